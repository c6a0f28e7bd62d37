"""The command line end to end on the bundled demo model, and its manners."""

import json
import os
import subprocess
import sys

import pytest

from nanoexport.cli import main


def test_default_command_exports_and_validates_the_demo_model(tmp_path):
    # Exactly what README's first command runs, as a separate process through the console script's module.
    result = subprocess.run(
        [sys.executable, "-m", "nanoexport.cli", "--target", "onnx"], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "nanoexport-out" / "demo-onnx"
    assert "model.onnx.data" in result.stdout and "validation of" in result.stdout and "PASS" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["passed"]
    assert {c["name"] for c in report["checks"]} >= {
        "logits max-abs error", "top-1 agreement", "KV consistency max-abs", "greedy agreement"
    }
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_validate_verb_on_an_artifact(demo_artifact, capsys):
    assert main(["validate", str(demo_artifact.path)]) == 0
    assert "PASS" in capsys.readouterr().out


def test_validate_exits_1_when_a_threshold_fails(demo_artifact, tmp_path, capsys):
    strict = tmp_path / "strict.toml"
    strict.write_text("[validate]\nlogits_max_abs = 0.0\n")
    assert main(["validate", str(demo_artifact.path), "--config", str(strict)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out
    report = json.loads((demo_artifact.path / "report.json").read_text())
    failed = [c["name"] for c in report["checks"] if not c["passed"]]
    assert failed == ["logits max-abs error"]


def test_nanoexport_toml_supplies_defaults_and_flags_override(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nanoexport.toml").write_text(
        f'model = "{tiny_checkpoint("qwen2")}"\nout = "from-toml"\n[validate]\ngreedy_tokens = 8\n'
        '[onnx]\npadded_batches = false\n'
    )
    assert main(["--no-validate"]) == 0
    manifest = json.loads((tmp_path / "from-toml" / "manifest.json").read_text())
    assert manifest["source"]["family"] == "qwen2"
    assert manifest["config"]["validate"]["greedy_tokens"] == 8
    assert manifest["config"]["onnx"]["padded_batches"] is False

    assert main(["--no-validate", "--model", str(tiny_checkpoint("gpt2")), "--out", "from-flag",
                 "--padded-batches"]) == 0
    manifest = json.loads((tmp_path / "from-flag" / "manifest.json").read_text())
    assert manifest["source"]["family"] == "gpt2"
    assert manifest["config"]["onnx"]["padded_batches"] is True


def test_targets_lists_onnx_with_its_runtime(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert "onnx" in out and "onnxruntime" in out and "yes" in out


def test_inspect_shows_io_and_passes(demo_artifact, capsys):
    assert main(["inspect", str(demo_artifact.path)]) == 0
    out = capsys.readouterr().out
    assert "past_key_values.0.key" in out and "present.3.value" in out and "fold_constants" in out
    timings = json.loads((demo_artifact.path / "build.json").read_text())["passes"]
    fold = next(entry for entry in timings if entry["name"] == "fold_constants")
    assert fold["seconds"] > 0 and fold["logits_change"] is not None  # the fixture verifies every pass
    assert f"{fold['seconds']:.2f}" in out
    assert "onnx lowering passes" in out and "group_query_attention" in out and "ort_kernels" in out


@pytest.mark.parametrize("verb", [[], ["validate"], ["inspect"], ["targets"]])
def test_every_verb_has_help_with_examples(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*verb, "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_an_error_quoting_a_name_with_line_breaks_stays_one_line(tmp_path, capsys, monkeypatch):
    # A damaged Core ML program named an op "\nadd_21\n\n" (found by fuzzing the coreml loader).
    import nanoexport.cli as cli
    from nanoexport.errors import NanoexportError

    def refuse(*args, **kwargs):
        raise NanoexportError("the MIL interpreter has no kernel for op \nadd_21\n\n; it cannot run this package")

    monkeypatch.setattr(cli, "_validate", refuse)
    assert main(["validate", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == \
        r"error: the MIL interpreter has no kernel for op \nadd_21\n\n; it cannot run this package"


def test_a_preset_sits_under_the_config_file_and_the_flags(tmp_path, capsys):
    """``--preset speed`` loads the target's preset; a config file and flags still override it; an unknown
    preset is refused in one line naming the ones there are."""
    from nanoexport.config import load_config, preset_file

    preset = load_config(None, {"target": "onnx"}, preset="speed")
    assert preset.quant.weights == "int4" and preset.quant.keep_float == []
    assert preset.quant.block_size != 32  # the preset, not the default
    settings = tmp_path / "settings.toml"
    settings.write_text("[quant]\nblock_size = 128\n")
    assert load_config(settings, {"target": "onnx"}, preset="speed").quant.block_size == 128
    assert load_config(settings, {"target": "onnx", "quant": {"block_size": 16}}, preset="speed").quant.block_size == 16
    assert preset_file("openvino", "speed").is_file()

    assert main(["--preset", "fastest", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "no preset 'fastest' for target onnx; choose one of speed, speed-gptq" in error
    assert not (tmp_path / "out").exists()
