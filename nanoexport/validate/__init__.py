"""Validation: run an artifact in its target's runtime beside the reference model and compare.

The reference is the PyTorch model of the checkpoint the artifact was exported from; for a weightless
checkpoint (an Optimum ONNX folder without safetensors) it is that ONNX decoder, on ONNX Runtime CPU.

Measured on a few prompts: logits max-abs and cosine error and top-1 agreement (one full forward),
KV-cache consistency (prefill then one-token decode steps against one full forward, both in the
artifact), greedy-generation agreement, and perplexity on evaluation text against the reference's.
Each measure has a threshold from ``ValidationConfig``; artifacts with quantized weights are held to the
``quantized_*`` thresholds, since they are meant to differ from the float reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoexport.artifact import Artifact
from nanoexport.capture.checkpoint import DEMO_MODEL, Checkpoint, load_checkpoint
from nanoexport.config import ValidationConfig
from nanoexport.errors import NanoexportError, first_line
from nanoexport.targets import get_target
from nanoexport.validate.decoding import ArtifactDecoder, Reference, greedy, prompts_for, reference_model
from nanoexport.validate.perplexity import perplexity, text_windows
from nanoexport.validate.report import write_report

log = logging.getLogger(__name__)


@dataclass
class Check:
    """One measure, its threshold, and whether it passed."""

    name: str
    value: float
    threshold: float
    passed: bool
    higher_is_better: bool
    detail: str = ""


@dataclass
class ValidationReport:
    """What validation measured on one artifact."""

    artifact: str
    target: str
    model: str
    prompts: int
    reference: str  # what ran as the reference: PyTorch, or ONNX Runtime on a weightless checkpoint's file
    checks: list[Check] = field(default_factory=list)
    measured: dict[str, float] = field(default_factory=dict)  # figures reported without a threshold
    notes: list[str] = field(default_factory=list)  # the target's structural findings (not gated)
    # Per prompt, per position (what the HTML report plots): the logits' error against the reference, as
    # {"max_abs": [...], "one_minus_cosine": [...]}, and the KV-cache path's against one full forward, as
    # {"prefill": tokens prefilled before the one-token steps, "max_abs": [...]}.
    logits_error_by_position: list[dict[str, list[float]]] = field(default_factory=list)
    kv_error_by_position: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def add(self, name: str, value: float, threshold: float, higher_is_better: bool, detail: str = "") -> None:
        passed = value >= threshold if higher_is_better else value <= threshold
        self.checks.append(Check(name, float(value), threshold, bool(passed), higher_is_better, detail))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def validate(
    artifact: Artifact | str | Path,
    reference: str | Path | torch.nn.Module | Checkpoint | None = None,
    config: ValidationConfig | None = None,
    write: bool = True,
) -> ValidationReport:
    """Validate ``artifact`` against ``reference`` (default: the model recorded in its manifest).

    Writes ``report.json`` and ``report.html`` into the artifact folder when ``write``.
    """
    if not isinstance(artifact, Artifact):
        artifact = Artifact.load(artifact)
    config = config or artifact.thresholds()
    problems = artifact.verify()
    if problems:
        raise NanoexportError(f"artifact {artifact.path} is damaged ({problems[0]}); re-export it")
    checkpoint = reference_checkpoint(artifact, reference)
    target = get_target(artifact.target)
    with runtime_refusals(artifact):
        decoder = ArtifactDecoder(target.runner(artifact), artifact.manifest["io"]["kv_cache"])
    reference_run = reference_model(checkpoint)
    prompts = prompts_for(artifact.path, decoder.vocab_size)

    quantized = bool(artifact.manifest.get("quantization"))
    if quantized:
        config = dataclasses.replace(
            config, logits_min_cosine=config.quantized_logits_min_cosine,
            top1_agreement=config.quantized_top1_agreement, greedy_agreement=config.quantized_greedy_agreement,
            perplexity_increase=config.quantized_perplexity_increase, kv_max_abs=config.quantized_kv_max_abs,
        )

    report = ValidationReport(str(artifact.path), artifact.target, checkpoint.name, len(prompts),
                              reference_run.description)
    with runtime_refusals(artifact):
        full_logits = [decoder.full_logits(prompt) for prompt in prompts]
    _compare_logits(report, full_logits, reference_run, prompts, config, gate_max_abs=not quantized)
    _kv_consistency(report, full_logits, decoder, prompts, config)
    _greedy_agreement(report, decoder, reference_run, prompts, config)
    scorer = scoring_decoder(artifact, decoder)
    _perplexity(report, artifact, scorer, reference_run, config, by_scoring_runner=scorer is not decoder)
    with runtime_refusals(artifact):  # a target's notes may run the artifact another way (QNN: HTP and CPU)
        report.notes = target.notes(artifact)
    if write:
        write_report(artifact.path, report.to_dict())
    return report


def scoring_decoder(artifact: Artifact, decoder: ArtifactDecoder) -> ArtifactDecoder:
    """What scores perplexity: the target's scoring runner where it declares one (faster, same numbers), else
    ``decoder``."""
    target = get_target(artifact.target)
    if target.scoring_runner is None:
        return decoder
    with runtime_refusals(artifact):
        return ArtifactDecoder(target.scoring_runner(artifact), artifact.manifest["io"]["kv_cache"])


@contextlib.contextmanager
def runtime_refusals(artifact: Artifact) -> Iterator[None]:
    """Report the target runtime failing to load or run ``artifact`` in one line. Its files passed the
    manifest's checksums, so they were damaged with a manifest written to match, or the runtime cannot run
    what we wrote; either way the fix is a fresh export (the traceback is logged, shown with -v)."""
    try:
        yield
    except NanoexportError:
        raise
    except Exception as error:  # each runtime raises its own types for a model it cannot load or run
        log.info("the %s runtime failed on %s", artifact.target, artifact.path, exc_info=True)
        raise NanoexportError(
            f"the {artifact.target} runtime cannot run {artifact.path} ({first_line(error)[:300]}); re-export it "
            "(run with -v for the traceback)"
        ) from None


def reference_checkpoint(artifact: Artifact, reference: Any) -> Checkpoint:
    """The reference model of ``artifact``: ``reference`` when given, else the one it was exported from (checked
    against the weights digest its manifest recorded)."""
    if isinstance(reference, Checkpoint):
        return reference
    if reference is not None:
        return load_checkpoint(reference)
    if artifact.checkpoint is not None:
        return artifact.checkpoint
    source = artifact.manifest["source"]["source"]
    if not source:
        raise NanoexportError(
            f"{artifact.path} was exported from a model in memory; pass the reference with --reference"
        )
    checkpoint = load_checkpoint(source)
    if checkpoint.weights_sha256 != artifact.manifest["source"]["weights_sha256"]:
        raise NanoexportError(
            f"the weights at {source} differ from those {artifact.path} was exported from; "
            "pass the original checkpoint with --reference"
        )
    return checkpoint


def _compare_logits(report, full_logits, reference: Reference, prompts, config: ValidationConfig,
                    gate_max_abs: bool) -> None:
    max_abs, min_cosine, agree, positions = 0.0, 1.0, 0, 0
    for prompt, ours in zip(prompts, full_logits):
        theirs = reference.logits(prompt)
        max_abs_by_position = np.abs(ours - theirs).max(-1)
        max_abs = max(max_abs, float(max_abs_by_position.max()))
        cosine = (ours * theirs).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1))
        min_cosine = min(min_cosine, float(cosine.min()))
        report.logits_error_by_position.append({"max_abs": _rounded(max_abs_by_position),
                                                "one_minus_cosine": _rounded(1 - cosine)})
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        positions += len(prompt)
    if gate_max_abs:
        report.add("logits max-abs error", max_abs, config.logits_max_abs, False)
    else:
        report.measured["logits max-abs error"] = max_abs
    report.add("logits min cosine", min_cosine, config.logits_min_cosine, True)
    report.add("top-1 agreement", agree / positions, config.top1_agreement, True, f"{positions} positions")


def _rounded(values: np.ndarray) -> list[float]:
    """``values`` to four significant digits: enough to plot, and a report.json people can still read."""
    return [float(f"{value:.4g}") for value in values.tolist()]


def _kv_consistency(report, full_logits, decoder, prompts, config: ValidationConfig) -> None:
    steps = config.decode_steps
    worst = 0.0
    for prompt, full in zip(prompts, full_logits):
        if len(prompt) <= steps:
            raise NanoexportError(f"validation prompt of {len(prompt)} tokens is too short for {steps} decode steps")
        stepped = decoder.prefill_then_decode(prompt, len(prompt) - steps)
        error_by_position = np.abs(full - stepped).max(-1)
        worst = max(worst, float(error_by_position.max()))
        report.kv_error_by_position.append({"prefill": len(prompt) - steps, "max_abs": _rounded(error_by_position)})
    report.add("KV consistency max-abs", worst, config.kv_max_abs, False, f"prefill, then {steps} decode steps")


def _greedy_agreement(report, decoder, reference: Reference, prompts, config: ValidationConfig) -> None:
    count = config.greedy_tokens
    matched, total = 0, 0
    for prompt in prompts:
        ours = greedy(decoder.next_token_stream(prompt), count)
        theirs = greedy(reference.next_token_stream(prompt), count)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), count)
        matched += same
        total += count
    report.add("greedy agreement", matched / total, config.greedy_agreement, True,
               f"{count} tokens x {len(prompts)} prompts, matched until first difference")


def _perplexity(report, artifact: Artifact, decoder, reference: Reference, config: ValidationConfig,
                by_scoring_runner: bool = False) -> None:
    """Perplexity of the artifact and of the reference on the same windows of the evaluation text."""
    tokenizer_folder = artifact.path / "tokenizer"
    if not tokenizer_folder.is_dir():
        log.warning("perplexity not measured: the artifact has no tokenizer to read the evaluation text with")
        return
    text = config.eval_text or str(DEMO_MODEL / "heldout.txt")
    window = config.eval_window
    if decoder.capacity is not None and not decoder.circular:
        window = min(window, decoder.capacity)  # a window must fit the artifact's KV cache
    windows = text_windows(text, tokenizer_folder, window, config.eval_windows)
    with runtime_refusals(artifact):
        ours = perplexity(decoder.full_logits, windows)
    theirs = perplexity(reference.logits, windows)
    report.measured["perplexity"] = ours
    report.measured["reference perplexity"] = theirs
    detail = f"{ours:.3f} vs {theirs:.3f}, {len(windows)} windows of {window} tokens of {Path(text).name}"
    if by_scoring_runner:
        detail += f", scored by the {artifact.target} target's scoring runner"
    report.add("perplexity increase", ours / theirs - 1, config.perplexity_increase, False, detail)
