"""The two ways bad input ends: a stage-stopping error, or a recorded skip of one file."""
from __future__ import annotations


class DataError(RuntimeError):
    """The dataset or its configuration cannot be used; the message names the file and the problem."""


class SkipSample(Exception):
    """One image cannot be used; the stage records `file` and `reason` and goes on."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file = str(file)
        self.reason = reason
