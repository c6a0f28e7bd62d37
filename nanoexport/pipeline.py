"""The export pipeline: checkpoint -> ONNX -> passes -> target files -> artifact folder."""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch

from nanoexport.artifact import BUILD_LOG, Artifact, staging, write_json, write_manifest
from nanoexport.calibration import check_config, quantize
from nanoexport.capture.checkpoint import DEMO_MODEL, Checkpoint, load_checkpoint, module_name
from nanoexport.capture.onnx_export import export_onnx
from nanoexport.capture.optimum import check_optimum_folder, import_optimum_onnx, optimum_onnx_file
from nanoexport.config import ExportConfig, QuantConfig, ValidationConfig
from nanoexport.digests import CanonicalWeights, stored_digests
from nanoexport.interface import KvCache, kv_shape
from nanoexport.passes import PassStats, run_passes, select_passes, static_kv_cache_pass
from nanoexport.progress import Steps
from nanoexport.targets import Build, Target, get_target

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("nanoexport", "torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime")


def default_out(model_name: str, target: str) -> Path:
    return Path("nanoexport-out") / f"{model_name}-{target}"


def export(
    model: str | Path | torch.nn.Module | Checkpoint | None = None,
    target: str | None = None,
    out: str | Path | None = None,
    config: ExportConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Artifact:
    """Export ``model`` for ``target`` into the artifact folder ``out`` and return the artifact.

    ``model`` is a checkpoint folder, a hub id, a ``transformers`` model or a loaded ``Checkpoint``;
    by default the bundled demo model. ``target`` and ``model`` override ``config``. The folder is
    built beside ``out`` and moved into place only when complete; an existing non-empty ``out`` is
    refused unless ``overwrite``.
    """
    config = copy.deepcopy(config) if config else ExportConfig()
    if target is not None:
        config.target = target
    model = model_argument(model, config)
    plan = plan_target(config)
    passes = select_passes(config.passes, config.skip_passes)
    destination = Path(out or config.out or default_out(model_name(model), config.target))

    with Steps(progress) as steps, staging(destination, overwrite) as folder:
        canonical = canonical_graph(model, config, passes, steps)
        lower_into(folder, canonical, canonical.graph, plan, canonical.quantization, steps)
    artifact = Artifact.load(destination)
    # Validation's reference: a checkpoint read lazily from safetensors has no weights in memory, so validation
    # loads it; a weightless one's reference is its ONNX file, run as it is.
    checkpoint = canonical.checkpoint
    artifact.checkpoint = None if checkpoint.lazy and checkpoint.onnx_weights is None else checkpoint
    return artifact


def model_argument(model: Any, config: ExportConfig) -> Any:
    """The model to export: ``model``, else the config's, else the bundled demo; recorded in ``config``."""
    if model is None:
        model = config.model or str(DEMO_MODEL)
    if isinstance(model, (str, Path)):
        config.model = str(model)
    return model


@dataclass
class TargetPlan:
    """One target's settings (its declared defaults applied), the target, and the KV cache it builds."""

    config: ExportConfig
    target: Target
    cache: KvCache


def plan_target(config: ExportConfig) -> TargetPlan:
    """Apply ``config.target``'s defaults to ``config`` and check it: before capture, so a bad setting costs
    nothing (the attention windows come with the checkpoint, in ``lower_into``)."""
    target = get_target(config.target)
    _apply_target_defaults(config, target)
    check_config(config.quant)
    target.check(config)
    cache = KvCache.resolve(config.kv_cache, target.kv_cache_forms, config.split_prefill_decode,
                            config.max_context, config.prefill_chunk, config.target)
    config.kv_cache = cache.form
    return TargetPlan(config, target, cache)


@dataclass
class Canonical:
    """The quantized canonical graph and what made it: the stages every target shares."""

    checkpoint: Checkpoint
    graph: ir.Model
    pass_stats: list[PassStats]
    quantization: dict[str, Any] | None
    quantize_seconds: float | None
    weights: CanonicalWeights  # its quantized layers, for the manifests' digests


def canonical_graph(model: Any, config: ExportConfig, passes: list, steps: Steps) -> Canonical:
    """Capture ``model``, run the canonical ``passes`` and quantize as ``config.quant`` says."""
    floating = float_canonical(model, config, passes, steps)
    return quantized_canonical(floating, floating.graph, config.quant, steps)


def float_canonical(model: Any, config: ExportConfig, passes: list, steps: Steps) -> Canonical:
    """Capture ``model`` and run the canonical ``passes``: the canonical graph before quantization.

    A folder holding an Optimum ONNX decoder (``model.onnx``) is read instead of captured from torch; its
    checkpoint files beside it are the model's description and, when its safetensors are there, validation's
    reference (else the ONNX file is: a weightless checkpoint).
    """
    onnx_file = optimum_onnx_file(model)
    if onnx_file is not None:
        check_optimum_folder(onnx_file.parent)
    with steps.step("capture: load checkpoint"):
        checkpoint = model if isinstance(model, Checkpoint) else load_checkpoint(model, lazy=True)
    onnx_file = onnx_file or checkpoint.onnx_weights  # a weightless checkpoint's model has nothing to trace
    if onnx_file is not None:
        with steps.step("capture: read Optimum ONNX"):
            graph = import_optimum_onnx(onnx_file, checkpoint.config)
    else:
        with steps.step("capture: torch -> ONNX"):
            graph = export_onnx(checkpoint)
    with steps.step("passes") as detail:
        pass_stats = run_passes(graph, passes, on_pass=detail, verify=config.verify_passes)
    return Canonical(checkpoint, graph, pass_stats, None, None, CanonicalWeights(graph))


def quantized_canonical(floating: Canonical, graph: ir.Model, quant: QuantConfig, steps: Steps,
                        label: str = "quantize") -> Canonical:
    """``floating`` with ``graph`` (its graph, or a ``copy_graph`` of it to keep the float one) quantized as
    ``quant`` says; ``label`` names the step."""
    quantization, quantize_seconds = None, None
    if quant.weights != "none" or quant.activations != "none":
        with steps.step(f"{label}: {quant.weights}, {quant.algorithm}") as detail:
            started = time.perf_counter()
            checkpoint = floating.checkpoint
            quantization = quantize(graph, quant, checkpoint.tokenizer_files, checkpoint_folder(checkpoint), detail)
            quantize_seconds = time.perf_counter() - started
    return dataclasses.replace(floating, graph=graph, quantization=quantization, quantize_seconds=quantize_seconds,
                               weights=CanonicalWeights(graph))


def copy_graph(model: ir.Model) -> ir.Model:
    """A copy of ``model`` for a later stage to edit (quantization, a target's passes): every node and value
    cloned, the tensors shared (nothing is read or written). The names that stage then gives new nodes
    continue ``model``'s count, as they would on ``model`` itself, so a copy is written to the same bytes."""
    clone = model.clone()
    naming_counters(clone, naming_counters(model))
    return clone


def naming_counters(model: ir.Model, counters: tuple[int, int] | None = None) -> tuple[int, int]:
    """The counters ``model`` numbers new nodes and values from; set to ``counters`` when given. A graph
    cloned or read from a file starts at 0, and would name new nodes as ``export`` does not."""
    # onnx_ir has no public way to read or carry a graph's naming counters.
    authority = model.graph._name_authority
    if counters is not None:
        authority._node_counter, authority._value_counter = counters
    return authority._node_counter, authority._value_counter


def lower_into(folder: Path, canonical: Canonical, graph: ir.Model, plan: TargetPlan,
               quantization: dict[str, Any] | None, steps: Steps) -> None:
    """Lower ``graph`` (the canonical graph or a copy of it) for ``plan``'s target and write the artifact's
    files, manifest and build log into ``folder``; ``quantization``: the manifest's quantization record."""
    config, target, checkpoint = plan.config, plan.target, canonical.checkpoint
    pass_stats = list(canonical.pass_stats)
    cache = plan.cache.for_model(checkpoint.config)
    if cache.fixed:
        # After quantization: calibration feeds whole windows, which the growing cache takes at any length.
        kv_pass = static_kv_cache_pass(cache.capacity, list(cache.windows), cache.circular)
        with steps.step(f"passes: {config.target} KV-cache rewrite") as detail:
            pass_stats += run_passes(graph, [kv_pass], on_pass=detail, verify=config.verify_passes)
    build = Build(config, checkpoint, cache, folder, config.verify_passes)
    with steps.step(f"passes: {config.target} lowering") as detail:
        build.detail = detail
        build.run_passes(graph, target.passes(build))
    with steps.step(f"write: {config.target}") as detail:
        build.detail = detail
        _write_tokenizer(checkpoint, folder)
        model_files = target.lower(graph, build)
        fields = _manifest_fields(graph, checkpoint, config, cache, model_files, pass_stats, quantization)
        fields["weight_digests"] = _weight_digests(canonical.weights, target, folder)
        write_manifest(folder, fields)
        write_json(folder / BUILD_LOG, {
            "passes": [dataclasses.asdict(stat) for stat in pass_stats],
            "target_passes": [dataclasses.asdict(stat) for stat in build.stats],
            "quantize_seconds": canonical.quantize_seconds,
            "target_seconds": build.seconds,
        })
    for stat in [*pass_stats, *build.stats]:
        change = "" if stat.logits_change is None else f", logits moved {stat.logits_change:.2e}"
        log.info("pass %s: %.2fs, %d -> %d nodes%s", stat.name, stat.seconds, stat.nodes_before, stat.nodes_after,
                 change)


def _weight_digests(weights: CanonicalWeights, target: Target, folder: Path) -> dict[str, Any] | None:
    """Digests of the canonical graph's quantized layers and of what the target stored in ``folder``
    (None without quantized layers); the target's stored record is None when it cannot read its files back."""
    if not weights.tensors:
        return None
    canonical = weights.record()
    stored = None
    if target.stored_weights is not None:
        stored = stored_digests(target.stored_weights(folder), canonical, weights)
    return {"canonical": canonical, "stored": stored}


def _manifest_fields(graph: ir.Model, checkpoint: Checkpoint, config: ExportConfig, cache: KvCache,
                     model_files: list[str], pass_stats: list, quantization: dict | None) -> dict[str, Any]:
    """What the manifest says about the artifact beside its files: the hashed, reproducible description."""
    return {
        "tool_versions": _tool_versions(),
        "target": config.target,
        "model_files": model_files,
        "source": _source_record(checkpoint),
        "config": config.manifest_view(),
        "io": io_signature(graph, checkpoint, cache),
        "passes": [{"name": s.name, "nodes_before": s.nodes_before, "nodes_after": s.nodes_after}
                   for s in pass_stats],
        "quantization": quantization,
        "tokenizer": "tokenizer" if checkpoint.tokenizer_files else None,
    }


def _source_record(checkpoint: Checkpoint) -> dict[str, Any]:
    """The manifest's record of the model exported: where from, and the digest of the files holding its weights
    (a weightless checkpoint names that file, its ONNX decoder; otherwise they are the safetensors)."""
    record = {
        "name": checkpoint.name,
        "source": checkpoint.source,
        "family": checkpoint.family,
        "weights_sha256": checkpoint.weights_sha256,
        "parameters": sum(p.numel() for p in checkpoint.model.parameters()),
        "config": checkpoint.config.to_diff_dict(),
    }
    if checkpoint.onnx_weights is not None:
        record["weights_file"] = checkpoint.onnx_weights.name
    return record


def model_name(model: Any) -> str:
    if isinstance(model, Checkpoint):
        return model.name
    if isinstance(model, torch.nn.Module):
        return module_name(model)
    return Path(str(model)).name or "model"


def checkpoint_folder(checkpoint: Checkpoint) -> Path | None:
    folder = Path(checkpoint.source) if checkpoint.source else None
    return folder if folder is not None and folder.is_dir() else None


def _write_tokenizer(checkpoint: Checkpoint, folder: Path) -> None:
    if not checkpoint.tokenizer_files:
        return
    tokenizer_folder = folder / "tokenizer"
    tokenizer_folder.mkdir()
    for file_name, data in sorted(checkpoint.tokenizer_files.items()):
        (tokenizer_folder / file_name).write_bytes(data)


def _apply_target_defaults(config: ExportConfig, target: Target) -> None:
    """What a target declares about itself: graphs it always splits, the quantization it needs (used where
    the config still holds "none"), and validation thresholds for the precision it computes in (used where
    the config still holds the fp32 defaults)."""
    if target.split_prefill_decode:
        config.split_prefill_decode = True
    for name, value in target.quant_defaults.items():
        if getattr(config.quant, name) == "none":
            setattr(config.quant, name, value)
    fp32_defaults = ValidationConfig()
    for name, value in target.validation_defaults(config).items():
        if getattr(config.validate, name) == getattr(fp32_defaults, name):
            setattr(config.validate, name, value)


def io_signature(graph: ir.Model, checkpoint: Checkpoint, cache: KvCache) -> dict[str, Any]:
    """Names, dtypes and shapes of the graph's inputs and outputs, and the KV-cache layout."""

    def describe(value: ir.Value) -> dict[str, Any]:
        shape = [d if isinstance(d, int) else str(d) for d in value.shape] if value.shape is not None else None
        return {"name": value.name, "dtype": value.dtype.name.lower(), "shape": shape}

    kv_heads, head_dim = kv_shape(checkpoint.config)
    return {
        "inputs": [describe(v) for v in graph.graph.inputs],
        "outputs": [describe(v) for v in graph.graph.outputs],
        "kv_cache": {
            "layout": ["batch", "kv_heads", "sequence", "head_dim"],
            "num_layers": checkpoint.config.num_hidden_layers,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "vocab_size": checkpoint.config.vocab_size,
            "form": cache.form,
            "capacity": cache.capacity,
            "prefill_chunk": cache.prefill_chunk,
        },
    }


def _tool_versions() -> dict[str, str]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
