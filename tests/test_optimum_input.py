"""An Optimum ONNX decoder folder as ``--model``: fused to our canonical graph, exported, validated; with the
checkpoint's safetensors beside it, or without them (a weightless checkpoint, its ONNX file the reference).

The fixture (tests/fixtures/optimum-llama, made by make_optimum_fixture.py in Optimum's own environment) is a
tiny Llama exported by ``optimum-cli export onnx --task text-generation-with-past``, beside its checkpoint.
How each family's Optimum graph fuses and quantizes, against our own capture, is test_optimum_families.py's.
"""

import hashlib
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import onnx
import pytest

import nanoexport
from nanoexport.artifact import sha256_of
from nanoexport.build import build
from nanoexport.capture import checkpoint as checkpoint_module
from nanoexport.capture.checkpoint import DEMO_MODEL, load_checkpoint
from nanoexport.cli import main
from nanoexport.validate.compare import compare

FIXTURE = Path(__file__).parent / "fixtures" / "optimum-llama"


def test_optimum_folder_exports_to_onnx_and_matches_pytorch(tmp_path):
    artifact = nanoexport.export(FIXTURE, target="onnx", out=tmp_path / "onnx",
                                 config=nanoexport.ExportConfig(verify_passes=True), progress=False)
    graph = onnx.load(artifact.path / "model.onnx", load_external_data=False)
    assert Counter(node.op_type for node in graph.graph.node)["GroupQueryAttention"] == 2
    assert [value["name"] for value in artifact.manifest["io"]["outputs"]][:2] == ["logits", "present.0.key"]
    report = nanoexport.validate(nanoexport.Artifact.load(artifact.path))
    checks = {check.name: check for check in report.checks}
    assert checks["logits max-abs error"].value <= 1e-4
    assert checks["greedy agreement"].value == 1.0
    assert report.passed, [check for check in report.checks if not check.passed]


def test_every_static_shape_target_builds_from_an_optimum_folder(tmp_path):
    """Optimum's reshapes read the shape of a normalized activation; the static-shape targets (coreml, qnn,
    tvm) need it folded once the sequence length is fixed. Float validation of each is the targets' own
    tests' business; here each must build, and carry the canonical graph's integers."""
    config = nanoexport.ExportConfig()
    config.quant.weights = "int4"
    config.quant.calib = str(DEMO_MODEL / "calibration.txt")  # qnn's activations
    result = build(FIXTURE, targets=["coreml", "qnn", "tvm"], out=tmp_path / "build", config=config, progress=False)
    assert not result.failures, result.failures
    digests = {name: artifact.manifest["weight_digests"]["canonical"] for name, artifact in result.artifacts.items()}
    assert len(set(map(str, digests.values()))) == 1, digests


@pytest.mark.parametrize("damage, message", [
    ("encoder", "not a decoder with the 2-layer KV-cache interface"),
    ("no weights", "no weights in"),
    ("split decoder", "older split decoder files"),
    ("another config", "the config belongs to another model"),
    ("missing external data", "keeps weights in 'model.onnx_data', which is not beside it"),
])
def test_an_onnx_folder_we_do_not_understand_is_refused_in_one_line(damage, message, tmp_path, capsys):
    folder = tmp_path / damage.replace(" ", "-")
    shutil.copytree(FIXTURE, folder)
    if damage == "encoder":  # an ONNX model without the cache: Optimum's export without "-with-past"
        graph = onnx.load(folder / "model.onnx")
        kept = [value for value in graph.graph.input if not value.name.startswith("past_key_values.")]
        del graph.graph.input[:]
        graph.graph.input.extend(kept)
        onnx.save(graph, folder / "model.onnx")
    elif damage == "no weights":  # neither the checkpoint's weights nor an ONNX file holding them
        (folder / "model.safetensors").unlink()
        (folder / "model.onnx").unlink()
    elif damage == "another config":  # nothing but the ONNX file to check the config against
        (folder / "model.safetensors").unlink()
        settings = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**settings, "vocab_size": 640}))
    elif damage == "missing external data":
        with_external_data(folder)
        (folder / "model.onnx_data").unlink()
    else:
        (folder / "model.onnx").rename(folder / "decoder_model.onnx")
    assert main(["--model", str(folder), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert re.search(message, " ".join(error.split())) and error.count("\n") == 0, error
    if damage in ("encoder", "no weights", "split decoder"):  # the fix: export it again, this way
        assert "optimum-cli export onnx" in " ".join(error.split())


def weightless_copy(folder: Path) -> Path:
    """The fixture without its checkpoint's weights: the Optimum ONNX folder such users have."""
    shutil.copytree(FIXTURE, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    return folder


def with_external_data(folder: Path) -> None:
    """Rewrite ``folder``'s model.onnx as Optimum writes a model over 2 GB: its weights in model.onnx_data."""
    graph = onnx.load(folder / "model.onnx")
    onnx.save(graph, folder / "model.onnx", save_as_external_data=True, location="model.onnx_data",
              size_threshold=0)


def files_digest(*paths: Path) -> str:
    """The digest a manifest records for the files holding a model's weights: over each file's name and sha256."""
    return hashlib.sha256(b"".join(path.name.encode() + b"\0" + sha256_of(path).encode() + b"\n"
                                   for path in paths)).hexdigest()


def test_a_weightless_checkpoint_is_identified_by_its_onnx_file_and_external_data(tmp_path):
    folder = weightless_copy(tmp_path / "optimum")
    with_external_data(folder)
    checkpoint = load_checkpoint(folder)
    assert checkpoint.onnx_weights == folder.resolve() / "model.onnx" and checkpoint.lazy
    assert checkpoint.weights_sha256 == files_digest(folder / "model.onnx", folder / "model.onnx_data")


def test_a_folder_without_safetensors_builds_the_integers_of_the_full_folder(tmp_path):
    """int4 RTN needs no reference: the weightless folder gives the full folder's integers to every target, and
    validation against its ONNX file gives the figures validation against the PyTorch model gives."""
    config = nanoexport.ExportConfig()
    config.quant.weights = "int4"
    folder = weightless_copy(tmp_path / "optimum")
    result = build(folder, targets=["onnx", "openvino"], out=tmp_path / "build", config=config, progress=False)
    full = nanoexport.export(FIXTURE, target="onnx", out=tmp_path / "full", config=config, progress=False)
    assert not result.failures, result.failures
    for artifact in result.artifacts.values():
        assert artifact.manifest["weight_digests"]["canonical"] == full.manifest["weight_digests"]["canonical"]
        source = artifact.manifest["source"]
        assert source["weights_file"] == "model.onnx"
        assert source["weights_sha256"] == files_digest(folder / "model.onnx")
    assert result.artifacts["onnx"].manifest["weight_digests"]["stored"] == full.manifest["weight_digests"]["stored"]
    assert "weights_file" not in full.manifest["source"]
    assert full.manifest["source"]["weights_sha256"] == files_digest(FIXTURE / "model.safetensors")

    ours, theirs = nanoexport.validate(result.artifacts["onnx"], write=False), nanoexport.validate(full, write=False)
    assert (ours.reference, theirs.reference) == ("ONNX Runtime CPU on model.onnx", "PyTorch fp32")
    for check in theirs.checks:
        assert next(c.value for c in ours.checks if c.name == check.name) == pytest.approx(check.value, abs=1e-4)
    report = compare(list(result.artifacts.values()))
    assert report["reference"]["model"] == "ONNX Runtime CPU on model.onnx" and report["passed"], report["failures"]


def test_a_folder_without_safetensors_validates_against_its_onnx_file(tmp_path, capsys, monkeypatch):
    folder = weightless_copy(tmp_path / "optimum")
    artifact = nanoexport.export(folder, target="onnx", out=tmp_path / "onnx", progress=False)
    report = nanoexport.validate(artifact)
    checks = {check.name: check.value for check in report.checks}
    assert report.reference == "ONNX Runtime CPU on model.onnx" and report.passed
    assert checks["logits max-abs error"] <= 1e-4 and checks["greedy agreement"] == 1.0

    def reference_of(artifact_folder: Path) -> str:
        return json.loads((artifact_folder / "report.json").read_text())["reference"]

    # Later, from the manifest: the reference found again at the source, checked against the recorded digest.
    assert main(["validate", str(artifact.path)]) == 0
    assert reference_of(artifact.path) == "ONNX Runtime CPU on model.onnx"
    # Where the user has the checkpoint after all: its PyTorch model.
    assert main(["validate", str(artifact.path), "--reference", str(FIXTURE)]) == 0
    assert reference_of(artifact.path) == "PyTorch fp32"
    assert main(["--model", str(folder), "--out", str(tmp_path / "vs-torch"), "--reference", str(FIXTURE)]) == 0
    assert reference_of(tmp_path / "vs-torch") == "PyTorch fp32"
    assert main(["--model", str(folder), "--out", str(tmp_path / "unchecked"), "--no-validate"]) == 0
    assert not (tmp_path / "unchecked" / "report.json").exists()

    with monkeypatch.context() as patch:  # the reference needs the ONNX file's bytes in memory
        patch.setattr(checkpoint_module, "_available_memory", lambda: 1 << 10)
        capsys.readouterr()
        assert main(["validate", str(artifact.path)]) == 2
        assert "GiB as the ONNX Runtime reference model" in capsys.readouterr().err

    graph = onnx.load(folder / "model.onnx")
    graph.doc_string = "another export"
    onnx.save(graph, folder / "model.onnx")
    capsys.readouterr()
    assert main(["validate", str(artifact.path)]) == 2
    assert "differ from those" in capsys.readouterr().err
