"""The ``nanoexport`` command, a thin layer over the Python API. Export is the default verb.

Exit codes: 0 success, 1 validation failed, 2 bad input, 130 interrupted (SIGINT, Ctrl-C), 143 terminated
(SIGTERM, as CI runners cancel a job).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import threading
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from nanoexport.artifact import Artifact, read_build_log
from nanoexport.config import ExportConfig, load_config
from nanoexport.errors import NanoexportError, one_line
from nanoexport.interface import KV_CACHE_FORMS
from nanoexport.interrupts import Interrupted, handling_signals
from nanoexport.targets import TARGETS, Target

EXPORT_EXAMPLES = """\
examples:
  nanoexport                                   export the bundled demo model for ONNX Runtime and validate it
  nanoexport --target onnx --model ./my-llama  export a local Hugging Face checkpoint
  nanoexport --model ./optimum-onnx            a folder where `optimum-cli export onnx` wrote model.onnx beside
                                               config.json and the tokenizer; without the checkpoint's
                                               *.safetensors there, validation runs model.onnx on ONNX Runtime
                                               as the reference (--reference CHECKPOINT: PyTorch instead)
  nanoexport --model Qwen/Qwen2.5-0.5B --out build/qwen --overwrite
  nanoexport --config ci/nanoexport.toml       settings from a file; flags override it
  nanoexport --verify-passes -v                check every pass on ONNX Runtime and log its statistics
  nanoexport --skip-passes fold_constants      run the other passes only
  nanoexport --kv-cache static --max-context 512   fixed-capacity KV cache written at cache_position
  nanoexport --split-prefill-decode --prefill-chunk 64   static prefill and decode graphs, one weights file
  nanoexport --kv-cache sliding --max-context 256  attend to the last 256 positions, generate without end
  nanoexport --quant int4 --block-size 32      block-wise int4 weights, round to nearest
  nanoexport --quant int4 --algo gptq --calib data.jsonl   GPTQ on your calibration text
  nanoexport --quant int4 --size-budget 900MB  int4/int8 per layer, chosen by sensitivity, to fit 900 MB
  nanoexport --target qnn --soc-model 57 --htp-arch 75   HTP context binaries for one Snapdragon SoC
  nanoexport --target qnn --max-part-bytes 300MB   layers split into graphs of at most 300 MB of weights
  nanoexport --quant int4 --keep-float ''      quantize the output head too (smaller, faster, less exact)
  nanoexport --target openvino --preset speed  the frontier's fastest settings for the target (int4)
  nanoexport --quant int4 --no-padded-batches  for onnxruntime-genai, which feeds unpadded masks: no padding bias

other verbs:
  nanoexport build --targets onnx,qnn   quantize once, lower for several targets into one output root
  nanoexport compare DIR DIR...         run artifacts of one model side by side and compare them
  nanoexport validate DIR     validate an artifact against its reference model
  nanoexport inspect DIR      show an artifact's manifest: files, inputs/outputs, passes
  nanoexport targets          list targets and whether their runtimes are installed
Each verb takes --help. Settings are read from ./nanoexport.toml when it exists.
"""
VALIDATE_EXAMPLES = """\
examples:
  nanoexport validate nanoexport-out/demo-onnx
  nanoexport validate build/qwen --reference ./qwen-checkpoint
  nanoexport validate build/qwen --eval wiki.txt --eval-windows 0   perplexity on all of wiki.txt
exit codes: 0 all checks passed, 1 a check failed, 2 bad input.
"""
INSPECT_EXAMPLES = """\
examples:
  nanoexport inspect nanoexport-out/demo-onnx
"""
TARGETS_EXAMPLES = """\
examples:
  nanoexport targets
"""
BUILD_EXAMPLES = """\
examples:
  nanoexport build --targets onnx,openvino,coreml,qnn --quant int4 --block-size 32
                                      the demo model for four targets from one quantization, then compared
  nanoexport build --config build.toml    targets = [...] and every other setting from a file
  nanoexport build --model ./my-llama --targets onnx,openvino --quant int4 --algo gptq --calib data.jsonl
  nanoexport build --targets onnx,qnn --quant int4 --no-compare --out build/demo
  nanoexport build --config variants.toml --targets onnx,openvino
                                      each [quant_variants.NAME] table quantized once, into OUT/NAME/<target>
  nanoexport build --targets onnx,openvino,coreml,qnn --quant int4 --ray auto
                                      each target lowered as a task on the Ray cluster `ray start` runs here
Each target's artifact is written to OUT/<target> (default OUT: ./nanoexport-out/<model>-build), the
comparison to OUT/report.json with its plots in OUT/report.html; with quantization variants, to
OUT/<variant>/<target> and OUT/<variant>/report.json (and .html). A target that fails does not stop the others.
exit codes: 0 every target built (and the comparisons passed), 1 a target failed or a comparison failed,
2 bad input.
"""
COMPARE_EXAMPLES = """\
examples:
  nanoexport compare nanoexport-out/demo-build/onnx nanoexport-out/demo-build/qnn
  nanoexport compare out/*/ --eval wiki.txt --eval-windows 8 --report parity.json
  nanoexport compare out/*/ --config ci.toml   thresholds from its [compare] table, workload from [validate]
Gates: artifacts with quantized weights must have perplexities within 0.5% of each other, float ones agree on
99% of top-1 tokens, and each artifact's stored integers must still have the digest its build recorded.
exit codes: 0 all pairs agree, 1 a pair disagrees or an artifact's weights changed, 2 bad input.
"""
VERBS = ("export", "build", "compare", "validate", "inspect", "targets")

console = Console()
log = logging.getLogger("nanoexport")


def _parser(verb: str) -> argparse.ArgumentParser:
    descriptions = {
        "export": ("nanoexport", "Export a decoder LM to a validated artifact for one target.", EXPORT_EXAMPLES),
        "validate": ("nanoexport validate", "Run an artifact beside its reference model (PyTorch; ONNX Runtime for "
                     "an Optimum ONNX folder without safetensors) and check the numbers.",
                     VALIDATE_EXAMPLES),
        "build": ("nanoexport build", "Quantize a decoder LM once and lower it for several targets.", BUILD_EXAMPLES),
        "compare": ("nanoexport compare", "Run artifacts of one model side by side against its reference model.",
                    COMPARE_EXAMPLES),
        "inspect": ("nanoexport inspect", "Show an artifact's manifest.", INSPECT_EXAMPLES),
        "targets": ("nanoexport targets", "List the targets and whether each one's runtime is installed.",
                    TARGETS_EXAMPLES),
    }
    prog, description, epilog = descriptions[verb]
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    if verb == "export":
        parser.add_argument("--target", help="target backend (default: onnx); see `nanoexport targets`")
        parser.add_argument("--out", help="artifact folder (default: ./nanoexport-out/<model>-<target>)")
        parser.add_argument("--no-validate", action="store_true", help="skip validation after export")
        parser.add_argument("--reference", help="checkpoint to validate against (default: the exported one; for an "
                                                "Optimum ONNX folder without *.safetensors, its model.onnx run on "
                                                "ONNX Runtime)")
        parser.add_argument("--preset", help="the target's tested settings, under the config file and flags: "
                                             "speed (fastest decode at no more perplexity change than the peer "
                                             "exporter's default int4; see benchmarks/frontier.py)")
        _add_export_flags(parser)
    elif verb == "build":
        parser.add_argument("--targets", type=_names, help="comma-separated targets, e.g. onnx,openvino,coreml,qnn "
                                                           "(default: the config's targets)")
        parser.add_argument("--out", help="output root, one folder per target (default: "
                                          "./nanoexport-out/<model>-build)")
        parser.add_argument("--no-compare", action="store_true", help="skip comparing the artifacts after the build")
        parser.add_argument("--ray", metavar="ADDRESS",
                            help="lower each target as a Ray task: 'local' starts Ray on this machine, 'auto' joins "
                                 "the cluster `ray start` runs here, or a cluster's address; each quantization's "
                                 "comparison runs as a task too; every Ray node must see --out at the same path "
                                 "(pip install 'nanoexport[ray]')")
        _add_export_flags(parser)
    elif verb == "compare":
        parser.add_argument("artifacts", type=Path, nargs="+", help="artifact folders of one model")
        parser.add_argument("--reference", help="reference checkpoint (default: the one in the manifests)")
        parser.add_argument("--config", type=Path, help="settings file: thresholds from [compare], prompts and "
                                                        "evaluation text from [validate]")
        parser.add_argument("--eval", type=Path, help="text for perplexity (default: the demo's held-out plays)")
        parser.add_argument("--eval-windows", type=int, help="windows of the text to score; 0: all (default: 16)")
        parser.add_argument("--report", type=Path, help="where to write the JSON report, its HTML page with plots "
                                                        "beside it as .html (default: report.json in the artifacts' "
                                                        "common parent folder)")
    elif verb == "validate":
        parser.add_argument("artifact", type=Path, help="artifact folder")
        parser.add_argument("--reference", help="reference checkpoint (default: the one in the manifest)")
        parser.add_argument("--config", type=Path, help="settings file whose [validate] table sets thresholds")
        parser.add_argument("--eval", type=Path, help="text for the perplexity check (default: the demo's held-out "
                                                      "plays)")
        parser.add_argument("--eval-windows", type=int, help="windows of the text to score; 0: all (default: 16)")
    elif verb == "inspect":
        parser.add_argument("artifact", type=Path, help="artifact folder")
    return parser


def _add_export_flags(parser: argparse.ArgumentParser) -> None:
    """The flags export and build share: the model, settings file, passes, KV cache, quantization, and each
    target's options."""
    parser.add_argument("--model", help="checkpoint folder, hub id, or a folder where `optimum-cli export onnx` "
                                        "wrote model.onnx beside config.json (default: the bundled demo model)")
    parser.add_argument("--config", type=Path, help="settings file (default: ./nanoexport.toml if present)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--passes", type=_names, help="comma-separated passes to run (default: all)")
    parser.add_argument("--skip-passes", type=_names, help="comma-separated passes not to run")
    parser.add_argument("--kv-cache", choices=KV_CACHE_FORMS,
                        help="KV cache form: growing (dynamic), growing inside the runtime's state "
                             "(stateful), fixed capacity (static), or fixed capacity written round-robin "
                             "so generation runs past it (sliding); default per target")
    parser.add_argument("--max-context", type=int, help="capacity of the static KV cache (default: 2048)")
    parser.add_argument("--split-prefill-decode", action="store_true", default=None,
                        help="write a prefill graph (--prefill-chunk tokens) and a one-token decode graph, "
                             "all shapes static, sharing one weights file (implies --kv-cache static)")
    parser.add_argument("--prefill-chunk", type=int, help="tokens per prefill call (default: 128)")
    parser.add_argument("--verify-passes", action="store_true", default=None,
                        help="run ONNX Runtime before and after each pass; stop at one that moves the logits")
    quant = parser.add_argument_group("quantization")
    quant.add_argument("--quant", choices=["none", "fp16", "int4", "uint4", "int8", "nf4"],
                       help="weight type of the linear layers (default: none, fp32)")
    quant.add_argument("--block-size", type=int, help="input rows per scale, 16 to 256 (default: 32)")
    quant.add_argument("--algo", choices=["rtn", "se", "gptq", "awq"],
                       help="quantizer (default: gptq when --calib is given, else rtn). se: scale estimation, "
                            "round to nearest with block scales fitted to each layer's output on the calibration "
                            "data; gptq: GPTQ with block scales chosen as se chooses them; awq: AWQ with clip "
                            "search and scale estimation")
    quant.add_argument("--calib", help="calibration text, JSONL, folder or saved dataset (default: "
                                       "calibration.txt in the checkpoint folder)")
    quant.add_argument("--asymmetric", action="store_true", default=None, help="a zero point per block")
    quant.add_argument("--pad-blocks", action="store_true", default=None,
                       help="allow a last partial block where the block size does not divide a dimension")
    quant.add_argument("--keep-float", type=_names, metavar="PATTERNS",
                       help="layers left unquantized (stored in fp16), comma-separated name patterns; '' "
                            "quantizes every layer (default: lm_head,*embed_tokens)")
    quant.add_argument("--dynamic-int8", action=argparse.BooleanOptionalAction, default=None,
                       help="4-bit MatMuls quantize activations to int8 on the fly where the runtime can "
                            "(ONNX Runtime's accuracy_level 4, OpenVINO CPU's dynamic quantization; "
                            "default: on)")
    quant.add_argument("--size-budget", help="fit the weights in this size (e.g. 2.2GB), int4/int8 per layer")
    quant.add_argument("--activations", choices=["none", "a16", "a8"],
                       help="QuantizeLinear/DequantizeLinear on activations for QDQ targets (default: none)")
    for target in TARGETS.values():
        _add_option_flags(parser, target)


def _add_option_flags(parser: argparse.ArgumentParser, target: Target) -> None:
    """A flag group "<name> target" with one flag per field of the target's options dataclass (``--soc-model``
    for ``soc_model``; booleans as ``--x`` / ``--no-x``), its help from the field's metadata."""
    if target.options is None:
        return
    group = parser.add_argument_group(f"{target.name} target")
    for option in dataclasses.fields(target.options):
        flag = "--" + option.name.replace("_", "-")
        dest = f"{target.name}.{option.name}"
        if option.type in (bool, "bool"):
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                               help=option.metadata["help"])
        else:
            kind = int if option.type in (int, "int") else str
            group.add_argument(flag, dest=dest, type=kind, help=option.metadata["help"])


def _option_overrides(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """The target flags the user set, as ``{target: {option: value}}`` (unset flags are None)."""
    overrides: dict[str, dict[str, object]] = {}
    for dest, value in vars(args).items():
        target, _, option = dest.partition(".")
        if option and target in TARGETS:
            overrides.setdefault(target, {})[option] = value
    return overrides


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    """Run one verb; returns the exit code. Installs SIGINT/SIGTERM handlers when run in the main thread."""
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    with handling_signals() if in_main_thread else contextlib.nullcontext():
        return _run(list(sys.argv[1:] if argv is None else argv))


def _run(argv: list[str]) -> int:
    try:
        verb = argv.pop(0) if argv and argv[0] in VERBS else "export"
        args = _parser(verb).parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(message)s")
        return {"export": _export, "build": _build, "compare": _compare, "validate": _validate, "inspect": _inspect,
                "targets": _targets}[verb](args)
    except NanoexportError as error:
        Console(stderr=True).print(Text.assemble(("error:", "red"), f" {one_line(str(error))}"), highlight=False,
                                   soft_wrap=True)
        return 2
    except Interrupted as interrupt:
        Console(stderr=True).print(Text.assemble(("interrupted", "red"), f" by {interrupt}: stopped, and nothing was "
                                                 "left half-written"), highlight=False, soft_wrap=True)
        return 128 + interrupt.signal_number


def _export(args: argparse.Namespace) -> int:
    from nanoexport.pipeline import export
    from nanoexport.validate import validate
    from nanoexport.validate.report import report_table

    artifact = export(config=_export_config(args, target=args.target), overwrite=args.overwrite)
    console.print(_summary_table(artifact))
    if args.no_validate:
        return 0
    report = validate(artifact, reference=args.reference)
    console.print(report_table(report.to_dict()))
    return 0 if report.passed else 1


def _export_config(args: argparse.Namespace, **settings: object) -> ExportConfig:
    """The preset, the settings file (or ./nanoexport.toml), then the flags export and build share, then
    ``settings``."""
    return load_config(args.config, preset=getattr(args, "preset", None) or "", overrides={
        "model": args.model, "out": args.out, "passes": args.passes, **settings,
        "skip_passes": args.skip_passes, "verify_passes": args.verify_passes, "kv_cache": args.kv_cache,
        "max_context": args.max_context, "split_prefill_decode": args.split_prefill_decode,
        "prefill_chunk": args.prefill_chunk,
        "quant": {"weights": args.quant, "block_size": args.block_size, "algo": args.algo, "calib": args.calib,
                  "asymmetric": args.asymmetric, "pad_blocks": args.pad_blocks, "size_budget": args.size_budget,
                  "activations": args.activations, "keep_float": args.keep_float,
                  "dynamic_int8": args.dynamic_int8},
        **_option_overrides(args),
    })


def _build(args: argparse.Namespace) -> int:
    from nanoexport.build import artifact_name, build
    from nanoexport.validate.report import compare_tables

    config = _export_config(args, targets=args.targets)
    session = contextlib.nullcontext()
    if args.ray:
        from nanoexport.distributed import session as ray_session

        session = ray_session(args.ray)  # one Ray start for the lowerings and the comparisons
    with session:
        result = build(config=config, overwrite=args.overwrite, ray_address=args.ray)
        table = Table(title=escape(f"build {result.out}"))
        for column in ("target", "result", "folder", "integers"):
            table.add_column(column)
        for variant in config.quant_variants or [""]:
            for target in config.targets:
                name = artifact_name(variant, target)
                if name in result.failures:
                    table.add_row(name, "[red]failed[/]", "-", escape(result.failures[name]))
                    continue
                stored = (result.artifacts[name].manifest.get("weight_digests") or {}).get("stored")
                integers = "-" if stored is None else "canonical" if stored["equals_canonical"] else \
                    f"re-rounded by the target (relative RMS {stored.get('weight_error', {}).get('relative_rms', '-')})"
                table.add_row(name, "[green]written[/]", escape(str(result.artifacts[name].path)), integers)
        console.print(table)
        # One quantization's targets are compared together.
        groups = {} if args.no_compare else {folder: artifacts for folder, artifacts in result.groups().items()
                                             if len(artifacts) > 1}
        reports = _compare_groups(groups, config, args.ray)
    for report in reports.values():
        for table in compare_tables(report):
            console.print(table)
    passed = all(report["passed"] for report in reports.values())
    for name, reason in result.failures.items():
        written = f"; written: {', '.join(result.artifacts)}" if result.artifacts else ""
        Console(stderr=True).print(Text.assemble(("failed:", "red"), f" {name}: {reason}{written}"),
                                   highlight=False, soft_wrap=True)
    return 0 if passed and not result.failures else 1


def _compare_groups(groups: dict[Path, list[Artifact]], config: ExportConfig, ray: str | None) -> dict[Path, dict]:
    """Each group's report (written to ``<group>/report.json``): as Ray tasks with ``--ray``, else in turn."""
    if ray:
        from nanoexport.distributed import compare_groups

        return compare_groups(groups, config.validate, config.compare)
    from nanoexport.validate.compare import compare

    return {folder: compare(artifacts, validation=config.validate, thresholds=config.compare,
                            report_path=folder / "report.json") for folder, artifacts in groups.items()}


def _compare(args: argparse.Namespace) -> int:
    from nanoexport.validate.compare import compare
    from nanoexport.validate.report import compare_tables

    artifacts = [Artifact.load(path) for path in args.artifacts]
    config = load_config(args.config) if args.config else None
    validation = config.validate if config else artifacts[0].thresholds()
    if args.eval is not None:
        validation.eval_text = str(args.eval)
    if args.eval_windows is not None:
        validation.eval_windows = args.eval_windows
    report_path = args.report or Path(os.path.commonpath([path.resolve() for path in args.artifacts])) / "report.json"
    report = compare(artifacts, reference=args.reference, validation=validation,
                     thresholds=config.compare if config else None, report_path=report_path)
    for table in compare_tables(report):
        console.print(table)
    return 0 if report["passed"] else 1


def _validate(args: argparse.Namespace) -> int:
    from nanoexport.validate import validate
    from nanoexport.validate.report import report_table

    artifact = Artifact.load(args.artifact)
    thresholds = load_config(args.config).validate if args.config else None
    if args.eval is not None or args.eval_windows is not None:
        thresholds = thresholds or artifact.thresholds()
        thresholds.eval_text = str(args.eval) if args.eval is not None else thresholds.eval_text
        thresholds.eval_windows = args.eval_windows if args.eval_windows is not None else thresholds.eval_windows
    report = validate(artifact, reference=args.reference, config=thresholds)
    console.print(report_table(report.to_dict()))
    return 0 if report.passed else 1


def _summary_table(artifact: Artifact) -> Table:
    manifest = artifact.manifest
    source = manifest["source"]
    table = Table(title=escape(f"artifact {artifact.path}"), show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("model", escape(f"{source['name']} ({source['family']}, {source['parameters']:,} parameters)"))
    table.add_row("target", escape(manifest["target"]))
    io = manifest["io"]
    table.add_row("inputs / outputs", f"{len(io['inputs'])} / {len(io['outputs'])} "
                  f"({io['kv_cache']['num_layers']} layers of KV cache)")
    for entry in manifest["files"]:
        table.add_row(escape(entry["path"]), f"{entry['size']:,} bytes")
    return table


def _inspect(args: argparse.Namespace) -> int:
    artifact = Artifact.load(args.artifact)
    console.print(_summary_table(artifact))
    io = Table(title="inputs and outputs")
    for column in ("kind", "name", "dtype", "shape"):
        io.add_column(column)
    for kind in ("inputs", "outputs"):
        for value in artifact.manifest["io"][kind]:
            io.add_row(kind[:-1], *(escape(str(value.get(key, "-"))) for key in ("name", "dtype", "shape")))
    console.print(io)
    build = read_build_log(artifact.path)
    seconds = {entry["name"]: entry["seconds"] for entry in build.get("passes") or []}  # read_build_log checked
    passes = Table(title="passes")
    for column in ("pass", "nodes before", "nodes after", "seconds"):
        passes.add_column(column)
    for entry in artifact.manifest["passes"]:
        took = f"{seconds[entry['name']]:.2f}" if entry["name"] in seconds else "-"
        passes.add_row(escape(entry["name"]), str(entry["nodes_before"]), str(entry["nodes_after"]), took)
    console.print(passes)
    if build.get("target_passes"):
        lowering = Table(title=escape(f"{artifact.target} lowering passes (build.json)"))
        for column in ("pass", "nodes before", "nodes after", "seconds", "logits moved"):
            lowering.add_column(column)
        for entry in build["target_passes"]:
            moved = "-" if entry.get("logits_change") is None else f"{entry['logits_change']:.2e}"
            lowering.add_row(escape(entry["name"]), str(entry["nodes_before"]), str(entry["nodes_after"]),
                             f"{entry['seconds']:.2f}", moved)
        console.print(lowering)
    quantization = artifact.manifest.get("quantization")
    if quantization:
        layers = Table(title=f"quantization: {quantization['bits_per_weight']} bits per quantized weight")
        for column in ("layer", "weights"):
            layers.add_column(column)
        for name, kind in quantization["layers"].items():
            layers.add_row(escape(name), escape(kind))
        console.print(layers)
    return 0


def _targets(args: argparse.Namespace) -> int:
    table = Table(title="targets")
    for column in ("target", "runtime", "installed", "KV cache forms (first: default)"):
        table.add_column(column)
    for name, target in sorted(TARGETS.items()):
        installed = "yes" if target.installed else escape(f"no: {target.install}")  # [extra] is not markup
        table.add_row(name, target.runtime, installed, ", ".join(target.kv_cache_forms))
    console.print(table)
    return 0


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
