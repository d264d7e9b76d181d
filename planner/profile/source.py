"""Where the layers that are measured come from.

``InMemory``: a model built for real and moved to the device; each layer runs on the inputs it
receives in the real model. ``OnMeta``: a model built on the meta device; a run on meta tensors
gives each layer's input shapes and dtypes, and each layer is made real on the device only while
it is measured, on inputs of those shapes, then freed.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._pytree import tree_map

from planner.model import user_code
from planner.profile.meta import materialise, real_like, to_meta
from planner.split import INPUT, LayeredModel, keep_ties, layered

__all__ = ["Source", "InMemory", "OnMeta"]


class Source:
    """The model cut into layers, and the way a layer and its inputs are had for a measurement."""

    lm: LayeredModel
    stages: list[nn.Module]  # one-layer stages, real or meta
    device: torch.device
    materialises = False  # whether a layer is made real for its measurement (and may not fit)

    def flow(self, inputs: tuple, where: str) -> list:
        """What enters each layer, then the model's output (real or meta)."""
        return self.lm.layer_inputs(self.shaped(inputs), self.stages, where=where)

    def shaped(self, inputs: tuple) -> tuple:
        return inputs

    def inputs_of(self, flow: list, i: int, inputs: tuple, gen: torch.Generator) -> tuple:
        """Real inputs of layer ``i`` on the device; ``inputs`` is the batch."""
        return tuple(flow[i])

    def output_of(self, flow: list, gen: torch.Generator):
        """The model's output, real, for the loss."""
        return flow[-1]

    @contextmanager
    def module(self, a: int, b: int) -> Iterator[nn.Module]:
        """Layers [a, b) as one stage on the device, for as long as the block runs."""
        yield self.stages[a] if b == a + 1 else self.lm.stage(a, b)


class InMemory(Source):
    def __init__(self, model: nn.Module, first_inputs: tuple, layers: list[str] | None, depth: int | None,
                 device: torch.device, trace: str = "auto"):
        self.lm = layered(model, first_inputs, layers, depth, trace)
        self.stages = [self.lm.stage(i, i + 1) for i in range(self.lm.n_layers)]
        self.device = device


class OnMeta(Source):
    materialises = True

    def __init__(self, model: nn.Module, first_inputs: tuple, layers: list[str] | None, depth: int | None,
                 device: torch.device, dtype: torch.dtype, trace: str = "auto"):
        # The factory's model stays as it was. Tensors it made real (a table built on the CPU
        # explicitly, say) go to meta too, so that the meta run does not mix devices; measured
        # layers get fresh values for them, which timing does not depend on.
        meta = keep_ties(copy.deepcopy(model), lambda m: m.to(dtype=dtype).to("meta"))
        self.lm = layered(meta, to_meta(first_inputs), layers, depth, trace)
        self.stages = [self.lm.stage(i, i + 1) for i in range(self.lm.n_layers)]
        self.device, self.dtype = device, dtype

    def shaped(self, inputs: tuple) -> tuple:
        return to_meta(inputs)

    def inputs_of(self, flow: list, i: int, inputs: tuple, gen: torch.Generator) -> tuple:
        # The batch's own tensors where the layer takes a model input (token ids must be valid),
        # made-up ones of the meta run's shapes and dtypes elsewhere.
        keys = self.lm.crossing(i)
        return tuple(inputs[t.index] if t.producer == INPUT else real_like(v, self.device, gen)
                     for t, v in zip(keys, flow[i], strict=True))

    def output_of(self, flow: list, gen: torch.Generator):
        return tree_map(lambda v: real_like(v, self.device, gen), flow[-1])

    @contextmanager
    def module(self, a: int, b: int) -> Iterator[nn.Module]:
        stage = self.stages[a] if b == a + 1 else self.lm.stage(a, b)
        name = self.lm.names[a] if b == a + 1 else f"{self.lm.names[a]}..{self.lm.names[b - 1]}"
        with user_code(f"layer {name}, made real on {self.device}"):
            real = materialise(stage, self.device, self.dtype, name)
        try:
            yield real
        finally:
            del real
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
