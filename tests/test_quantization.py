"""Block-wise weight quantization: the arithmetic, the graph form, calibration data, and whole exports."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

import nanoexport
from nanoexport.calibration import algorithms, check_config, plan_layers, quantize
from nanoexport.config import parse_size
from nanoexport.calibration.algorithms import awq, gptq, output_error as hessian_error
from nanoexport.calibration.blocks import NF4_CODEBOOK, WeightFormat, block_hessians, rtn
from nanoexport.calibration.data import calibration_windows, read_texts
from nanoexport.calibration.graph import find_linears
from nanoexport.capture.checkpoint import DEMO_MODEL, load_checkpoint
from nanoexport.capture.onnx_export import export_onnx
from nanoexport.config import ExportConfig, QuantConfig
from nanoexport.errors import NanoexportError
from nanoexport.passes import run_passes, select_passes
from nanoexport.passes.verify import GraphRunner


def correlated_inputs(rows: int, channels: int, seed: int = 0) -> np.ndarray:
    """Activations whose channels are correlated and of very different magnitudes, as in real layers."""
    generator = np.random.default_rng(seed)
    x = generator.standard_normal((rows, channels)).astype(np.float32)
    x[:, 1:] += 0.8 * x[:, :-1]
    return x * np.exp(generator.standard_normal(channels)).astype(np.float32)


@pytest.mark.parametrize("dtype,asymmetric", [("int4", False), ("int4", True), ("uint4", False), ("uint4", True),
                                              ("int8", False), ("nf4", False)])
def test_rtn_stays_in_range_and_close(dtype, asymmetric):
    weight = np.random.default_rng(1).standard_normal((128, 48)).astype(np.float32)
    fmt = WeightFormat(dtype, 32, asymmetric)
    quantized = rtn(weight, fmt, grid=1)  # the plain range: nothing is clipped
    low, high = fmt.levels
    assert quantized.values.min() >= low and quantized.values.max() <= high
    assert quantized.scales.shape == (4, 48)
    assert (quantized.zero_points is not None) == fmt.has_zero_point
    error = np.abs(quantized.dequantize() - weight)
    step = np.repeat(np.abs(quantized.scales.astype(np.float32)), 32, axis=0)
    if dtype == "nf4":
        step = step * np.diff(NF4_CODEBOOK).max()  # the widest gap between two levels
    # Half a step of rounding; symmetric integers map the largest magnitude to the most negative level, so the
    # opposite extreme can be clipped by one more level (up to a whole step).
    allowed = 0.5 if asymmetric or dtype == "nf4" else 1.0
    assert (error <= step * allowed * 1.001 + 1e-6).all()


def test_symmetric_int4_maps_the_largest_magnitude_to_minus_eight():
    weight = np.zeros((32, 2), np.float32)
    weight[5, 0], weight[7, 1] = 0.8, -0.4  # one positive and one negative extreme
    quantized = rtn(weight, WeightFormat("int4", 32), grid=1)
    assert quantized.values[5, 0] == -8 and quantized.values[7, 1] == -8
    assert np.allclose(quantized.dequantize(), weight, atol=1e-3)


def test_scale_search_is_no_worse_than_the_plain_range():
    weight = np.random.default_rng(2).standard_normal((256, 64)).astype(np.float32)
    fmt = WeightFormat("int4", 32)
    plain = ((rtn(weight, fmt, grid=1).dequantize() - weight) ** 2).sum()
    searched = ((rtn(weight, fmt).dequantize() - weight) ** 2).sum()
    assert searched <= plain


def output_error(x: np.ndarray, weight: np.ndarray, dequantized: np.ndarray) -> float:
    return float(((x @ dequantized - x @ weight) ** 2).mean())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(act_order):
    x = correlated_inputs(4096, 128)
    weight = np.random.default_rng(3).standard_normal((128, 32)).astype(np.float32) * 0.05
    fmt = WeightFormat("int4", 32)
    hessian = 2 * x.T.astype(np.float64) @ x / len(x)
    ours = output_error(x, weight, gptq(weight, hessian, fmt, act_order=act_order).dequantize())
    assert ours < output_error(x, weight, rtn(weight, fmt, grid=1).dequantize())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt", [WeightFormat("int4", 32), WeightFormat("uint4", 64, asymmetric=True)],
                         ids=["int4-sym", "uint4-asym"])
def test_gptq_in_column_pieces_is_gptq_on_the_whole_matrix(act_order, fmt, monkeypatch):
    x = correlated_inputs(1024, 128)
    x[:, 3] = 0  # a dead input row, which GPTQ zeroes in every piece
    weight = np.random.default_rng(4).standard_normal((128, 300)).astype(np.float32) * 0.05
    hessian = 2 * x.T.astype(np.float64) @ x / len(x)
    whole = gptq(weight, hessian, fmt, act_order=act_order)
    monkeypatch.setattr(algorithms, "GPTQ_PIECE_BYTES", 8 * 128 * 64)  # five pieces, the last of 44 columns
    pieces = gptq(weight, hessian, fmt, act_order=act_order)
    np.testing.assert_array_equal(pieces.values, whole.values)
    np.testing.assert_array_equal(pieces.scales, whole.scales)
    if fmt.has_zero_point:
        np.testing.assert_array_equal(pieces.zero_points, whole.zero_points)


def test_block_hessians_are_the_diagonal_blocks_a_last_partial_one_padded():
    hessian = np.random.default_rng(9).standard_normal((70, 70))
    blocks = block_hessians(hessian, 32)
    assert blocks.shape == (3, 32, 32)
    assert np.allclose(blocks[1], hessian[32:64, 32:64])
    assert np.allclose(blocks[2, :6, :6], hessian[64:, 64:]) and not blocks[2, 6:].any() and not blocks[2, :, 6:].any()


@pytest.mark.parametrize("dtype,asymmetric", [("int4", False), ("uint4", True), ("int8", False)])
def test_data_aware_scales_lower_the_output_error(dtype, asymmetric):
    """Clip search and scale estimation against the block Hessians beat the weight-error search on the
    output, and the Hessian form of the error is the mean squared output difference."""
    x = correlated_inputs(4096, 128, seed=7)
    weight = np.random.default_rng(8).standard_normal((128, 32)).astype(np.float32) * 0.05
    hessian = x.T.astype(np.float64) @ x / len(x)
    fmt = WeightFormat(dtype, 32, asymmetric)
    by_weights, by_output = rtn(weight, fmt), rtn(weight, fmt, hessian=hessian)
    assert output_error(x, weight, by_output.dequantize()) < output_error(x, weight, by_weights.dequantize())
    expected = output_error(x, weight, by_output.dequantize()) * weight.shape[1]
    assert hessian_error(weight, by_output.dequantize(), hessian) == pytest.approx(expected, rel=1e-3)


def test_awq_protects_salient_channels():
    x = correlated_inputs(2048, 128, seed=4)
    weight = np.random.default_rng(5).standard_normal((128, 32)).astype(np.float32) * 0.05
    x[:, 3] *= 30  # one salient channel, far louder than the rest
    hessian = x.T.astype(np.float64) @ x / len(x)
    fmt = WeightFormat("int4", 32)
    quantized, scale = awq(weight, np.abs(x).mean(0), hessian, fmt)
    assert scale is not None, "scaling the salient channel must win here"
    assert output_error(x / scale, weight * scale[:, None], quantized.dequantize()) \
        < output_error(x, weight, rtn(weight, fmt, hessian=hessian).dequantize())


@pytest.mark.parametrize("seed", range(6))
def test_data_aware_algorithms_never_lose_to_rtn_on_calibration_data(seed):
    """AWQ's and GPTQ's objective on their calibration data is never above our RTN's, whatever the layer."""
    generator = np.random.default_rng(seed)
    x = correlated_inputs(1024, 64, seed=seed)
    if seed % 2:
        x = generator.standard_normal(x.shape).astype(np.float32)  # uncorrelated, similar magnitudes
    weight = generator.standard_normal((64, 24)).astype(np.float32) * generator.uniform(0.01, 0.2)
    hessian = x.T.astype(np.float64) @ x / len(x)
    fmt = WeightFormat("int4", 32)
    baseline = output_error(x, weight, rtn(weight, fmt).dequantize())
    quantized, scale = awq(weight, np.abs(x).mean(0), hessian, fmt)
    scaled = np.ones(64, np.float32) if scale is None else scale
    assert output_error(x / scaled, weight * scaled[:, None], quantized.dequantize()) <= baseline * (1 + 1e-6)
    assert output_error(x, weight, gptq(weight, 2 * hessian, fmt).dequantize()) <= baseline * (1 + 1e-6)


@pytest.fixture(scope="module")
def demo_graph():
    checkpoint = load_checkpoint(DEMO_MODEL)
    graph = export_onnx(checkpoint)
    run_passes(graph, select_passes())
    return checkpoint, graph


def reload(model: ir.Model, folder) -> ir.Model:
    ir.save(model, folder / "model.onnx", external_data="model.onnx.data")
    return ir.load(folder / "model.onnx")


@pytest.mark.parametrize("weights", ["int4", "uint4", "nf4", "fp16"])
def test_quantized_graph_computes_with_exactly_the_stored_integers(demo_graph, tmp_path, weights):
    checkpoint, graph = demo_graph
    model = reload(graph, tmp_path)
    plans = {plan.linear.name: plan for plan in plan_layers(model, QuantConfig(weights=weights))}
    expected = {name: rtn(plan.linear.matrix(), plan.format(QuantConfig(weights=weights))).dequantize()
                for name, plan in plans.items() if plan.weight_type not in ("float", "fp16")}
    # The kept head is stored in fp16.
    summary = quantize(model, QuantConfig(weights=weights), checkpoint.tokenizer_files, DEMO_MODEL)
    assert summary["layers"]["lm_head"] == "fp16"
    assert not find_linears(model)[:-1], "every decoder linear is quantized; only lm_head stays float"
    if weights != "fp16":
        dequantize = [node for node in model.graph if node.op_type == "DequantizeLinear"]
        assert len(dequantize) == (0 if weights == "nf4" else 16)
        # The same graph with our own dequantized weights as float initializers gives the same logits.
        (tmp_path / "float").mkdir()
        floats = reload(graph, tmp_path / "float")
        for linear in find_linears(floats):
            if linear.name in expected:
                linear.initializer.const_value = ir.Tensor(expected[linear.name])
            elif linear.name == "lm_head":  # kept, in fp16
                stored = linear.initializer.const_value.numpy()
                linear.initializer.const_value = ir.Tensor(stored.astype(np.float16).astype(np.float32))
        runner = GraphRunner(floats)
        assert np.abs(runner.logits(model) - runner.logits(floats)).max() < 1e-4


def test_block_size_must_divide_the_input_dimension_unless_padded(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=128, hidden_size=64, intermediate_size=80,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    settings = ExportConfig()
    # int8: the padded last block is what is tested; int4's error on a random model would blur the check.
    settings.quant.weights = "int8"
    with pytest.raises(NanoexportError, match="block size 32 does not divide the input dimension 80 of "
                                              "model.layers.0.mlp.down_proj.*--pad-blocks"):
        nanoexport.export(model, out=tmp_path / "refused", config=settings, progress=False)
    assert not (tmp_path / "refused").exists()
    settings.quant.pad_blocks = True
    artifact = nanoexport.export(model, out=tmp_path / "padded", config=settings, progress=False)
    report = nanoexport.validate(artifact, reference=model, write=False)
    assert report.passed, report.checks


@pytest.mark.parametrize("settings,message", [
    ({"weights": "int3"}, "quant weights 'int3' is not one of"),
    ({"weights": "int4", "block_size": 48}, "power of two from 16 to 256"),
    ({"weights": "int4", "algo": "gptq", "calib": "/nonexistent/calib.txt"}, "does not exist"),
    ({"weights": "int4", "size_budget": "1MB"}, "below the smallest reachable size"),
    ({"weights": "int4", "size_budget": "lots"}, "is not a size"),
    ({"weights": "int4", "overrides": {"lm_head": "int2"}}, "quant override lm_head"),
])
def test_bad_quantization_settings_are_refused(tmp_path, settings, message):
    config = ExportConfig()
    for key, value in settings.items():
        setattr(config.quant, key, value)
    with pytest.raises(NanoexportError, match=message):
        nanoexport.export(out=tmp_path / "out", config=config, progress=False)
    assert not (tmp_path / "out").exists()


def test_calibration_data_without_an_algorithm_means_the_data_aware_default(demo_graph, tmp_path):
    """--calib alone picks the data-aware default, which the manifest's summary names; no data: RTN."""
    assert QuantConfig(weights="int4").algorithm == "rtn"
    assert QuantConfig(weights="int4", calib="x.txt", algo="gptq").algorithm == "gptq"
    checkpoint, graph = demo_graph
    config = QuantConfig(weights="int4", calib=str(DEMO_MODEL / "calibration.txt"), calib_samples=4)
    model = reload(graph, tmp_path)
    summary = quantize(model, config, checkpoint.tokenizer_files, DEMO_MODEL)
    assert summary["algorithm"] == "gptq"
    (tmp_path / "plain").mkdir()
    plain = reload(graph, tmp_path / "plain")
    quantize(plain, QuantConfig(weights="int4"), checkpoint.tokenizer_files, DEMO_MODEL)
    stored = [{value.name: value.const_value.numpy() for value in graph_.graph.initializers.values()
               if value.name.endswith(".scale")} for graph_ in (model, plain)]
    assert stored[0].keys() == stored[1].keys() and stored[0]
    assert any(not np.array_equal(stored[0][name], stored[1][name]) for name in stored[0]), \
        "the data-aware default must move some block scale away from RTN's"
    with pytest.raises(NanoexportError, match="quant algo 'sgd' is not one of rtn, se, gptq, awq"):
        check_config(QuantConfig(weights="int4", algo="sgd"))


def test_data_aware_algorithms_need_calibration_data(tmp_path):
    folder = tmp_path / "demo-without-calibration"
    folder.mkdir()
    for file in DEMO_MODEL.iterdir():
        if file.name != "calibration.txt":
            (folder / file.name).write_bytes(file.read_bytes())
    config = ExportConfig()
    config.quant.weights, config.quant.algo = "int4", "awq"
    with pytest.raises(NanoexportError, match="needs calibration data and none was given; pass --calib"):
        nanoexport.export(folder, out=tmp_path / "out", config=config, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    config.quant.calib = str(empty)
    with pytest.raises(NanoexportError, match="holds no text"):
        nanoexport.export(folder, out=tmp_path / "out", config=config, progress=False)


def test_calibration_data_formats_and_seeded_windows(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    text = (DEMO_MODEL / "calibration.txt").read_text()[:20000]
    (tmp_path / "plain.txt").write_text(text)
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": part}) for part in text.split("\n\n")))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text(text[:10000])
    (tmp_path / "folder" / "b.txt").write_text(text[10000:])
    for source in ("plain.txt", "data.jsonl", "folder"):
        assert "".join(read_texts(tmp_path / source)).replace("\n", "") == text.replace("\n", "")
    first = calibration_windows(tmp_path / "plain.txt", tokenizer, 8, 64, seed=0)
    assert first.shape == (8, 64)
    assert np.array_equal(first, calibration_windows(tmp_path / "plain.txt", tokenizer, 8, 64, seed=0))
    assert not np.array_equal(first, calibration_windows(tmp_path / "plain.txt", tokenizer, 8, 64, seed=1))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(NanoexportError, match="line 1 has no text field"):
        read_texts(tmp_path / "bad.jsonl")


def test_saved_datasets_dataset_is_calibration_data(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["first text", "second text"]}).save_to_disk(str(tmp_path / "saved"))
    assert read_texts(tmp_path / "saved") == ["first text", "second text"]


def test_size_budget_mixes_precisions_to_fit(tmp_path):
    config = ExportConfig()
    config.quant.weights, config.quant.size_budget = "int4", "4.2MB"
    artifact = nanoexport.export(out=tmp_path / "budget", config=config, progress=False)
    layers = artifact.manifest["quantization"]["layers"]
    chosen = {kind for name, kind in layers.items() if name != "lm_head"}
    assert chosen == {"int4", "int8"}
    assert artifact.manifest["quantization"]["weights_bytes"] <= parse_size("4.2MB", "--size-budget")


def test_cli_gptq_export_validates_with_perplexity(tmp_path):
    out = tmp_path / "gptq"
    result = subprocess.run(
        [sys.executable, "-m", "nanoexport.cli", "--quant", "int4", "--algo", "gptq", "--out", str(out)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["quant"]["algo"] == "gptq"
    assert manifest["quantization"]["bits_per_weight"] == pytest.approx(4.5)
    report = json.loads((out / "report.json").read_text())
    names = {check["name"] for check in report["checks"]}
    assert "perplexity increase" in names and "logits max-abs error" not in names
    assert report["measured"]["perplexity"] > report["measured"]["reference perplexity"] * 0.99

    evaluation = tmp_path / "eval.txt"
    evaluation.write_text((DEMO_MODEL / "calibration.txt").read_text()[:30000])
    result = subprocess.run(
        [sys.executable, "-m", "nanoexport.cli", "validate", str(out), "--eval", str(evaluation),
         "--eval-windows", "2"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    check = next(c for c in json.loads((out / "report.json").read_text())["checks"]
                 if c["name"] == "perplexity increase")
    assert "2 windows" in check["detail"] and "eval.txt" in check["detail"]


def test_activation_qdq_spares_excluded_ops_and_validates(tmp_path):
    config = ExportConfig()
    config.quant.weights, config.quant.activations, config.quant.observer = "int8", "a16", "mse"
    artifact = nanoexport.export(out=tmp_path / "w8a16", config=config, progress=False)
    model = ir.load(artifact.file("model.onnx"))
    pairs = [node for node in model.graph if node.op_type == "QuantizeLinear"]
    assert len(pairs) == artifact.manifest["quantization"]["activations"]["tensors"] > 0
    assert {node.outputs[0].dtype for node in pairs} == {ir.DataType.UINT16}
    # Weights keep their own quantization, and positions cast to float keep their exact values.
    assert not [node for node in pairs if node.inputs[0].producer() is not None
                and node.inputs[0].producer().op_type in ("DequantizeLinear", "Cast")]
    for node in pairs:
        for consumer, _ in node.outputs[0].uses():
            for user, _ in consumer.outputs[0].uses():
                assert user.op_type not in config.quant.activation_exclude
    report = nanoexport.validate(artifact, write=False)
    assert report.passed, report.checks


def test_observers_narrow_heavy_tailed_ranges():
    from nanoexport.calibration.qdq import _mse_range

    sample = np.random.default_rng(6).standard_t(2, 50000).astype(np.float32)
    low, high = float(sample.min()), float(sample.max())
    mse_low, mse_high = _mse_range(sample, low, high)
    assert low < mse_low < 0 < mse_high < high


def _calibration(count: int = 3, length: int = 24) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 200, (count, length))


def test_layerwise_capture_sees_what_the_whole_graph_sees(demo_graph):
    """Left unquantized between layers, the segment-by-segment capture records the same inputs as one session
    on the whole graph: the cuts, the prelude values and the residual stream carried between sessions are
    right."""
    from nanoexport.calibration.activations import capture_groups
    from nanoexport.calibration.layerwise import capture_layers, segments

    _, graph = demo_graph
    linears = find_linears(graph)
    windows = _calibration()
    parts = segments(graph, linears)
    assert len(parts) == 5 and all(part.linears for part in parts)  # the demo's 4 layers, then its (tied) head
    assert parts[-1].end is None and [linear.transposed for linear in parts[-1].linears] == [True]
    whole = {name: stats for _, group in capture_groups(graph, linears, windows) for name, stats in group.items()}
    layered = {}
    for group, statistics in capture_layers(graph, linears, windows):
        assert {linear.input.name for linear in group} == set(statistics)
        layered.update(statistics)
    assert set(layered) == set(whole)
    for name, stats in whole.items():
        np.testing.assert_allclose(layered[name].hessian, stats.hessian, rtol=1e-4,
                                   atol=1e-4 * np.abs(stats.hessian).max())
        assert layered[name].tokens == stats.tokens


def test_layers_whose_two_norms_share_one_weight_are_still_cut_at_their_input_norm(demo_graph, tmp_path):
    """A random-weight checkpoint's norms are all ones, and merge_duplicate_initializers lets a layer's
    post-attention norm read its input_layernorm weight: the layer still starts at its first norm, so every
    linear lies in a segment and GPTQ calibrates layer by layer (the Qwen2.5-0.5B config fell back to
    calibrating the whole graph at once, 6 GB)."""
    from nanoexport.calibration.layerwise import residual_cuts, segments

    _, float_graph = demo_graph
    graph = reload(float_graph, tmp_path)
    expected = residual_cuts(graph)
    norms = [node for node in graph.graph if node.op_type == "RMSNormalization"]
    shared = 0
    for node in norms:
        name = node.inputs[1].name
        if "post_attention_layernorm" in name:
            first = next(other for other in norms if other.inputs[1].name == name.replace(
                "post_attention_layernorm", "input_layernorm"))
            node.replace_input_with(1, first.inputs[1])
            shared += 1
    assert shared == 4
    assert residual_cuts(graph) == expected
    assert len(segments(graph, find_linears(graph))) == 5


def test_layerwise_capture_feeds_each_layer_the_quantized_layers_before_it(demo_graph, tmp_path):
    """After the caller quantizes a layer, the next layer's inputs are computed through the quantized one, as
    GPTQ orders it: layer 1's statistics then match a whole-graph capture with layer 0 quantized."""
    from nanoexport.calibration.activations import capture_groups
    from nanoexport.calibration.graph import replace_weight
    from nanoexport.calibration.layerwise import capture_layers

    _, float_graph = demo_graph
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    graph, reference = reload(float_graph, tmp_path / "a"), reload(float_graph, tmp_path / "b")
    windows = _calibration()
    fmt = WeightFormat("int4", 32)
    layer_one = None
    for index, (group, statistics) in enumerate(capture_layers(graph, find_linears(graph), windows)):
        if index == 1:
            layer_one = statistics
            break
        for linear in group:
            replace_weight(graph, linear, rtn(linear.matrix(), fmt))
    for linear in find_linears(reference):
        if ".layers.0." in linear.name:
            replace_weight(reference, linear, rtn(linear.matrix(), fmt))
    whole = {name: stats for _, group in capture_groups(reference, find_linears(reference), windows)
             for name, stats in group.items()}
    plain = {name: stats for _, group in capture_groups(float_graph, find_linears(float_graph), windows)
             for name, stats in group.items()}
    for name, stats in layer_one.items():
        scale = np.abs(whole[name].hessian).max()
        np.testing.assert_allclose(stats.hessian, whole[name].hessian, rtol=1e-4, atol=1e-4 * scale)
        assert np.abs(stats.hessian - plain[name].hessian).max() > 1e-3 * scale  # quantizing layer 0 did change them
