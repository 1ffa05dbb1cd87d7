"""Text for messages: names from a file made printable, byte counts made readable."""

from __future__ import annotations


def printable(text: str) -> str:
    """Names and messages from a file are shown escaped: no terminal control sequences from a checkpoint."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fmt_bytes(n: float | None) -> str:
    """A byte count in decimal units: 512 B, 1.5 kB, 3.2 MB, 1.1 GB ('-' for None)."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)
