"""Time to first token and decode tokens/s: our artifacts beside a peer exporter's, per runtime, in one run.

ONNX Runtime CPU: ``nanoexport`` (onnx target) and onnxruntime-genai's model builder
(``python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu``) export the same checkpoint, and both
artifacts run through the same onnxruntime-genai generator, the two taking turns run by run, each run on a
freshly loaded model. Ours is exported with ``--no-padded-batches``, the builder's contract (every
attention_mask entry 1, which is what genai feeds); ``--padded-batches`` measures our default instead, whose
attention also hides left padding.

OpenVINO CPU: ``nanoexport --target openvino`` and optimum-intel's exporter (``optimum-cli export openvino
--task text-generation-with-past --weight-format fp32``, or ``--weight-format int4 --sym --group-size 32
--ratio 1.0 --backup-precision none`` beside our ``--quant int4 --block-size 32``: the same decoder MatMuls
in int4, embedding and lm_head float) export the same checkpoint, and both artifacts run through
``openvino_genai.LLMPipeline(folder, "CPU")`` with the same greedy generation config, taking turns run by
run. optimum-intel pins transformers below ours, so it cannot be installed beside nanoexport: on first use
the benchmark creates a virtual environment for it in ~/.cache/nanoexport/optimum-venv
(``--system-site-packages``, reusing the installed CPU torch, OpenVINO, NNCF and openvino-tokenizers) and
runs ``optimum-cli`` from there.

TVM (``--runtimes tvm``): ``nanoexport --target tvm`` (compiled for this machine's CPU, a static cache of
prompt + new tokens rounded up to 64 slots, prefill in one 128-token chunk) beside our own onnx artifact of the
same model and quantization run by onnxruntime-genai, taking turns run by run; ours/theirs is TVM/ONNX Runtime.
TVM generates through ``nanoexport.targets.tvm.runtime.Generator``, the cache kept in TVM tensors.

Each measurement: a 128-token prompt (time to first token), then greedy decoding of --new-tokens tokens
(tokens/s). The median of several runs is reported, with ours/theirs speed ratios (above 1: ours faster),
each the median of the run-by-run ratios. Peak memory: the peak resident set of a fresh process that loads
the artifact and generates once (Python and the runtime's libraries included, the same for both tools).

Examples:
    python benchmarks/decode_bench.py
    python benchmarks/decode_bench.py --models demo --runs 5 --new-tokens 128
    python benchmarks/decode_bench.py --runtimes onnxruntime --padded-batches
    python benchmarks/decode_bench.py --runtimes openvino --runs 10 --json benchmarks/results/decode_bench_openvino.json
    python benchmarks/decode_bench.py --runtimes tvm --json benchmarks/results/decode_bench_tvm.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from models import MODELS, RESULTS, checkpoint, write_results

log = logging.getLogger("decode_bench")

PROMPT_TOKENS = 128
PRECISIONS = ("fp32", "int4")
RUNTIMES = ("onnxruntime", "openvino", "tvm")
CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
OPTIMUM_VENV = Path.home() / ".cache" / "nanoexport" / "optimum-venv"
# The newest optimum-intel and the versions it resolved to that import and export here: optimum-intel 2.2
# needs transformers<5.6 and huggingface-hub<1.22, and the datasets it imports must accept that hub.
OPTIMUM_PACKAGES = ("optimum-intel==2.2.0", "optimum==2.3.0", "transformers==5.5.4", "datasets==5.0.1")
OPTIMUM_WEIGHTS = {
    "fp32": ["--weight-format", "fp32"],
    # Our int4: symmetric, blocks of 32, every decoder MatMul (--ratio 1.0: none left int8), and the embedding
    # and lm_head float as ours keeps them (--backup-precision none; NNCF's default makes them int8).
    "int4": ["--weight-format", "int4", "--sym", "--group-size", "32", "--ratio", "1.0", "--backup-precision", "none"],
}


def export_ours(model: Path, out: Path, precision: str, target: str = "onnx", flags: tuple[str, ...] = ()) -> None:
    # int4: round to nearest, blocks of 32, as both other tools. The model builder's int4 also quantizes the
    # (tied) output head and embedding, so ours does for onnx; optimum-intel's is told to keep them float
    # (--backup-precision none), as ours does by default.
    quant = ["--quant", "int4", "--block-size", "32"] if precision == "int4" else []
    if precision == "int4" and target == "onnx":
        quant += ["--keep-float", ""]
    subprocess.run(
        [sys.executable, "-m", "nanoexport.cli", "--model", str(model), "--target", target, "--out", str(out),
         "--no-validate", *quant, *flags],
        check=True, stdout=subprocess.DEVNULL,
    )


def export_builder(model: Path, out: Path, precision: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out),
         "-p", precision, "-e", "cpu"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def optimum_cli() -> Path:
    """``optimum-cli`` of the side environment, which is created (once) when missing or outdated."""
    bin_dir = OPTIMUM_VENV / "bin"
    stamp = OPTIMUM_VENV / "nanoexport-packages.txt"
    wanted = "\n".join(OPTIMUM_PACKAGES) + "\n"
    if not stamp.is_file() or stamp.read_text() != wanted:
        log.warning("installing optimum-intel into %s (once; it cannot share our transformers)", OPTIMUM_VENV)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--clear", str(OPTIMUM_VENV)],
                       check=True)
        pip = [str(bin_dir / "python"), "-m", "pip"]
        # The constraints pin torch to the installed CPU build, so pip never pulls the CUDA one.
        subprocess.run([*pip, "install", "--quiet", "-c", str(CONSTRAINTS), *OPTIMUM_PACKAGES], check=True)
        # optimum-intel requires torchvision, but PyPI's wheel is built for the CUDA torch and fails to load
        # beside our CPU build ("operator torchvision::nms does not exist"), taking transformers' imports
        # down with it. Text-generation export never uses it.
        subprocess.run([*pip, "uninstall", "--quiet", "--yes", "torchvision"], check=True)
        stamp.write_text(wanted)
    return bin_dir / "optimum-cli"


def export_optimum(model: Path, out: Path, precision: str) -> None:
    subprocess.run(
        [str(optimum_cli()), "export", "openvino", "-m", str(model), "--task", "text-generation-with-past",
         *OPTIMUM_WEIGHTS[precision], str(out)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def prompt_tokens(vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(10, vocab, PROMPT_TOKENS).astype(np.int32)


def generate_onnxruntime(model, prompt: np.ndarray, max_length: int) -> tuple[float, float]:
    """Greedy generation to ``max_length`` tokens; (time to first token in s, decode tokens/s)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
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
    return first - started, (generated - 1) / max(finished - first, 1e-9)


def measure_onnxruntime(folders: dict[str, Path], vocab: int, new_tokens: int,
                        runs: int) -> dict[str, list[tuple[float, float]]]:
    """(time to first token in s, decode tokens/s) of each tool's artifact, the tools taking turns run by run.

    Each run loads the artifact into a new genai model, warms it up and frees it, so that no other model's
    idle threads (ONNX Runtime's spin after each call) share the cores with the one measured.
    """
    import onnxruntime_genai as og

    prompt = prompt_tokens(vocab, 0)
    samples = {tool: [] for tool in folders}
    for run in range(runs):
        for tool in (folders if run % 2 else reversed(folders)):
            model = og.Model(str(folders[tool]))
            generate_onnxruntime(model, prompt, len(prompt) + 4)
            samples[tool].append(generate_onnxruntime(model, prompt, len(prompt) + new_tokens))
            del model
    return samples


def measure_openvino(folders: dict[str, Path], vocab: int, new_tokens: int,
                     runs: int) -> dict[str, list[tuple[float, float]]]:
    """(time to first token in s, decode tokens/s) of each tool's artifact, the tools taking turns run by run.

    Each run loads the artifact into a new LLMPipeline and warms it up, and only one pipeline exists at a
    time: with both loaded in one process, whichever was created first ran at half speed in some processes,
    whichever artifact it held. Every run has a new prompt, since genai's CPU pipeline caches prompt
    prefixes and a repeated prompt would measure the cache instead of the prefill.
    """
    import openvino_genai as og

    samples = {tool: [] for tool in folders}
    for run in range(runs):
        for tool in (folders if run % 2 else reversed(folders)):
            pipeline = og.LLMPipeline(str(folders[tool]), "CPU")
            generate_openvino(pipeline, vocab, runs + run, 4)
            samples[tool].append(generate_openvino(pipeline, vocab, run, new_tokens))
            del pipeline
    return samples


def generate_openvino(pipeline, vocab: int, seed: int, new_tokens: int) -> tuple[float, float]:
    """Greedy generation of ``new_tokens`` after prompt number ``seed``; (time to first token in s, decode
    tokens/s)."""
    import openvino as ov
    import openvino_genai as og

    ids = prompt_tokens(vocab, seed).astype(np.int64)[None]
    config = og.GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, ignore_eos=True,
                                 do_sample=False)
    metrics = pipeline.generate(og.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids))), config).perf_metrics
    # genai's throughput is 1 / time per output token, the first token excluded.
    return metrics.get_ttft().mean / 1000, metrics.get_throughput().mean


def peak_memory_mib(runtime: str, folder: Path, vocab: int, new_tokens: int) -> float:
    """Peak resident memory of a fresh process that loads ``folder`` and generates once (MiB, Python included)."""
    context = multiprocessing.get_context("spawn")  # nothing of this process's runtimes in the child
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_load_and_generate, runtime, str(folder), vocab, new_tokens).result()


def _load_and_generate(runtime: str, folder: str, vocab: int, new_tokens: int) -> float:
    if runtime == "openvino":
        import openvino_genai as og

        generate_openvino(og.LLMPipeline(folder, "CPU"), vocab, 0, new_tokens)
    elif runtime == "tvm":
        from nanoexport.targets.tvm.runtime import Generator

        generate_tvm(Generator(folder), prompt_tokens(vocab, 0), new_tokens)
    else:
        import onnxruntime_genai as og

        generate_onnxruntime(og.Model(folder), prompt_tokens(vocab, 0), PROMPT_TOKENS + new_tokens)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec.
    status = Path("/proc/self/status").read_text()
    return round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)


def figures_onnxruntime(name: str, model: Path, precision: str, vocab: int, scratch: Path,
                        args: argparse.Namespace) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float]]:
    folders = {tool: scratch / f"{name}-{precision}-onnxruntime-{tool}" for tool in ("nanoexport", "builder")}
    export_ours(model, folders["nanoexport"], precision,
                flags=("--padded-batches",) if args.padded_batches else ("--no-padded-batches",))
    export_builder(model, folders["builder"], precision)
    return measure_onnxruntime(folders, vocab, args.new_tokens, args.runs), memory("onnxruntime", folders, vocab, args)


def figures_openvino(name: str, model: Path, precision: str, vocab: int, scratch: Path,
                     args: argparse.Namespace) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float]]:
    folders = {tool: scratch / f"{name}-{precision}-openvino-{tool}" for tool in ("nanoexport", "optimum")}
    export_ours(model, folders["nanoexport"], precision, target="openvino")
    export_optimum(model, folders["optimum"], precision)
    return measure_openvino(folders, vocab, args.new_tokens, args.runs), memory("openvino", folders, vocab, args)


def tvm_context(new_tokens: int) -> int:
    """Static-cache slots of the benchmark's tvm artifacts: the prompt and the new tokens, rounded up to 64."""
    return -(-(PROMPT_TOKENS + new_tokens) // 64) * 64


def generate_tvm(generator, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """Greedy generation of ``new_tokens`` after ``prompt``; (time to first token in s, decode tokens/s)."""
    marks = []
    started = time.perf_counter()
    generator.generate(prompt.tolist(), new_tokens, first_token=lambda: marks.append(time.perf_counter()))
    finished = time.perf_counter()
    return marks[0] - started, (new_tokens - 1) / max(finished - marks[0], 1e-9)


def measure_tvm(folders: dict[str, Path], vocab: int, new_tokens: int,
                runs: int) -> dict[str, list[tuple[float, float]]]:
    """(time to first token in s, decode tokens/s) of our tvm and onnx artifacts, taking turns run by run, each
    run on a freshly loaded model warmed up first."""
    import onnxruntime_genai as og

    from nanoexport.targets.tvm.runtime import Generator

    prompt = prompt_tokens(vocab, 0)
    samples = {tool: [] for tool in folders}
    for run in range(runs):
        for tool in (folders if run % 2 else reversed(folders)):
            if tool == "nanoexport":
                generator = Generator(folders[tool])
                generate_tvm(generator, prompt, 4)
                samples[tool].append(generate_tvm(generator, prompt, new_tokens))
            else:
                generator = og.Model(str(folders[tool]))
                generate_onnxruntime(generator, prompt, len(prompt) + 4)
                samples[tool].append(generate_onnxruntime(generator, prompt, len(prompt) + new_tokens))
            del generator
    return samples


def figures_tvm(name: str, model: Path, precision: str, vocab: int, scratch: Path,
                args: argparse.Namespace) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float]]:
    folders = {tool: scratch / f"{name}-{precision}-tvm-{tool}" for tool in ("nanoexport", "nanoexport-onnx")}
    # The same quantization as our onnx artifact's (export_ours quantizes its tied head and embedding too).
    keep_float = ("--keep-float", "") if precision == "int4" else ()
    export_ours(model, folders["nanoexport"], precision, target="tvm",
                flags=("--max-context", str(tvm_context(args.new_tokens)), *keep_float))
    export_ours(model, folders["nanoexport-onnx"], precision, flags=("--no-padded-batches",))
    peak = {"nanoexport": peak_memory_mib("tvm", folders["nanoexport"], vocab, args.new_tokens),
            "nanoexport-onnx": peak_memory_mib("onnxruntime", folders["nanoexport-onnx"], vocab, args.new_tokens)}
    return measure_tvm(folders, vocab, args.new_tokens, args.runs), peak


def memory(runtime: str, folders: dict[str, Path], vocab: int, args: argparse.Namespace) -> dict[str, float]:
    return {tool: peak_memory_mib(runtime, folder, vocab, args.new_tokens) for tool, folder in folders.items()}


FIGURES = {"onnxruntime": figures_onnxruntime, "openvino": figures_openvino, "tvm": figures_tvm}


def compare(name: str, runtime: str, model: Path, precision: str, scratch: Path, args: argparse.Namespace) -> dict:
    """Both tools' artifacts of ``model`` at ``precision`` on ``runtime``; the printed row.

    Figures are medians over the runs; ratios (ours/theirs speed, above 1: ours faster) are medians of the
    run-by-run ratios, which a burst of load on a shared machine moves less than it moves either figure.
    """
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    samples, peak_memory = FIGURES[runtime](name, model, precision, vocab, scratch, args)
    (_, ours), (peer, theirs) = samples.items()
    figures = {tool: {"time_to_first_token_s": round(statistics.median(ttft for ttft, _ in runs), 5),
                      "decode_tokens_per_s": round(statistics.median(rate for _, rate in runs), 2),
                      "peak_memory_mib": peak_memory[tool]}
               for tool, runs in samples.items()}
    decode_ratios, first_token_ratios = run_ratios(ours, theirs)
    row = {
        "model": name,
        "runtime": runtime,
        "precision": precision,
        **{f"{tool}_{key}": value for tool, values in figures.items() for key, value in values.items()},
        "decode_ratio": round(statistics.median(decode_ratios), 3),
        "first_token_ratio": round(statistics.median(first_token_ratios), 3),
        # Run by run, so that a reader can see the spread behind each median.
        "decode_ratios": decode_ratios,
        "first_token_ratios": first_token_ratios,
    }
    mine, other = figures["nanoexport"], figures[peer]
    print(
        f"{name:13s} {runtime:11s} {precision}  decode tok/s: ours {mine['decode_tokens_per_s']:8.1f}  {peer} "
        f"{other['decode_tokens_per_s']:8.1f}  ratio {row['decode_ratio']:.2f} {_spread(decode_ratios)}   "
        f"first token ({PROMPT_TOKENS}-token prompt): ours {mine['time_to_first_token_s'] * 1000:7.1f} ms  {peer} "
        f"{other['time_to_first_token_s'] * 1000:7.1f} ms  speed ratio {row['first_token_ratio']:.2f} "
        f"{_spread(first_token_ratios)}   peak memory: ours {mine['peak_memory_mib']:,.0f} MiB  {peer} "
        f"{other['peak_memory_mib']:,.0f} MiB",
        flush=True,
    )
    return row


def run_ratios(ours: list[tuple[float, float]], theirs: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Run-by-run speed ratios of ours to theirs from (time to first token, decode tokens/s) samples, above 1:
    ours faster; (decode ratios, first-token ratios)."""
    return ([round(a[1] / b[1], 3) for a, b in zip(ours, theirs)],
            [round(b[0] / a[0], 3) for a, b in zip(ours, theirs)])


def _spread(ratios: list[float]) -> str:
    """The runs' range of a ratio and in how many runs ours was the faster, e.g. ``[0.97-1.04, 7/12 >= 1]``."""
    return f"[{min(ratios):.2f}-{max(ratios):.2f}, {sum(ratio >= 1 for ratio in ratios)}/{len(ratios)} >= 1]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["demo", "qwen2.5-0.5b"])
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--padded-batches", action="store_true",
                        help="export ours for ONNX Runtime with its default exact left padding (a bias per call)")
    parser.add_argument("--json", type=Path, default=RESULTS / "decode_bench.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            model = checkpoint(name, Path(scratch))
            for runtime in args.runtimes:
                for precision in args.precisions:
                    rows.append(compare(name, runtime, model, precision, Path(scratch), args))
    settings = {"runs": args.runs, "new_tokens": args.new_tokens, "prompt_tokens": PROMPT_TOKENS,
                "padded_batches": args.padded_batches,
                "runtimes": args.runtimes, "precisions": args.precisions}
    write_results(args.json, settings, rows)


if __name__ == "__main__":
    main()
