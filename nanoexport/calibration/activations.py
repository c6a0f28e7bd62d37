"""Activation capture on ONNX Runtime: what each linear layer's input looks like on calibration data.

The graph itself is run (no second PyTorch code path), with the layers' inputs added as outputs. Layers are
taken in groups whose statistics fit a memory budget; each group's statistics are handed to the caller
and dropped before the next group is captured, so memory stays bounded however large the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from nanoexport.calibration.graph import Linear
from nanoexport.runtime import cpu_session

log = logging.getLogger(__name__)

STATISTICS_BUDGET = 1 << 30  # bytes of statistics held at once


@dataclass
class InputStatistics:
    """One layer's input ``x`` ``[tokens, K]`` summarized: ``x^T x``, mean ``|x|`` per channel, sampled rows."""

    gram: np.ndarray  # float64 [K, K], summed over tokens
    magnitude: np.ndarray  # [K], mean |x|
    sample: np.ndarray  # [rows, K]
    tokens: int

    @property
    def hessian(self) -> np.ndarray:
        """GPTQ's ``H = 2 x^T x / tokens``."""
        return 2.0 * self.gram / self.tokens


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
        self.cache_inputs = [
            (value.name, value.shape[1], value.shape[3])
            for value in model.graph.inputs
            if value.name.startswith("past_key_values.")
        ]

    def run(self, tokens: np.ndarray, names: list[str], extra_feeds: dict[str, np.ndarray] | None = None):
        """Outputs ``names`` for one window ``tokens`` (1-D), fed after an empty growing cache."""
        length = len(tokens)
        feeds = {
            "input_ids": tokens[None].astype(np.int64),
            "attention_mask": np.ones((1, length), np.int64),
            "position_ids": np.arange(length, dtype=np.int64)[None],
        }
        for name, heads, head_dim in self.cache_inputs:
            feeds[name] = np.zeros((1, heads, 0, head_dim), np.float32)
        return self.session.run(names, {**feeds, **(extra_feeds or {})})


def statistics_size(linear: Linear, sample_rows: int) -> int:
    rows = linear.shape[0]
    return rows * rows * 8 + sample_rows * rows * 4


def layer_groups(linears: list[Linear], sample_rows: int, budget: int = STATISTICS_BUDGET) -> list[list[Linear]]:
    """Consecutive linears grouped so that one group's statistics fit ``budget`` (at least one per group).

    Linears reading the same input share one set of statistics and stay in one group.
    """
    groups: list[list[Linear]] = []
    used = budget
    seen_inputs: set[int] = set()
    for linear in linears:
        size = 0 if id(linear.input) in seen_inputs else statistics_size(linear, sample_rows)
        if used + size > budget and size:
            groups.append([])
            used = 0
            seen_inputs = set()
        groups[-1].append(linear)
        used += size
        seen_inputs.add(id(linear.input))
    return groups


def capture_groups(
    model: ir.Model, linears: list[Linear], windows: np.ndarray, sample_rows: int, seed: int,
    on_window: Callable[[], None] | None = None,
) -> Iterator[tuple[list[Linear], dict[str, InputStatistics]]]:
    """For each group of ``linears``: the group and its layers' input statistics over ``windows``.

    Statistics are keyed by the input value's name (layers reading one input share them).
    """
    session = ModelSession(model, [linear.input for linear in linears])
    generator = np.random.default_rng(seed)
    rows_per_window = max(1, sample_rows // len(windows))
    for group in layer_groups(linears, sample_rows):
        names = sorted({linear.input.name for linear in group})
        gram: dict[str, np.ndarray] = {}
        magnitude: dict[str, np.ndarray] = {}
        samples: dict[str, list[np.ndarray]] = {name: [] for name in names}
        tokens = 0
        for window in windows:
            for name, x in zip(names, session.run(window, names)):
                x = x.reshape(-1, x.shape[-1])
                wide = x.astype(np.float64)
                gram[name] = gram.get(name, 0.0) + wide.T @ wide
                magnitude[name] = magnitude.get(name, 0.0) + np.abs(wide).sum(0)
                picked = generator.choice(len(x), min(rows_per_window, len(x)), replace=False)
                samples[name].append(x[np.sort(picked)])
            tokens += windows.shape[1]
            if on_window is not None:
                on_window()
        statistics = {
            name: InputStatistics(gram[name], (magnitude[name] / tokens).astype(np.float32),
                                  np.concatenate(samples[name]), tokens)
            for name in names
        }
        log.info("captured inputs of %d layers over %d tokens", len(group), tokens)
        yield group, statistics
