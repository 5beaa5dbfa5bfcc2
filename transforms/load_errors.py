"""How the CT readers refuse an input: one error type whose message names the input and the fix."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CTLoadError", "fail", "first_line", "last_line", "check_readable"]


class CTLoadError(ValueError):
    """Raised for an input that is not a loadable CT volume (message: input and what to do)."""


def fail(path, what: str, fix: str) -> CTLoadError:
    return CTLoadError(f"{path}: {what}; {fix}")


def first_line(e: BaseException, limit: int = 100) -> str:
    """``Type: first line of the message`` (just the type when the message is empty, e.g. MemoryError)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


def last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1][:100] if lines else type(e).__name__


def check_readable(path: Path) -> None:
    """Refuses a path this process may not read, naming the permission."""
    need = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if not os.access(path, need):
        raise fail(path, "no permission to read it", "fix its permissions (e.g. chmod -R a+rX) or run as a user who may read it")
