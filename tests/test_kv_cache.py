"""The static KV cache: same tokens as the growing cache, fixed shapes, clear refusals."""

import pytest

import nanoexport
from nanoexport.capture.checkpoint import SUPPORTED_FAMILIES
from nanoexport.errors import NanoexportError
from nanoexport.targets.onnx.runtime import Runner
from nanoexport.validate.decoding import ArtifactDecoder, greedy, prompts_for

STATIC = dict(kv_cache="static", max_context=96, verify_passes=True)


def greedy_tokens(artifact, count=40):
    decoder = ArtifactDecoder(Runner(artifact), artifact.manifest["io"]["kv_cache"])
    return [greedy(decoder.next_token_stream(p), count) for p in prompts_for(artifact.path, decoder.vocab_size)]


def export_both(model, tmp_path):
    dynamic = nanoexport.export(model, out=tmp_path / "dynamic", progress=False)
    static = nanoexport.export(model, out=tmp_path / "static", config=nanoexport.ExportConfig(**STATIC),
                               progress=False)
    return dynamic, static


@pytest.mark.parametrize("family", sorted(SUPPORTED_FAMILIES))
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
    dynamic, static = export_both(windowed_mistral(tmp_path / "mistral-window", 8), tmp_path)
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
    decoder = ArtifactDecoder(Runner(static), static.manifest["io"]["kv_cache"])
    with pytest.raises(NanoexportError, match="do not fit the artifact's KV cache of 20"):
        greedy(decoder.next_token_stream(list(range(3, 19))), 8)


def test_static_cache_is_refused_where_attention_is_not_fused(tiny_checkpoint, tmp_path):
    with pytest.raises(NanoexportError, match="attention is not fused yet: use --kv-cache dynamic"):
        nanoexport.export(tiny_checkpoint("llama"), out=tmp_path / "llama", progress=False,
                          config=nanoexport.ExportConfig(kv_cache="static", skip_passes=["fuse"]))
    assert not (tmp_path / "llama").exists()


def test_max_context_below_one_is_refused(tmp_path, capsys):
    from nanoexport.cli import main

    assert main(["--kv-cache", "static", "--max-context", "0", "--out", str(tmp_path / "out")]) == 2
    assert "--max-context must be at least 1" in capsys.readouterr().err


SPLIT = dict(split_prefill_decode=True, prefill_chunk=16, max_context=96, verify_passes=True)


def assert_fully_static(path):
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    for value in values:
        dims = value.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), (path.name, value.name)
    produced = {out for node in model.graph.node for out in node.output if out}  # "": an output left out
    assert produced <= {v.name for v in values}  # every intermediate value has a recorded, static shape
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma2", "gpt2"])
def test_split_graphs_are_static_and_reproduce_dynamic_tokens(family, tiny_checkpoint, tmp_path):
    dynamic = nanoexport.export(tiny_checkpoint(family), out=tmp_path / "dynamic", progress=False)
    split = nanoexport.export(tiny_checkpoint(family), out=tmp_path / "split",
                              config=nanoexport.ExportConfig(**SPLIT), progress=False)
    assert split.manifest["model_files"] == ["prefill.onnx", "decode.onnx", "model.onnx.data"]
    prefill = assert_fully_static(split.path / "prefill.onnx")
    decode = assert_fully_static(split.path / "decode.onnx")
    assert [d.dim_value for d in prefill.graph.input[0].type.tensor_type.shape.dim] == [1, 16]
    assert [d.dim_value for d in decode.graph.input[0].type.tensor_type.shape.dim] == [1, 1]
    for graph in (prefill, decode):
        locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {"model.onnx.data"}  # one weights file, referenced by both graphs
    assert greedy_tokens(split) == greedy_tokens(dynamic)
    assert nanoexport.validate(split).passed


def test_split_on_the_demo_model_with_prompts_longer_than_a_chunk(tmp_path):
    config = nanoexport.ExportConfig(**dict(SPLIT, prefill_chunk=4))  # 9-12 token prompts: 3 chunks each
    split = nanoexport.export(out=tmp_path / "split", config=config, progress=False)
    dynamic = nanoexport.export(out=tmp_path / "dynamic", progress=False)
    assert greedy_tokens(split) == greedy_tokens(dynamic)
    report = nanoexport.validate(split)
    assert report.passed, [c for c in report.checks if not c.passed]


@pytest.mark.parametrize("settings, message", [
    (dict(split_prefill_decode=True, kv_cache="dynamic"), "needs a fixed-size KV cache"),
    (dict(split_prefill_decode=True, prefill_chunk=4096), "--prefill-chunk must be between 2 and --max-context"),
])
def test_bad_split_settings_are_refused(settings, message, tmp_path):
    with pytest.raises(NanoexportError, match=message):
        nanoexport.export(out=tmp_path / "out", config=nanoexport.ExportConfig(**settings), progress=False)


def windowed_mistral(folder, window):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny_models import TINY_CONFIGS

    torch.manual_seed(0)
    config = AutoConfig.for_model("mistral", **dict(TINY_CONFIGS["mistral"], sliding_window=window))
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("split", [False, True])
def test_sliding_cache_generates_past_its_capacity(split, tmp_path):
    """A window-8 model in an 8-slot round-robin cache: 16-token prompts and 32 new tokens, exact vs PyTorch."""
    model = windowed_mistral(tmp_path / "mistral-window", 8)
    config = nanoexport.ExportConfig(kv_cache="sliding", max_context=8, verify_passes=True,
                                     split_prefill_decode=split, prefill_chunk=4)
    sliding = nanoexport.export(model, out=tmp_path / "sliding", config=config, progress=False)
    report = nanoexport.validate(sliding)
    assert report.passed, [c for c in report.checks if not c.passed]
    assert greedy_tokens(sliding) == greedy_tokens(nanoexport.export(model, out=tmp_path / "dynamic", progress=False))


def test_sliding_cache_keeps_the_static_cache_numbers_within_capacity(tiny_checkpoint, tmp_path):
    sliding = nanoexport.export(tiny_checkpoint("qwen2"), out=tmp_path / "sliding", progress=False,
                                config=nanoexport.ExportConfig(kv_cache="sliding", max_context=96))
    static = nanoexport.export(tiny_checkpoint("qwen2"), out=tmp_path / "static", progress=False,
                               config=nanoexport.ExportConfig(kv_cache="static", max_context=96))
    assert greedy_tokens(sliding) == greedy_tokens(static)
