"""One quantization, many targets: ``nanoexport build``.

Capture, the canonical passes and weight quantization run once. Each target lowers its own copy of the
quantized canonical graph (nodes cloned, tensors shared) into ``<out>/<target>``, staged and moved into place
as ``export`` does, and writes the same bytes ``export`` would. A target whose activations are quantized
(qnn's W4A16) calibrates them on its copy: activation ranges belong to the graph a target runs, the weights'
integers to every target. A target that fails is reported and the others are still written.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from nanoexport.artifact import Artifact, check_destination, staging
from nanoexport.calibration import quantize
from nanoexport.config import ExportConfig, QuantConfig
from nanoexport.errors import NanoexportError, first_line
from nanoexport.pipeline import (Canonical, TargetPlan, canonical_graph, checkpoint_folder, lower_into, model_argument,
                                 model_name, plan_target)
from nanoexport.passes import select_passes
from nanoexport.progress import Steps

log = logging.getLogger(__name__)

# Quantization settings that only shape activation quantization, which each target runs on its own copy.
ACTIVATION_SETTINGS = ("activations", "observer", "activation_exclude")


@dataclass
class BuildResult:
    """The artifacts a build wrote under ``out``, and the targets that failed with their one-line reasons."""

    out: Path
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def default_root(model: Any) -> Path:
    return Path("nanoexport-out") / f"{model_name(model)}-build"


def build(
    model: Any = None,
    targets: list[str] | None = None,
    out: str | Path | None = None,
    config: ExportConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> BuildResult:
    """Export ``model`` for every one of ``targets`` (default: the config's ``targets``) from one quantized
    canonical graph, each into ``out/<target>``. Settings are checked for every target before capture; a
    target that fails while lowering or writing is recorded in the result and the others are still built."""
    config = copy.deepcopy(config) if config else ExportConfig()
    targets = list(targets or config.targets)
    if not targets:
        raise NanoexportError("no targets to build; pass --targets onnx,openvino (or set targets = [...] in the "
                              "config)")
    repeated = sorted({name for name in targets if targets.count(name) > 1})
    if repeated:
        raise NanoexportError(f"target {repeated[0]} is listed twice in --targets; list each target once")
    model = model_argument(model, config)
    plans = {name: plan_target(dataclasses.replace(copy.deepcopy(config), target=name)) for name in targets}
    shared = copy.deepcopy(config)
    shared.quant = shared_weight_quantization(plans)
    passes = select_passes(config.passes, config.skip_passes)
    root = Path(out or config.out or default_root(model))
    for name in targets:
        check_destination(root / name, overwrite)  # before any work, as export does
    result = BuildResult(root)

    with Steps(progress) as steps:
        canonical = canonical_graph(model, shared, passes, steps)
        for name, plan in plans.items():
            try:
                with staging(root / name, overwrite) as folder:
                    graph = _copy(canonical.graph)
                    quantization = _target_activations(graph, plan, canonical, steps)
                    lower_into(folder, canonical, graph, plan, quantization, steps)
                result.artifacts[name] = Artifact.load(root / name)
            except NanoexportError as error:
                result.failures[name] = str(error)
            except Exception as error:  # a backend's own failure: the other targets still get built
                log.info("the %s target failed", name, exc_info=True)
                result.failures[name] = f"{type(error).__name__}: {first_line(error)[:300]} (-v for the traceback)"
            if name in result.failures:  # said now, in the run's log; the command's summary repeats it
                log.error("%s failed: %s; the build goes on with the other targets", name, result.failures[name])
    return result


def _copy(model: ir.Model) -> ir.Model:
    """A target's own copy of the canonical graph, for its passes to edit: every node and value cloned, the
    tensors shared (nothing is read or written). The names the target's passes then give new nodes continue
    the canonical graph's count, as they do in ``export``, so a build writes the same bytes as an export."""
    copy = model.clone()
    # onnx_ir has no public way to carry a graph's naming counters over; a fresh copy would start at 0.
    source, target = model.graph._name_authority, copy.graph._name_authority
    target._node_counter, target._value_counter = source._node_counter, source._value_counter
    return copy


def shared_weight_quantization(plans: dict[str, TargetPlan]) -> QuantConfig:
    """The weight quantization every target takes from the one canonical graph: the targets' settings (their
    declared defaults applied) must agree on everything but activations, or the build is refused."""
    names = list(plans)
    first = plans[names[0]].config.quant
    for name in names[1:]:
        quant = plans[name].config.quant
        for setting in dataclasses.fields(QuantConfig):
            if setting.name in ACTIVATION_SETTINGS:
                continue
            ours, theirs = getattr(first, setting.name), getattr(quant, setting.name)
            if ours != theirs:
                raise NanoexportError(
                    f"targets {names[0]} and {name} would quantize weights differently (quant {setting.name} "
                    f"{ours!r} vs {theirs!r}); one build quantizes once: set it for all, e.g. --quant int4")
    return dataclasses.replace(first, activations="none")


def _target_activations(graph: ir.Model, plan: TargetPlan, canonical: Canonical, steps: Steps) -> dict | None:
    """Quantize ``graph``'s activations when ``plan``'s target computes on them; returns its manifest's
    quantization record (the shared weights' record, with the activations' when quantized here)."""
    quant = plan.config.quant
    if quant.activations == "none":
        return canonical.quantization
    activations_only = dataclasses.replace(quant, weights="none", size_budget="")
    checkpoint = canonical.checkpoint
    with steps.step(f"quantize: {plan.config.target} activations {quant.activations}") as detail:
        summary = quantize(graph, activations_only, checkpoint.tokenizer_files, checkpoint_folder(checkpoint), detail)
    return {**(canonical.quantization or {}), "activations": summary["activations"],
            "weights_bytes": summary["weights_bytes"]}
