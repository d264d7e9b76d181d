"""What a search returns: the ranked candidates, today's splits priced beside the best, and what
was proven."""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.evaluate import Config, Evaluation
from planner.solve.baselines import Baseline
from planner.solve.exact import InnerResult


@dataclass
class Candidate:
    config: Config
    inner: InnerResult

    @property
    def evaluation(self) -> Evaluation:
        return self.inner.payload  # type: ignore[return-value]

    @property
    def throughput(self) -> float:
        return self.config.global_batch / self.inner.step_time_s if self.inner.segments else 0.0


@dataclass
class SolveResult:
    best: Candidate
    ranked: list[Candidate]
    baselines: list[Baseline]
    proven: bool
    configs_total: int
    configs_solved: int
    elapsed_s: float
    notes: list[str] = field(default_factory=list)
    # with --fix-cuts: whether the micro-batching, schedule and recomputation are proven best for
    # the user's split (``proven`` is then False: the split itself was not searched); else None
    proven_for_fixed_cuts: bool | None = None
