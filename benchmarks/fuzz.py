"""Long fuzzing runs of the loaders that read files users hand us: atheris (libFuzzer, coverage-guided).

Each loader of ``tests/fuzzing.py`` runs in a process of its own, over a fresh export of the bundled demo model
(``nanoexport --target onnx``) and the demo checkpoint: their files are the seeds. libFuzzer chooses which
inputs to keep by the lines of nanoexport they reach; each new input is one of libFuzzer's byte mutations or
one of our format-aware edits (a JSON value of another type, a path out of the folder, an absurd offset).

An input the loader refuses with its one-line ``NanoexportError`` passes. Any other exception is a crash,
counted under its signature (type and the line of nanoexport it escaped from), its first input kept in
``WORKDIR/crashes/<loader>/``, and the run goes on. A loader stops after ``--iterations`` inputs or
``--max-minutes``, whichever comes first. Printed and written as JSON per loader: inputs run, inputs per
second, distinct crashes.

Examples:
    python benchmarks/fuzz.py --iterations 2000
    python benchmarks/fuzz.py --loaders manifest,onnx --iterations 20000
    nice -n 10 python benchmarks/fuzz.py --iterations 100000 --max-minutes 20 --json benchmarks/results/fuzz.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from models import RESULTS, write_results  # noqa: E402

# Every module a loader reaches, imported under atheris' instrumentation so their lines count as coverage.
INSTRUMENTED = ("nanoexport.artifact", "nanoexport.cli", "nanoexport.config", "nanoexport.validate",
                "nanoexport.interface", "nanoexport.capture.checkpoint", "nanoexport.capture.weights",
                "nanoexport.calibration.data", "nanoexport.tokenizer", "nanoexport.onnx_file",
                "nanoexport.targets.onnx.runtime")
REPORT_EVERY = 500  # inputs between rewrites of a loader's report, so a run that dies still has one
RSS_LIMIT_MB = 6144  # libFuzzer stops a loader whose process grows past this


def main() -> None:
    import fuzzing
    from fuzzing import LOADERS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10_000, help="inputs per loader (default: 10000)")
    parser.add_argument("--loaders", default=",".join(LOADERS), help=f"comma-separated (default: all: "
                                                                     f"{','.join(LOADERS)})")
    parser.add_argument("--max-minutes", type=float, help="stop a loader after this long (default: no limit)")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed (default: 1)")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "nanoexport" / "fuzz",
                        help="sources, corpora, crashes and logs (default: ~/.cache/nanoexport/fuzz)")
    parser.add_argument("--json", type=Path, default=RESULTS / "fuzz.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one loader's run, in its own process
    args = parser.parse_args()
    if args.child:
        fuzz_one(args.child, args)
        return
    loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    unknown = sorted(set(loaders) - set(LOADERS))
    if unknown:
        parser.error(f"unknown loaders {', '.join(unknown)}; choose from {', '.join(LOADERS)}")
    targets = sorted({fuzzing.ARTIFACT_TARGETS[name] for name in loaders if name in fuzzing.ARTIFACT_TARGETS})
    artifacts = [export_demo(args.workdir, target) for target in targets]
    rows = []
    for name in loaders:
        row = run_child(name, args)
        rows.append(row)
        crashes = row["crashes"]
        print(f"{name:12s} {row['inputs']:>8,} inputs  {row['seconds']:8.1f} s  {row['inputs_per_second']:7.1f}/s  "
              f"{len(crashes)} distinct crashes  ({row['stopped']})", flush=True)
        for crash in crashes:
            print(f"    {crash['count']:>6,} x {crash['kind']} at {crash['where']}  e.g. {crash['example']}",
                  flush=True)
    settings = {"iterations": args.iterations, "max_minutes": args.max_minutes, "seed": args.seed,
                "engine": "atheris " + _version("atheris"), "seeds": [str(path) for path in artifacts]}
    write_results(args.json, settings, rows)


def export_demo(workdir: Path, target: str) -> Path:
    """A fresh export of the demo model for ``target`` under ``workdir``, a source of seeds."""
    artifact = workdir / f"demo-{target}"
    print(f"exporting the demo model to {artifact} for seeds", flush=True)
    subprocess.run([sys.executable, "-m", "nanoexport.cli", "--target", target, "--out", str(artifact),
                    "--overwrite", "--no-validate"], check=True, stdout=subprocess.DEVNULL)
    return artifact


def run_child(name: str, args: argparse.Namespace) -> dict:
    """Fuzz loader ``name`` in a process of its own; its report, and how the process ended."""
    report_path = args.workdir / "reports" / f"{name}.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.unlink(missing_ok=True)
    log_path = args.workdir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--child", name, "--iterations", str(args.iterations),
               "--seed", str(args.seed), "--workdir", str(args.workdir)]
    if args.max_minutes:
        command += ["--max-minutes", str(args.max_minutes)]
    started = time.monotonic()
    with log_path.open("w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    row = json.loads(report_path.read_text()) if report_path.is_file() else {
        "loader": name, "inputs": 0, "seconds": time.monotonic() - started, "crashes": [], "stopped": ""}
    if code != 0:  # a harness error (in the report), or libFuzzer's own end: a deadly signal, out of memory
        reason = row["stopped"] if row["stopped"].startswith("harness error") else _libfuzzer_reason(log_path)
        row["stopped"] = f"process ended with code {code}: {reason}; see {log_path}"
    row["inputs_per_second"] = row["inputs"] / row["seconds"] if row["seconds"] else 0.0
    return row


def _libfuzzer_reason(log_path: Path) -> str:
    lines = log_path.read_text(errors="replace").splitlines()
    return next((line.strip() for line in lines if "ERROR: libFuzzer" in line or "Traceback" in line),
                lines[-1].strip() if lines else "no output")


def fuzz_one(name: str, args: argparse.Namespace) -> None:
    """Run in the child: libFuzzer over loader ``name``, the report rewritten as it goes."""
    import atheris

    with atheris.instrument_imports(include=["nanoexport"]):
        import importlib

        import fuzzing

        for module in INSTRUMENTED:
            importlib.import_module(module)
        loader = fuzzing.make_loader(name, lambda target: args.workdir / f"demo-{target}", fuzzing.DEMO_CHECKPOINT,
                                     args.workdir / "scratch")
    corpus = args.workdir / "corpus" / name
    crash_folder = args.workdir / "crashes" / name
    for folder in (corpus, crash_folder):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            stale.unlink()
    for index, seed in enumerate(loader.seeds):
        (corpus / f"seed-{index}").write_bytes(seed)
    report_path = args.workdir / "reports" / f"{name}.json"
    deadline = time.monotonic() + args.max_minutes * 60 if args.max_minutes else None
    started = time.monotonic()
    state = {"inputs": 0}
    crashes: dict = {}  # Crash -> {"count", "example"}

    def write_report(stopped: str) -> None:
        rows = [{"kind": crash.kind, "where": crash.where, **seen} for crash, seen in crashes.items()]
        report = {"loader": name, "inputs": state["inputs"], "seconds": time.monotonic() - started,
                  "crashes": rows, "stopped": stopped}
        report_path.write_text(json.dumps(report, indent=2) + "\n")

    def test_one_input(data: bytes) -> None:
        state["inputs"] += 1
        crash = loader.check(data)
        if crash is not None:
            if crash not in crashes:
                example = crash_folder / f"crash-{len(crashes)}"
                example.write_bytes(data)
                crashes[crash] = {"count": 0, "example": str(example)}
                write_report("running")
            crashes[crash]["count"] += 1
        if state["inputs"] >= args.iterations:
            write_report(f"{args.iterations:,} inputs run")
            os._exit(0)  # libFuzzer would exit by itself; this keeps the count exact
        if deadline is not None and time.monotonic() > deadline:
            write_report(f"time limit of {args.max_minutes:g} minutes")
            os._exit(0)
        if state["inputs"] % REPORT_EVERY == 0:
            write_report("running")

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            return atheris.Mutate(data, max_size)
        return loader.mutate(data, rng)[:max_size]

    write_report("starting")
    max_len = 2 * max(len(seed) for seed in loader.seeds)
    atheris.Setup([sys.argv[0], f"-runs={args.iterations + 10}", f"-seed={args.seed}", f"-max_len={max_len}",
                   f"-rss_limit_mb={RSS_LIMIT_MB}", "-timeout=0", "-close_fd_mask=3",
                   f"-artifact_prefix={crash_folder}/", str(corpus)],
                  test_one_input, custom_mutator=custom_mutator)
    try:
        atheris.Fuzz()
    except BaseException as error:  # the harness itself failed (a mutator bug): say so in the report
        write_report(f"harness error: {type(error).__name__}: {str(error)[:200]}")
        # Leaving through Python's own exit deadlocks in atheris' clean-up (it takes the GIL after finalization).
        os._exit(3)


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
