"""Plain-text formatting of bytes, seconds and layer spans: no rich, no torch, so the solver,
``planner check`` and the launcher can word their messages without the table library."""

from __future__ import annotations

import re


def fmt_bytes(n: float) -> str:
    n = float(n)
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def layer_span(layers: list[str]) -> str:
    """'transformer.h.5 .. h.10 (6)': the first and last layer, the last without the dotted
    prefix it shares with the first (bar the name of an index), and how many."""
    if len(layers) == 1:
        return layers[0]
    first, last = layers[0].split("."), layers[-1].split(".")
    same = 0
    while same < min(len(first), len(last)) - 1 and first[same] == last[same]:
        same += 1
    if same and last[same].isdigit():  # 'h.10', not a bare '10'
        same -= 1
    return f"{layers[0]} .. {'.'.join(last[same:])} ({len(layers)})"


def ascii_whole(text: str) -> int | None:
    """``text`` as a whole number if it is written with the digits 0-9 (an optional sign first),
    else None. ``int()`` alone also takes other scripts' digits ('２', '٣'), underscores and spaces."""
    return int(text) if re.fullmatch(r"[+-]?[0-9]+", text) else None


def foreign_digits(text: str) -> bool:
    """Whether ``text`` holds a digit other than 0-9 (a full-width '２', an Arabic-Indic '٣', a '²')."""
    return any(ch.isdigit() and not ch.isascii() for ch in text)


__all__ = ["ascii_whole", "fmt_bytes", "fmt_time", "foreign_digits", "layer_span"]
