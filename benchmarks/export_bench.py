"""Export wall time and peak RSS, for the demo model and a random-weight Qwen2.5-0.5B-config model.

Each export runs as its own process (``nanoexport --no-validate``) so its peak RSS is its own. The
Qwen model is built from Qwen2.5-0.5B's published config with random weights (the hub is not needed)
and saved as safetensors first, in a separate process.

Examples:
    python benchmarks/export_bench.py                  # both models
    python benchmarks/export_bench.py --models demo    # only the demo model
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from models import MODELS, RESULTS, checkpoint, write_results


def weight_bytes(folder: Path) -> int:
    """fp32 bytes of the checkpoint's parameters, counting tied tensors once (as stored)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += 4 * count
    return total


def measure_export(model: Path, out: Path) -> dict:
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "nanoexport.cli", "--model", str(model), "--out", str(out), "--no-validate"],
        stdout=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export of {model} failed with exit code {os.waitstatus_to_exitcode(status)}")
    artifact_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"seconds": round(seconds, 2), "peak_rss_bytes": usage.ru_maxrss * 1024, "artifact_bytes": artifact_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--json", type=Path, default=RESULTS / "export_bench.json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            model = checkpoint(name, Path(scratch))
            figures = measure_export(model, Path(scratch) / f"{name}-onnx")
            figures["weights_fp32_bytes"] = weight_bytes(model)
            figures["peak_rss_over_weights"] = round(figures["peak_rss_bytes"] / figures["weights_fp32_bytes"], 3)
            results.append({"model": name, **figures})
            print(
                f"{name:14s} export {figures['seconds']:7.1f} s   peak RSS {figures['peak_rss_bytes'] / 2**20:8.0f} MiB"
                f"   fp32 weights {figures['weights_fp32_bytes'] / 2**20:8.0f} MiB"
                f"   ratio {figures['peak_rss_over_weights']:.2f}",
                flush=True,
            )
    write_results(args.json, {}, results)


if __name__ == "__main__":
    main()
