"""``nanoexport compare``: artifacts of one model side by side, each in its own runtime, against one reference.

Every artifact runs the same prompts (the fixed English ones through the first artifact's tokenizer) and the
same windows of evaluation text; the reference (PyTorch, or a weightless checkpoint's ONNX decoder) runs them
once. Per artifact: perplexity and its change from the reference's, top-1 agreement and the lowest logits
cosine against the reference, greedy agreement, KV consistency, the weight digests recomputed from its files,
and the seconds it took. Per pair: the change of
perplexity from one to the other, their top-1 agreement and lowest logits cosine, their greedy agreement, and
whether their canonical and stored integers are equal. A target that scores perplexity with a faster runner
(qnn: ONNX Runtime CPU on the QDQ graphs instead of the HTP emulator) runs the prompts on both, and the
report gives their agreement.

It fails (``passed`` false, exit 1) when a pair of artifacts with quantized weights differs in perplexity by
more than ``quantized_perplexity_spread``, a pair of float ones agrees on fewer top-1 tokens than
``float_top1_agreement`` (both from the config's ``[compare]``), or an artifact's stored weights no longer
have the digest its manifest recorded (its files changed after the build, checksums rewritten to match).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nanoexport.artifact import Artifact
from nanoexport.capture.checkpoint import DEMO_MODEL
from nanoexport.config import CompareConfig, ValidationConfig
from nanoexport.digests import stored_digests
from nanoexport.errors import NanoexportError
from nanoexport.targets import get_target
from nanoexport.validate import reference_checkpoint, runtime_refusals, scoring_decoder
from nanoexport.validate.decoding import ArtifactDecoder, Reference, greedy, prompts_for, reference_model
from nanoexport.validate.perplexity import perplexity, text_windows
from nanoexport.validate.report import write_compare_report

log = logging.getLogger(__name__)


@dataclass
class Outputs:
    """What one model (an artifact or the reference) gave on the shared prompts and evaluation windows."""

    logits: list[np.ndarray]  # per prompt, [positions, vocab]
    greedy: list[list[int]]  # per prompt
    perplexity: float | None
    kv_max_abs: float | None = None  # prefill then decode steps against one full forward (artifacts only)
    seconds: dict[str, float] = field(default_factory=dict)
    # Where the target scores perplexity with another runner: how the two agree on the prompts.
    scoring_agreement: dict[str, float] | None = None


@dataclass
class Workload:
    """The prompts and evaluation windows every model runs, and how it is measured."""

    prompts: list[list[int]]
    windows: list[list[int]]
    greedy_tokens: int
    decode_steps: int
    description: str


def compare(artifacts: list[Artifact | str | Path], reference: Any = None, validation: ValidationConfig | None = None,
            thresholds: CompareConfig | None = None, report_path: Path | None = None) -> dict[str, Any]:
    """Run ``artifacts`` and their reference on one workload and compare them; returns the report (written to
    ``report_path`` as JSON, and beside it as HTML with plots, when given: ``report.html_twin``).
    ``validation`` sets the workload (prompts' greedy tokens, decode steps, evaluation text and windows),
    ``thresholds`` the gates."""
    loaded = [item if isinstance(item, Artifact) else Artifact.load(item) for item in artifacts]
    if len(loaded) < 2:
        raise NanoexportError("compare needs at least two artifacts; pass their folders, e.g. "
                              "nanoexport compare out/onnx out/openvino")
    folders = [artifact.path.resolve() for artifact in loaded]
    if len(set(folders)) < len(folders):
        raise NanoexportError("an artifact is given twice; pass each artifact folder once")
    validation = validation or loaded[0].thresholds()
    thresholds = thresholds or CompareConfig()
    _check_same_model(loaded)
    labels = _labels(loaded)
    checkpoint = reference_checkpoint(loaded[0], reference)
    workload = _workload(loaded, validation)

    started = time.perf_counter()
    reference_run = reference_model(checkpoint)
    reference_outputs = _run_reference(reference_run, workload)
    reference_outputs.seconds["total"] = time.perf_counter() - started
    outputs, rows = {}, []
    for label, artifact in zip(labels, loaded):
        log.info("compare: running %s (%s)", label, artifact.target)
        outputs[label] = _run_artifact(artifact, workload)
        rows.append(_artifact_row(label, artifact, outputs[label], reference_outputs, workload))
    pairs = [_pair_row(a, b, outputs[a.label], outputs[b.label], workload, thresholds)
             for a, b in itertools.combinations([_Named(label, row) for label, row in zip(labels, rows)], 2)]
    failures = [f"{row['artifact']}: its stored weights no longer match the digest its manifest recorded ("
                f"{', '.join(row['weights_changed_layers'][:3]) or 'layers renamed'}); the files changed after the "
                "build" for row in rows if row["weights_intact"] is False]
    failures += [pair["failure"] for pair in pairs if not pair["passed"]]
    report = {
        "model": checkpoint.name,
        "workload": workload.description,
        "thresholds": {"quantized_perplexity_spread": thresholds.quantized_perplexity_spread,
                       "float_top1_agreement": thresholds.float_top1_agreement},
        "reference": {"model": reference_run.description, "perplexity": reference_outputs.perplexity,
                      "seconds": reference_outputs.seconds},
        "artifacts": rows,
        "pairs": pairs,
        "failures": failures,
        "passed": not failures,
    }
    if report_path is not None:
        write_compare_report(report_path, report)
    return report


@dataclass
class _Named:
    label: str
    row: dict[str, Any]


def _check_same_model(artifacts: list[Artifact]) -> None:
    first = artifacts[0]
    for artifact in artifacts[1:]:
        if artifact.manifest["source"]["weights_sha256"] != first.manifest["source"]["weights_sha256"]:
            raise NanoexportError(f"{artifact.path} was exported from other weights than {first.path}; compare "
                                  "artifacts of one model")


def _labels(artifacts: list[Artifact]) -> list[str]:
    """Each artifact's target name, or its folder where two share a target."""
    targets = [artifact.target for artifact in artifacts]
    if len(set(targets)) == len(targets):
        return targets
    return [str(artifact.path) for artifact in artifacts]


def _workload(artifacts: list[Artifact], validation: ValidationConfig) -> Workload:
    """The first artifact's prompts; windows of the evaluation text that fit every artifact's KV cache."""
    kv_caches = [artifact.manifest["io"]["kv_cache"] for artifact in artifacts]
    prompts = prompts_for(artifacts[0].path, kv_caches[0]["vocab_size"])
    window = validation.eval_window
    for kv_cache in kv_caches:
        if kv_cache.get("capacity") is not None and kv_cache.get("form") != "sliding":
            window = min(window, kv_cache["capacity"])  # a window must fit the artifact's KV cache
    tokenizer_folder = artifacts[0].path / "tokenizer"
    windows, description = [], "no perplexity: the first artifact has no tokenizer to read the evaluation text"
    if tokenizer_folder.is_dir():
        text = validation.eval_text or str(DEMO_MODEL / "heldout.txt")
        windows = text_windows(text, tokenizer_folder, window, validation.eval_windows)
        description = f"{len(prompts)} prompts; perplexity on {len(windows)} windows of {window} tokens of " \
                      f"{Path(text).name}"
    too_short = [len(prompt) for prompt in prompts if len(prompt) <= validation.decode_steps]
    if too_short:
        raise NanoexportError(f"a prompt of {too_short[0]} tokens is too short for {validation.decode_steps} decode "
                              "steps; lower decode_steps in [validate]")
    return Workload(prompts, windows, validation.greedy_tokens, validation.decode_steps, description)


def _run_reference(model: Reference, workload: Workload) -> Outputs:
    return Outputs(
        [model.logits(prompt) for prompt in workload.prompts],
        [greedy(model.next_token_stream(prompt), workload.greedy_tokens) for prompt in workload.prompts],
        perplexity(model.logits, workload.windows) if workload.windows else None,
    )


def _run_artifact(artifact: Artifact, workload: Workload) -> Outputs:
    """``artifact`` in its target's runtime on ``workload``, timing each part."""
    problems = artifact.verify()
    if problems:
        raise NanoexportError(f"artifact {artifact.path} is damaged ({problems[0]}); re-export it")
    seconds = {}
    with runtime_refusals(artifact):
        started = time.perf_counter()
        decoder = ArtifactDecoder(get_target(artifact.target).runner(artifact), artifact.manifest["io"]["kv_cache"])
        seconds["load"] = time.perf_counter() - started
        started = time.perf_counter()
        logits = [decoder.full_logits(prompt) for prompt in workload.prompts]
        steps = workload.decode_steps
        kv_max_abs = max(float(np.abs(full - decoder.prefill_then_decode(prompt, len(prompt) - steps)).max())
                         for prompt, full in zip(workload.prompts, logits))
        tokens = [greedy(decoder.next_token_stream(prompt), workload.greedy_tokens) for prompt in workload.prompts]
        seconds["prompts"] = time.perf_counter() - started
        started = time.perf_counter()
        scorer = scoring_decoder(artifact, decoder)
        agreement = None
        if scorer is not decoder:  # the prompts on both: how faithful the faster scoring is
            scored = [scorer.full_logits(prompt) for prompt in workload.prompts]
            agreement = {"top1_agreement": float(np.mean(np.concatenate(
                             [a.argmax(-1) == b.argmax(-1) for a, b in zip(logits, scored)]))),
                         "logits_max_abs": max(float(np.abs(a - b).max()) for a, b in zip(logits, scored))}
        score = perplexity(scorer.full_logits, workload.windows) if workload.windows else None
        seconds["perplexity"] = time.perf_counter() - started
    seconds["total"] = sum(seconds.values())
    return Outputs(logits, tokens, score, kv_max_abs, seconds, agreement)


def _agreement(ours: Outputs, theirs: Outputs) -> dict[str, float]:
    """Top-1 agreement and the lowest cosine of two models' logits over every prompt position, and the share of
    greedy tokens that match until their first difference."""
    agree = positions = matched = generated = 0
    lowest = 1.0
    for a, b in zip(ours.logits, theirs.logits):
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        positions += len(a)
        cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        lowest = min(lowest, float(cosine.min()))
    for a, b in zip(ours.greedy, theirs.greedy):
        matched += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        generated += len(a)
    return {"top1_agreement": agree / positions, "logits_min_cosine": lowest, "greedy_agreement": matched / generated}


def _change(ours: float | None, theirs: float | None) -> float | None:
    """Relative change from ``theirs`` to ``ours``."""
    return None if ours is None or theirs is None else ours / theirs - 1


def _artifact_row(label: str, artifact: Artifact, outputs: Outputs, reference: Outputs,
                  workload: Workload) -> dict[str, Any]:
    digests = artifact.manifest.get("weight_digests") or {}
    recorded = digests.get("stored")
    row = {
        "artifact": label,
        "path": str(artifact.path),
        "target": artifact.target,
        "quantized": bool(artifact.manifest.get("quantization")),
        "perplexity": outputs.perplexity,
        "perplexity_change": _change(outputs.perplexity, reference.perplexity),
        **_agreement(outputs, reference),
        "kv_max_abs": outputs.kv_max_abs,
        "scoring_runner_agreement": outputs.scoring_agreement,  # None: perplexity by the runner itself
        "canonical_digest": (digests.get("canonical") or {}).get("digest"),
        "stored_digest": None,
        "stored_equals_canonical": None,
        "weights_intact": None,  # the stored weights still have the digest the build recorded
        "weights_changed_layers": [],
        # From the manifest, for the HTML report's plots: each layer's bits per weight, and where the target
        # re-rounded the canonical integers, each changed layer's relative RMS error (None: not recorded).
        "layer_bits": (artifact.manifest.get("quantization") or {}).get("layer_bits"),
        "layer_weight_error": ((recorded or {}).get("weight_error") or {}).get("layer_relative_rms"),
        "seconds": outputs.seconds,
    }
    target = get_target(artifact.target)
    if digests.get("canonical") and target.stored_weights is not None:
        started = time.perf_counter()
        with runtime_refusals(artifact):
            now = stored_digests(target.stored_weights(artifact.path), digests["canonical"])
        row["seconds"]["digests"] = time.perf_counter() - started
        row["stored_digest"], row["stored_equals_canonical"] = now["digest"], now["equals_canonical"]
        if recorded is not None:
            row["weights_intact"] = now["digest"] == recorded["digest"]
            row["weights_changed_layers"] = sorted(name for name, digest in now["layers"].items()
                                                   if recorded["layers"].get(name) != digest)
    return row


def _pair_row(a: _Named, b: _Named, ours: Outputs, theirs: Outputs, workload: Workload,
              thresholds: CompareConfig) -> dict[str, Any]:
    """Two artifacts against each other, and the gate their kind (both quantized, both float) puts on them."""
    row = {
        "a": a.label,
        "b": b.label,
        "perplexity_change": _change(theirs.perplexity, ours.perplexity),
        **_agreement(ours, theirs),
        "canonical_digests_equal": _equal(a.row["canonical_digest"], b.row["canonical_digest"]),
        "stored_digests_equal": _equal(a.row["stored_digest"], b.row["stored_digest"]),
        "gate": "none (one quantized, one float)" if a.row["quantized"] != b.row["quantized"] else
                "none (no perplexity: the artifacts have no tokenizer)",
        "passed": True,
        "failure": "",
    }
    if a.row["quantized"] and b.row["quantized"] and row["perplexity_change"] is not None:
        spread = abs(row["perplexity_change"])
        row["gate"] = f"perplexity within {thresholds.quantized_perplexity_spread:.2%}"
        row["passed"] = spread <= thresholds.quantized_perplexity_spread
        row["failure"] = (f"{a.label} and {b.label}: perplexity {ours.perplexity:.4f} vs {theirs.perplexity:.4f}, "
                          f"{spread:.2%} apart (at most {thresholds.quantized_perplexity_spread:.2%})")
    elif not a.row["quantized"] and not b.row["quantized"]:
        row["gate"] = f"top-1 agreement >= {thresholds.float_top1_agreement:.2%}"
        row["passed"] = row["top1_agreement"] >= thresholds.float_top1_agreement
        row["failure"] = (f"{a.label} and {b.label}: top-1 tokens agree at {row['top1_agreement']:.2%} of positions "
                          f"(at least {thresholds.float_top1_agreement:.2%})")
    if row["passed"]:
        row["failure"] = ""
    return row


def _equal(a: str | None, b: str | None) -> bool | None:
    return None if a is None or b is None else a == b
