"""Fuzzed loaders: damaged inputs from a fixed seed, none escaping as anything but our one-line error; and a
regression test for each bug fuzzing found.

The targets and the mutator are in ``tests/fuzzing.py``; ``benchmarks/fuzz.py`` runs the same targets under
atheris for long, coverage-guided runs. The inputs here are mutations of a real export: a tiny llama
checkpoint with the demo's tokenizer, exported for the onnx target.
"""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fuzzing import DEMO_CHECKPOINT, LOADERS, cli_outcome, fuzz, make_loader
from nanoexport.calibration import DEFAULT_CALIBRATION_FILE
from nanoexport.config import ExportConfig, QuantConfig
from nanoexport.errors import NanoexportError

# Inputs per loader, sized so the file runs in about 2 minutes on one core: loaders that build a model, run ONNX
# Runtime or a tokenizer per input take hundreds, the others thousands; the target runtimes' loaders run the
# prompts per input (the qnn one on the HTP emulator and on CPU, about 4 s), so they take tens.
INPUTS = {"manifest": 3000, "inspect": 600, "validate": 200, "safetensors": 3000, "config": 300, "toml": 3000,
          "tokenizer": 300, "onnx": 600, "openvino": 60, "coreml": 60, "qnn": 15}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(checkpoint, artifact, scratch, artifact_for): a tiny llama with the demo's tokenizer (a vocabulary as
    large as it holds), exported for the onnx target without validation; ``artifact_for(target)`` exports it
    for another target on first use."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import nanoexport
    from tiny_models import COMMON

    root = tmp_path_factory.mktemp("fuzz")
    checkpoint = root / "checkpoint"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **dict(COMMON, vocab_size=4096)))
    model.save_pretrained(checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json", DEFAULT_CALIBRATION_FILE):  # text for QNN's QDQ
        shutil.copyfile(DEMO_CHECKPOINT / name, checkpoint / name)
    artifacts = {"onnx": nanoexport.export(checkpoint, out=root / "artifact", progress=False).path}

    def artifact_for(target: str) -> Path:
        if target not in artifacts:
            settings = {"quant": QuantConfig(calib_samples=4)} if target == "qnn" else {}
            config = ExportConfig(target=target, **settings)
            artifacts[target] = nanoexport.export(checkpoint, config=config, out=root / f"artifact-{target}",
                                                  progress=False).path
        return artifacts[target]

    return checkpoint, artifacts["onnx"], root / "scratch", artifact_for


@pytest.mark.parametrize("name", LOADERS)
def test_a_fuzzed_loader_refuses_damage_in_one_line(name, sources):
    loader = make_loader(name, sources[3], sources[0], sources[2])
    crashes = fuzz(loader, INPUTS[name], seed=0)
    for number, (crash, data) in enumerate(crashes.items()):
        kept = sources[2] / f"{name}-crash-{number}"
        kept.write_bytes(data)
        print(f"{crash}; input in {kept} (first byte: which file, the rest: its contents)")
    assert not crashes, f"{len(crashes)} kinds of crash: {', '.join(map(str, crashes))}"


# Regression tests, one per bug fuzzing found, named after the bug. ----------------------------------------

@pytest.fixture
def artifact(sources, tmp_path):
    """A copy of the exported artifact to damage."""
    return Path(shutil.copytree(sources[1], tmp_path / "artifact"))


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def replace_file(folder: Path, name: str, contents: bytes) -> None:
    """Replace an artifact's file and recompute its checksum in the manifest: damage ``verify`` cannot see."""
    (folder / name).write_bytes(contents)

    def rehash(manifest):
        for entry in manifest["files"]:
            if entry["path"] == name:
                entry["size"], entry["sha256"] = len(contents), hashlib.sha256(contents).hexdigest()

    edit_manifest(folder, rehash)


def one_line_error(run, *phrases: str) -> str:
    with pytest.raises(NanoexportError) as caught:
        run()
    message = str(caught.value)
    assert "\n" not in message
    for phrase in phrases:
        assert phrase in message, message
    return message


@pytest.mark.parametrize("contents, phrase", [
    (b"[]", "schema_version None"),  # was AttributeError: 'list' object has no attribute 'get'
    (b"\xff\xfe", "not valid JSON"),  # was UnicodeDecodeError
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # was RecursionError
    (b'{"schema_version": 1, "size": ' + b"9" * 5000 + b"}", "not valid JSON"),  # was ValueError (int digits)
], ids=["a list", "not UTF-8", "nested deeply", "a huge number"])
def test_a_manifest_that_is_not_a_json_table_is_refused(artifact, contents, phrase):
    from nanoexport.artifact import Artifact

    (artifact / "manifest.json").write_bytes(contents)
    one_line_error(lambda: Artifact.load(artifact), phrase, "manifest.json")


def _set(path: str, value):
    def change(manifest):
        *parents, last = path.split(".")
        node = manifest
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return change


@pytest.mark.parametrize("change, phrase", [
    (_set("files", 3), "field 'files' is an integer, not a list"),  # was TypeError: not iterable
    (_set("files", [1]), "field 'files[0]' is an integer, not a table"),  # was TypeError: not subscriptable
    (_set("files", [{}]), "has no field 'files[0].path'"),  # was KeyError: 'path'
    (_set("files.0.path", 1), "field 'files[0].path' is an integer, not a string"),  # was TypeError in inside
    (lambda manifest: manifest.pop("target"), "has no field 'target'"),  # was KeyError in validate
    (_set("io.kv_cache.num_layers", "4"), "field 'io.kv_cache.num_layers' is a string, not an integer"),  # range()
    (_set("passes.0.name", []), "field 'passes[0].name' is a list, not a string"),  # was NotRenderableError
    (_set("quantization", {"layers": {"lm_head": 8}, "bits_per_weight": 4.5}),  # was NotRenderableError
     "field 'quantization.layers.lm_head' is an integer, not a string"),
])
def test_a_manifest_field_of_the_wrong_type_is_refused_naming_it(artifact, change, phrase):
    from nanoexport.artifact import Artifact

    edit_manifest(artifact, change)
    one_line_error(lambda: Artifact.load(artifact), phrase, "re-export")
    assert cli_outcome(["inspect", str(artifact)], allowed=(2,)) == 2


@pytest.mark.parametrize("path", ["a\x00b", "\ud800"])  # was ValueError (embedded null byte), UnicodeEncodeError
def test_a_manifest_file_path_that_cannot_name_a_file_is_refused(artifact, path):
    from nanoexport.artifact import Artifact

    edit_manifest(artifact, _set("files.0.path", path))
    one_line_error(lambda: Artifact.load(artifact), "is not a file name")


def test_a_manifest_file_path_too_long_for_the_file_system_is_a_problem_not_an_oserror(artifact):
    from nanoexport.artifact import Artifact

    edit_manifest(artifact, _set("files.0.path", "x" * 5000))
    problems = Artifact.load(artifact).verify()  # was OSError: File name too long
    assert problems[0].startswith("x" * 200 + "...: unreadable")


@pytest.mark.parametrize("thresholds, phrase", [
    ({"bogus": 1}, "unknown setting 'bogus'"),  # was TypeError: unexpected keyword argument
    ({"greedy_tokens": "many"}, "'greedy_tokens'"),
])
def test_validation_thresholds_in_the_manifest_of_a_wrong_name_or_type_are_refused(artifact, thresholds, phrase):
    from nanoexport.validate import validate

    edit_manifest(artifact, _set("config.validate", thresholds))
    one_line_error(lambda: validate(artifact, write=False), phrase, "manifest.json [config.validate]")


@pytest.mark.parametrize("name, contents", [
    ("tokenizer/tokenizer.json", b"{"),  # was JSONDecodeError
    ("tokenizer/tokenizer.json", b"\xff\xfe"),  # was UnicodeDecodeError
    ("tokenizer/tokenizer.json", b'{"model": 1}'),  # was KeyError: 'added_tokens'
    ("tokenizer/tokenizer_config.json", b"[]"),  # was AttributeError
])
def test_a_damaged_artifact_tokenizer_is_refused_in_one_line(artifact, name, contents):
    from nanoexport.interface import prompts_for

    replace_file(artifact, name, contents)
    one_line_error(lambda: prompts_for(artifact, 4096), "the artifact's tokenizer", "re-export")


def test_a_damaged_checkpoint_tokenizer_is_refused_by_calibration():
    from nanoexport.calibration.data import load_tokenizer

    files = {"tokenizer.json": b'{"model": {"type": "BPE", "vocab": 3}}'}  # was KeyError: 'added_tokens'
    one_line_error(lambda: load_tokenizer(files), "the checkpoint's tokenizer (tokenizer.json)")


def _safetensors(folder: Path, change_header, data_change=lambda data: data) -> Path:
    """A copy of the checkpoint's model.safetensors with its header (parsed JSON) and data changed."""
    source = (folder / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", source[:8])
    header = change_header(json.loads(source[8:8 + length]))
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = folder.parent / "damaged" / "model.safetensors"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data_change(source[8 + length:]))
    return path


def _first_tensor(change):
    def apply(header):
        name = min((name for name in header if name != "__metadata__"), key=lambda n: header[n]["data_offsets"])
        change(header, name)
        return header
    return apply


# Each was an exception of another type from SafetensorsWeights or its reads (the ``was``), or a MemoryError.
@pytest.mark.parametrize("change_header, data_change, phrase", [
    (lambda header: [header], None, "not a table"),  # was AttributeError: 'list' has no attribute 'items'
    (_first_tensor(lambda h, n: h.__setitem__(n, 7)), None, "needs a known dtype"),  # was TypeError
    (_first_tensor(lambda h, n: h[n].__setitem__("dtype", {})), None, "needs a known dtype"),  # AttributeError
    (_first_tensor(lambda h, n: h[n].pop("shape")), None, "needs a known dtype"),  # was KeyError: 'shape'
    (_first_tensor(lambda h, n: h[n].__setitem__("shape", [-1])), None, "needs a known dtype"),  # ValueError
    (_first_tensor(lambda h, n: h[n].__setitem__("data_offsets", [0])), None, "needs a known dtype"),  # ValueError
    (_first_tensor(lambda h, n: h[n]["shape"].__setitem__(0, 10**12)), None, "data_offsets hold"),  # MemoryError
    (_first_tensor(lambda h, n: h[n].__setitem__("shape", [3])), None, "data_offsets hold"),  # SafetensorError
    (lambda header: header, lambda data: data + b"\0" * 4, "4 bytes after the last tensor"),  # SafetensorError
    (lambda header: {**header, "__metadata__": {"format": 1}}, None, "__metadata__"),  # SafetensorError
    (lambda header: json.dumps(header).replace('"pt"', "NaN").encode(), None, "unreadable header"),  # the same
    (lambda header: json.dumps(header).replace('"format"', '"\\ud800"').encode(), None, "unreadable header"),
    (lambda header: json.dumps(header)[:-1].encode() + b', "__metadata__": {}}', None, "unreadable header"),
])
def test_a_safetensors_header_the_library_would_refuse_is_refused_naming_the_file(
        sources, tmp_path, change_header, data_change, phrase):
    from nanoexport.capture.weights import SafetensorsWeights

    folder = Path(shutil.copytree(sources[0], tmp_path / "checkpoint"))
    path = _safetensors(folder, change_header, data_change or (lambda data: data))
    one_line_error(lambda: SafetensorsWeights([path]), "corrupt safetensors file", str(path), phrase)


def test_a_config_file_that_is_not_utf8_is_refused(tmp_path):
    from nanoexport.config import load_config

    path = tmp_path / "nanoexport.toml"
    path.write_bytes(b'model = "caf\xe9"\n')  # Latin-1; was UnicodeDecodeError
    one_line_error(lambda: load_config(path), "not UTF-8 text", "save it as UTF-8")


@pytest.mark.parametrize("text, phrase", [
    ("[quant]\nkeep_float = [1]\n", "'keep_float' in"),  # accepted, then fnmatch on an int
    ("[quant]\noverrides = { lm_head = 8 }\n", "'overrides' in"),
    ('passes = ["fold_constants", true]\n', "'passes' in"),
])
def test_a_config_list_or_table_holding_another_type_is_refused(tmp_path, text, phrase):
    from nanoexport.config import load_config

    path = tmp_path / "nanoexport.toml"
    path.write_text(text)
    one_line_error(lambda: load_config(path), phrase, "of str values")


def _edit_model(artifact: Path, change) -> None:
    import onnx

    model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    change(model)
    replace_file(artifact, "model.onnx", model.SerializeToString())


def _external(key: str, value: str):
    def change(model):
        tensor = next(t for t in model.graph.initializer if t.external_data)
        entry = next(e for e in tensor.external_data if e.key == key)
        entry.value = value
    return change


def open_runner(artifact: Path):
    from nanoexport.artifact import Artifact
    from nanoexport.targets import get_target

    loaded = Artifact.load(artifact)
    return get_target(loaded.target).runner(loaded)


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", "link.data"])
def test_onnx_external_data_outside_the_artifact_is_refused(artifact, location):
    outside = artifact.parent / "outside.data"
    shutil.copyfile(artifact / "model.onnx.data", outside)
    os.symlink(outside, artifact / "link.data")  # inside by name, outside once resolved
    _edit_model(artifact, _external("location", location))  # was onnxruntime's Fail, many lines
    one_line_error(lambda: open_runner(artifact), "outside the artifact folder", location)


@pytest.mark.parametrize("change, phrase", [
    (_external("offset", str(10**12)), "which holds"),
    (_external("length", "4"), "but its external data says 4"),
    (_external("offset", "abc"), "offset 'abc', not a byte count"),
    (_external("location", "missing.data"), "not a file in the artifact"),
    (lambda model: model.graph.initializer[-1].dims.__setitem__(0, -3), "negative shape"),
])
def test_onnx_external_data_of_absurd_size_or_offset_is_refused(artifact, change, phrase):
    import onnx

    def last_external_first(model):  # the negative shape goes to a tensor with external data
        tensors = model.graph.initializer
        external = [t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]
        tensors.remove(external[-1])
        tensors.append(external[-1])
        change(model)

    _edit_model(artifact, last_external_first)
    one_line_error(lambda: open_runner(artifact), "model.onnx", phrase, "re-export")


def test_an_onnx_external_data_location_that_is_not_utf8_is_refused(artifact):
    # protobuf hands a string field that is not UTF-8 to Python as bytes: our check raised TypeError on it
    text = (artifact / "model.onnx").read_bytes()
    replace_file(artifact, "model.onnx", text.replace(b"model.onnx.data", b"mod\x85l.onnx.data", 1))
    one_line_error(lambda: open_runner(artifact), "which is not a file in the artifact")


def test_an_onnx_dimension_name_that_is_not_utf8_is_refused(artifact):
    # ONNX Runtime opened the model, then reading the output's shape raised UnicodeDecodeError (benchmarks/fuzz.py)
    text = (artifact / "model.onnx").read_bytes()
    damaged = text.replace(b"total_sequence_length", b"total_sequen\x9e\x9a\xa0\x93ength")
    replace_file(artifact, "model.onnx", damaged)
    one_line_error(lambda: open_runner(artifact), "in bytes that are not UTF-8")


def test_a_truncated_onnx_model_is_refused(artifact):
    text = (artifact / "model.onnx").read_bytes()
    replace_file(artifact, "model.onnx", text[: len(text) // 2])  # was onnxruntime's InvalidProtobuf
    one_line_error(lambda: open_runner(artifact), "is not a readable ONNX model")


def test_an_onnx_model_the_runtime_refuses_is_one_line(artifact):
    _edit_model(artifact, lambda model: setattr(model.graph.node[0], "op_type", "NoSuchOp"))  # was Fail
    one_line_error(lambda: open_runner(artifact), "ONNX Runtime cannot load", "re-export")


def _kv_cache(key: str, value):
    return lambda manifest: manifest["io"]["kv_cache"].__setitem__(key, value)


@pytest.mark.parametrize("change, phrase", [
    (_kv_cache("num_layers", 5), "says 5 layers of KV cache"),  # was onnxruntime's InvalidArgument in a run
    (_kv_cache("num_layers", 1), "says 1 layers of KV cache"),  # was ValueError
    (_kv_cache("kv_heads", 3), "says kv_heads 3, but model.onnx takes 2"),  # was InvalidArgument
    (_kv_cache("vocab_size", 0), "says vocab_size 0, but model.onnx takes 4096"),  # was ValueError (no prompts)
    (_kv_cache("capacity", 10**12), "says capacity 1000000000000"),  # was MemoryError, allocating the cache
    (_kv_cache("prefill_chunk", 0), "says prefill_chunk 0"),  # was ValueError: range() arg 3 must not be zero
])
def test_a_manifest_kv_cache_that_does_not_fit_the_graph_is_refused(artifact, change, phrase):
    edit_manifest(artifact, change)
    one_line_error(lambda: open_runner(artifact), phrase, "does not describe the model")


def test_a_manifest_kv_cache_leaving_out_capacity_opens_as_a_growing_cache(artifact):
    # the manifest check lets capacity and prefill_chunk be left out (None); the graph check read them: KeyError
    edit_manifest(artifact, lambda manifest: manifest["io"]["kv_cache"].pop("capacity"))
    assert open_runner(artifact).sessions


@pytest.mark.parametrize("target, missing", [("qnn", "prefill.onnx"), ("openvino", "openvino_model.xml"),
                                             ("coreml", "model.mlpackage")])
def test_a_manifest_naming_another_target_is_refused_for_the_missing_files(artifact, target, missing):
    # was onnxruntime's NoSuchFile, OpenVINO's RuntimeError, FileNotFoundError
    edit_manifest(artifact, _set("target", target))
    one_line_error(lambda: open_runner(artifact), f"has no {missing}, which its {target} runtime needs")


COREML_FILES = "model.mlpackage/Data/com.apple.CoreML/"


@pytest.mark.parametrize("target, damaged, phrase", [
    ("openvino", "openvino_model.bin", "of a weights file of"),  # was a traceback from compile_model
    ("openvino", "openvino_model.xml", "is not readable XML"),
    ("qnn", "decode_ctx_qnn.bin", "Failed to load from EpContext model"),  # the HTP provider's refusal
    ("coreml", COREML_FILES + "model.mlmodel", "Wire format was corrupt"),  # protobuf's DecodeError
    ("coreml", COREML_FILES + "weights/weight.bin", "cannot reshape array"),  # at the first prediction
    ("qnn", "decode.onnx", "is not a readable ONNX model"),  # read by the CPU runner of the HTP note
])
def test_a_target_runtime_refusing_a_damaged_file_is_one_line(sources, tmp_path, target, damaged, phrase):
    """A file cut in half with its checksum recomputed (so the manifest check passes): the runtime's
    failure, when it loads the artifact or first runs it, becomes one line naming the reason."""
    folder = Path(shutil.copytree(sources[3](target), tmp_path / target))
    path = folder / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rehash(folder, damaged)
    errors = validate_errors(folder)
    assert phrase in errors[-1] and "re-export it" in errors[-1], errors


def test_a_compiled_qnn_graph_naming_a_context_outside_the_artifact_is_refused(sources, tmp_path):
    import onnx

    folder = Path(shutil.copytree(sources[3]("qnn"), tmp_path / "qnn"))
    model = onnx.load(folder / "decode_ctx.onnx", load_external_data=False)
    (context,) = [attribute for attribute in model.graph.node[0].attribute if attribute.name == "ep_cache_context"]
    context.s = b"../../../etc/passwd"  # the QNN provider would read it as the compiled graph
    onnx.save(model, folder / "decode_ctx.onnx")
    rehash(folder, "decode_ctx.onnx")
    errors = validate_errors(folder)
    assert "reads its compiled context from '../../../etc/passwd', outside the artifact folder" in errors[-1]


@pytest.mark.parametrize("edit, phrase", [
    # OpenVINO's reader dereferences the missing variable: the process died with SIGSEGV (fuzzing found it)
    (lambda xml: xml.replace('type="Assign" version="opset6">\n\t\t\t<data variable_id=',
                             'type="Assign" version="opset6">\n\t\t\t<data variable_name=', 1),
     "names no variable_id"),
    (lambda xml: xml.replace('<edge from-layer="0" from-port="0"', '<edge from-layer="0" from-port="7"', 1),
     "which do not exist"),
    (lambda xml: xml.replace('offset="0" size="4"', 'offset="0" size="40"', 1), "but says 40"),
])
def test_an_openvino_ir_openvino_would_crash_on_is_refused_first(sources, tmp_path, edit, phrase):
    folder = Path(shutil.copytree(sources[3]("openvino"), tmp_path / "openvino"))
    xml = (folder / "openvino_model.xml").read_text()
    damaged = edit(xml)
    assert damaged != xml
    (folder / "openvino_model.xml").write_text(damaged)
    rehash(folder, "openvino_model.xml")
    errors = validate_errors(folder)
    assert phrase in errors[-1], errors


def rehash(folder: Path, changed: str) -> None:
    """Make the manifest agree with the damaged file, as a forged artifact would."""
    contents = (folder / changed).read_bytes()
    edit_manifest(folder, lambda manifest: [entry.update(size=len(contents),
                                                        sha256=hashlib.sha256(contents).hexdigest())
                                           for entry in manifest["files"] if entry["path"] == changed])


def validate_errors(folder: Path) -> list[str]:
    """The ``error:`` lines of ``nanoexport validate FOLDER``, which must exit 2."""
    process = subprocess.run([sys.executable, "-m", "nanoexport.cli", "validate", str(folder)],
                             capture_output=True, text=True, timeout=600)
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert process.returncode == 2 and len(errors) == 1, process.stderr[-3000:]
    return errors


# Crashes fuzzing found in the command line and checkpoint loading, fixed there; each a regression test.


def test_an_error_naming_a_path_with_brackets_is_printed_as_text(tmp_path):
    folder = tmp_path / "a[" / "b]"  # the path holds "[/b]", a closing markup tag: MarkupError
    folder.mkdir(parents=True)
    assert cli_outcome(["validate", str(folder)], allowed=(2,)) == 2


@pytest.mark.parametrize("build_log", ["[]", '{"passes": [{"name": "fold_constants"}]}', "{"])
def test_inspect_of_a_damaged_build_log_is_one_line(artifact, build_log):
    (artifact / "build.json").write_text(build_log)  # AttributeError, KeyError, JSONDecodeError
    assert cli_outcome(["inspect", str(artifact)], allowed=(2,)) == 2


def test_inspect_shows_manifest_names_as_text(artifact):
    edit_manifest(artifact, _set("passes.0.name", "[/]"))  # MarkupError
    assert cli_outcome(["inspect", str(artifact)], allowed=(0,)) == 0


def test_validate_with_eval_flags_checks_the_manifest_thresholds(artifact):
    edit_manifest(artifact, _set("config.validate", {"bogus": 1}))  # TypeError: ValidationConfig(**...)
    assert cli_outcome(["validate", str(artifact), "--eval-windows", "1"], allowed=(2,)) == 2


def _damaged_checkpoint(sources, tmp_path, change) -> Path:
    folder = Path(shutil.copytree(sources[0], tmp_path / "checkpoint"))
    change(folder)
    return folder


def _config(change):
    def apply(folder):
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))
    return apply


@pytest.mark.parametrize("change", [
    lambda folder: _safetensors(folder, lambda header: [header]).replace(folder / "model.safetensors"),
    lambda folder: (folder / "config.json").write_bytes(
        (folder / "config.json").read_bytes().replace(b'"llama"', b'"llam\xe9"')),  # UnicodeDecodeError
    _config(lambda config: config.__setitem__("model_type", ["llama"])),  # TypeError: unhashable
    _config(lambda config: config.__setitem__("num_attention_heads", "4")),  # StrictDataclassFieldValidationError
], ids=["safetensors header a list", "config.json not UTF-8", "model_type a list", "heads a string"])
def test_a_damaged_checkpoint_is_refused_in_one_line(sources, tmp_path, change):
    from nanoexport.capture.checkpoint import load_checkpoint

    folder = _damaged_checkpoint(sources, tmp_path, change)
    one_line_error(lambda: load_checkpoint(folder, lazy=True))


def test_a_special_token_that_is_not_utf8_is_refused_in_one_line(sources):
    from nanoexport.capture.checkpoint import _load_config, check_tokenizer

    files = {name: (sources[0] / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}
    files["tokenizer_config.json"] = b'{"bos_token": "\\ud800"}'  # UnicodeEncodeError in token_to_id
    one_line_error(lambda: check_tokenizer(files, _load_config(sources[0]), sources[0]))
