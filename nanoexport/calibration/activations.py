"""Activation capture on ONNX Runtime: what each linear layer's input looks like on calibration data.

The graph itself is run (no second PyTorch code path), with the layers' inputs added as outputs. Layers are
taken in groups whose statistics fit a memory budget; each group's statistics are handed to the caller
and dropped before the next group is captured, so memory stays bounded however large the model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from nanoexport.calibration.graph import Linear
from nanoexport.runtime import cpu_session

log = logging.getLogger(__name__)

STATISTICS_BUDGET = 1 << 30  # bytes of statistics held at once


@dataclass
class InputStatistics:
    """One layer's input ``x`` ``[tokens, K]`` summarized: GPTQ's ``H = 2 x^T x / tokens`` and mean ``|x|`` per
    channel."""

    hessian: np.ndarray  # float64 [K, K]
    magnitude: np.ndarray  # [K], mean |x|
    tokens: int


class ModelSession:
    """An ONNX Runtime session on ``model`` with extra values exposed as outputs, fed whole windows."""

    def __init__(self, model: ir.Model, extra_outputs: list[ir.Value], graph_inputs: list[ir.Value] = ()):
        added_outputs = [value for value in extra_outputs if not value.is_graph_output()]
        added_inputs = [value for value in graph_inputs if value not in model.graph.inputs]
        model.graph.outputs.extend(added_outputs)
        moved = {}
        for value in added_inputs:
            moved[value.name] = model.graph.initializers.pop(value.name)
            model.graph.inputs.append(value)
        try:
            self.session = cpu_session(model)
        finally:
            for value in added_outputs:
                model.graph.outputs.remove(value)
            for value in added_inputs:
                model.graph.inputs.remove(value)
                model.graph.register_initializer(moved[value.name])
        self.cache_inputs = cache_inputs(model)

    def run(self, tokens: np.ndarray, names: list[str], extra_feeds: dict[str, np.ndarray] | None = None):
        """Outputs ``names`` for one window ``tokens`` (1-D), fed after an empty growing cache."""
        return self.session.run(names, {**window_feeds(self.cache_inputs, tokens), **(extra_feeds or {})})


def cache_inputs(model: ir.Model) -> list[tuple[str, int, int]]:
    """Each past-KV input's name, heads and head size."""
    return [(value.name, value.shape[1], value.shape[3]) for value in model.graph.inputs
            if value.name.startswith("past_key_values.")]


def window_feeds(caches: list[tuple[str, int, int]], tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The graph inputs for one window ``tokens`` (1-D) after an empty growing cache (``caches`` from
    ``cache_inputs``)."""
    length = len(tokens)
    feeds = {
        "input_ids": tokens[None].astype(np.int64),
        "attention_mask": np.ones((1, length), np.int64),
        "position_ids": np.arange(length, dtype=np.int64)[None],
    }
    for name, heads, head_dim in caches:
        feeds[name] = np.zeros((1, heads, 0, head_dim), np.float32)
    return feeds


def statistics_size(linear: Linear) -> int:
    rows = linear.shape[0]
    return rows * rows * 8


def layer_groups(linears: list[Linear], budget: int = STATISTICS_BUDGET) -> list[list[Linear]]:
    """Consecutive linears grouped so that one group's statistics fit ``budget`` (at least one per group).

    Linears reading the same input share one set of statistics and stay in one group.
    """
    groups: list[list[Linear]] = []
    used = budget
    seen_inputs: set[int] = set()
    for linear in linears:
        size = 0 if id(linear.input) in seen_inputs else statistics_size(linear)
        if used + size > budget and size:
            groups.append([])
            used = 0
            seen_inputs = set()
        groups[-1].append(linear)
        used += size
        seen_inputs.add(id(linear.input))
    return groups


class StatisticsAccumulator:
    """Sums what ``InputStatistics`` holds over the windows of one group of layers, then hands it over."""

    def __init__(self):
        self.gram: dict[str, np.ndarray] = {}
        self.magnitude: dict[str, np.ndarray] = {}

    def add(self, names: list[str], inputs: list[np.ndarray]) -> None:
        """One window's inputs ``[..., K]`` of the layers reading ``names``."""
        for name, x in zip(names, inputs, strict=True):
            x = x.reshape(-1, x.shape[-1])
            wide = x.astype(np.float64)
            if name not in self.gram:
                self.gram[name] = np.zeros((wide.shape[1],) * 2)
                self.magnitude[name] = np.zeros(wide.shape[1])
            # In place: a new sum per window held the [K, K] float64 Gram matrix three times over (189 MB each
            # for Qwen2.5-0.5B's down_proj input), the largest transient of a capture.
            self.gram[name] += wide.T @ wide
            self.magnitude[name] += np.abs(wide).sum(0)

    def collect(self, tokens: int) -> dict[str, InputStatistics]:
        """The statistics over ``tokens`` tokens, by input name; the accumulator starts over."""
        statistics = {}
        for name, gram in self.gram.items():
            # The Hessian made of the Gram matrix in place (the values of ``2.0 * gram / tokens``): one [K, K]
            # matrix per input, not two.
            gram *= 2.0
            gram /= tokens
            statistics[name] = InputStatistics(gram, (self.magnitude[name] / tokens).astype(np.float32), tokens)
        self.gram, self.magnitude = {}, {}
        return statistics


def capture_groups(
    model: ir.Model, linears: list[Linear], windows: np.ndarray,
) -> Iterator[tuple[list[Linear], dict[str, InputStatistics]]]:
    """For each group of ``linears``: the group and its layers' input statistics over ``windows``, all from
    one session on the whole float graph (``layerwise.capture_layers`` is the one that streams).

    Statistics are keyed by the input value's name (layers reading one input share them).
    """
    session = ModelSession(model, [linear.input for linear in linears])
    accumulator = StatisticsAccumulator()
    for group in layer_groups(linears):
        names = sorted({linear.input.name for linear in group})
        for window in windows:
            accumulator.add(names, session.run(window, names))
        tokens = len(windows) * windows.shape[1]
        log.info("captured inputs of %d layers over %d tokens", len(group), tokens)
        yield group, accumulator.collect(tokens)
