"""Every supported family: export a tiny random-weight checkpoint and validate it against PyTorch."""

import pytest

import nanoexport
from nanoexport.capture.checkpoint import SUPPORTED_FAMILIES


@pytest.mark.parametrize("family", sorted(SUPPORTED_FAMILIES))
def test_family_exports_and_matches_pytorch(family, tiny_checkpoint, tmp_path):
    artifact = nanoexport.export(
        tiny_checkpoint(family), out=tmp_path / family, config=nanoexport.ExportConfig(verify_passes=True),
        progress=False,
    )
    report = nanoexport.validate(nanoexport.Artifact.load(artifact.path))
    checks = {check.name: check for check in report.checks}

    assert checks["logits max-abs error"].value <= 1e-4
    assert checks["KV consistency max-abs"].value <= 1e-4
    assert checks["greedy agreement"].value == 1.0
    assert checks["top-1 agreement"].value == 1.0
    assert report.passed, [c for c in report.checks if not c.passed]
    assert (artifact.path / "report.json").is_file()


def test_interface_names_follow_optimum(tiny_checkpoint, tmp_path):
    artifact = nanoexport.export(tiny_checkpoint("llama"), out=tmp_path / "llama", progress=False)
    io = artifact.manifest["io"]
    assert [v["name"] for v in io["inputs"]] == [
        "input_ids", "attention_mask", "position_ids",
        "past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value",
    ]
    assert [v["name"] for v in io["outputs"]] == [
        "logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value",
    ]
    # KV heads are not repeated in the cache: [batch, kv_heads, seq, head_dim]
    assert io["inputs"][3]["shape"] == ["batch_size", 2, "past_sequence_length", 16]
    assert io["outputs"][1]["shape"] == ["batch_size", 2, "total_sequence_length", 16]
