"""Locate real binaries (promtool, prometheus, amtool, ...): under CI a missing one fails."""

from __future__ import annotations

import os
import shutil

import pytest


def find_binary(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is required under CI but is not installed (see .ci/run)")
    pytest.skip(f"{name} not installed (install Debian's prometheus packages)")
    raise AssertionError("unreachable")
