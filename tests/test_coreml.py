"""The coreml target: the CLI on the demo model, the saved package, refusals, block-quantized weights."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from filelock import FileLock

ct = pytest.importorskip("coremltools")

from coremltools.converters.mil.frontend.milproto.load import load as load_milproto  # noqa: E402

from nanoexport.errors import NanoexportError  # noqa: E402
from nanoexport.targets.coreml.package import PACKAGE, write_package  # noqa: E402
from nanoexport.targets.coreml.interpreter import MODEL_FILE, WEIGHTS_FOLDER, Interpreter  # noqa: E402
from nanoexport.targets.coreml.lowering import lower_graph  # noqa: E402

# A small cache and chunk and short generation and perplexity runs: validation runs our numpy interpreter.
# No thresholds: the target's fp16 ones apply.
CONFIG = """\
max_context = 128
prefill_chunk = 16

[validate]
greedy_tokens = 8
eval_window = 32
eval_windows = 2
"""


def nanoexport_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanoexport.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """``nanoexport --target coreml`` on the demo model, once for all test workers."""
    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent  # this session's folder, the same for every worker
    folder = shared / "coreml-cli"
    with FileLock(str(shared / "coreml-cli.lock")):
        if not (folder / "demo-coreml" / "manifest.json").is_file():
            folder.mkdir(exist_ok=True)
            (folder / "nanoexport.toml").write_text(CONFIG)
            result = nanoexport_cli("--target", "coreml", "--out", "demo-coreml", "--no-validate", cwd=folder)
            assert result.returncode == 0, result.stderr
            assert "Neural Engine" in result.stderr  # the report's summary is shown, not only written
    return folder / "demo-coreml"


def test_validate_passes_with_fp16_thresholds(exported):
    result = nanoexport_cli("validate", str(exported), cwd=exported.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = {check["name"]: check for check in json.loads((exported / "report.json").read_text())["checks"]}
    assert checks["logits min cosine"]["threshold"] == 0.999
    assert checks["logits min cosine"]["value"] > 0.9999  # fp16 compute, fp32 reference
    assert checks["top-1 agreement"]["value"] >= 0.95
    assert checks["KV consistency max-abs"]["value"] < 0.05  # prefill chunks then decode steps, both fp16
    assert {"greedy agreement", "perplexity increase"} <= set(checks)
    notes = json.loads((exported / "report.json").read_text())["notes"]
    assert any(note.startswith("Neural Engine risk, run-time cache write") for note in notes)
    assert "Neural Engine risk" in result.stdout


def test_package_loads_with_both_functions_and_the_cache_states(exported, tmp_path):
    # Opening a package, coremltools rewrites its Manifest.json: load a copy, not the artifact validated beside.
    package = shutil.copytree(exported / PACKAGE, tmp_path / PACKAGE)
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    functions = {function.name: function for function in spec.description.functions}
    assert set(functions) == {"prefill", "decode"} and spec.description.defaultFunctionName == "decode"
    for name, tokens in (("prefill", 16), ("decode", 1)):
        function = functions[name]
        inputs = {value.name: list(value.type.multiArrayType.shape) for value in function.input}
        assert inputs == {"input_ids": [1, tokens], "position_ids": [1, tokens], "attention_mask": [1, 128],
                          "cache_position": [1]}
        states = {value.name: list(value.type.stateType.arrayType.shape) for value in function.state}
        assert states == {f"{kind}_cache_{layer}": [1, 2, 128, 32] for layer in range(4) for kind in ("key", "value")}
        assert [value.name for value in function.output] == ["logits"]
    parameters = json.loads((exported / "manifest.json").read_text())["source"]["parameters"]
    weights = exported / PACKAGE / WEIGHTS_FOLDER / "weight.bin"
    assert weights.stat().st_size < 1.01 * 2 * parameters  # fp16, stored once for both functions
    report = json.loads((exported / "neural_engine.json").read_text())
    assert "run-time cache write" in {finding["rule"] for finding in report}


def linear_model(weight_nodes) -> ir.Model:
    """``logits = x [1, 4, 64] @ w``, where ``weight_nodes(graph)`` adds the nodes computing ``w``."""
    x = ir.Value(name="x", shape=ir.Shape([1, 4, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 23}, name="linear")
    matmul = ir.node("MatMul", [x, weight_nodes(graph)])
    graph.append(matmul)
    logits = matmul.outputs[0]
    logits.name, logits.shape, logits.type = "logits", ir.Shape([1, 4, 32]), x.type
    graph.outputs.append(logits)
    return ir.Model(graph, ir_version=10)


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def test_an_op_without_a_lowering_is_refused_by_name():
    x = ir.Value(name="x", shape=ir.Shape([1, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    hardmax = ir.node("Hardmax", [x])
    hardmax.outputs[0].name = "logits"
    graph = ir.Graph([x], hardmax.outputs, nodes=[hardmax], opset_imports={"": 23})
    with pytest.raises(NanoexportError, match="no lowering for ONNX op Hardmax"):
        lower_graph(ir.Model(graph, ir_version=10))


def rtn_blocks(weight: np.ndarray, block: int, bits: int, asymmetric: bool):
    """Round-to-nearest block-wise quantization along the input axis: (integers, fp16 scales, zero points)."""
    rows, columns = weight.shape
    blocks = weight.reshape(rows // block, block, columns)
    if asymmetric:
        low, high = blocks.min(axis=1), blocks.max(axis=1)
        scale = ((high - low) / (2**bits - 1)).astype(np.float16)
        zero = np.round(-low / scale.astype(np.float32)).astype(np.int64)
    else:
        scale = (np.abs(blocks).max(axis=1) / (2 ** (bits - 1) - 1)).astype(np.float16)
        zero = np.zeros_like(scale, np.int64)
    levels = np.round(blocks / scale[:, None].astype(np.float32)) + zero[:, None]
    low, high = (0, 2**bits - 1) if asymmetric else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return np.clip(levels, low, high).astype(np.int64).reshape(rows, columns), scale, zero


@pytest.mark.parametrize("storage, asymmetric", [(ml_dtypes.int4, False), (ml_dtypes.uint4, True)])
def test_block_quantized_matmul_keeps_its_integers(storage, asymmetric, tmp_path):
    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    q, scale, zero = rtn_blocks(weight, block=32, bits=4, asymmetric=asymmetric)

    def dequantized_weight(graph):
        inputs = [initializer(graph, "w.quant", q.astype(storage)), initializer(graph, "w.scale", scale)]
        if asymmetric:
            inputs.append(initializer(graph, "w.zero_point", zero.astype(storage)))
        dequantize = ir.node("DequantizeLinear", inputs, attributes={"axis": 0, "block_size": 32})
        cast = ir.node("Cast", [dequantize.outputs[0]], attributes={"to": ir.DataType.FLOAT})
        graph.extend([dequantize, cast])
        return cast.outputs[0]

    packages = [tmp_path / "first.mlpackage", tmp_path / "second.mlpackage"]
    for package in packages:
        write_package([("main", lower_graph(linear_model(dequantized_weight)))], package)

    # Read back by coremltools' own reader: the same integers and scales, laid out [out, in] for linear.
    spec = ct.utils.load_spec(str(packages[0]))
    program = load_milproto(spec, spec.specificationVersion, str(packages[0] / WEIGHTS_FOLDER))
    (op,) = program.functions["main"].find_ops(op_type="constexpr_blockwise_shift_scale")
    np.testing.assert_array_equal(op.data.val.astype(np.int64), q.T)
    np.testing.assert_array_equal(op.scale.val, scale.T)
    if asymmetric:
        np.testing.assert_array_equal(op.offset.val.astype(np.int64), zero.T)
    else:
        assert op.offset is None

    x = np.random.default_rng(1).standard_normal((1, 4, 64)).astype(np.float16)
    expected = x.astype(np.float64) @ ((q - np.repeat(zero, 32, axis=0)) * np.repeat(scale, 32, axis=0))
    logits = Interpreter(packages[0]).run("main", {"x": x})["logits"]
    np.testing.assert_allclose(logits, expected, atol=2e-3 * np.abs(expected).max())  # fp16 output rounding

    # Lowered twice, written twice: the same bytes.
    for relative in (MODEL_FILE, WEIGHTS_FOLDER / "weight.bin", Path("Manifest.json")):
        assert (packages[0] / relative).read_bytes() == (packages[1] / relative).read_bytes()


def test_nf4_weight_is_a_lookup_table_scaled_per_block(tmp_path):
    """Quantization's nf4 expansion -> the same 4-bit indices through the 16 levels, then the block scales."""
    from nanoexport.calibration.blocks import NF4_CODEBOOK, WeightFormat, rtn
    from nanoexport.calibration.graph import find_linears, replace_weight

    weight = np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32)
    def float_weight(graph):
        value = initializer(graph, "w", weight)
        value.shape, value.type = ir.Shape(weight.shape), ir.TensorType(ir.DataType.FLOAT)
        return value

    model = linear_model(float_weight)
    (linear,) = find_linears(model)
    quantized = rtn(linear.matrix(), WeightFormat("nf4", block_size=32))
    replace_weight(model, linear, quantized)
    package = tmp_path / "nf4.mlpackage"
    write_package([("main", lower_graph(model))], package)

    spec = ct.utils.load_spec(str(package))
    program = load_milproto(spec, spec.specificationVersion, str(package / WEIGHTS_FOLDER))
    (lookup,) = program.functions["main"].find_ops(op_type="constexpr_lut_to_dense")
    (scaling,) = program.functions["main"].find_ops(op_type="constexpr_blockwise_shift_scale")
    np.testing.assert_array_equal(lookup.indices.val.astype(np.int64), quantized.values.T)
    np.testing.assert_array_equal(lookup.lut.val.reshape(-1), NF4_CODEBOOK.astype(np.float16))
    assert scaling.data is lookup.outputs[0]
    np.testing.assert_array_equal(scaling.scale.val, quantized.scales.T.astype(np.float16))

    x = np.random.default_rng(1).standard_normal((1, 4, 64)).astype(np.float16)
    expected = x.astype(np.float64) @ quantized.dequantize()
    logits = Interpreter(package).run("main", {"x": x})["logits"]
    np.testing.assert_allclose(logits, expected, atol=2e-3 * np.abs(expected).max())  # fp16 rounding


def test_nf4_demo_with_quantized_tied_head_validates(tmp_path):
    """nf4 everywhere, the tied embedding too: looked up and used as the head from one compressed table."""
    import nanoexport

    config = nanoexport.ExportConfig()
    config.quant.weights, config.quant.keep_float = "nf4", []
    artifact = nanoexport.export(target="coreml", out=tmp_path / "nf4", config=config, progress=False)
    spec = ct.utils.load_spec(str(artifact.path / PACKAGE))
    program = load_milproto(spec, spec.specificationVersion, str(artifact.path / PACKAGE / WEIGHTS_FOLDER))
    tables = program.functions["decode"].find_ops(op_type="constexpr_lut_to_dense")
    assert len(tables) == 17  # 4 layers x (qkv, o, gate+up, down) + the tied embedding, shared by both uses
    report = nanoexport.validate(artifact, write=False)
    assert report.passed, report.to_dict()


def test_gemma2_with_softcapped_windowed_attention_validates(tiny_checkpoint, tmp_path):
    # Softcapped attention (no fused op), a sliding-window mask and GELU: the demo model has none of them.
    import nanoexport

    config = nanoexport.ExportConfig(target="coreml", max_context=64, prefill_chunk=8)
    config.validate.greedy_tokens = 8
    artifact = nanoexport.export(tiny_checkpoint("gemma2"), out=tmp_path / "gemma2", config=config, progress=False)
    report = nanoexport.validate(artifact, write=False)
    assert report.passed, [check for check in report.checks if not check.passed]


def test_ci_recipe_int4_block32_exports_and_validates(tmp_path):
    recipe = Path(__file__).parent.parent / "examples" / "coreml-ci" / "nanoexport.toml"
    result = nanoexport_cli("--config", str(recipe), "--out", "int4", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((tmp_path / "int4" / "manifest.json").read_text())
    assert manifest["quantization"]["bits_per_weight"] == 4.5
    assert manifest["config"]["quant"]["block_size"] == 32
    result = nanoexport_cli("validate", "int4", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
