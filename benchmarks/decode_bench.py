"""Time to first token and decode tokens/s on ONNX Runtime CPU: our artifact beside the model builder's.

For each model, in the same run: ``nanoexport`` (onnx target) and onnxruntime-genai's model builder
(``python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu``) export the same checkpoint, and both
artifacts run through the same onnxruntime-genai generator: a 128-token prompt (time to first token),
then greedy decoding (tokens/s). The median of several runs is reported, with ours/builder ratios.

Examples:
    python benchmarks/decode_bench.py
    python benchmarks/decode_bench.py --models demo --runs 5 --new-tokens 128
    python benchmarks/decode_bench.py --precisions int4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from models import MODELS, RESULTS, checkpoint, write_results
PROMPT_TOKENS = 128


PRECISIONS = ("fp32", "int4")


def export_ours(model: Path, out: Path, precision: str) -> None:
    # int4: round to nearest, blocks of 32, lm_head float -- the builder's int4 defaults quantize the same
    # decoder MatMuls the same way.
    quant = ["--quant", "int4", "--block-size", "32"] if precision == "int4" else []
    subprocess.run(
        [sys.executable, "-m", "nanoexport.cli", "--model", str(model), "--out", str(out), "--no-validate", *quant],
        check=True, stdout=subprocess.DEVNULL,
    )


def export_builder(model: Path, out: Path, precision: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out),
         "-p", precision, "-e", "cpu"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def measure(folder: Path, prompt: np.ndarray, new_tokens: int, runs: int) -> dict:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    first_token, decode_rate = [], []
    for _ in range(runs + 1):  # the first run warms up and is dropped
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.append_tokens(prompt)
        generator.generate_next_token()
        first = time.perf_counter()
        generated = 1
        while not generator.is_done():
            generator.generate_next_token()
            generated += 1
        finished = time.perf_counter()
        first_token.append(first - started)
        decode_rate.append((generated - 1) / (finished - first))
    return {
        "time_to_first_token_s": round(statistics.median(first_token[1:]), 5),
        "decode_tokens_per_s": round(statistics.median(decode_rate[1:]), 2),
    }


def compare(name: str, model: Path, precision: str, prompt: np.ndarray, scratch: Path, args) -> dict:
    """Both tools' artifacts of ``model`` at ``precision``, measured one after the other; the printed row."""
    figures = {}
    for tool, export in (("nanoexport", export_ours), ("builder", export_builder)):
        out = scratch / f"{name}-{precision}-{tool}"
        export(model, out, precision)
        figures[tool] = measure(out, prompt, args.new_tokens, args.runs)
    ours, theirs = figures["nanoexport"], figures["builder"]
    row = {
        "model": name,
        "precision": precision,
        **{f"{tool}_{key}": value for tool, values in figures.items() for key, value in values.items()},
        "decode_ratio": round(ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"], 3),
        "first_token_ratio": round(theirs["time_to_first_token_s"] / ours["time_to_first_token_s"], 3),
    }
    print(
        f"{name:13s} {precision}  decode tok/s: ours {ours['decode_tokens_per_s']:8.1f}  builder "
        f"{theirs['decode_tokens_per_s']:8.1f}  ratio {row['decode_ratio']:.2f}   "
        f"first token (128-token prompt): ours {ours['time_to_first_token_s'] * 1000:7.1f} ms  builder "
        f"{theirs['time_to_first_token_s'] * 1000:7.1f} ms  speed ratio {row['first_token_ratio']:.2f}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=RESULTS / "decode_bench.json")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            model = checkpoint(name, Path(scratch))
            vocab = json.loads((model / "config.json").read_text())["vocab_size"]
            prompt = np.random.default_rng(0).integers(10, vocab, PROMPT_TOKENS).astype(np.int32)
            for precision in args.precisions:
                rows.append(compare(name, model, precision, prompt, Path(scratch), args))
    settings = {"runs": args.runs, "new_tokens": args.new_tokens, "prompt_tokens": PROMPT_TOKENS,
                "precisions": args.precisions}
    write_results(args.json, settings, rows)


if __name__ == "__main__":
    main()
