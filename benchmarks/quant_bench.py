"""Our int4 quantizers beside the peer anchors, in one run on the demo model.

int4 symmetric, blocks of 32 along the input dimension, the decoder linears quantized (embeddings and the
tied lm_head stay float) by: our RTN, GPTQ and AWQ (nanoexport.calibration on the canonical graph), and the
anchors of quant_anchors.py (ONNX Runtime's MatMulNBitsQuantizer, NNCF data-free / GPTQ / AWQ with scale
estimation, llama.cpp Q4_0). Every row is scored by perplexity on the held-out play on ONNX Runtime CPU
(same windows), with bits per weight counting scales, and the quantization time alone.

Example:
    python benchmarks/quant_bench.py            # all rows, about 10 minutes on 2 cores
    python benchmarks/quant_bench.py --ours-only
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import onnx_ir as ir
import quant_anchors as anchors
from models import RESULTS, write_results

from nanoexport.calibration import quantize
from nanoexport.capture.checkpoint import DEMO_MODEL, load_checkpoint
from nanoexport.capture.onnx_export import export_onnx
from nanoexport.config import QuantConfig
from nanoexport.passes import run_passes, select_passes

log = logging.getLogger("quant_bench")

OURS = ("rtn", "gptq", "awq")


def canonical_graph(folder: Path) -> tuple[Path, dict[str, bytes]]:
    """The demo model's canonical fp32 graph (capture and passes, no target lowering); its path."""
    checkpoint = load_checkpoint(DEMO_MODEL)
    model = export_onnx(checkpoint)
    run_passes(model, select_passes())
    folder.mkdir()
    ir.save(model, folder / "model.onnx", external_data="model.onnx.data")
    return folder / "model.onnx", checkpoint.tokenizer_files


def ours(algo: str, canonical: Path, tokenizer_files: dict[str, bytes], work: Path) -> dict:
    """Our quantizer ``algo`` on a fresh copy of the canonical graph, with as many calibration windows as
    the anchors get."""
    model = ir.load(canonical)
    config = QuantConfig(weights="int4", block_size=anchors.BLOCK, algo=algo,
                         calib_samples=anchors.CALIBRATION_WINDOWS, calib_window=anchors.WINDOW)
    started = time.perf_counter()
    summary = quantize(model, config, tokenizer_files, DEMO_MODEL)
    seconds = time.perf_counter() - started
    folder = work / f"ours-{algo}"
    folder.mkdir()
    ir.save(model, folder / "model.onnx", external_data="model.onnx.data")
    weights = summary["quantized_weights"]
    return anchors.result(f"nanoexport {algo}", seconds, weights, round(summary["bits_per_weight"] * weights),
                          folder / "model.onnx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours-only", action="store_true", help="skip the anchors")
    parser.add_argument("--algos", default=",".join(OURS), help="our algorithms to run, comma-separated")
    parser.add_argument("--json", type=Path, default=RESULTS / "quant_bench.json")
    args = parser.parse_args()
    anchors.quiet_logs()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        canonical, tokenizer_files = canonical_graph(work / "ours-canonical")
        rows = [anchors.fp32_baseline("fp32 (canonical graph)", canonical)]
        for algo in args.algos.split(","):
            log.info("nanoexport %s", algo)
            rows.append(ours(algo, canonical, tokenizer_files, work))
        if not args.ours_only:
            rows += anchors.anchor_rows(work)
    anchors.check_same_layers([row for row in rows if row["bits_per_weight"] != 32])
    anchors.print_table(rows)
    packages = anchors.PACKAGES if not args.ours_only else ("nanoexport", "onnxruntime", "numpy")
    settings = {
        "model": "demo", "bits": 4, "block_size": anchors.BLOCK, "symmetric": True, "window": anchors.WINDOW,
        "heldout_windows": len(anchors.heldout_windows()), "calibration_windows": anchors.CALIBRATION_WINDOWS,
        "versions": {package: version(package) for package in packages},
    }
    write_results(args.json, settings, rows)


if __name__ == "__main__":
    main()
