"""The layer graph of a profile: layers in topological order and the tensors between them.

A *cut* ``k`` (1 <= k < L) separates layers ``[0, k)`` from ``[k, L)``. Every tensor produced
before a cut and consumed at or after it crosses that cut, so a skip connection from layer 2 to
layer 9 crosses cuts 3..9 and is paid for at each of them (the engine passes it through the stages
in between).

Plain Python on purpose: a profile lists its layers in topological order (the format checks it),
so the only graph questions the cost model asks, which tensors cross each cut and what each layer
reads, are answered by one pass over the tensors; a general graph library would add a dependency
and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.formats import INPUT, LOSS, Profile


@dataclass(frozen=True)
class Tensor:
    """One distinct tensor: produced by layer ``producer`` (-1 for the input batch), last consumed
    by layer ``last_consumer`` (L for the loss)."""

    producer: int
    index: int
    bytes_per_sample: int
    consumers: tuple[int, ...]
    saved: bool  # kept for backward by its producer or a consumer

    @property
    def last_consumer(self) -> int:
        return max(self.consumers)


class LayerGraph:
    """Layers, tensors and cut sizes of a profile."""

    def __init__(self, profile: Profile):
        self.edges = profile.edges
        self.names = [layer.name for layer in profile.layers]
        self.index = {name: i for i, name in enumerate(self.names)}
        n = len(self.names)
        self.n_layers = n

        position = dict(self.index) | {INPUT: -1, LOSS: n}
        grouped: dict[tuple[int, int], dict] = {}
        for e in profile.edges:
            key = (position[e.src], e.tensor)
            entry = grouped.setdefault(key, {"bytes": e.bytes_per_sample, "consumers": [], "saved": False})
            entry["bytes"] = max(entry["bytes"], e.bytes_per_sample)
            entry["consumers"].append(position[e.dst])
            entry["saved"] = entry["saved"] or e.saved
        self.tensors = [
            Tensor(producer=p, index=t, bytes_per_sample=v["bytes"],
                   consumers=tuple(sorted(set(v["consumers"]))), saved=v["saved"])
            for (p, t), v in sorted(grouped.items())
        ]

    def cut_bytes_per_sample(self) -> list[int]:
        """Bytes per sample crossing each cut; entries 0 and L are 0 (the batch and the loss are
        local to the first and last stage)."""
        n = self.n_layers
        diff = [0] * (n + 2)
        for t in self.tensors:
            lo = max(t.producer + 1, 1)
            hi = min(t.last_consumer, n - 1)
            if lo <= hi:
                diff[lo] += t.bytes_per_sample
                diff[hi + 1] -= t.bytes_per_sample
        out, run = [], 0
        for k in range(n + 1):
            run += diff[k]
            out.append(run if 0 < k < n else 0)
        return out

    def input_bytes_per_sample(self) -> list[int]:
        """Bytes per sample of the distinct tensors each layer consumes (what a checkpoint keeps)."""
        out = [0] * self.n_layers
        for t in self.tensors:
            for c in t.consumers:
                if c < self.n_layers:
                    out[c] += t.bytes_per_sample
        return out
