"""Export a fixed set of artifacts and record every file's sha256, or compare two such records.

Used to show that a refactor changes no artifact: record on the commit before it, record on the commit
after, compare. The set is the demo model and the seven tiny test families for every target, with the
quantization forms and KV-cache forms the test suite covers.

Examples:
    python benchmarks/artifact_parity.py record before.json            # every case (about 20 minutes here)
    python benchmarks/artifact_parity.py record after.json --cases 'demo-onnx*'
    python benchmarks/artifact_parity.py compare before.json after.json   # exit 1 on any difference

Every target rebuilds byte for byte (the QNN context binaries too, since they are compiled in a pinned
worker process), so any difference is a change of the artifact.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import sys
import tempfile
from pathlib import Path

# (case name, model: "demo" or a tiny family, target, settings applied to ExportConfig / its tables)
QUANT_FORMS = {
    "fp32": {},
    "int4": {"quant": {"weights": "int4"}},
    "int4-asym": {"quant": {"weights": "int4", "asymmetric": True}},
    "int4-gptq": {"quant": {"weights": "int4", "algo": "gptq", "calib_samples": 8}},
    "int4-awq": {"quant": {"weights": "int4", "algo": "awq", "calib_samples": 8}},
    "int4-head": {"quant": {"weights": "int4", "keep_float": [], "dynamic_int8": False}},
    "uint4": {"quant": {"weights": "uint4"}},
    "int8": {"quant": {"weights": "int8"}},
    "nf4": {"quant": {"weights": "nf4", "keep_float": []}},
    "fp16": {"quant": {"weights": "fp16"}},
    "w8a16": {"quant": {"weights": "int8", "activations": "a16", "observer": "mse"}},
    "static": {"kv_cache": "static", "max_context": 64},
    "sliding": {"kv_cache": "sliding", "max_context": 16},
    "split": {"split_prefill_decode": True, "max_context": 64, "prefill_chunk": 16},
    "split-int4": {"split_prefill_decode": True, "max_context": 64, "prefill_chunk": 16,
                   "quant": {"weights": "int4"}},
    "unpadded-int4": {"quant": {"weights": "int4"}, "onnx": {"padded_batches": False}},
    "qnn-default": {"max_context": 64, "prefill_chunk": 16},
    "qnn-w8a8": {"max_context": 64, "prefill_chunk": 16, "quant": {"weights": "int8", "activations": "a8"}},
    "qnn-parts": {"max_context": 64, "prefill_chunk": 16, "qnn": {"max_part_bytes": "1MB"}},
    "coreml-default": {"max_context": 64, "prefill_chunk": 16},
    "coreml-int4": {"max_context": 64, "prefill_chunk": 16, "quant": {"weights": "int4"}},
    "coreml-nf4": {"max_context": 64, "prefill_chunk": 16, "quant": {"weights": "nf4", "keep_float": []}},
}
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt2")
CASES = [
    *[(f"demo-onnx-{form}", "demo", "onnx", form) for form in (
        "fp32", "int4", "int4-asym", "int4-gptq", "int4-awq", "int4-head", "uint4", "int8", "nf4", "fp16",
        "w8a16", "static", "sliding", "split", "split-int4", "unpadded-int4")],
    *[(f"demo-openvino-{form}", "demo", "openvino", form) for form in ("fp32", "int4", "int4-asym", "int8", "nf4")],
    *[(f"demo-{form}", "demo", "coreml", form) for form in ("coreml-default", "coreml-int4", "coreml-nf4")],
    *[(f"demo-{form}", "demo", "qnn", form) for form in ("qnn-default", "qnn-w8a8", "qnn-parts")],
    *[(f"{family}-onnx-fp32", family, "onnx", "fp32") for family in FAMILIES],
    *[(f"{family}-onnx-int4", family, "onnx", "int4") for family in FAMILIES],
    *[(f"{family}-onnx-split", family, "onnx", "split") for family in FAMILIES],
    *[(f"{family}-openvino-fp32", family, "openvino", "fp32") for family in FAMILIES],
    *[(f"{family}-coreml", family, "coreml", "coreml-default") for family in FAMILIES],
    *[(f"{family}-qnn", family, "qnn", "qnn-default") for family in FAMILIES],
]


def _config(target: str, form: str):
    from nanoexport.config import ExportConfig, load_config

    settings = {"target": target, **QUANT_FORMS[form]}
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as handle:
        handle.write(_toml(settings))
    config = load_config(Path(handle.name))
    Path(handle.name).unlink()
    assert isinstance(config, ExportConfig)
    return config


def _toml(settings: dict, table: str = "") -> str:
    lines, tables = [], []
    for key, value in settings.items():
        if isinstance(value, dict):
            tables.append(_toml(value, key))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    head = f"[{table}]\n" if table else ""
    return head + "\n".join(lines) + "\n" + "".join(tables)


def record(path: Path, patterns: list[str]) -> None:
    import nanoexport

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from tiny_models import save_tiny_checkpoint

    results = json.loads(path.read_text()) if path.is_file() else {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        checkpoints: dict[str, Path] = {}
        for name, model, target, form in CASES:
            if patterns and not any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
                continue
            if model != "demo" and model not in checkpoints:
                checkpoints[model] = save_tiny_checkpoint(model, root / f"ckpt-{model}")
            source = None if model == "demo" else checkpoints[model]
            try:
                artifact = nanoexport.export(source, out=root / name, config=_config(target, form), progress=False)
            except Exception as error:  # a case that fails is recorded as such, and compared like files
                results[name] = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
                print(f"{name}: error {results[name]['error']}", flush=True)
                path.write_text(json.dumps(results, indent=1, sort_keys=True))
                continue
            files = {entry["path"]: entry["sha256"] for entry in artifact.manifest["files"]}
            manifest = (artifact.path / "manifest.json").read_text()
            # The demo model's path names the checkout, a tiny model's the scratch folder: compare the rest.
            manifest = manifest.replace(str(Path(nanoexport.__file__).parent), "<package>")
            manifest = manifest.replace(str(root), "<scratch>")
            files["manifest.json"] = hashlib.sha256(manifest.encode()).hexdigest()
            results[name] = {"target": target, "files": files}
            print(f"{name}: {len(files)} files", flush=True)
            path.write_text(json.dumps(results, indent=1, sort_keys=True))


def compare(before_path: Path, after_path: Path) -> int:
    before, after = json.loads(before_path.read_text()), json.loads(after_path.read_text())
    differences, same = [], 0
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old is None or new is None:
            differences.append(f"{name}: only in {'after' if old is None else 'before'}")
            continue
        if "error" in old or "error" in new:
            if old != new:
                differences.append(f"{name}: {old.get('error', 'ok')} -> {new.get('error', 'ok')}")
            continue
        old_files, new_files = old["files"], new["files"]
        for file in sorted(set(old_files) | set(new_files)):
            if old_files.get(file) == new_files.get(file):
                same += 1
                continue
            change = "added" if file not in old_files else "removed" if file not in new_files else "differs"
            differences.append(f"{name}: {file} {change}")
    print(f"{same} files identical across {len(set(before) & set(after))} cases")
    if differences:
        print(f"{len(differences)} differences:")
        for line in differences:
            print("  " + line)
    return 1 if differences else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    recording = verbs.add_parser("record", help="export every case and write {case: {file: sha256}}")
    recording.add_argument("output", type=Path)
    recording.add_argument("--cases", nargs="*", default=[], help="shell patterns of case names (default: all)")
    comparing = verbs.add_parser("compare", help="compare two records; exit 1 on any difference")
    comparing.add_argument("before", type=Path)
    comparing.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.verb == "record":
        record(args.output, args.cases)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
