"""Targets: one package per backend, each declaring itself in one ``TARGET = Target(...)`` value.

The pipeline, the command line and validation read a target only through its ``Target``: the settings it
takes, the KV-cache forms it runs, the ONNX -> ONNX passes that lower the canonical graph towards it (run
by the pipeline's pass manager, so ``--verify-passes`` checks them), the writer of its files, and the
runner validation drives. A target package imports its runtime only inside the functions that need it, so
listing targets and building the command line cost no runtime import.

Adding a target: a package here that ends with ``TARGET = Target(...)``, and its line in ``TARGETS`` below.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from nanoexport.errors import NanoexportError

if TYPE_CHECKING:
    import numpy as np
    import onnx_ir as ir

    from nanoexport.artifact import Artifact
    from nanoexport.capture.checkpoint import Checkpoint
    from nanoexport.config import ExportConfig
    from nanoexport.digests import QuantizedWeight
    from nanoexport.interface import KvCache
    from nanoexport.passes import GraphPass, PassStats

# A target pass's largest logits change on a graph of fp16-scaled quantized weights: the demo's onnx target
# pass that puts its int4 layers in ONNX Runtime's kernels moved them by 7.8e-4 (3.8e-3 with an int8 head), each
# weight no longer rounded to fp16; a broken rewrite moves them by whole units.
QUANTIZED_WEIGHTS_TOLERANCE = 1e-2


class Runner(Protocol):
    """Runs an artifact one call at a time through the explicit KV-cache interface (validation drives it)."""

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class Build:
    """What a target's passes and writer are given: the settings, the source model, the resolved KV cache,
    the staging folder, and the pipeline's pass manager for passes run on graphs the writer derives (the
    prefill and decode specializations), so their statistics and verification are the pipeline's too."""

    config: ExportConfig
    checkpoint: Checkpoint
    cache: KvCache
    folder: Path
    verify: bool = False
    detail: Callable[[str], None] | None = None  # shows what the current step is doing (a pass, a tensor)
    stats: list[PassStats] = field(default_factory=list)
    # Seconds of the writer's own steps (a compiler's, say), kept in build.json, out of the hashed files.
    seconds: dict[str, float] = field(default_factory=dict)

    def run_passes(self, model: ir.Model, passes: list[GraphPass], graph: str = "") -> None:
        """Run ``passes`` on ``model`` as the pipeline does; their statistics are named ``graph: pass``.

        Verified against the canonical passes' tolerance, or, on a graph whose activations are quantized,
        against the KV-consistency threshold of quantized artifacts: there a float change in the last bit
        can move an activation by one whole quantization level (measured on the demo's W4A16 graph: 1.4e-3
        for rotary tables computed once instead of per call). Quantized weights with fp16 scales get
        ``QUANTIZED_WEIGHTS_TOLERANCE``: the canonical DequantizeLinear rounds each weight to fp16, a target's
        kernel multiplies the integer by the scale in fp32.
        """
        from nanoexport.passes import run_passes

        quant = self.config.quant
        tolerance = 1e-4
        if quant.weights not in ("none", "fp16") and quant.scale_dtype == "fp16":
            tolerance = QUANTIZED_WEIGHTS_TOLERANCE
        if quant.activations != "none":
            tolerance = self.config.validate.quantized_kv_max_abs
        fix = f"--verify-passes stops here; report the model (the {self.config.target} target needs this pass)"
        for stat in run_passes(model, passes, on_pass=self.detail, verify=self.verify, tolerance=tolerance,
                               fix=fix):
            stat.name = f"{graph}: {stat.name}" if graph else stat.name
            self.stats.append(stat)

    def save_onnx(self, model: ir.Model, path: Path, external_data: str | None = None) -> None:
        """Write ``model`` to ``path``, its weights to the file ``external_data`` beside it when given: one
        tensor at a time (a lazy weight is computed as it is written and not kept), counting them."""
        import onnx_ir as ir

        from nanoexport.progress import Countdown

        countdown: Countdown | None = None

        def written(tensor: ir.TensorProtocol, info) -> None:
            nonlocal countdown
            countdown = countdown or Countdown(f"writing {path.name}", info.total, self.detail)
            countdown.advance()

        needed = sum(value.const_value.nbytes for value in model.graph.initializers.values()
                     if value.const_value is not None)
        free = shutil.disk_usage(path.parent).free
        if needed > free:
            raise NanoexportError(f"no space left in {self.folder.parent} for {path.name}: its weights need "
                                  f"{needed:,} bytes, {free:,} are free; free space or choose another --out")
        ir.save(model, path, external_data=external_data, callback=written if external_data else None)


def _no_passes(build: Build) -> list[GraphPass]:
    return []


def _no_check(config: ExportConfig) -> None:
    return None


def _no_notes(artifact: Artifact) -> list[str]:
    return []


def _no_validation_defaults(config: ExportConfig) -> dict[str, float]:
    return {}


@dataclass(frozen=True)
class Target:
    """Everything the pipeline, the command line and validation know about one backend."""

    name: str
    runtime: str  # the Python package whose presence means the runtime is installed
    install: str  # what to run when it is not
    kv_cache_forms: tuple[str, ...]  # the first is the default
    # Writes the artifact's model files into ``build.folder`` from the lowered graph; returns their paths.
    lower: Callable[[ir.Model, Build], list[str]]
    runner: Callable[[Artifact], Runner]  # validation's way to run an artifact of this target
    # ONNX -> ONNX passes that lower the canonical (quantized, KV-rewritten) graph towards this target.
    passes: Callable[[Build], list[GraphPass]] = _no_passes
    split_prefill_decode: bool = False  # the artifact always holds separate prefill and decode graphs
    quant_defaults: Mapping[str, str] = field(default_factory=dict)  # used where the config still holds "none"
    # Thresholds for the precision the target computes in, used where the config holds the fp32 defaults.
    validation_defaults: Callable[[ExportConfig], dict[str, float]] = _no_validation_defaults
    check: Callable[[ExportConfig], None] = _no_check  # refuses settings it cannot build, before capture
    notes: Callable[[Artifact], list[str]] = _no_notes  # structural findings for the validation report
    options: type | None = None  # a dataclass of the target's settings: the config's [name] table and flags
    # Reads back the quantized weights the writer stored in an artifact folder, as (canonical layer name,
    # integers and scales) in any layout (see ``nanoexport.digests``): the manifest's stored-weight digests.
    stored_weights: Callable[[Path], Iterator[tuple[str, QuantizedWeight]]] | None = None
    # Runs the long scoring (perplexity over many windows) where that is much faster and computes what ``runner``
    # does (qnn: its QDQ graphs on ONNX Runtime CPU rather than the HTP emulator); None: ``runner`` scores.
    scoring_runner: Callable[[Artifact], Runner] | None = None

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(self.runtime) is not None


from nanoexport.targets import coreml, onnx, openvino, qnn, tvm  # noqa: E402 (they import Target from above)

TARGETS: dict[str, Target] = {target.name: target for target in (onnx.TARGET, coreml.TARGET, openvino.TARGET,
                                                                   qnn.TARGET, tvm.TARGET)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise NanoexportError(f"unknown target {name!r}; available targets: {', '.join(sorted(TARGETS))}")
    target = TARGETS[name]
    if not target.installed:
        raise NanoexportError(f"the {name} target needs {target.runtime}, which is not installed; {target.install}")
    return target
