"""What each distributed worker writes to ``<run-dir>/rank<R>.json``: what it measured, or why it
failed. The worker writes it, the launcher and ``execute`` read it; both sides use this model, so a
misspelt field fails where it is written. Torch-free."""

from __future__ import annotations

import traceback
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["Failure", "Measured", "WorkerReport", "error_text", "read_report"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Measured(_Model):
    """A worker that ran every step."""

    step_times_s: list[float]  # the measured steps, after the warm-up
    max_rss_bytes: int
    cpu_live_peak_bytes: int | None = None  # CPU: live tensor bytes over two steps, parameters included
    peak_allocated_bytes: int | None = None  # CUDA allocator statistics
    peak_reserved_bytes: int | None = None
    # the first step against the single-process reference (None: not verified)
    loss: float | None = None  # only the rank of the last stage computes it
    reference_loss: float | None = None  # float64, the same micro-batches
    loss_tolerance: float | None = None
    loss_message: str = ""  # empty: the loss matched
    max_grad_error: float | None = None
    grad_ratio: float | None = None  # the largest difference / tolerance of this rank's gradients
    grad_detail: str = ""  # the largest difference, its parameter and tolerance (or the mismatch)
    grad_message: str = ""  # empty: every gradient of this rank matched
    reference_note: str = ""  # how the reference ran (float64, Dropout modules off, ...)


class Failure(_Model):
    """A worker that raised."""

    error: str  # the exception's type name
    message: str  # error_text of it: never empty
    oom: bool = False
    traceback: str = ""
    peak_before_failure_bytes: int | None = None  # CUDA allocated


class WorkerReport(_Model):
    rank: int
    pp_rank: int
    dp_rank: int
    stages: list[int]
    tp_rank: int = 0
    device: str = ""
    measured: Measured | None = None
    failure: Failure | None = None

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str) -> WorkerReport:
        return cls.model_validate_json(text)


def coordinates(rank: int, dp: int, tp: int) -> tuple[int, int, int]:
    """Global rank -> (pipeline rank, replica, tensor-parallel rank): rank = (pp * dp + d) * tp + t,
    the plan's placement (a replica of a stage owns tp consecutive devices)."""
    replica, tp_rank = divmod(rank, tp)
    pp_rank, dp_rank = divmod(replica, dp)
    return pp_rank, dp_rank, tp_rank


def world_size(plan) -> int:
    """Workers of a distributed run: one per device of the plan."""
    return plan.parallel.pp * plan.parallel.dp * plan.parallel.tp


def read_report(path: Path) -> WorkerReport | None:
    """The report in ``path``; None if it cannot be read or is not a report."""
    try:
        return WorkerReport.from_json(path.read_text())
    except (OSError, ValidationError):
        return None


def error_text(e: BaseException) -> str:
    """One line that says what went wrong: the exception's first non-empty line, else where it
    was raised (some engine errors carry no message, or start with a newline). The engine re-raises
    a stage's error under a header and a dump of shapes: the innermost cause says what happened."""
    while e.__cause__ is not None:
        e = e.__cause__
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        f = frames[-1]
        return f"raised without a message at {Path(f.filename).name}:{f.lineno} ({f.name})"
    return "raised without a message"
