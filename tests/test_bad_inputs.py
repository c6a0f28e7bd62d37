"""Bad input: one clear line on stderr, exit code 2, and nothing half-written."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from nanoexport.cli import main


def run_cli(args, capsys):
    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err.strip()


def assert_clean(out: Path):
    """Nothing at ``out`` and nothing of the export's beside it (staging folder, lock)."""
    assert not out.exists()
    if out.parent.exists():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def assert_one_line_error(code, err, *phrases):
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for phrase in phrases:
        assert phrase in err, err


def test_missing_model_folder(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["--model", tmp_path / "no-such-model", "--out", out], capsys)
    assert_one_line_error(code, err, "does not exist", "no-such-model")
    assert_clean(out)


def test_unsupported_architecture(tmp_path, capsys):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    out = tmp_path / "out"
    code, err = run_cli(["--model", model, "--out", out], capsys)
    assert_one_line_error(code, err, "unsupported architecture 'bert'", "llama", "gpt2", "qwen3")
    assert_clean(out)


def test_truncated_safetensors(tmp_path, tiny_checkpoint, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("llama"), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    code, err = run_cli(["--model", model, "--out", out], capsys)
    assert_one_line_error(code, err, "corrupt safetensors file", "model.safetensors", "truncated")
    assert_clean(out)


class _Payload:
    """Unpickling this would create a file; weights_only loading must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_refused(tmp_path, tiny_checkpoint, capsys):
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(tiny_checkpoint("llama") / "config.json", model)
    marker = tmp_path / "unpickled"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, model / "pytorch_model.bin")
    out = tmp_path / "out"
    code, err = run_cli(["--model", model, "--out", out], capsys)
    assert_one_line_error(code, err, "refusing to unpickle", "safetensors")
    assert not marker.exists()
    assert_clean(out)


def test_pickle_of_plain_tensors_loads(tmp_path, tiny_checkpoint):
    from safetensors.torch import load_file

    import nanoexport

    model = tmp_path / "model"
    model.mkdir()
    source = tiny_checkpoint("llama")
    shutil.copy(source / "config.json", model)
    torch.save(load_file(source / "model.safetensors"), model / "pytorch_model.bin")
    artifact = nanoexport.export(model, out=tmp_path / "out", progress=False)
    assert nanoexport.validate(artifact).passed


@pytest.mark.parametrize("where", ["parent-is-a-file", "read-only-filesystem"])
def test_unwritable_output_folder(tmp_path, tiny_checkpoint, capsys, where):
    if where == "parent-is-a-file":
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        out = blocker / "out"
    else:
        out = Path("/proc/nanoexport-test-out")  # refused even to root
    code, err = run_cli(["--model", tiny_checkpoint("llama"), "--out", out], capsys)
    assert_one_line_error(code, err, "cannot write to", "--out")
    assert not out.exists()


def test_output_folder_holding_another_artifact(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    assert run_cli(["--model", tiny_checkpoint("llama"), "--out", out, "--no-validate"], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, err = run_cli(["--model", tiny_checkpoint("gpt2"), "--out", out], capsys)
    assert_one_line_error(code, err, "already holds a different artifact", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]

    assert run_cli(["--model", tiny_checkpoint("gpt2"), "--out", out, "--overwrite", "--no-validate"], capsys)[0] == 0
    assert json.loads((out / "manifest.json").read_text())["source"]["family"] == "gpt2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unknown_target(tmp_path, capsys):
    code, err = run_cli(["--target", "tpu", "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "unknown target 'tpu'", "onnx")


def test_validate_rejects_a_path_escaping_the_artifact(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    assert run_cli(["--model", tiny_checkpoint("llama"), "--out", out, "--no-validate"], capsys)[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][0]["path"] = "../../etc/passwd"
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, err = run_cli(["validate", out], capsys)
    assert_one_line_error(code, err, "escapes the artifact folder")


def test_validate_detects_a_damaged_file(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    assert run_cli(["--model", tiny_checkpoint("llama"), "--out", out, "--no-validate"], capsys)[0] == 0
    data = out / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-4])
    code, err = run_cli(["validate", out], capsys)
    assert_one_line_error(code, err, "damaged", "model.onnx.data")


def test_validate_a_folder_that_is_not_an_artifact(tmp_path, capsys):
    code, err = run_cli(["validate", tmp_path], capsys)
    assert_one_line_error(code, err, "not a nanoexport artifact")


def test_bad_config_file(tmp_path, capsys):
    config = tmp_path / "nanoexport.toml"
    config.write_text('targte = "onnx"\n')
    code, err = run_cli(["--config", config, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "unknown setting 'targte'")


def test_hub_id_when_the_hub_is_unreachable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache: nothing to fall back on
    out = tmp_path / "out"
    code, err = run_cli(["--model", "nanoexport-tests/no-such-model", "--out", out], capsys)
    assert_one_line_error(code, err, "could not download nanoexport-tests/no-such-model", "local checkpoint folder")
    assert_clean(out)


@pytest.mark.parametrize("poison, quant", [(float("nan"), "none"), (float("inf"), "int4")])
def test_a_non_finite_weight_is_refused_naming_it(tmp_path, tiny_checkpoint, capsys, poison, quant):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("llama"), model)
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][5, 7] = poison
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, err = run_cli(["--model", model, "--out", out, "--quant", quant, "--no-validate"], capsys)
    assert_one_line_error(code, err, "model.layers.1.mlp.down_proj.weight", str(poison), "[5, 7]", "damaged")
    assert_clean(out)


DEMO = Path(__file__).resolve().parent.parent / "nanoexport" / "assets" / "demo"


def demo_copy(tmp_path: Path, config_changes=None, files=None) -> Path:
    """The demo checkpoint with some config.json fields changed and some files replaced."""
    model = tmp_path / "model"
    shutil.copytree(DEMO, model)
    if config_changes:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, **config_changes}))
    for name, contents in (files or {}).items():
        (model / name).write_bytes(contents)
    return model


@pytest.mark.parametrize("changes, phrases", [
    ({"vocab_size": 10**11}, ["vocab_size 100,000,000,000", "[4096, 256]"]),
    ({"hidden_size": 512}, ["hidden_size 512", "[4096, 256]"]),
    ({"num_hidden_layers": 6}, ["num_hidden_layers 6", "hold 4 layers"]),
    ({"intermediate_size": 10**11}, ["gate_proj.weight", "[100000000000, 256]"]),
])
@pytest.mark.parametrize("verb", ["export", "validate --reference"])
def test_a_config_that_disagrees_with_the_weights_is_refused_before_any_model_is_built(
        tmp_path, capsys, monkeypatch, demo_artifact, changes, phrases, verb):
    from nanoexport.capture import checkpoint

    monkeypatch.setattr(checkpoint, "meta_model", lambda *_: pytest.fail("a model was built from the config"))
    monkeypatch.setattr(checkpoint, "_load_model", lambda *_: pytest.fail("a model was built from the config"))
    model = demo_copy(tmp_path, changes)
    out = tmp_path / "out"
    if verb == "export":
        code, err = run_cli(["--model", model, "--out", out], capsys)
    else:
        code, err = run_cli(["validate", demo_artifact.path, "--reference", model], capsys)
    assert_one_line_error(code, err, *phrases, "different models")
    assert_clean(out)


def test_a_reference_larger_than_the_memory_is_refused_with_the_numbers(tmp_path, capsys, monkeypatch, demo_artifact):
    from nanoexport.capture import checkpoint

    monkeypatch.setattr(checkpoint, "_available_memory", lambda: 1 << 20)
    code, err = run_cli(["validate", demo_artifact.path, "--reference", DEMO], capsys)
    assert_one_line_error(code, err, "GiB as the fp32 reference model", "0.0 GiB of memory are available",
                          "--no-validate")


TOKENIZER = (DEMO / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("files, config_changes, phrases", [
    ({"tokenizer.json": TOKENIZER[:5000]}, None, ["tokenizer.json", "not valid JSON"]),
    ({"tokenizer.json": TOKENIZER.replace(b'"type": "BPE"', b'"type": "NoSuchModel"', 1)}, None,
     ["tokenizer.json", "cannot be loaded by the tokenizers library"]),
    ({"tokenizer_config.json": b'{"eos_token": "<|no-such-token|>"}'}, None,
     ["eos_token '<|no-such-token|>'", "does not hold"]),
    ({}, {"eos_token_id": [0, 5000]}, ["eos_token_id 5000", "outside the tokenizer's 4,096 tokens"]),
    ({"tokenizer.json": "larger"}, None, ["4,099 tokens but the model has 4,096 embedding rows"]),
])
def test_a_broken_tokenizer_is_refused_before_it_enters_an_artifact(tmp_path, capsys, files, config_changes, phrases):
    if files.get("tokenizer.json") == "larger":  # another model's tokenizer, with more tokens than embedding rows
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(TOKENIZER.decode())
        tokenizer.add_tokens(["<extra-1>", "<extra-2>", "<extra-3>"])
        files = {"tokenizer.json": tokenizer.to_str().encode()}
    model = demo_copy(tmp_path, config_changes, files)
    out = tmp_path / "out"
    code, err = run_cli(["--model", model, "--out", out], capsys)
    assert_one_line_error(code, err, *phrases)
    assert_clean(out)


def test_a_weight_of_an_integer_dtype_is_refused_from_the_header(tmp_path, tiny_checkpoint, capsys):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("llama"), model)
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"].to(torch.int8)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, err = run_cli(["--model", model, "--out", out], capsys)
    assert_one_line_error(code, err, "model.layers.0.self_attn.q_proj.weight", "is I8, not a float type", "--quant")
    assert_clean(out)
