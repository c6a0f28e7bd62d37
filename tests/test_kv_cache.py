"""The static KV cache: same tokens as the growing cache, fixed shapes, clear refusals."""

import pytest

import nanoexport
from nanoexport.errors import NanoexportError
from nanoexport.targets.onnx import Runner
from nanoexport.validate.decoding import ArtifactDecoder, greedy, prompts_for
from tiny_models import save_tiny_checkpoint

STATIC = dict(kv_cache="static", max_context=96, verify_passes=True)


def greedy_tokens(artifact, count=40):
    decoder = ArtifactDecoder(Runner(artifact.path), artifact.manifest["io"]["kv_cache"])
    return [greedy(decoder.next_token_stream(p), count) for p in prompts_for(artifact.path, decoder.vocab_size)]


def export_both(model, tmp_path):
    dynamic = nanoexport.export(model, out=tmp_path / "dynamic", progress=False)
    static = nanoexport.export(model, out=tmp_path / "static", config=nanoexport.ExportConfig(**STATIC),
                               progress=False)
    return dynamic, static


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2"])
def test_static_cache_reproduces_dynamic_tokens(family, tiny_checkpoint, tmp_path):
    dynamic, static = export_both(tiny_checkpoint(family), tmp_path)
    assert greedy_tokens(static) == greedy_tokens(dynamic)
    assert nanoexport.validate(static).passed


def test_static_cache_on_the_demo_model(tmp_path):
    dynamic, static = export_both(None, tmp_path)
    assert greedy_tokens(static) == greedy_tokens(dynamic)
    report = nanoexport.validate(static)
    assert report.passed, [c for c in report.checks if not c.passed]


def test_static_cache_with_a_sliding_window_shorter_than_the_text(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny_models import TINY_CONFIGS

    torch.manual_seed(0)
    config = AutoConfig.for_model("mistral", **dict(TINY_CONFIGS["mistral"], sliding_window=8))
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path / "mistral-window"
    model.save_pretrained(folder)
    dynamic, static = export_both(folder, tmp_path)
    assert greedy_tokens(static) == greedy_tokens(dynamic)
    assert nanoexport.validate(static).passed  # 16-token prompts + 32 generated, window 8: against PyTorch


def test_static_interface_has_fixed_cache_shapes(tiny_checkpoint, tmp_path):
    static = nanoexport.export(tiny_checkpoint("qwen2"), out=tmp_path / "static",
                               config=nanoexport.ExportConfig(**STATIC), progress=False)
    io = {v["name"]: v for v in static.manifest["io"]["inputs"] + static.manifest["io"]["outputs"]}
    assert io["past_key_values.0.key"]["shape"] == ["batch_size", 2, 96, 16]
    assert io["present.1.value"]["shape"] == ["batch_size", 2, 96, 16]
    assert io["attention_mask"]["shape"] == ["batch_size", 96]
    assert io["cache_position"]["shape"] == ["batch_size"]
    assert static.manifest["io"]["kv_cache"]["capacity"] == 96
    assert "static_kv_cache" in [p["name"] for p in static.manifest["passes"]]


def test_generation_past_the_capacity_is_refused(tiny_checkpoint, tmp_path):
    static = nanoexport.export(tiny_checkpoint("llama"), out=tmp_path / "static",
                               config=nanoexport.ExportConfig(kv_cache="static", max_context=20), progress=False)
    decoder = ArtifactDecoder(Runner(static.path), static.manifest["io"]["kv_cache"])
    with pytest.raises(NanoexportError, match="do not fit the artifact's KV cache of 20"):
        greedy(decoder.next_token_stream(list(range(3, 19))), 8)


def test_static_cache_is_refused_for_mixed_attention_layers(tiny_checkpoint, tmp_path):
    with pytest.raises(NanoexportError, match="gemma2 mixes sliding-window and full-attention layers.*--kv-cache dynamic"):
        nanoexport.export(tiny_checkpoint("gemma2"), out=tmp_path / "gemma2",
                          config=nanoexport.ExportConfig(kv_cache="static"), progress=False)
    assert not (tmp_path / "gemma2").exists()


def test_static_cache_is_refused_where_attention_is_not_fused(tiny_checkpoint, tmp_path):
    with pytest.raises(NanoexportError, match="attention is not fused yet: use --kv-cache dynamic"):
        nanoexport.export(tiny_checkpoint("llama"), out=tmp_path / "llama", progress=False,
                          config=nanoexport.ExportConfig(kv_cache="static", skip_passes=["fuse"]))
    assert not (tmp_path / "llama").exists()


def test_max_context_below_one_is_refused(tmp_path, capsys):
    from nanoexport.cli import main

    assert main(["--kv-cache", "static", "--max-context", "0", "--out", str(tmp_path / "out")]) == 2
    assert "--max-context must be at least 1" in capsys.readouterr().err
