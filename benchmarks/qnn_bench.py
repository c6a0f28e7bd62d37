"""Perplexity of the qnn target's W4A16, W8A16 and W8A8 artifacts on the HTP emulator and on ONNX Runtime CPU.

On the demo model, in one run: the fp32 PyTorch model (the reference), the onnx target's weight-only int4
artifact (``--quant int4``) on ONNX Runtime CPU, and for each qnn variant its QDQ graphs on ONNX Runtime CPU
(quantization error) and its compiled context binaries on the HTP emulator of ``onnxruntime-qnn`` (quantization
plus backend error). Every row is scored on the same windows of the demo's held-out play with
``nanoexport.validate.perplexity``; each row also gives its top-1 agreement with the reference over the
predicted positions. Sizes are the artifact's bytes of graphs (``*.onnx`` but the EPContext models), weights
(``*.data``) and context binaries (EPContext models and ``*.bin``); compile seconds come from the artifact's
``qnn_compile.json``. The weight form is whatever the target writes.

A variant the QNN provider cannot compile is exported again without compiling (as on a machine without
``onnxruntime-qnn``) so its CPU row is still measured; its HTP row records the error and the run goes on.

The HTP emulator is slow (about 0.1-0.15 s per token on 2 cores), so the defaults score 6 windows of 128
tokens through 64-token prefill calls: under 10 minutes on a 2-core machine.

Examples:
    python benchmarks/qnn_bench.py
    python benchmarks/qnn_bench.py --windows 12 --variants w4a16 w8a16
    python benchmarks/qnn_bench.py --max-context 256 --prefill-chunk 128 --window 256 --json /tmp/qnn.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from models import RESULTS, write_results

VARIANTS = {"w4a16": ("int4", "a16"), "w8a16": ("int8", "a16"), "w8a8": ("int8", "a8")}
# The target's path for a machine without onnxruntime-qnn: QDQ graphs only, nothing compiled.
WITHOUT_QNN = "import sys; sys.modules['onnxruntime_qnn'] = None; from nanoexport.cli import main; sys.exit(main())"


def export(out: Path, flags: list[str], compile_graphs: bool = True) -> tuple[float, str | None]:
    """``nanoexport`` into ``out``; returns (seconds, the error line when it failed)."""
    command = ["-m", "nanoexport.cli"] if compile_graphs else ["-c", WITHOUT_QNN]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *command, "--out", str(out), "--no-validate", "--overwrite", *flags],
                            capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")] or \
            result.stderr.strip().splitlines()[-1:]
        return seconds, lines[0] if lines else f"exit code {result.returncode}"
    return seconds, None


def sizes(folder: Path) -> dict[str, int]:
    """Bytes of the artifact's graphs, weights and context binaries, from its manifest."""
    total = {"graphs_bytes": 0, "weights_bytes": 0, "context_bytes": 0}
    for entry in json.loads((folder / "manifest.json").read_text())["files"]:
        path = entry["path"]
        if path.endswith("_ctx.onnx") or path.endswith(".bin"):
            total["context_bytes"] += entry["size"]
        elif path.endswith(".onnx"):
            total["graphs_bytes"] += entry["size"]
        elif path.endswith(".data"):
            total["weights_bytes"] += entry["size"]
    return total


def compile_seconds(folder: Path) -> float | None:
    build = json.loads((folder / "build.json").read_text())
    return round(sum(build["target_seconds"].values()), 2) if build.get("target_seconds") else None


def score(logits_of, windows: list[list[int]], reference_top1: list[np.ndarray] | None) -> dict:
    """Perplexity over ``windows``, and top-1 agreement with ``reference_top1`` (the reference's argmaxes)."""
    from nanoexport.validate.perplexity import perplexity

    top1 = []
    started = time.perf_counter()

    def recorded(tokens: list[int]) -> np.ndarray:
        logits = logits_of(tokens)
        top1.append(logits[:-1].argmax(-1))
        return logits

    value = perplexity(recorded, windows)
    row = {"perplexity": round(value, 4), "seconds": round(time.perf_counter() - started, 1), "top1": top1}
    if reference_top1 is not None:
        agree = sum(int((ours == theirs).sum()) for ours, theirs in zip(top1, reference_top1))
        row["top1_agreement"] = round(agree / sum(len(theirs) for theirs in reference_top1), 4)
    return row


def artifact_decoder(folder: Path, backend: str | None = None):
    import nanoexport
    from nanoexport.targets import get_target
    from nanoexport.validate.decoding import ArtifactDecoder

    artifact = nanoexport.Artifact.load(folder)
    target = get_target(artifact.target)
    runner = target.Runner(artifact, backend) if backend else target.Runner(artifact)
    return ArtifactDecoder(runner, artifact.manifest["io"]["kv_cache"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--windows", type=int, default=6, help="evaluation windows scored by every row")
    parser.add_argument("--window", type=int, default=128, help="tokens per window (at most --max-context)")
    parser.add_argument("--max-context", type=int, default=128, help="KV-cache capacity of the qnn artifacts")
    parser.add_argument("--prefill-chunk", type=int, default=64, help="tokens per prefill call of the qnn graphs")
    parser.add_argument("--calib-samples", type=int, default=128, help="calibration windows for the activations")
    parser.add_argument("--json", type=Path, default=RESULTS / "qnn_bench.json")
    args = parser.parse_args()
    if args.window > args.max_context:
        parser.error("--window must fit the artifacts' KV cache: at most --max-context")

    from nanoexport.capture.checkpoint import DEMO_MODEL, load_checkpoint
    from nanoexport.validate.decoding import TorchReference
    from nanoexport.validate.perplexity import text_windows

    has_qnn = importlib.util.find_spec("onnxruntime_qnn") is not None
    windows = text_windows(DEMO_MODEL / "heldout.txt", DEMO_MODEL, args.window, args.windows)
    reference = score(TorchReference(load_checkpoint(DEMO_MODEL).model).logits, windows, None)
    print(f"fp32 reference: perplexity {reference['perplexity']:.4f} on {len(windows)} windows of {args.window}",
          flush=True)
    rows = [{"artifact": "fp32", "runtime": "PyTorch", "perplexity": reference["perplexity"]}]
    with tempfile.TemporaryDirectory() as scratch:
        settings_file = Path(scratch) / "bench.toml"  # the bench's settings only, never ./nanoexport.toml
        settings_file.write_text(f"[quant]\ncalib_samples = {args.calib_samples}\n")
        config = ["--config", str(settings_file)]
        int4 = Path(scratch) / "onnx-int4"
        seconds, error = export(int4, [*config, "--target", "onnx", "--quant", "int4"])
        if error:
            raise SystemExit(f"onnx target export failed: {error}")
        measured = score(artifact_decoder(int4).full_logits, windows, reference["top1"])
        rows.append({"artifact": "int4 weight-only (onnx target)", "runtime": "ONNX Runtime CPU",
                     "perplexity": measured["perplexity"], "top1_agreement": measured["top1_agreement"],
                     "export_s": round(seconds, 1), "score_s": measured["seconds"], **sizes(int4)})
        print(f"int4 onnx: {measured['perplexity']:.4f}", flush=True)
        for variant in args.variants:
            weights, activations = VARIANTS[variant]
            out = Path(scratch) / f"qnn-{variant}"
            flags = [*config, "--target", "qnn", "--quant", weights, "--activations", activations,
                     "--max-context", str(args.max_context), "--prefill-chunk", str(args.prefill_chunk)]
            seconds, error = export(out, flags)
            compile_error = error if error and "could not compile" in error else None
            if compile_error:
                print(f"{variant}: {compile_error}; exporting the QDQ graphs without compiling", flush=True)
                seconds, error = export(out, flags, compile_graphs=False)
            if error:
                print(f"{variant}: export failed: {error}", flush=True)
                rows.append({"artifact": variant.upper(), "runtime": "export", "error": error[:300]})
                continue
            common = {"artifact": variant.upper(), "export_s": round(seconds, 1),
                      "compile_s": compile_seconds(out), **sizes(out)}
            cpu = score(artifact_decoder(out, "cpu").full_logits, windows, reference["top1"])
            rows.append({**common, "runtime": "ONNX Runtime CPU (QDQ)", "perplexity": cpu["perplexity"],
                         "top1_agreement": cpu["top1_agreement"], "score_s": cpu["seconds"]})
            print(f"{variant} cpu: {cpu['perplexity']:.4f}", flush=True)
            htp_row = {**common, "runtime": "HTP emulator"}
            if not has_qnn:
                htp_row["error"] = "onnxruntime-qnn is not installed"
            else:
                try:
                    htp = score(artifact_decoder(out, "htp").full_logits, windows, reference["top1"])
                    backend_top1 = sum(int((a == b).sum()) for a, b in zip(htp["top1"], cpu["top1"]))
                    htp_row.update(perplexity=htp["perplexity"], top1_agreement=htp["top1_agreement"],
                                   score_s=htp["seconds"], top1_vs_cpu=round(
                                       backend_top1 / sum(len(b) for b in cpu["top1"]), 4))
                    print(f"{variant} htp: {htp['perplexity']:.4f}", flush=True)
                except Exception as error:  # noqa: BLE001 -- the bench records it and goes on
                    htp_row["error"] = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
                    print(f"{variant} htp: failed: {htp_row['error']}", flush=True)
            if compile_error:
                htp_row["compile_error"] = compile_error[:300]
            rows.append(htp_row)

    fp32, int4_ppl = rows[0]["perplexity"], rows[1]["perplexity"]
    cpu_of = {row["artifact"]: row["perplexity"] for row in rows if row["runtime"].startswith("ONNX Runtime CPU (")}
    for row in rows[1:]:
        if "perplexity" in row:
            row["change_vs_fp32"] = round(row["perplexity"] / fp32 - 1, 5)
            row["change_vs_int4_ort"] = round(row["perplexity"] / int4_ppl - 1, 5)
            if row["runtime"] == "HTP emulator":
                row["change_vs_same_qdq_on_cpu"] = round(row["perplexity"] / cpu_of[row["artifact"]] - 1, 5)
    print_table(rows)
    settings = {"model": "demo", "eval_text": "heldout.txt", "windows": len(windows), "window": args.window,
                "max_context": args.max_context, "prefill_chunk": args.prefill_chunk,
                "calib_samples": args.calib_samples, "variants": args.variants}
    write_results(args.json, settings, rows)


def print_table(rows: list[dict]) -> None:
    def percent(row, key):
        return f"{row[key] * 100:+.3f}%" if key in row else ""

    def megabytes(row, key):
        return f"{row[key] / 1e6:.2f}" if row.get(key) else ""

    print("\n| artifact | runtime | perplexity | vs fp32 | vs int4 ORT | HTP vs same QDQ on CPU | top-1 vs fp32 "
          "| graphs MB | weights MB | context MB | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "perplexity" not in row:
            error = row.get("compile_error", row.get("error", ""))
            print(f"| {row['artifact']} | {row['runtime']} | failed: {error[:160]} | | | | | | | | |")
            continue
        top1 = f"{row['top1_agreement']:.3f}" if "top1_agreement" in row else ""
        compiled = "" if row.get("compile_s") is None else f"{row['compile_s']:.2f}"
        print(f"| {row['artifact']} | {row['runtime']} | {row['perplexity']:.4f} | {percent(row, 'change_vs_fp32')} "
              f"| {percent(row, 'change_vs_int4_ort')} | {percent(row, 'change_vs_same_qdq_on_cpu')} | {top1} "
              f"| {megabytes(row, 'graphs_bytes')} | {megabytes(row, 'weights_bytes')} "
              f"| {megabytes(row, 'context_bytes')} | {compiled} |")


if __name__ == "__main__":
    main()
