"""Timeline pictures of a simulated step: one row per rank, forward / backward / weight-gradient
boxes coloured, idle time left blank so bubbles show at a glance. Given the stage costs, each box
ends in a darker tail as long as the tensor-parallel collectives inside it, and a purple one for
ZeRO's per-micro-batch collectives: the cost model prices them serial with the compute, so their
share of the box is their share of its time (where inside the box they run is not modelled).

The picture is laid out once as boxes and labels; SVG, HTML and PNG only render that layout.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from planner.errors import InputError
from planner.formats import StageCost, write_atomic
from planner.schedules import Kind, Schedule
from planner.simulate import Event, SimResult, collective_seconds

COLORS = dict(zip(Kind, ("#4C78A8", "#54A24B", "#88D27A", "#F58518"), strict=True))
NAMES = dict(zip(Kind, ("forward", "backward", "backward (input grad)", "backward (weight grad)"), strict=True))
LATER_CHUNK = dict(zip(Kind, ("#9ECAE9", "#A1D99B", "#C7E9C0", "#FDD0A2"), strict=True))  # chunks after the first

DP_FILL = "#B279A2"  # data-parallel collectives: the step's all-reduce, ZeRO's per micro-batch
MIN_TAIL_PX = 1.0  # a narrower tail would still paint a whole pixel, overstating its share
TP_LEGEND = "tensor-parallel collectives (darker tail)"
ZERO_LEGEND = "ZeRO collectives (tail)"

WIDTH, LEFT, RIGHT, TOP, ROW, GAP, BOTTOM = 1200, 80, 20, 56, 26, 6, 64


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float
    fill: str
    label: str
    tip: str
    stroke: str | None = "white"


@dataclass(frozen=True)
class Text:
    x: float
    y: float
    text: str
    size: int = 12
    anchor: str = "start"  # start | middle | end


@dataclass(frozen=True)
class Layout:
    width: int
    height: int
    boxes: list[Box]
    texts: list[Text]
    lines: list[tuple[float, float, float, float]]


def layout(schedule: Schedule, sim: SimResult, title: str, costs: Sequence[StageCost] | None = None) -> Layout:
    """The picture as boxes and labels; ``costs`` (the stages' own, as simulated) add the
    collectives' tails."""
    pp = schedule.pp
    step = sim.step_time_s or 1.0
    span = WIDTH - LEFT - RIGHT
    scale = span / step
    height = TOP + pp * (ROW + GAP) + BOTTOM
    boxes: list[Box] = []
    texts: list[Text] = []
    lines: list[tuple[float, float, float, float]] = []
    texts.append(Text(LEFT, 22, title, 15))
    texts.append(Text(LEFT, 42, f"{schedule.name}   step {_ms(step)}   bubble {sim.bubble_fraction:.1%}   "
                               f"{schedule.microbatches} micro-batches", 12))
    for r in range(pp):
        y = TOP + r * (ROW + GAP)
        boxes.append(Box(LEFT, y, span, ROW, "#F2F2F2", "", f"rank {r}: idle"))
        texts.append(Text(LEFT - 8, y + ROW / 2 + 4, f"rank {r}", 12, "end"))
    first_chunk = {s: s < schedule.pp for s in range(schedule.n_stages)}
    tails: list[Box] = []
    for e in sim.events:
        a = e.action
        y = TOP + e.rank * (ROW + GAP)
        w = max((e.end_s - e.start_s) * scale, 0.5)
        fill = (COLORS if first_chunk[a.stage] else LATER_CHUNK)[a.kind]
        label = str(a.mb) if w >= 14 else ""
        tip = f"rank {e.rank} stage {a.stage} {NAMES[a.kind]} micro-batch {a.mb}: " \
              f"{_ms(e.start_s)} - {_ms(e.end_s)}"
        boxes.append(Box(LEFT + e.start_s * scale, y, w, ROW, fill, label, tip))
        if costs is not None:
            tails += comm_tails(e, costs[a.stage], scale, fill)
    boxes += [b for b in tails if b.w >= MIN_TAIL_PX]
    for r in range(pp):  # gradient all-reduce and optimizer step after the last action
        tail = sim.tail_s[r]
        if tail > 0:
            y = TOP + r * (ROW + GAP)
            x0 = LEFT + (step - tail) * scale
            boxes.append(Box(x0, y + ROW * 0.3, tail * scale, ROW * 0.4, DP_FILL, "",
                             f"rank {r}: all-reduce and optimizer {_ms(tail)}"))
    axis_y = TOP + pp * (ROW + GAP) + 4
    lines.append((LEFT, axis_y, LEFT + span, axis_y))
    for k in range(6):
        t = step * k / 5
        x = LEFT + t * scale
        lines.append((x, axis_y, x, axis_y + 5))
        texts.append(Text(x, axis_y + 18, _ms(t), 11, "middle"))
    legend_y = axis_y + 42
    for box, text in _legend(_legend_entries(schedule, sim, tails), legend_y):
        boxes.append(box)
        texts.append(text)
    height = max(height, int(max(t.y for t in texts) + BOTTOM - 46))  # a legend of several lines
    return Layout(WIDTH, height, boxes, texts, lines)


def _legend_entries(schedule: Schedule, sim: SimResult, tails: list[Box]) -> list[tuple[str, str]]:
    """(colour, text) for what the picture shows, and for collectives too short to draw."""
    present = {a.kind for acts in schedule.ranks for a in acts}
    out = [(COLORS[k], NAMES[k]) for k in Kind if k in present]  # zb-auto may keep whole backwards
    if any(t > 0 for t in sim.tail_s):
        out.append((DP_FILL, "all-reduce and optimizer step"))
    for what, fill, text in (("tensor-parallel", darker(COLORS[Kind.FORWARD]), TP_LEGEND),
                             ("ZeRO", DP_FILL, ZERO_LEGEND)):
        widths = [b.w for b in tails if f": {what} collectives" in b.tip]
        if any(w >= MIN_TAIL_PX for w in widths):
            out.append((fill, text))
        elif widths:
            out.append((fill, f"{what} collectives: under a pixel a box at this scale, not drawn"))
    if schedule.n_stages > schedule.pp:
        out.append((LATER_CHUNK[Kind.FORWARD], "lighter shade: the rank's later model chunk (virtual stage)"))
    return out


def _legend(entries: list[tuple[str, str]], y: float) -> list[tuple[Box, Text]]:
    """The legend's swatches and texts, left to right, onto a new line where one would not fit."""
    out = []
    x = LEFT
    for fill, text in entries:
        w = 30 + 7 * len(text)
        if x > LEFT and x + w > WIDTH - RIGHT:
            x, y = LEFT, y + 18
        out.append((Box(x, y - 10, 12, 12, fill, "", text), Text(x + 16, y, text, 11)))
        x += w
    return out


def comm_tails(e: Event, cost: StageCost, scale: float, fill: str) -> list[Box]:
    """The tails of one action's box: its tensor-parallel collectives (the box's colour, darker),
    then ZeRO's (purple), each ``scale`` pixels a second, ending where the box ends."""
    a = e.action
    out: list[Box] = []
    x = LEFT + e.end_s * scale
    for what, comm, colour in (("ZeRO", cost.zero_comm, DP_FILL), ("tensor-parallel", cost.tp_comm, darker(fill))):
        seconds = min(collective_seconds(comm)[a.kind.slot], e.end_s - e.start_s)
        if seconds <= 0:
            continue
        x -= seconds * scale
        # no "micro-batch" in the tip: one box per action carries that word
        tip = (f"rank {e.rank} stage {a.stage} {NAMES[a.kind]} mb {a.mb}: {what} collectives "
               f"{_ms(seconds)} of {_ms(e.end_s - e.start_s)}")
        out.append(Box(x, TOP + e.rank * (ROW + GAP), seconds * scale, ROW, colour, "", tip, None))
    return out


def darker(colour: str, keep: float = 0.55) -> str:
    """'#RRGGBB' with each channel scaled by ``keep``."""
    r, g, b = (int(colour[k:k + 2], 16) for k in (1, 3, 5))
    return "#" + "".join(f"{int(c * keep):02X}" for c in (r, g, b))


def _ms(seconds: float) -> str:
    if seconds == 0:
        return "0"  # the axis origin, in whatever unit the other ticks use
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def to_svg(lay: Layout) -> str:
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{lay.width}" height="{lay.height}" '
           f'viewBox="0 0 {lay.width} {lay.height}" font-family="Helvetica, Arial, sans-serif">',
           f'<rect width="{lay.width}" height="{lay.height}" fill="white"/>']
    for b in lay.boxes:
        stroke = f' stroke="{b.stroke}" stroke-width="0.5"' if b.stroke else ""
        out.append(f'<rect x="{b.x:.2f}" y="{b.y:.2f}" width="{b.w:.2f}" height="{b.h:.2f}" '
                   f'fill="{b.fill}"{stroke}>'
                   f'<title>{html.escape(b.tip)}</title></rect>')
        if b.label:
            out.append(f'<text x="{b.x + b.w / 2:.2f}" y="{b.y + b.h / 2 + 4:.2f}" font-size="10" '
                       f'text-anchor="middle" fill="white">{html.escape(b.label)}</text>')
    for x1, y1, x2, y2 in lay.lines:
        out.append(f'<line x1="{x1:.2f}" y1="{y1:.2f}" x2="{x2:.2f}" y2="{y2:.2f}" stroke="#444"/>')
    for t in lay.texts:
        out.append(f'<text x="{t.x:.2f}" y="{t.y:.2f}" font-size="{t.size}" '
                   f'text-anchor="{t.anchor}">{html.escape(t.text)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def to_html(lay: Layout, title: str) -> str:
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "</head><body style='margin:16px'>\n" + to_svg(lay) +
            "<p style='font-family:sans-serif;font-size:12px'>Hover a box for its stage, "
            "micro-batch and times.</p></body></html>\n")


def to_png(lay: Layout, path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (lay.width, lay.height), "white")
    draw = ImageDraw.Draw(img)
    fonts: dict[int, object] = {}

    def font(size: int):
        if size not in fonts:
            try:
                fonts[size] = ImageFont.load_default(size=size)
            except TypeError:  # Pillow < 10.1 has one bitmap size
                fonts[size] = ImageFont.load_default()
        return fonts[size]

    for b in lay.boxes:
        draw.rectangle([b.x, b.y, b.x + b.w, b.y + b.h], fill=b.fill, outline=b.stroke)
        if b.label:
            draw.text((b.x + b.w / 2, b.y + b.h / 2), b.label, fill="white", font=font(10), anchor="mm")
    for x1, y1, x2, y2 in lay.lines:
        draw.line([x1, y1, x2, y2], fill="#444444")
    for t in lay.texts:
        anchor = {"start": "ls", "middle": "ms", "end": "rs"}[t.anchor]
        draw.text((t.x, t.y), t.text, fill="black", font=font(t.size), anchor=anchor)
    png = io.BytesIO()
    img.save(png, format="PNG")
    write_atomic(path, png.getvalue())


def write(path: str | Path, schedule: Schedule, sim: SimResult, title: str,
          costs: Sequence[StageCost] | None = None) -> Path:
    """Draw the timeline to ``path``; the format follows the suffix (.png, .svg, .html); ``costs``
    as for ``layout``."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".png", ".svg", ".html", ".htm"):
        raise InputError(f"{p}: timeline format must be .png, .svg or .html")
    if not (p.parent if str(p.parent) else Path(".")).is_dir():
        raise InputError(f"{p}: folder {p.parent} does not exist")
    lay = layout(schedule, sim, title, costs)
    if suffix == ".png":
        to_png(lay, p)
    elif suffix == ".svg":
        write_atomic(p, to_svg(lay))
    else:
        write_atomic(p, to_html(lay, title))
    return p
