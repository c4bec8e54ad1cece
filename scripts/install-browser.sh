#!/usr/bin/env bash
# Headless Chromium + chromedriver for the browser tests (tests/test_mlflow_ui.py, tests/test_app.py), from Debian/Ubuntu
# packages. Needs root (or sudo); does nothing when both are already on PATH.
set -euo pipefail
if command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
    exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
echo "install-browser: $(chromium --version 2>/dev/null | tail -1)"
