"""Servers for tests, bound to 127.0.0.1 on a free port: `mlflow server` (one worker, no job runners), and any
command that serves HTTP until it is stopped (`mlflow models serve`, `cocosnet app`)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(command: Sequence[str], ready_url: str, log_path: Path, env: dict[str, str] | None = None,
                   timeout: float = 120) -> Iterator[subprocess.Popen]:
    """Run `command` until the block ends, once `ready_url` answers 200. Its output goes to log_path; the whole
    process group is stopped at the end (servers that start workers of their own)."""
    with open(log_path, "w") as log:
        server = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(ready_url, timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{' '.join(command)[:160]} did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield server
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


@contextlib.contextmanager
def mlflow_server(folder: Path, *store_args: str, timeout: float = 120) -> Iterator[str]:
    """Run `mlflow server <store_args>` until the block ends; -> its base URL. Its log is folder/server.log."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               *store_args]
    no_jobs = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with running_server(command, f"{base}/health", folder / "server.log", no_jobs, timeout):
        yield base
