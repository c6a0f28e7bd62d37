"""Artifacts: reproducible bytes, a complete manifest, and the Python API."""

import json

import pytest

import nanoexport
from nanoexport.artifact import REPORT_FILES, sha256_of
from nanoexport.errors import NanoexportError
from tiny_models import tiny_model


def test_two_exports_are_byte_identical(demo_artifact, tmp_path):
    same_config = nanoexport.ExportConfig(verify_passes=demo_artifact.manifest["config"]["verify_passes"])
    again = nanoexport.export(out=tmp_path / "again", config=same_config, progress=False)
    first = sorted(p.relative_to(demo_artifact.path) for p in demo_artifact.path.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again.path) for p in again.path.rglob("*") if p.is_file())
    hashed = [p for p in first if p.name not in REPORT_FILES]
    assert hashed == [p for p in second if p.name not in REPORT_FILES]
    for relative in hashed:
        assert (demo_artifact.path / relative).read_bytes() == (again.path / relative).read_bytes(), relative


def test_manifest_describes_every_file(demo_artifact):
    manifest = json.loads((demo_artifact.path / "manifest.json").read_text())
    on_disk = sorted(
        p.relative_to(demo_artifact.path).as_posix()
        for p in demo_artifact.path.rglob("*")
        if p.is_file() and p.name not in ("manifest.json", *REPORT_FILES)
    )
    assert [entry["path"] for entry in manifest["files"]] == on_disk
    for entry in manifest["files"]:
        path = demo_artifact.path / entry["path"]
        assert entry["size"] == path.stat().st_size
        assert entry["sha256"] == sha256_of(path)
    assert manifest["source"]["family"] == "llama"
    assert len(manifest["source"]["weights_sha256"]) == 64
    assert manifest["tool_versions"]["onnxruntime"] != "not installed"
    assert manifest["config"]["target"] == "onnx"
    assert manifest["io"]["kv_cache"]["kv_heads"] < manifest["source"]["config"]["num_attention_heads"]
    assert demo_artifact.verify() == []


def test_onnx_external_data_stays_inside_the_artifact(demo_artifact):
    import onnx

    model = onnx.load(str(demo_artifact.path / "model.onnx"), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {"model.onnx.data"}


def test_export_a_module_in_memory(tmp_path):
    model = tiny_model("qwen3", seed=3)
    artifact = nanoexport.export(model, out=tmp_path / "qwen3", progress=False)
    assert nanoexport.validate(artifact).passed
    assert artifact.manifest["tokenizer"] is None and not (artifact.path / "tokenizer").exists()

    reloaded = nanoexport.Artifact.load(artifact.path)
    with pytest.raises(NanoexportError, match="exported from a model in memory"):
        nanoexport.validate(reloaded)
    assert nanoexport.validate(reloaded, reference=model).passed


def test_checkpoint_without_tokenizer_warns(tiny_checkpoint, tmp_path, caplog):
    artifact = nanoexport.export(tiny_checkpoint("llama"), out=tmp_path / "llama", progress=False)
    assert "no tokenizer files" in caplog.text
    assert artifact.manifest["tokenizer"] is None


def test_validation_catches_a_wrong_reference(tiny_checkpoint, tmp_path):
    artifact = nanoexport.export(tiny_checkpoint("llama"), out=tmp_path / "llama", progress=False)
    report = nanoexport.validate(artifact, reference=tiny_model("llama", seed=1))
    assert not report.passed
    assert not {c.name: c for c in report.checks}["logits max-abs error"].passed
