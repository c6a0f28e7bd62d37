"""Export wall time, peak RSS and artifact bytes, per model and target, against the checkpoint's bf16 bytes.

Each export runs as its own process (``nanoexport --no-validate``, int4 round-to-nearest by default) so its
peak RSS (``ru_maxrss`` of that child alone) is its own. The larger models are built from published configs
with random weights and saved as bf16 safetensors shards, as checkpoints ship (see ``models.py``).
onnxruntime-genai's model builder (``-p int4 -e cpu``) exports the same checkpoint in the same run when it is
installed, so its time and memory are measured beside ours on this machine as it is now.

Examples:
    python benchmarks/export_bench.py                                   # demo and Qwen2.5-0.5B, onnx
    python benchmarks/export_bench.py --models qwen2.5-1.5b phi3-mini --targets onnx openvino coreml qnn
    python benchmarks/export_bench.py --models qwen2.5-0.5b --quant none --builder no
    python benchmarks/export_bench.py --models phi3-mini --keep-float ''   # the output head in int4 too
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from models import MODELS, RESULTS, checkpoint, write_results

TARGETS = ("onnx", "openvino", "coreml", "qnn")


def checkpoint_bytes(folder: Path) -> dict[str, int]:
    """Parameters of the checkpoint (tied tensors once, as stored), and their size in bf16 and fp32."""
    from safetensors import safe_open

    count = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                size = 1
                for dimension in shape:
                    size *= dimension
                count += size
    return {"parameters": count, "bf16_bytes": 2 * count, "fp32_bytes": 4 * count}


def run_measured(command: list[str]) -> dict:
    """Run ``command`` as a child; its wall seconds and peak RSS."""
    started = time.perf_counter()
    # stderr into a file, not a pipe: a chatty child (the builder logs every tensor) would fill a pipe nobody
    # reads before wait4 returns, and block.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        log.seek(0)
        error = log.read().decode(errors="replace").strip().splitlines()
    if os.waitstatus_to_exitcode(status) != 0:
        return {"failed": error[-1] if error else f"exit code {os.waitstatus_to_exitcode(status)}",
                "seconds": round(seconds, 1), "peak_rss_bytes": usage.ru_maxrss * 1024}
    return {"seconds": round(seconds, 1), "peak_rss_bytes": usage.ru_maxrss * 1024}


def export_ours(model: Path, out: Path, target: str, quant: str, algo: str, keep_float: str | None,
                extra: list[str]) -> dict:
    flags = ["--quant", quant, "--algo", algo] if quant != "none" else []
    if keep_float is not None and quant != "none":
        flags += ["--keep-float", keep_float]
    flags += extra
    if target == "qnn":
        flags += ["--max-context", "512", "--prefill-chunk", "64"]
    return run_measured([sys.executable, "-m", "nanoexport.cli", "--model", str(model), "--target", target,
                         "--out", str(out), "--no-validate", *flags])


def export_builder(model: Path, out: Path) -> dict:
    return run_measured([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out),
                         "-p", "int4", "-e", "cpu"])


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["demo", "qwen2.5-0.5b"])
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=["onnx"])
    parser.add_argument("--quant", default="int4", help="weight type (default: int4); none for fp32")
    parser.add_argument("--algo", default="rtn", help="quantizer (default: rtn)")
    parser.add_argument("--keep-float", help="our --keep-float (default: ours, the output head); '' quantizes it")
    parser.add_argument("--extra", default="", help="more flags for our exports, e.g. '--config calib.toml'")
    parser.add_argument("--builder", choices=("auto", "no"), default="auto",
                        help="also run onnxruntime-genai's model builder (-p int4 -e cpu) when installed")
    parser.add_argument("--scratch", type=Path, help="keep checkpoints and artifacts here (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=RESULTS / "export_bench.json")
    args = parser.parse_args()
    run_builder = args.builder == "auto" and importlib.util.find_spec("onnxruntime_genai") is not None
    results = []
    with tempfile.TemporaryDirectory() as temporary:
        scratch = args.scratch or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            model = checkpoint(name, scratch)
            sizes = checkpoint_bytes(model)
            runs = [(target, lambda out, t=target: export_ours(model, out, t, args.quant, args.algo,
                                                                      args.keep_float, args.extra.split()))
                    for target in args.targets]
            if run_builder and name != "demo":  # the builder needs a hub-style config the demo lacks
                runs.append(("builder", lambda out: export_builder(model, out)))
            for tool, export in runs:
                out = scratch / f"{name}-{tool}"
                shutil.rmtree(out, ignore_errors=True)  # a kept --scratch holds the last run's artifacts
                figures = export(out)
                figures["artifact_bytes"] = folder_bytes(out)
                figures["peak_rss_over_bf16"] = round(figures["peak_rss_bytes"] / sizes["bf16_bytes"], 3)
                figures["artifact_bits_per_weight"] = round(8 * figures["artifact_bytes"] / sizes["parameters"], 2)
                results.append({"model": name, "tool": "nanoexport" if tool != "builder" else "model builder",
                                "target": tool if tool != "builder" else "onnx", "quant": args.quant,
                                "algo": args.algo, "keep_float": args.keep_float, "extra": args.extra, **sizes,
                                **figures})
                status = f"FAILED: {figures['failed']}" if "failed" in figures else ""
                print(f"{name:14s} {tool:9s} {figures['seconds']:8.1f} s   peak RSS "
                      f"{figures['peak_rss_bytes'] / 2**20:8.0f} MiB = {figures['peak_rss_over_bf16']:.2f} x bf16 "
                      f"({sizes['bf16_bytes'] / 2**20:.0f} MiB)   artifact "
                      f"{figures['artifact_bytes'] / 2**20:8.0f} MiB "
                      f"({figures['artifact_bits_per_weight']:.2f} bits/weight) {status}", flush=True)
                if args.scratch is None:
                    shutil.rmtree(out, ignore_errors=True)
    write_results(args.json, {"quant": args.quant, "algo": args.algo, "keep_float": args.keep_float}, results)


if __name__ == "__main__":
    main()
