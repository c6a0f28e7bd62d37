"""One capture, each quantization once, many targets: ``nanoexport build``.

Capture and the canonical passes run once. Each quantization setting (``[quant]``, or each variant of
``quant_variants``) quantizes its own copy of the float canonical graph, and each target lowers its own copy
of that quantized graph (nodes cloned, tensors shared) into ``<out>/<target>`` (with variants,
``<out>/<variant>/<target>``), staged and moved into place as ``export`` does, and writes the same bytes
``export`` would with that setting. A target whose activations are quantized (qnn's W4A16) calibrates them
on its copy: activation ranges belong to the graph a target runs, the weights' integers to every target. A
target that fails is reported and the others are still written. With ``ray_address``, the targets' lowerings
run as Ray tasks (``nanoexport.distributed``) and write the same bytes.
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
from nanoexport.config import ExportConfig, QuantConfig, quant_settings
from nanoexport.errors import NanoexportError, first_line
from nanoexport.pipeline import (Canonical, TargetPlan, checkpoint_folder, copy_graph, float_canonical, lower_into,
                                 model_argument, model_name, plan_target, quantized_canonical)
from nanoexport.passes import select_passes
from nanoexport.progress import Steps

log = logging.getLogger(__name__)

# Quantization settings that only shape activation quantization, which each target runs on its own copy.
ACTIVATION_SETTINGS = ("activations", "observer", "activation_exclude")


@dataclass
class BuildResult:
    """The artifacts a build wrote under ``out`` and the ones that failed with their one-line reasons, each
    named by its folder relative to ``out``: ``onnx``, or ``int4-gptq/onnx`` with quantization variants."""

    out: Path
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def failed(self, name: str, reason: str) -> None:
        """Record that ``name`` failed; said now, in the run's log, and again in the command's summary."""
        self.failures[name] = reason
        log.error("%s failed: %s; the build goes on with the others", name, reason)

    def groups(self) -> dict[Path, list[Artifact]]:
        """The written artifacts by the folder that holds them (``out``, or ``out/<variant>``): each group is one
        quantization's targets, which ``compare`` runs side by side."""
        groups: dict[Path, list[Artifact]] = {}
        for artifact in self.artifacts.values():
            groups.setdefault(artifact.path.parent, []).append(artifact)
        return groups


@dataclass
class LoweringJob:
    """One target to lower from one quantized canonical graph into ``destination`` (``name`` under the root)."""

    name: str
    destination: Path
    canonical: Canonical
    plan: TargetPlan


def artifact_name(variant: str, target: str) -> str:
    """How a build names the artifact of ``target`` from quantization ``variant`` ("" without variants): its
    folder relative to the output root."""
    return f"{variant}/{target}" if variant else target


def default_root(model: Any) -> Path:
    return Path("nanoexport-out") / f"{model_name(model)}-build"


def build(
    model: Any = None,
    targets: list[str] | None = None,
    out: str | Path | None = None,
    config: ExportConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    ray_address: str | None = None,
) -> BuildResult:
    """Export ``model`` for every one of ``targets`` (default: the config's ``targets``), each quantization
    setting once (see ``quant_settings``), into ``out/<target>``, or ``out/<variant>/<target>`` with variants.
    Settings are checked for every target and variant before capture; a target that fails while lowering or
    writing is recorded in the result and the others are still built. ``ray_address`` ("local", "auto", a
    cluster's address) lowers the targets as Ray tasks; every Ray node must see ``out`` at the same path."""
    config = copy.deepcopy(config) if config else ExportConfig()
    targets = list(targets or config.targets)
    if not targets:
        raise NanoexportError("no targets to build; pass --targets onnx,openvino (or set targets = [...] in the "
                              "config)")
    repeated = sorted({name for name in targets if targets.count(name) > 1})
    if repeated:
        raise NanoexportError(f"target {repeated[0]} is listed twice in --targets; list each target once")
    model = model_argument(model, config)
    plans, weights = {}, {}
    for variant, quant in quant_settings(config).items():
        plans[variant], weights[variant] = _plan_variant(config, quant, targets, variant)
    passes = select_passes(config.passes, config.skip_passes)
    root = Path(out or config.out or default_root(model))
    for variant, variant_plans in plans.items():
        for name in variant_plans:
            check_destination(root / variant / name, overwrite)  # before any work, as export does
    if ray_address is None:
        lowering = SequentialLowering(root, overwrite)
    else:
        from nanoexport.distributed import RayLowering  # Ray is imported only when asked for

        lowering = RayLowering(ray_address, root, overwrite)

    with Steps(progress) as steps, lowering:
        floating = float_canonical(model, config, passes, steps)
        for variant, variant_plans in plans.items():
            label = f"quantize {variant}" if variant else "quantize"
            canonical = quantized_canonical(floating, copy_graph(floating.graph), weights[variant], steps, label)
            for name, plan in variant_plans.items():
                lowering.lower(LoweringJob(artifact_name(variant, name), root / variant / name, canonical, plan),
                               steps)
            del canonical  # the lowering keeps what it still needs; the next variant's integers replace these
        return lowering.finish(steps)


def _plan_variant(config: ExportConfig, quant: QuantConfig, targets: list[str],
                  variant: str) -> tuple[dict[str, TargetPlan], QuantConfig]:
    """Each target's plan with quantization ``quant``, and the weight quantization they share; an error names
    ``variant`` when there are variants."""
    try:
        plans = {name: plan_target(dataclasses.replace(copy.deepcopy(config), target=name, quant=copy.deepcopy(quant),
                                                       quant_variants={}))
                 for name in targets}
        return plans, shared_weight_quantization(plans)
    except NanoexportError as error:
        if not variant:
            raise
        raise NanoexportError(f"quantization variant {variant}: {error}") from None


class SequentialLowering:
    """Lowers each job in this process as it comes, each target from its own copy of the graph."""

    def __init__(self, root: Path, overwrite: bool):
        self.result = BuildResult(root)
        self.overwrite = overwrite

    def __enter__(self) -> SequentialLowering:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def lower(self, job: LoweringJob, steps: Steps) -> None:
        """Lower ``job`` and move it into place now; a failure is recorded, not raised."""
        try:
            with staging(job.destination, self.overwrite) as folder:
                graph = copy_graph(job.canonical.graph)
                quantization = target_activations(graph, job.plan, job.canonical, steps)
                lower_into(folder, job.canonical, graph, job.plan, quantization, steps)
            self.result.artifacts[job.name] = Artifact.load(job.destination)
        except Exception as error:  # a backend's own failure: the other targets still get built
            self.result.failed(job.name, failure_reason(error, job.name))

    def finish(self, steps: Steps) -> BuildResult:
        """The result: every job was done as it came."""
        return self.result


def failure_reason(error: Exception, name: str) -> str:
    """The one line a build reports for a target that raised ``error`` (its traceback logged at -v)."""
    if isinstance(error, NanoexportError):
        return str(error)
    log.info("%s failed", name, exc_info=error)
    return f"{type(error).__name__}: {first_line(error)[:300]} (-v for the traceback)"


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


def target_activations(graph: ir.Model, plan: TargetPlan, canonical: Canonical, steps: Steps) -> dict | None:
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
