"""Quantization anchors: peer int4 weight quantizers on one model, the yardsticks for our RTN/GPTQ/AWQ.

Every anchor quantizes the same layers the same way: the decoder MatMuls (qkv, o, gate+up and down of each
layer; the embedding and the tied lm_head stay float), int4 symmetric, blocks of 32 along the input
dimension. Each starts from the fp32 ONNX graph of our onnx target (dynamic cache) and is scored by
perplexity on ONNX Runtime CPU over the same held-out windows, so only the weights differ. The model is a
checkpoint folder holding ``heldout.txt`` (evaluation) and ``calibration.txt`` (the demo, or one of
quality_set.py's models):

- ort_matmul_nbits: ONNX Runtime's MatMulNBitsQuantizer (round to nearest); MatMulNBits in the graph.
- nncf_data_free, nncf_awq_scale_estimation: NNCF compress_weights on the ONNX graph (for AWQ, the one
  exported without merged projections: see nncf_awq_scale_estimation).
- nncf_gptq: NNCF compress_weights with GPTQ, which NNCF 3.4 implements for OpenVINO models only: our
  canonical graph goes through OpenVINO and the dequantized weights come back into the fp32 ONNX graph
  (OpenVINO CPU's own perplexity is kept beside it as a cross-check).
- gguf_q4_0: llama.cpp's Q4_0 by the gguf package's numpy quantizer, dequantized into the fp32 graph.

Bits per weight count everything stored per quantized weight: the int4 values, the scales (in the dtype each
tool stores them) and zero points if any. Seconds are the quantization call alone.

Run them with ``python benchmarks/quant_bench.py``, which puts our quantizers beside them.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nanoexport.validate.perplexity import perplexity, text_windows

log = logging.getLogger("quant_anchors")

BLOCK = 32
WINDOW = 256
CALIBRATION_WINDOWS = 128  # NNCF's default subset size; calibration.txt holds 135 windows of 256 tokens
STORED_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT8: 8, TensorProto.UINT8: 8,
               TensorProto.FLOAT16: 16, TensorProto.FLOAT: 32}
# f32 math and no dynamic int8 quantization of activations (the CPU plugin's default beside int4 weights),
# so OpenVINO's figures differ from the reference by the weights only.
OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
PACKAGES = ("nanoexport", "onnxruntime", "nncf", "openvino", "gguf", "onnx", "numpy", "torch")


# --- running the graph --------------------------------------------------------------------------------------

def past_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """(kv_heads, head_dim) of each past_key_values.* input, from the graph's input shapes."""
    shapes = {}
    for value in model.graph.input:
        if value.name.startswith("past_key_values."):
            dims = value.type.tensor_type.shape.dim
            shapes[value.name] = (dims[1].dim_value, dims[3].dim_value)
    return shapes


def forward_inputs(tokens: list[int], past: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """The inputs of one forward over ``tokens`` from an empty cache."""
    length = len(tokens)
    inputs = {
        "input_ids": np.array([tokens], dtype=np.int64),
        "attention_mask": np.ones((1, length), dtype=np.int64),
        "position_ids": np.arange(length, dtype=np.int64)[None],
    }
    for name, (kv_heads, head_dim) in past.items():
        inputs[name] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
    return inputs


def ort_logits_fn(model_path: Path) -> Callable[[list[int]], np.ndarray]:
    """tokens -> logits ``[len, vocab]`` of the ONNX graph at ``model_path`` on ONNX Runtime CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    past = past_shapes(onnx.load(str(model_path), load_external_data=False))
    return lambda tokens: session.run(["logits"], forward_inputs(tokens, past))[0][0]


def openvino_logits_fn(model, past: dict[str, tuple[int, int]]) -> Callable[[list[int]], np.ndarray]:
    """tokens -> logits of an ``openvino.Model`` on OpenVINO CPU in f32."""
    import openvino as ov

    request = ov.Core().compile_model(model, "CPU", OPENVINO_F32).create_infer_request()
    return lambda tokens: request.infer(forward_inputs(tokens, past))["logits"][0]


@functools.cache
def heldout_windows(folder: Path) -> list[list[int]]:
    return text_windows(folder / "heldout.txt", folder, WINDOW, 0)


@functools.cache
def calibration_windows(folder: Path) -> list[list[int]]:
    return text_windows(folder / "calibration.txt", folder, WINDOW, CALIBRATION_WINDOWS)


def calibration_dataset(model: onnx.ModelProto, folder: Path):
    """The calibration windows as an NNCF dataset of graph inputs (ONNX Runtime and OpenVINO take the same)."""
    import nncf

    past = past_shapes(model)
    return nncf.Dataset(calibration_windows(folder), lambda tokens: forward_inputs(tokens, past))


# --- the graph's layers and what a quantized graph stores ----------------------------------------------------

def decoder_weights(model: onnx.ModelProto) -> dict[str, str]:
    """MatMul node -> weight initializer, for the MatMuls with a constant 2-D weight: the decoder linears.

    The tied lm_head multiplies by a Transpose of the embedding, not by an initializer, so it is not among them.
    """
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    return {
        node.name: node.input[1]
        for node in model.graph.node
        if node.op_type == "MatMul" and node.input[1] in initializers and len(initializers[node.input[1]].dims) == 2
    }


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes whose weights stay float: the embedding Gather and the lm_head (the MatMul giving the logits)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    embeddings = [node.name for node in model.graph.node if node.op_type == "Gather" and node.input[0] in initializers]
    return embeddings + [node.name for node in model.graph.node if "logits" in node.output]


def onnx_storage(model: onnx.ModelProto) -> tuple[int, int]:
    """(quantized weights, stored bits) of the MatMulNBits and weight DequantizeLinear nodes' initializers."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    weights = bits = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
            weights += attributes["K"] * attributes["N"]
            stored = node.input[1:]
        elif node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            weights += int(np.prod(initializers[node.input[0]].dims))
            stored = node.input
        else:
            continue
        for name in stored:
            if name in initializers:
                tensor = initializers[name]
                bits += int(np.prod(tensor.dims)) * STORED_BITS[tensor.data_type]
    return weights, bits


def artifact_names(weights: dict[str, np.ndarray], artifact: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Canonical-graph weights keyed as the onnx artifact stores them: the artifact splits a merged gate+up
    weight ``W`` into column parts ``W.part0``, ``W.part1`` (its own lowering), so those are cut apart."""
    stored = {tensor.name: tensor for tensor in artifact.graph.initializer if tensor.name in
              set(decoder_weights(artifact).values())}
    named = {}
    for name, weight in weights.items():
        prefix = f"{name}.part"
        parts = sorted((key for key in stored if key.startswith(prefix)), key=lambda key: int(key[len(prefix):]))
        if name in stored:
            named[name] = weight
        elif parts:
            widths = np.cumsum([stored[part].dims[1] for part in parts])[:-1]
            named.update(zip(parts, np.split(weight, widths, axis=1), strict=True))
        else:
            raise SystemExit(f"the canonical weight {name} is not in the onnx artifact, whole or in parts")
    if set(named) != set(stored):
        raise SystemExit(f"the onnx artifact's decoder weights {sorted(set(stored) - set(named))} have no "
                         "canonical counterpart")
    return named


def with_weights(fp32_model: Path, weights: dict[str, np.ndarray], out: Path) -> Path:
    """A copy of the fp32 graph with some initializers replaced by (dequantized) weights, as one file."""
    model = onnx.load(str(fp32_model))
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name].astype(np.float32), tensor.name))
    onnx.save(model, str(out))
    return out


def result(name: str, seconds: float, weights: int, bits: int, model_path: Path, folder: Path, **extra) -> dict:
    """One row: the quantization's figures and the perplexity of the graph at ``model_path`` on ONNX Runtime,
    on the held-out text of the checkpoint ``folder``."""
    log.info("%s: %.2f s, %d weights at %.3f bits; scoring", name, seconds, weights, bits / weights)
    windows = heldout_windows(folder)
    return {
        "name": name, "seconds": round(seconds, 3), "bits_per_weight": round(bits / weights, 4),
        "quantized_weights": weights, "perplexity": perplexity(ort_logits_fn(model_path), windows), **extra,
    }


def fp32_baseline(name: str, fp32_model: Path, folder: Path) -> dict:
    model = onnx.load(str(fp32_model))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    weights = sum(int(np.prod(initializers[name].dims)) for name in decoder_weights(model).values())
    return result(name, 0.0, weights, 32 * weights, fp32_model, folder)


# --- the anchors ----------------------------------------------------------------------------------------------

def ort_matmul_nbits(fp32_model: Path, work: Path, folder: Path) -> dict:
    """ONNX Runtime's MatMulNBitsQuantizer: default (round to nearest) algorithm, symmetric, block 32.

    Its scales take the weight's dtype, fp32 here. accuracy_level is left unset, so the CPU kernel dequantizes
    to fp32 rather than quantizing activations.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(fp32_model))
    started = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(
        model, algo_config=DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True),
        nodes_to_exclude=float_nodes(model),
    )
    quantizer.process()
    seconds = time.perf_counter() - started
    quantized = quantizer.model.model
    path = work / "ort_matmul_nbits.onnx"
    onnx.save(quantized, str(path))
    return result("onnxruntime MatMulNBits (RTN)", seconds, *onnx_storage(quantized), path, folder)


def nncf_int4_options(keep_float: list[str]) -> dict:
    """compress_weights options shared by the NNCF anchors: INT4_SYM, group 32, every decoder MatMul in int4.

    NNCF's defaults do not keep the embedding and lm_head float: they go to the backup precision (int8 asym),
    and with all_layers=False the *last weighted MatMul* stays out of int4, which in the OpenVINO graph is the
    last down projection (there the tied lm_head's weight is a Transpose, not a constant). So: no backup
    precision, all layers, and the float nodes named in the ignored scope; then ratio 1.0 gives the same 16
    layers on both backends.
    """
    import nncf

    return dict(
        mode=nncf.CompressWeightsMode.INT4_SYM, group_size=BLOCK, ratio=1.0, all_layers=True,
        backup_mode=nncf.BackupMode.NONE, ignored_scope=nncf.IgnoredScope(names=keep_float),
    )


def nncf_onnx(name: str, fp32_model: Path, out: Path, folder: Path, data_aware: dict) -> dict:
    """NNCF compress_weights on the ONNX graph; ``data_aware`` adds the calibration options."""
    import nncf

    model = onnx.load(str(fp32_model))
    options = nncf_int4_options(float_nodes(model))
    if data_aware:
        options |= dict(dataset=calibration_dataset(model, folder), subset_size=CALIBRATION_WINDOWS, **data_aware)
    started = time.perf_counter()
    compressed = nncf.compress_weights(model, **options)
    seconds = time.perf_counter() - started
    onnx.save(compressed, str(out))
    return result(name, seconds, *onnx_storage(compressed), out, folder)


def nncf_data_free(fp32_model: Path, work: Path, folder: Path) -> dict:
    """NNCF INT4_SYM, data-free (round to nearest with NNCF's scales); fp32 scales in the ONNX graph."""
    return nncf_onnx("nncf int4_sym data-free", fp32_model, work / "nncf_data_free.onnx", folder, {})


def nncf_awq_scale_estimation(fp32_model: Path, work: Path, folder: Path) -> dict:
    """NNCF INT4_SYM with AWQ and scale estimation.

    Give it the graph exported *without* merge_projections: NNCF's AWQ only looks for MatMul -> Mul -> MatMul
    (up -> gate product -> down) and activation -> Mul -> MatMul, and our merged gate+up puts a Split in
    the way, so on the merged graph AWQ finds nothing and this is scale estimation alone. The quantized
    weights are the same set (q, k, v and gate, up quantized apart are the merged matrices' columns).
    """
    options = {"awq": True, "scale_estimation": True}
    return nncf_onnx("nncf int4_sym AWQ + scale estimation", fp32_model, work / "nncf_awq_se.onnx", folder, options)


def openvino_graph(folder: Path, checkpoint: Path) -> tuple[object, dict[str, str]]:
    """Our canonical graph of the model at ``checkpoint``, read by OpenVINO and prepared for NNCF's GPTQ, and its
    decoder_weights.

    The canonical graph (our passes, no target lowering) has standard ONNX ops only; the onnx target's
    com.microsoft GroupQueryAttention (17 inputs) is beyond OpenVINO's ONNX frontend (7 to 16). It is written
    to ``folder`` and shares the onnx artifact's node and weight names. Query heads are made static and the
    decoder weights transposed (the openvino target's static_heads, and transpose_weights).
    """
    import onnx_ir as ir
    import openvino as ov

    from nanoexport.capture.checkpoint import load_checkpoint
    from nanoexport.capture.onnx_export import export_onnx
    from nanoexport.passes import run_passes, select_passes
    from nanoexport.targets.openvino.onnx_rules import static_heads

    canonical = export_onnx(load_checkpoint(checkpoint))
    run_passes(canonical, select_passes())
    static_heads(canonical)
    folder.mkdir()
    ir.save(canonical, folder / "model.onnx", external_data="model.onnx.data")
    model = onnx.load(str(folder / "model.onnx"))
    graph = ov.Core().read_model(model.SerializeToString(), b"")
    decoder = decoder_weights(model)
    transpose_weights(graph, decoder)
    return graph, decoder


def transpose_weights(graph, decoder: dict[str, str]) -> None:
    """Store the decoder MatMuls' weights [out, in] with transpose_b, in place.

    NNCF's GPTQ takes only that layout (PyTorch's) and refuses ours, [in, out], with "Transpose is not
    supported". Node names are kept, so the weights can be found again by the ONNX names.
    """
    import openvino.opset13 as ops

    for op in graph.get_ordered_ops():
        if op.get_type_name() == "MatMul" and op.get_friendly_name() in decoder:
            weight = op.input_value(1).get_node()
            transposed = ops.constant(np.ascontiguousarray(weight.get_data().T), name=weight.get_friendly_name())
            replacement = ops.matmul(op.input_value(0), transposed, transpose_a=False, transpose_b=True)
            replacement.set_friendly_name(op.get_friendly_name())
            op.output(0).replace(replacement.output(0))
    graph.validate_nodes_and_infer_types()


def openvino_float_nodes(model) -> list[str]:
    """The OpenVINO graph's embedding Gather (on a constant table) and lm_head (the MatMul giving the logits)."""
    embeddings = [
        op.get_friendly_name() for op in model.get_ordered_ops()
        if op.get_type_name() == "Gather" and op.input_value(0).get_node().get_type_name() == "Constant"
    ]
    return embeddings + [model.output("logits").get_node().input_value(0).get_node().get_friendly_name()]


def openvino_constants(output) -> list:
    """The Constant nodes the value ``output`` is computed from."""
    constants, pending, seen = [], [output.get_node()], set()
    while pending:
        node = pending.pop()
        if node.get_friendly_name() in seen:
            continue
        seen.add(node.get_friendly_name())
        if node.get_type_name() == "Constant":
            constants.append(node)
        pending.extend(value.get_node() for value in node.input_values())
    return constants


def openvino_weights(model, decoder: dict[str, str]) -> tuple[dict[str, np.ndarray], int, int]:
    """The decoder MatMuls' weights as OpenVINO computes them from NNCF's int4 constants and scales, keyed by
    ONNX initializer (OpenVINO keeps the ONNX node names), with the quantized weight count and stored bits."""
    import openvino as ov

    matmuls = {op.get_friendly_name(): op for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"}
    outputs = [matmuls[node].input_value(1) for node in decoder]
    weights = bits = 0
    for output in outputs:
        for constant in openvino_constants(output):
            if constant.get_element_type() == ov.Type.i64:  # a Reshape's target shape, not stored weights
                continue
            count = int(np.prod(constant.get_output_shape(0)))
            bits += count * constant.get_element_type().bitwidth
            weights += count if constant.get_element_type().bitwidth == 4 else 0
    # Evaluate the decompression subgraphs alone, on the CPU plugin that runs the model; they give
    # [out, in] (see transpose_weights).
    values = ov.Core().compile_model(ov.Model(outputs, [], "decoder_weights"), "CPU", OPENVINO_F32)({})
    dequantized = {initializer: values[index].T for index, initializer in enumerate(decoder.values())}
    return dequantized, weights, bits


def nncf_gptq(fp32_model: Path, work: Path, folder: Path) -> dict:
    """NNCF INT4_SYM with GPTQ, through OpenVINO (NNCF 3.4 has no GPTQ for ONNX models).

    Our canonical graph goes through OpenVINO (see openvino_graph), is compressed, and the dequantized
    weights are put back into the fp32 onnx artifact's graph, so the perplexity is measured like the others';
    OpenVINO CPU's perplexity of its own graph, before and after, is recorded beside it. NNCF stores fp16
    scales in OpenVINO graphs.
    """
    import nncf

    model = onnx.load(str(fp32_model))
    past = past_shapes(model)
    graph, decoder = openvino_graph(work / "canonical", folder)
    openvino_fp32 = perplexity(openvino_logits_fn(graph, past), heldout_windows(folder))
    options = nncf_int4_options(openvino_float_nodes(graph))
    started = time.perf_counter()
    compressed = nncf.compress_weights(graph, **options, dataset=calibration_dataset(model, folder),
                                       subset_size=CALIBRATION_WINDOWS, gptq=True)
    seconds = time.perf_counter() - started
    dequantized, weights, bits = openvino_weights(compressed, decoder)
    path = with_weights(fp32_model, artifact_names(dequantized, model), work / "nncf_gptq.onnx")
    openvino_cpu = perplexity(openvino_logits_fn(compressed, past), heldout_windows(folder))
    return result("nncf int4_sym GPTQ (via OpenVINO)", seconds, weights, bits, path, folder,
                  openvino_cpu_perplexity=openvino_cpu, openvino_cpu_fp32_perplexity=openvino_fp32)


def gguf_q4_0(fp32_model: Path, work: Path, folder: Path) -> dict:
    """llama.cpp's Q4_0 (the gguf package's numpy reference): blocks of 32 with an fp16 scale, no zero point."""
    from gguf import GGMLQuantizationType, dequantize, quantize

    model = onnx.load(str(fp32_model))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    # ggml rows run along the input dimension (PyTorch's [out, in]); our MatMul weights are [in, out].
    rows = {name: np.ascontiguousarray(numpy_helper.to_array(initializers[name]).T)
            for name in decoder_weights(model).values()}
    started = time.perf_counter()
    blocks = {name: quantize(weight, GGMLQuantizationType.Q4_0) for name, weight in rows.items()}
    seconds = time.perf_counter() - started
    dequantized = {name: dequantize(data, GGMLQuantizationType.Q4_0).T for name, data in blocks.items()}
    weights = sum(weight.size for weight in rows.values())
    bits = 8 * sum(data.nbytes for data in blocks.values())
    path = with_weights(fp32_model, dequantized, work / "gguf_q4_0.onnx")
    return result("llama.cpp Q4_0 (gguf)", seconds, weights, bits, path, folder)


# --- shared by the driver (quant_bench.py) -----------------------------------------------------------------

def export_fp32(out: Path, folder: Path, merge_projections: bool) -> Path:
    """Our onnx-target artifact of the model at ``folder`` (dynamic cache, fp32); its graph file."""
    import nanoexport

    config = nanoexport.ExportConfig(skip_passes=[] if merge_projections else ["merge_projections"])
    nanoexport.export(folder, target="onnx", out=out, config=config, progress=False)
    return out / "model.onnx"


def check_same_layers(rows: list[dict]) -> None:
    """Every row must cover the same number of weights, or the comparison is not like for like."""
    counts = {row["name"]: row["quantized_weights"] for row in rows}
    if len(set(counts.values())) != 1:
        raise SystemExit(f"the anchors quantized different weight counts: {counts}")


def print_table(rows: list[dict]) -> None:
    reference = rows[0]["perplexity"]
    print(f"{'method':40s} {'ppl':>9s} {'change':>8s} {'bits/w':>7s} {'seconds':>8s}")
    for row in rows:
        change = 100 * (row["perplexity"] / reference - 1)
        print(f"{row['name']:40s} {row['perplexity']:9.4f} {change:+7.3f}% {row['bits_per_weight']:7.3f}"
              f" {row['seconds']:8.2f}")


def quiet_logs() -> None:
    """ONNX Runtime's quantizer logs every node and our exports every rewrite; NNCF's own report (which layers
    went to int4, whether AWQ found its patterns) is worth keeping."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("onnxruntime.quantization.matmul_nbits_quantizer", "nanoexport", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def anchor_rows(work: Path, folder: Path) -> list[dict]:
    """The fp32 onnx artifact and every anchor's row for the model at ``folder``, built under ``work``."""
    log.info("exporting %s, with and without merged projections", folder.name)
    merged = export_fp32(work / "fp32", folder, merge_projections=True)
    unmerged = export_fp32(work / "fp32-unmerged", folder, merge_projections=False)
    rows = [fp32_baseline("fp32 (onnx artifact)", merged, folder),
            fp32_baseline("fp32, projections not merged", unmerged, folder)]
    for anchor, model in ((ort_matmul_nbits, merged), (nncf_data_free, merged), (nncf_gptq, merged),
                          (nncf_awq_scale_estimation, unmerged), (gguf_q4_0, merged)):
        log.info("%s", anchor.__name__)
        rows.append(anchor(model, work, folder))
    return rows
