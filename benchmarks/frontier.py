"""The speed/quality frontier: our export settings beside each peer's default int4 export, per runtime.

For each runtime, a set of our settings (the levers: block size, the output head in fp16, int8 or int4) and
the peer's default int4 export as its users run it:

- ONNX Runtime (run by onnxruntime-genai): the model builder's ``-p int4 -e cpu``;
- OpenVINO (run by openvino-genai): ``optimum-cli export openvino --weight-format int4``, nothing else
  (int4_asym, group 128, the embedding and head in int8_asym: NNCF's defaults).

Speed on the Qwen2.5-0.5B config (random weights; decode bytes, not values, set the speed): decode tokens/s
after a 128-token prompt, time to first token, peak memory of a fresh process, artifact bytes; every point of
a runtime takes turns run by run (decode_bench.py's measurement), ratios are the medians of the run-by-run
ratios to the peer. Quality on the demo model (trained; held-out text never trained or calibrated on): the
same settings exported from it and scored in the same runtime, as its users run it (ONNX Runtime's default
session, OpenVINO CPU's default compile with the artifact's own runtime options), perplexity change against
the PyTorch fp32 model over every held-out window.

Printed per runtime as a table; written as JSON and as a plot (perplexity change against decode tokens/s). A
point of ours *dominates* the peer when its decode speed and first token are at least the peer's and its
perplexity change at most the peer's; the issue's goal is a dominating point at >= 1.15x decode.

Examples:
    python benchmarks/frontier.py
    python benchmarks/frontier.py --runtimes openvino --runs 8 --new-tokens 64
    python benchmarks/frontier.py --speed-model demo --runs 2       # a quick look, all on the demo
    python benchmarks/frontier.py --runtimes onnxruntime --only "int4/128" "gptq"
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from decode_bench import (
    PROMPT_TOKENS, measure_onnxruntime, measure_openvino, optimum_cli, peak_memory_mib, run_ratios,
)
from models import RESULTS, checkpoint, write_results
from quant_anchors import heldout_windows

log = logging.getLogger("frontier")

RUNTIMES = ("onnxruntime", "openvino")
GOAL = 1.15  # decode speed over the peer's default, at no more perplexity change


@dataclass(frozen=True)
class Point:
    """One export setting on one runtime: ours (``flags`` and ``quant`` TOML entries) or the peer's default."""

    runtime: str
    label: str
    flags: tuple[str, ...] = ()
    quant: dict[str, str] = field(default_factory=dict)  # [quant] entries of a config file, e.g. overrides
    peer: bool = False


def _ours(runtime: str, label: str, *flags: str, head: str = "fp16", weights: str = "int4") -> Point:
    quant = {"overrides": '{ lm_head = "%s", "*embed_tokens" = "%s" }' % (head, head)} if head != "fp16" else {}
    return Point(runtime, label, ("--quant", weights, *flags), quant)


POINTS = (
    Point("onnxruntime", "builder int4 (default)", peer=True),
    _ours("onnxruntime", "ours int4/32, head int4", head="int4"),
    _ours("onnxruntime", "ours int4/32, head int8", head="int8"),
    _ours("onnxruntime", "ours int4/64, head int4", "--block-size", "64", head="int4"),
    _ours("onnxruntime", "ours int4/128, head int8", "--block-size", "128", head="int8"),
    _ours("onnxruntime", "ours int4/128, head int4", "--block-size", "128", head="int4"),
    _ours("onnxruntime", "ours int4/128 gptq, head int4", "--block-size", "128", "--algo", "gptq", head="int4"),
    _ours("onnxruntime", "ours int4/64 gptq, head int4", "--block-size", "64", "--algo", "gptq", head="int4"),
    # Zero points (NNCF's default form) keep blocks of 128 close to the float weights.
    _ours("onnxruntime", "ours uint4/128 asym, head uint4", "--asymmetric", "--block-size", "128",
          head="uint4", weights="uint4"),
    _ours("onnxruntime", "ours uint4/128 asym gptq, head uint4", "--asymmetric", "--block-size", "128",
          "--algo", "gptq", head="uint4", weights="uint4"),
    Point("openvino", "optimum-intel int4 (default)", peer=True),
    _ours("openvino", "ours int4/32, head fp16"),
    _ours("openvino", "ours int4/32, head int8", head="int8"),
    _ours("openvino", "ours int4/64, head int8", "--block-size", "64", head="int8"),
    _ours("openvino", "ours int4/128, head int4", "--block-size", "128", head="int4"),
    _ours("openvino", "ours int4/64 gptq, head int8", "--block-size", "64", "--algo", "gptq", head="int8"),
)


def export(point: Point, model: Path, out: Path) -> Path:
    """``point``'s artifact of ``model`` in ``out`` (replacing an earlier run's)."""
    shutil.rmtree(out, ignore_errors=True)
    if point.peer and point.runtime == "onnxruntime":
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out),
                   "-p", "int4", "-e", "cpu"]
    elif point.peer:
        command = [str(optimum_cli()), "export", "openvino", "-m", str(model), "--task",
                   "text-generation-with-past", "--weight-format", "int4", str(out)]
    else:
        config = out.with_suffix(".toml")
        config.write_text("[quant]\n" + "".join(f"{key} = {value}\n" for key, value in point.quant.items()))
        target = "onnx" if point.runtime == "onnxruntime" else "openvino"
        # onnxruntime-genai feeds unpadded masks: the builder's contract, as in decode_bench.py.
        padding = ("--no-padded-batches",) if target == "onnx" else ()
        command = [sys.executable, "-m", "nanoexport.cli", "--model", str(model), "--target", target, "--out", str(out),
                   "--config", str(config), "--no-validate", *padding, *point.flags]
    log.info("exporting %s: %s", point.label, " ".join(command[1:]))
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# --- quality --------------------------------------------------------------------------------------------------

def perplexity_of(runtime: str, folder: Path, model: Path, windows: list[list[int]]) -> float:
    """Perplexity of the artifact in ``folder`` over ``windows``, each from an empty cache, in its runtime."""
    from nanoexport.validate.perplexity import perplexity

    config = json.loads((model / "config.json").read_text())
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if runtime == "onnxruntime":
        import onnxruntime as ort

        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])

        def logits(tokens: list[int]) -> np.ndarray:
            feeds = {}
            for value in session.get_inputs():
                integer = np.int32 if value.type == "tensor(int32)" else np.int64
                if value.name.startswith("past_key_values"):
                    dtype = np.float16 if value.type == "tensor(float16)" else np.float32
                    feeds[value.name] = np.zeros((1, kv_heads, 0, head_dim), dtype)
                elif value.name == "input_ids":
                    feeds[value.name] = np.array([tokens], integer)
                elif value.name == "attention_mask":
                    feeds[value.name] = np.ones((1, len(tokens)), integer)
                elif value.name == "position_ids":
                    feeds[value.name] = np.arange(len(tokens), dtype=integer)[None]
            return session.run(["logits"], feeds)[0][0].astype(np.float32)
    else:
        import openvino as ov

        xml = next(folder.glob("openvino_model.xml"))
        request = ov.Core().compile_model(xml, "CPU").create_infer_request()
        names = {name for port in request.model_inputs for name in port.get_names()}

        def logits(tokens: list[int]) -> np.ndarray:
            request.reset_state()
            feeds = {"input_ids": np.array([tokens], np.int64), "attention_mask": np.ones((1, len(tokens)), np.int64),
                     "position_ids": np.arange(len(tokens), dtype=np.int64)[None], "beam_idx": np.zeros(1, np.int32)}
            return np.array(request.infer({k: v for k, v in feeds.items() if k in names})["logits"][0], np.float32)

    return perplexity(logits, windows)


def reference_perplexity(model: Path, windows: list[list[int]]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from nanoexport.validate.perplexity import perplexity

    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        return perplexity(lambda tokens: reference(torch.tensor([tokens])).logits[0].numpy(), windows)


# --- speed ----------------------------------------------------------------------------------------------------

def speed(runtime: str, folders: dict[str, Path], vocab: int, args: argparse.Namespace) -> dict[str, dict]:
    """Per label: median decode tokens/s and time to first token, their run-by-run ratios to the peer's."""
    measure = measure_onnxruntime if runtime == "onnxruntime" else measure_openvino
    samples = measure(folders, vocab, args.new_tokens, args.runs)
    peer = next(iter(folders))
    figures = {}
    for label, runs in samples.items():
        decode, first = run_ratios(runs, samples[peer])
        figures[label] = {
            "decode_tokens_per_s": round(statistics.median(rate for _, rate in runs), 2),
            "time_to_first_token_s": round(statistics.median(ttft for ttft, _ in runs), 5),
            "decode_ratio": round(statistics.median(decode), 3), "decode_ratios": decode,
            "first_token_ratio": round(statistics.median(first), 3), "first_token_ratios": first,
            "peak_memory_mib": peak_memory_mib(runtime, folders[label], vocab, args.new_tokens),
            "artifact_bytes": folder_bytes(folders[label]),
        }
    return figures


def frontier(runtime: str, args: argparse.Namespace, scratch: Path) -> list[dict]:
    points = [point for point in POINTS if point.runtime == runtime
              and (point.peer or not args.only or any(label in point.label for label in args.only))]
    rows = {point.label: {"runtime": runtime, "label": point.label, "peer": point.peer} for point in points}
    quality_model = checkpoint("demo", scratch)
    windows = heldout_windows(quality_model)
    reference = reference_perplexity(quality_model, windows)
    for index, point in enumerate(points):
        artifact = export(point, quality_model, scratch / f"quality-{runtime}-{index}")
        value = perplexity_of(runtime, artifact, quality_model, windows)
        rows[point.label].update(perplexity=round(value, 4), reference_perplexity=round(reference, 4),
                                 perplexity_change_pct=round(100 * (value / reference - 1), 3))
        log.info("%s: perplexity %.4f (fp32 %.4f)", point.label, value, reference)
    speed_model = checkpoint(args.speed_model, scratch)
    vocab = json.loads((speed_model / "config.json").read_text())["vocab_size"]
    folders = {point.label: export(point, speed_model, scratch / f"speed-{runtime}-{index}")
               for index, point in enumerate(points)}
    for label, figures in speed(runtime, folders, vocab, args).items():
        rows[label].update(figures)
    peer = rows[points[0].label]
    for row in rows.values():
        row["dominates_peer"] = (not row["peer"] and row["decode_ratio"] >= 1 and row["first_token_ratio"] >= 1
                                 and row["perplexity_change_pct"] <= peer["perplexity_change_pct"])
        row["meets_goal"] = row["dominates_peer"] and row["decode_ratio"] >= GOAL
    return list(rows.values())


def print_table(rows: list[dict]) -> None:
    print(f"\n{'point':32s} {'decode tok/s':>12s} {'ratio [range]':>18s} {'1st token ms':>12s} {'ratio':>6s} "
          f"{'ppl change %':>12s} {'MB':>7s} {'peak MiB':>8s}  dominates")
    for row in rows:
        spread = f"{row['decode_ratio']:.2f} [{min(row['decode_ratios']):.2f}-{max(row['decode_ratios']):.2f}]"
        verdict = "peer" if row["peer"] else "yes, goal met" if row["meets_goal"] else \
            "yes" if row["dominates_peer"] else "no"
        print(f"{row['label']:32s} {row['decode_tokens_per_s']:12.1f} {spread:>18s} "
              f"{row['time_to_first_token_s'] * 1000:12.1f} {row['first_token_ratio']:6.2f} "
              f"{row['perplexity_change_pct']:+12.3f} {row['artifact_bytes'] / 1e6:7.0f} "
              f"{row['peak_memory_mib']:8.0f}  {verdict}")


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity change against decode speed ratio, one panel per runtime; the peer's point in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runtimes = sorted({row["runtime"] for row in rows})
    figure, axes = plt.subplots(1, len(runtimes), figsize=(6 * len(runtimes), 4.5), squeeze=False)
    for axis, runtime in zip(axes[0], runtimes):
        for row in (row for row in rows if row["runtime"] == runtime):
            axis.scatter(row["decode_ratio"], row["perplexity_change_pct"], color="tab:red" if row["peer"] else
                         "tab:green" if row["dominates_peer"] else "tab:blue")
            axis.annotate(row["label"], (row["decode_ratio"], row["perplexity_change_pct"]), fontsize=7,
                          xytext=(4, 4), textcoords="offset points")
        axis.axvline(GOAL, color="grey", linestyle=":", linewidth=1)
        axis.set(title=runtime, xlabel="decode tok/s / peer default's", ylabel="perplexity change vs fp32 (%)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--speed-model", default="qwen2.5-0.5b", help="checkpoint of the speed runs (models.py)")
    parser.add_argument("--only", nargs="+", metavar="TEXT",
                        help="our points whose label contains one of these (the peer's always runs)")
    parser.add_argument("--runs", type=int, default=8, help="alternating runs per point (default: 8)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--scratch", type=Path,
                        help="keep checkpoints and artifacts here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=RESULTS / "frontier.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        scratch = args.scratch or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        for runtime in args.runtimes:
            rows += frontier(runtime, args, scratch)
            print_table([row for row in rows if row["runtime"] == runtime])
    settings = {"runs": args.runs, "new_tokens": args.new_tokens, "prompt_tokens": PROMPT_TOKENS,
                "speed_model": args.speed_model, "quality_model": "demo",
                "points": {point.label: {"flags": list(point.flags), "quant": point.quant} for point in POINTS}}
    write_results(args.json, settings, rows)
    plot(rows, args.json.with_suffix(".svg"))
    print(f"\nwrote {args.json} and {args.json.with_suffix('.svg')}")


if __name__ == "__main__":
    main()
