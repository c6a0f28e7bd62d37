"""Our int4 quantizers beside the peer anchors, on the demo model and the quality set.

int4 symmetric, blocks of 32 along the input dimension, the decoder linears quantized (embeddings and the
tied lm_head stay float, activations float) by: our RTN, GPTQ and AWQ (nanoexport.calibration on the
canonical graph), and the anchors of quant_anchors.py (ONNX Runtime's MatMulNBitsQuantizer, NNCF data-free /
GPTQ / AWQ with scale estimation, llama.cpp Q4_0). Every row is scored by perplexity on the model's held-out
text on ONNX Runtime CPU (same windows), with bits per weight counting scales, and the quantization time
alone. The models are the demo and quality_set.py's (trained first when the cache lacks them); the table is
printed per model, then the mean perplexity change of every method over the models.

Examples:
    python benchmarks/quant_bench.py                        # every model, every row: about 10 minutes a model
    python benchmarks/quant_bench.py --ours-only --models demo,qs-mqa
    python benchmarks/quant_bench.py --reuse-anchors        # anchors' rows from the last --json, ours again
    python benchmarks/quant_bench.py --reuse-anchors a.json b.json   # anchors of runs on other models
    python benchmarks/quant_bench.py --report a.json b.json # print earlier runs' tables and their mean
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx_ir as ir
import quant_anchors as anchors
import quality_set
from models import RESULTS, write_results

from nanoexport.calibration import quantize
from nanoexport.capture.checkpoint import DEMO_MODEL, load_checkpoint
from nanoexport.capture.onnx_export import export_onnx
from nanoexport.config import QuantConfig
from nanoexport.passes import run_passes, select_passes

log = logging.getLogger("quant_bench")

OURS = ("rtn", "se", "gptq", "awq")


def model_folder(name: str, cache: Path) -> Path:
    return DEMO_MODEL if name == "demo" else quality_set.model_folder(name, cache)


def canonical_graph(checkpoint_folder: Path, folder: Path) -> tuple[Path, dict[str, bytes]]:
    """The model's canonical fp32 graph (capture and passes, no target lowering); its path."""
    checkpoint = load_checkpoint(checkpoint_folder)
    model = export_onnx(checkpoint)
    run_passes(model, select_passes())
    folder.mkdir()
    ir.save(model, folder / "model.onnx", external_data="model.onnx.data")
    return folder / "model.onnx", checkpoint.tokenizer_files


def ours(algo: str, canonical: Path, tokenizer_files: dict[str, bytes], checkpoint_folder: Path,
         work: Path) -> dict:
    """Our quantizer ``algo`` on a fresh copy of the canonical graph, with as many calibration windows as
    the anchors get."""
    model = ir.load(canonical)
    config = QuantConfig(weights="int4", block_size=anchors.BLOCK, algo=algo,
                         calib_samples=anchors.CALIBRATION_WINDOWS, calib_window=anchors.WINDOW)
    started = time.perf_counter()
    summary = quantize(model, config, tokenizer_files, checkpoint_folder)
    seconds = time.perf_counter() - started
    folder = work / f"ours-{algo}"
    folder.mkdir()
    ir.save(model, folder / "model.onnx", external_data="model.onnx.data")
    weights = summary["quantized_weights"]
    return anchors.result(f"nanoexport {algo}", seconds, weights, round(summary["bits_per_weight"] * weights),
                          folder / "model.onnx", checkpoint_folder)


def model_rows(name: str, checkpoint_folder: Path, algos: list[str], anchor_rows: list[dict] | None) -> list[dict]:
    """Every row of one model: fp32, ours, then the anchors (run now unless ``anchor_rows`` are given)."""
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        canonical, tokenizer_files = canonical_graph(checkpoint_folder, work / "ours-canonical")
        rows = [anchors.fp32_baseline("fp32 (canonical graph)", canonical, checkpoint_folder)]
        for algo in algos:
            log.info("%s: nanoexport %s", name, algo)
            rows.append(ours(algo, canonical, tokenizer_files, checkpoint_folder, work))
        rows += anchor_rows if anchor_rows is not None else anchors.anchor_rows(work, checkpoint_folder)
    anchors.check_same_layers([row for row in rows if row["bits_per_weight"] != 32])
    return rows


def change(row: dict, rows: list[dict]) -> float:
    """The row's perplexity change in percent against its model's fp32 canonical graph."""
    return 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)


def print_mean(per_model: dict[str, list[dict]]) -> dict[str, float]:
    """The mean perplexity change of every quantized method present for all models; printed and returned."""
    names = [row["name"] for row in next(iter(per_model.values())) if row["bits_per_weight"] != 32]
    means = {}
    for name in names:
        changes = [change(row, rows) for rows in per_model.values() for row in rows if row["name"] == name]
        if len(changes) == len(per_model):
            means[name] = float(np.mean(changes))
    print(f"\nmean perplexity change over {len(per_model)} models ({', '.join(per_model)})")
    for name, mean in means.items():
        worst = max(change(row, rows) for rows in per_model.values() for row in rows if row["name"] == name)
        print(f"{name:40s} {mean:+7.3f}%   worst {worst:+7.3f}%")
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(["demo", *quality_set.MODELS]),
                        help="comma-separated: demo and quality_set.py's models")
    parser.add_argument("--cache", type=Path, default=quality_set.DEFAULT_CACHE, help="where the quality set is")
    parser.add_argument("--ours-only", action="store_true", help="skip the anchors")
    parser.add_argument("--reuse-anchors", nargs="*", type=Path, metavar="JSON",
                        help="take each model's anchor rows from these earlier results (default: --json) "
                             "instead of running them")
    parser.add_argument("--algos", default=",".join(OURS), help="our algorithms to run, comma-separated")
    parser.add_argument("--report", nargs="+", type=Path, metavar="JSON",
                        help="run nothing: print the tables of these earlier results and the mean over their models")
    parser.add_argument("--json", type=Path, default=RESULTS / "quant_bench.json")
    args = parser.parse_args()
    if args.report:
        per_model: dict[str, list[dict]] = {}
        for path in args.report:  # a later file's row replaces an earlier one of the same model and name
            for entry in json.loads(path.read_text())["results"]:
                rows = {row["name"]: row for row in per_model.get(entry["model"], [])}
                per_model[entry["model"]] = list((rows | {row["name"]: row for row in entry["rows"]}).values())
        for name, rows in per_model.items():
            print(f"\n{name}")
            anchors.print_table(rows)
        print_mean(per_model)
        return
    anchors.quiet_logs()
    earlier = {}
    if args.reuse_anchors is not None:
        for path in args.reuse_anchors or [args.json]:
            earlier |= {entry["model"]: entry["rows"] for entry in json.loads(path.read_text())["results"]}
    per_model = {}
    for name in args.models.split(","):
        folder = model_folder(name, args.cache)
        kept = [row for row in earlier.get(name, []) if not row["name"].startswith(("nanoexport", "fp32 (canonical"))]
        anchor_rows = [] if args.ours_only else (kept or None)
        per_model[name] = model_rows(name, folder, args.algos.split(","), anchor_rows)
        print(f"\n{name} ({folder})")
        anchors.print_table(per_model[name])
    means = print_mean(per_model)
    packages = anchors.PACKAGES if not args.ours_only else ("nanoexport", "onnxruntime", "numpy")
    settings = {
        "bits": 4, "block_size": anchors.BLOCK, "symmetric": True, "window": anchors.WINDOW,
        "calibration_windows": anchors.CALIBRATION_WINDOWS, "mean_change_percent": means,
        "versions": {package: version(package) for package in packages},
    }
    write_results(args.json, settings, [{"model": name, "rows": rows} for name, rows in per_model.items()])


if __name__ == "__main__":
    main()
