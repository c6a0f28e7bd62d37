"""One quantization lowered for every target (``nanoexport build``), and the artifacts compared side by side
(``nanoexport compare``): equal canonical integers in every manifest, and a damaged artifact named."""

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from filelock import FileLock
from report_pages import NO_BROWSER, assert_self_contained, find_browser, plots_of, rendered_plots

import nanoexport
from nanoexport import pipeline

from nanoexport.artifact import MANIFEST, Artifact, sha256_of
from nanoexport.build import build
from nanoexport.cli import main
from nanoexport.capture.onnx_export import export_onnx
from nanoexport.config import ExportConfig, QuantConfig, load_config, quant_settings
from nanoexport.targets import TARGETS as TARGETS_BY_NAME

TARGETS = ("onnx", "openvino", "coreml", "qnn")
# Small on purpose: a short cache and prefill chunk, few calibration and evaluation windows.
CONFIG = """\
max_context = 64
prefill_chunk = 16

[quant]
calib_samples = 4
calib_window = 64

[validate]
greedy_tokens = 8
eval_window = 32
eval_windows = 2
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The demo model built for four targets from one int4 quantization and compared (``report.json``), once
    for all test workers."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    root = root / "build-compare"
    with FileLock(str(root) + ".lock"):
        if not (root / "out" / "report.json").is_file():
            root.mkdir(exist_ok=True)
            (root / "build.toml").write_text(CONFIG)
            code = main(["build", "--targets", ",".join(TARGETS), "--quant", "int4", "--block-size", "32",
                         "--config", str(root / "build.toml"), "--out", str(root / "out"), "--overwrite"])
            report = root / "out" / "report.json"
            assert code == 0, json.loads(report.read_text())["failures"] if report.is_file() else code
    return root / "out"


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def test_four_targets_share_one_quantization_and_agree(built):
    manifests = {name: _manifest(built / name) for name in TARGETS}
    canonical = {name: manifest["weight_digests"]["canonical"] for name, manifest in manifests.items()}
    # Every quantized linear of the demo model (4 layers x qkv, o, gate/up, down), the same integers everywhere.
    assert len(canonical["onnx"]["layers"]) == 16
    assert all(record == canonical["onnx"] for record in canonical.values())
    for name in ("onnx", "openvino", "coreml"):  # stored in their own layouts, the same numbers
        stored = manifests[name]["weight_digests"]["stored"]
        assert stored["equals_canonical"] and stored["layers"] == canonical[name]["layers"], name
    qnn = manifests["qnn"]["weight_digests"]["stored"]  # LPBQ re-rounds every int4 layer, and says by how much
    assert not qnn["equals_canonical"] and sorted(qnn["changed_layers"]) == sorted(canonical["qnn"]["layers"])
    assert 0 < qnn["weight_error"]["relative_rms"] < 0.5 and qnn["weight_error"]["layers"] == 16
    assert manifests["qnn"]["quantization"]["activations"]["type"] == "a16"
    assert "activations" not in manifests["onnx"]["quantization"]

    report = json.loads((built / "report.json").read_text())
    assert report["passed"] and report["failures"] == []
    assert [row["artifact"] for row in report["artifacts"]] == list(TARGETS)
    assert len(report["pairs"]) == 6 and all(pair["canonical_digests_equal"] for pair in report["pairs"])
    for row in report["artifacts"]:
        assert row["weights_intact"] and row["perplexity"] > 1 and row["top1_agreement"] > 0.5, row
        assert row["seconds"]["total"] > 0
        # qnn scores perplexity on ONNX Runtime CPU, and says how that agrees with its runner on the prompts.
        assert (row["scoring_runner_agreement"] is not None) == (row["target"] == "qnn")
    assert report["artifacts"][3]["scoring_runner_agreement"]["top1_agreement"] > 0.9
    for pair in report["pairs"]:
        assert abs(pair["perplexity_change"]) <= report["thresholds"]["quantized_perplexity_spread"], pair


# What importing coremltools sets in os.environ (coremltools 9), which a process that never ran it lacks.
COREMLTOOLS_VARIABLES = ("KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK", "TF_CPP_MIN_LOG_LEVEL")


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_qnn") is None, reason="onnxruntime-qnn is not installed")
def test_qnn_after_coreml_in_one_process_writes_the_bytes_of_a_qnn_export(tmp_path):
    """A build lowering coreml, which imports coremltools, before qnn in this process writes the qnn context
    binaries of ``nanoexport --target qnn`` in a fresh process that never imported coremltools, started from
    another environment."""
    # The default cache capacity: with CONFIG's 64 rows, decode's binary held no environment-dependent bytes.
    config_file = tmp_path / "build.toml"
    config_file.write_text("[quant]\ncalib_samples = 4\ncalib_window = 64\n")
    settings = ["--quant", "int4", "--config", str(config_file)]
    assert main(["build", "--targets", "coreml,qnn", *settings, "--out", str(tmp_path / "build"), "--no-compare"]) == 0
    environment = {name: value for name, value in os.environ.items() if name not in COREMLTOOLS_VARIABLES}
    # Another shell differs in more than that (PWD, the terminal's variables...). Unfixed, the binaries changed
    # with each 16 bytes of environment: this long variable makes a difference certain, not a matter of luck.
    environment["NANOEXPORT_TEST_ANOTHER_SHELL"] = "x" * 200
    package_root = Path(nanoexport.__file__).resolve().parents[1]  # where `-m` finds this very checkout
    result = subprocess.run([sys.executable, "-m", "nanoexport.cli", "--target", "qnn", *settings, "--no-validate",
                             "--out", str(tmp_path / "qnn")], cwd=package_root, env=environment,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # The manifest holds every file's sha256: equal manifests, equal bytes.
    assert _manifest(tmp_path / "qnn") == _manifest(tmp_path / "build" / "qnn")


def test_compare_writes_a_page_of_plots_beside_report_json(built):
    report = json.loads((built / "report.json").read_text())
    page = (built / "report.html").read_text()
    # Perplexity per artifact; the agreement matrix; the one quantization's bits per layer; qnn's re-rounding.
    perplexity, agreement, bits, rerounding = plots_of(page)
    for row in report["artifacts"]:
        assert f"{row['perplexity']:.3f} ({row['perplexity_change']:+.2%})" in perplexity
        assert row["layer_bits"] == report["artifacts"][0]["layer_bits"]  # one plot for the four
    assert f"reference {report['reference']['perplexity']:.3f}" in perplexity
    qnn_to_onnx = next(pair for pair in report["pairs"] if {pair["a"], pair["b"]} == {"onnx", "qnn"})
    cells = re.findall(r">(\d+\.\d)%</text>", agreement)
    assert len(cells) == 25 and f"{qnn_to_onnx['top1_agreement'] * 100:.1f}" in cells  # reference and 4 artifacts
    layer_bits = report["artifacts"][0]["layer_bits"]
    assert len(layer_bits) == 17 and set(layer_bits.values()) == {4.5, 16.0}  # int4 blocks of 32, fp16 lm_head
    assert "(onnx, openvino, coreml, qnn)" in page and "layers.3.mlp.down_proj" in bits
    qnn = report["artifacts"][3]
    assert [row["layer_weight_error"] is not None for row in report["artifacts"]] == [False, False, False, True]
    assert len(qnn["layer_weight_error"]) == 16 and 0 < max(qnn["layer_weight_error"].values()) < 0.5
    assert "layers.0.self_attn.o_proj" in rerounding
    assert_self_contained(page)


@pytest.mark.skipif(find_browser() is None, reason=NO_BROWSER)
def test_compare_page_renders_its_plots_in_a_browser(built, tmp_path):
    plots = rendered_plots(built / "report.html", tmp_path)
    assert len(plots) == 4
    for plot in plots:
        assert plot["width"] > 200 and plot["height"] > 150, plot
        assert plot["shapes"] > 10 and plot["texts"] > 8, plot


def test_compare_names_an_artifact_whose_weights_changed(built, tmp_path, capsys):
    for name in ("onnx", "openvino"):
        shutil.copytree(built / name, tmp_path / name)
    damaged = tmp_path / "onnx"
    # Invert the bytes of one layer's packed integers where they lie in the weights file...
    model = ir.load(damaged / "model.onnx")
    packed = model.graph.initializers["model.layers.1.mlp.down_proj.weight.T.quant.nbits"].const_value
    with open(damaged / "model.onnx.data", "r+b") as data:
        data.seek(packed.offset)
        inverted = bytes(255 - byte for byte in data.read(packed.length))
        data.seek(packed.offset)
        data.write(inverted)
    # ...and rewrite the manifest's checksum to match, so that the artifact loads and runs.
    manifest = _manifest(damaged)
    entry = next(entry for entry in manifest["files"] if entry["path"] == "model.onnx.data")
    entry["sha256"] = sha256_of(damaged / "model.onnx.data")
    (damaged / MANIFEST).write_text(json.dumps(manifest))

    config = tmp_path / "compare.toml"
    config.write_text(CONFIG)
    assert main(["compare", str(damaged), str(tmp_path / "openvino"), "--config", str(config)]) == 1
    out = " ".join(capsys.readouterr().out.split())  # the tables wrap to the terminal's width
    assert "FAIL" in out and "onnx: its stored weights no longer match the digest its manifest recorded" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["passed"]
    assert "compare demo: FAILED" in (tmp_path / "report.html").read_text()
    onnx_row, openvino_row = report["artifacts"]
    assert onnx_row["weights_intact"] is False and openvino_row["weights_intact"] is True
    assert onnx_row["weights_changed_layers"] == ["model.layers.1.mlp.down_proj.weight.T"]
    assert any(failure.startswith("onnx:") for failure in report["failures"])
    assert not report["pairs"][0]["stored_digests_equal"] and report["pairs"][0]["canonical_digests_equal"]
    assert np.isfinite(onnx_row["perplexity"])


def test_build_refuses_targets_that_would_quantize_differently(tmp_path, capsys):
    # qnn needs int4 weights, onnx defaults to float: one quantization cannot serve both.
    assert main(["build", "--targets", "onnx,qnn", "--out", str(tmp_path / "out")]) == 2
    assert "quantize weights differently" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_failing_target_does_not_lose_the_others(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    def broken_writer(model, build):
        raise RuntimeError("the backend's compiler crashed")

    monkeypatch.setitem(TARGETS_BY_NAME, "openvino", dataclasses.replace(TARGETS_BY_NAME["openvino"],
                                                                         lower=broken_writer))
    out = tmp_path / "out"
    assert main(["build", "--model", str(tiny_checkpoint("qwen2")), "--targets", "onnx,openvino", "--out", str(out),
                 "--no-compare"]) == 1
    assert "failed: openvino: RuntimeError: the backend's compiler crashed" in capsys.readouterr().err
    assert (out / "onnx" / MANIFEST).is_file() and not (out / "openvino").exists()
    assert sorted(path.name for path in out.iterdir()) == ["onnx"]  # no staging or scratch folder left behind


def test_stored_integers_read_back_with_zero_points_and_a_quantized_embedding(tiny_checkpoint, tmp_path):
    # Asymmetric uint4 with every layer quantized: zero points, and an embedding table each target stores its way
    # (ONNX Runtime's GatherBlockQuantized, OpenVINO's input-major Constant, a Core ML blockwise op).
    config = ExportConfig(quant=QuantConfig(weights="uint4", asymmetric=True, block_size=16, keep_float=[]))
    result = build(model=tiny_checkpoint("qwen2"), targets=["onnx", "openvino", "coreml"], out=tmp_path,
                   config=config, progress=False)
    assert result.failures == {}
    for name, artifact in result.artifacts.items():
        digests = artifact.manifest["weight_digests"]
        assert any("embed_tokens" in layer for layer in digests["canonical"]["layers"])
        assert digests["stored"]["equals_canonical"], (name, digests["stored"])
        assert digests["stored"]["layers"] == digests["canonical"]["layers"], name


def test_each_quantization_variant_is_quantized_once_and_written_as_its_export(tiny_checkpoint, tmp_path,
                                                                              monkeypatch):
    captures = []
    monkeypatch.setattr(pipeline, "export_onnx", lambda checkpoint: captures.append(1) or export_onnx(checkpoint))
    model = tiny_checkpoint("qwen2")
    config = ExportConfig(quant=QuantConfig(weights="int4", block_size=16),
                          quant_variants={"int4": {}, "int8-asym": {"weights": "int8", "asymmetric": True}})
    result = build(model=model, targets=["onnx", "openvino"], out=tmp_path / "build", config=config, progress=False)
    assert result.failures == {} and len(captures) == 1  # captured once for both quantizations
    assert list(result.artifacts) == ["int4/onnx", "int4/openvino", "int8-asym/onnx", "int8-asym/openvino"]
    assert sorted(os.listdir(tmp_path / "build")) == ["int4", "int8-asym"]
    assert {folder.name: len(artifacts) for folder, artifacts in result.groups().items()} == {"int4": 2, "int8-asym": 2}
    for variant, quant in (("int4", QuantConfig(weights="int4", block_size=16)),
                           ("int8-asym", QuantConfig(weights="int8", block_size=16, asymmetric=True))):
        alone = nanoexport.export(model, target="openvino", out=tmp_path / variant, progress=False,
                                  config=ExportConfig(quant=quant))
        assert _manifest(tmp_path / "build" / variant / "openvino") == _manifest(alone.path), variant


@pytest.mark.parametrize("settings, message", [
    ('[quant_variants."../int4"]\n', "quantization variant name '../int4' in"),
    ('[quant_variants.a]\nbits = 4\n', "unknown setting 'bits' in"),
    ('[quant_variants.a]\nblock_size = "x"\n', "setting 'block_size' in"),
    ('quant_variants = ["int4"]\n', "setting 'quant_variants' in"),
    ('[quant_variants.a]\nweights = "int9"\n', "quantization variant a: "),
    ('[quant]\nweights = "int4"\n[quant_variants.a]\n[quant_variants.b]\nweights = "int4"\n',
     "quantization variants a and b quantize alike"),
])
def test_a_bad_quantization_variant_is_refused_in_one_line(tmp_path, capsys, settings, message):
    (tmp_path / "build.toml").write_text(settings)
    assert main(["build", "--targets", "onnx", "--config", str(tmp_path / "build.toml"),
                 "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1, error
    assert not (tmp_path / "out").exists()


def test_a_quant_flag_holds_for_every_variant(tmp_path):
    (tmp_path / "build.toml").write_text('[quant_variants.awq]\nalgo = "awq"\n[quant_variants.int8]\n'
                                         'weights = "int8"\n')
    config = load_config(tmp_path / "build.toml", overrides={"quant": {"weights": "int4", "block_size": 64}})
    settings = quant_settings(config)
    assert [(quant.weights, quant.algo, quant.block_size) for quant in settings.values()] == [
        ("int4", "awq", 64), ("int4", "", 64)]  # the flag's int4 over the variant's int8, as over [quant]


def test_ray_without_ray_installed_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where it is not installed
    assert main(["build", "--targets", "onnx", "--ray", "local", "--out", str(tmp_path / "out")]) == 2
    assert "--ray needs Ray, which is not installed: pip install 'nanoexport[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_build_on_ray_writes_the_bytes_of_the_sequential_build(tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -c constraints.txt -e '.[ray]'")
    config_file = tmp_path / "build.toml"
    config_file.write_text(CONFIG)
    flags = ["build", "--quant", "int4", "--config", str(config_file)]
    assert main([*flags, "--targets", "onnx,openvino", "--out", str(tmp_path / "sequential"), "--no-compare"]) == 0

    def broken_writer(model, build):
        raise RuntimeError("the backend's compiler crashed")

    # A third target fails in its task (the plan, its target with it, travels to the worker).
    monkeypatch.setitem(TARGETS_BY_NAME, "coreml", dataclasses.replace(TARGETS_BY_NAME["coreml"], lower=broken_writer))
    # Started here to keep it to this machine's two cores and quiet; the build uses the Ray it finds.
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        code = main([*flags, "--targets", "onnx,openvino,coreml", "--out", str(tmp_path / "ray"), "--ray", "local"])
    finally:
        ray.shutdown()
    assert code == 1 and "failed: coreml: RuntimeError: the backend's compiler crashed" in capsys.readouterr().err
    out = tmp_path / "ray"
    folders = sorted(path.name for path in out.iterdir() if path.is_dir() or path.name.startswith("."))
    assert folders == ["onnx", "openvino"]  # no scratch or staging folder left
    for name in ("onnx", "openvino"):
        # The manifest holds every file's sha256: equal manifests, equal bytes.
        assert _manifest(out / name) == _manifest(tmp_path / "sequential" / name), name
        assert not Artifact.load(out / name).verify()
    report = json.loads((out / "report.json").read_text())  # compared in a task of its own
    assert report["passed"] and [row["artifact"] for row in report["artifacts"]] == ["onnx", "openvino"]
