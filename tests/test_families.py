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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_batch_matches_pytorch(family, tiny_checkpoint, tmp_path):
    """Batch and padding stay dynamic: two prompts of different lengths in one left-padded batch."""
    import numpy as np
    import torch

    from nanoexport.targets.onnx.runtime import Runner
    from tiny_models import tiny_model

    artifact = nanoexport.export(tiny_checkpoint(family), out=tmp_path / family, progress=False)
    kv = artifact.manifest["io"]["kv_cache"]
    generator = np.random.default_rng(1)
    ids = generator.integers(3, kv["vocab_size"], (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, :4] = 0  # the second prompt is 5 tokens, padded on the left
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for layer in range(kv["num_layers"]):
        for part in ("key", "value"):
            feeds[f"past_key_values.{layer}.{part}"] = np.zeros((2, kv["kv_heads"], 0, kv["head_dim"]), np.float32)
    runner = Runner(artifact)
    prefill = runner.forward(feeds)
    # Then one token per row on the cache the prompt left, padding included.
    step = generator.integers(3, kv["vocab_size"], (2, 1))
    feeds = {"input_ids": step, "attention_mask": np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1),
             "position_ids": positions[:, -1:] + 1,
             **{name.replace("present.", "past_key_values."): value for name, value in prefill.items()
                if name.startswith("present.")}}
    decoded = runner.forward(feeds)["logits"]

    model = tiny_model(family)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(np.concatenate([ids, step], axis=1)),
                       attention_mask=torch.tensor(feeds["attention_mask"]),
                       position_ids=torch.tensor(np.concatenate([positions, feeds["position_ids"]], axis=1))
                       ).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(prefill["logits"][real] - theirs[:, :-1][real]).max() <= 1e-4
    assert np.abs(decoded[:, -1] - theirs[:, -1]).max() <= 1e-4
