"""Timeline pictures of a simulated step: one row per rank, forward / backward / weight-gradient
boxes coloured, idle time left blank so bubbles show at a glance.

The picture is laid out once as boxes and labels; SVG, HTML and PNG only render that layout.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass
from pathlib import Path

from planner.errors import InputError
from planner.formats import write_atomic
from planner.schedules import Kind, Schedule
from planner.simulate import SimResult

COLORS = dict(zip(Kind, ("#4C78A8", "#54A24B", "#88D27A", "#F58518"), strict=True))
NAMES = dict(zip(Kind, ("forward", "backward", "backward (input grad)", "backward (weight grad)"), strict=True))
LATER_CHUNK = dict(zip(Kind, ("#9ECAE9", "#A1D99B", "#C7E9C0", "#FDD0A2"), strict=True))  # chunks after the first

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


def layout(schedule: Schedule, sim: SimResult, title: str) -> Layout:
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
    for e in sim.events:
        a = e.action
        y = TOP + e.rank * (ROW + GAP)
        w = max((e.end_s - e.start_s) * scale, 0.5)
        fill = (COLORS if first_chunk[a.stage] else LATER_CHUNK)[a.kind]
        label = str(a.mb) if w >= 14 else ""
        tip = f"rank {e.rank} stage {a.stage} {NAMES[a.kind]} micro-batch {a.mb}: " \
              f"{_ms(e.start_s)} - {_ms(e.end_s)}"
        boxes.append(Box(LEFT + e.start_s * scale, y, w, ROW, fill, label, tip))
    for r in range(pp):  # gradient all-reduce and optimizer step after the last action
        tail = sim.tail_s[r]
        if tail > 0:
            y = TOP + r * (ROW + GAP)
            x0 = LEFT + (step - tail) * scale
            boxes.append(Box(x0, y + ROW * 0.3, tail * scale, ROW * 0.4, "#B279A2", "",
                             f"rank {r}: all-reduce and optimizer {_ms(tail)}"))
    axis_y = TOP + pp * (ROW + GAP) + 4
    lines.append((LEFT, axis_y, LEFT + span, axis_y))
    for k in range(6):
        t = step * k / 5
        x = LEFT + t * scale
        lines.append((x, axis_y, x, axis_y + 5))
        texts.append(Text(x, axis_y + 18, _ms(t), 11, "middle"))
    legend_y = axis_y + 42
    x = LEFT
    present = {a.kind for acts in schedule.ranks for a in acts}
    kinds = [k for k in Kind if k in present]  # zb-auto may keep whole backwards
    for kind in kinds:
        boxes.append(Box(x, legend_y - 10, 12, 12, COLORS[kind], "", NAMES[kind]))
        texts.append(Text(x + 16, legend_y, NAMES[kind], 11))
        x += 30 + 7 * len(NAMES[kind])
    if any(t > 0 for t in sim.tail_s):
        boxes.append(Box(x, legend_y - 10, 12, 12, "#B279A2", "", "all-reduce and optimizer"))
        texts.append(Text(x + 16, legend_y, "all-reduce and optimizer step", 11))
        x += 30 + 7 * len("all-reduce and optimizer step")
    if schedule.n_stages > schedule.pp:
        boxes.append(Box(x, legend_y - 10, 12, 12, LATER_CHUNK[Kind.FORWARD], "", "second chunk"))
        texts.append(Text(x + 16, legend_y, "lighter shade: the rank's later model chunk (virtual stage)", 11))
    return Layout(WIDTH, height, boxes, texts, lines)


def _ms(seconds: float) -> str:
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
        out.append(f'<rect x="{b.x:.2f}" y="{b.y:.2f}" width="{b.w:.2f}" height="{b.h:.2f}" '
                   f'fill="{b.fill}" stroke="white" stroke-width="0.5">'
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
        draw.rectangle([b.x, b.y, b.x + b.w, b.y + b.h], fill=b.fill, outline="white")
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


def write(path: str | Path, schedule: Schedule, sim: SimResult, title: str) -> Path:
    """Draw the timeline to ``path``; the format follows the suffix (.png, .svg, .html)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".png", ".svg", ".html", ".htm"):
        raise InputError(f"{p}: timeline format must be .png, .svg or .html")
    if not (p.parent if str(p.parent) else Path(".")).is_dir():
        raise InputError(f"{p}: folder {p.parent} does not exist")
    lay = layout(schedule, sim, title)
    if suffix == ".png":
        to_png(lay, p)
    elif suffix == ".svg":
        write_atomic(p, to_svg(lay))
    else:
        write_atomic(p, to_html(lay, title))
    return p
