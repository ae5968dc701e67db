"""One-line renderings of exceptions, for the commands' ``error: ...`` messages (exit code 2)."""

from __future__ import annotations

__all__ = ["first_line", "one_line"]


def first_line(err: BaseException) -> str:
    """The first line of the message (libraries often append a traceback-like tail); the type if empty."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def one_line(err: BaseException) -> str:
    """The whole message with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(str(err).split())
