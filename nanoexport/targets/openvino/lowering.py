"""The openvino target's lowering: ONNX-side passes before the frontend, OpenVINO-side edits after it
(stateful cache, attention and mask forms, NF4), and the files it writes."""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import openvino as ov
import openvino.opset13 as ops
from onnxscript.rewriter import pattern
from openvino._offline_transformations import apply_make_stateful_transformation

from nanoexport.artifact import Artifact
from nanoexport.calibration.blocks import NF4_CODEBOOK
from nanoexport.capture.checkpoint import Checkpoint
from nanoexport.config import QuantConfig
from nanoexport.errors import NanoexportError
from nanoexport.passes import GraphPass
from nanoexport.passes.fusion import unmerge_projections
from nanoexport.targets import Build

log = logging.getLogger(__name__)

MODEL_FILE = "openvino_model.xml"
WEIGHTS_FILE = "openvino_model.bin"
TOKENIZER_FILE = "openvino_tokenizer.xml"
DETOKENIZER_FILE = "openvino_detokenizer.xml"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# Ops between the query's Reshape into heads and Attention that keep the head axis where it is.
HEAD_PRESERVING_OPS = ("RMSNormalization", "Transpose", "RotaryEmbedding")
# Validation measures our graph, so the CPU plugin computes as the reference does. Its defaults on this CPU
# moved the demo's logits by 0.05 (bf16 compute), KV consistency by 0.037 (u8 KV cache) and the int4 model's
# logits by 0.077 (int8-quantized activations); with these the fp32 artifact matches PyTorch within 2e-5.
VALIDATION_PROPERTIES = {
    "INFERENCE_PRECISION_HINT": "f32",
    "KV_CACHE_PRECISION": "f32",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0",
}
# Weight types that leave the model in float: its KV cache is kept in f16 rather than the CPU plugin's u8.
FLOAT_WEIGHTS = ("none", "fp16")
AUTO_NAME = re.compile(r"(?P<type>[A-Za-z0-9]+)_\d+(?P<output>(\.\d+)?)")


def lowering_passes(build: Build) -> list[GraphPass]:
    """The ONNX-side edits that give OpenVINO's frontend and the CPU plugin the graph they handle best."""
    return [static_heads, batch_from_input_ids, unmerge_projections, output_major_weights]


def lower(model: ir.Model, build: Build) -> list[str]:
    """Write ``model`` as a stateful OpenVINO IR plus the tokenizer IRs into the build folder; returns the
    files."""
    folder, config = build.folder, build.config
    with tempfile.TemporaryDirectory() as scratch:
        onnx_path = Path(scratch) / "canonical.onnx"
        ir.save(model, onnx_path, external_data="canonical.onnx.data")
        ov_model = _read(onnx_path)
        make_stateful(ov_model)
        broadcast_kv_heads(ov_model)
        additive_attention_mask(ov_model)
        drop_nan_guards(ov_model)
        compress_nf4(ov_model)
        set_runtime_options(ov_model, config.quant)
        _name_deterministically(ov_model)
        # Our float weights stay fp32 and our quantized ones as they are: no conversion on the way out.
        ov.save_model(ov_model, folder / MODEL_FILE, compress_to_fp16=False)
    return [MODEL_FILE, WEIGHTS_FILE, *_write_tokenizers(folder), *_write_configs(folder, build.checkpoint)]


def static_heads(model: ir.Model) -> int:
    """Reshape each attention's query, key and value into a constant number of heads; returns the count.

    The exporter reshapes ``[batch, seq, hidden]`` to ``[batch, seq, -1, head_dim]``. With the head count
    unknown, OpenVINO's ``Attention`` conversion assumes as many query heads as KV heads and fails (GQA),
    and openvino-genai's PagedAttention conversion leaves the heads of its output reshape unknown, so the CPU
    plugin runs the Transposes around attention instead of folding them (8 more nodes a step on the demo
    model). Shape inference knows the counts; writing them into the Reshapes gives OpenVINO the same
    knowledge, as PyTorch's frontend has it for optimum-intel's IRs.
    """
    reshapes = []
    for node in model.graph:
        if node.op_type != "Attention":
            continue
        for value in node.inputs[:3]:
            producer = value.producer()
            if producer is not None and producer.op_type == "Concat":  # the cache: past, then the new heads
                value = producer.inputs[-1]
            reshapes.append(_head_reshape(value))
    changed = 0
    for reshape in filter(None, reshapes):
        heads, head_dim = reshape.outputs[0].shape[2:]
        shape = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([0, 0, heads, head_dim], np.int64))})
        model.graph.insert_before(reshape, [shape])
        reshape.replace_input_with(1, shape.outputs[0])
        reshape.attributes.pop("allowzero", None)  # 0 now means "copy batch and sequence from the input"
        changed += 1
    return changed


class OutputMajorWeight(pattern.RewriteRuleClassBase):
    """MatMul by weights stored ``[K, N]`` -> MatMul by the Transpose of the same weights stored ``[N, K]``.

    The canonical graph stores a linear's weights input-major, ``[K, N]``; the CPU plugin's FullyConnected
    reads them output-major and, given ours, keeps a transposed copy beside the mapped .bin: a prompt and a
    step of the Qwen2.5-0.5B config peaked at 3,713 MiB against 3,028 MiB for optimum-intel's output-major
    IR (the 686 MiB are about its decoder weights in bf16), and at 3,028 MiB once stored output-major. For
    blocked integers (blocks along K: ``[N, K / block, block]`` in the plugin's compressed FullyConnected,
    optimum-intel's layout) the int4 config peaked at 1,464 MiB input-major, 1,441 MiB output-major,
    optimum-intel's IR at 1,422 MiB. Every weight, integer and scale stays the same; only their order in the
    .bin changes. The frontend folds the Transpose into the MatMul.
    """

    def __init__(self, name: str, dequantized: bool, cast: bool):
        super().__init__(name)
        self.dequantized, self.cast = dequantized, cast

    def pattern(self, op, x, weight):
        if self.dequantized:
            weight = op.DequantizeLinear(weight, _allow_other_inputs=True, _outputs=["dequantized"])
            if self.cast:  # fp16 scales
                weight = op.Cast(weight, _outputs=["cast"])
        return op.MatMul(x, weight, _outputs=["product"])

    def check(self, context, weight, dequantized=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        read = dequantized if dequantized is not None else weight
        constants = dequantized.producer().inputs if dequantized is not None else [weight]
        if any(value is None or value.const_value is None for value in constants) or not (
                dequantized is not None or weight.is_initializer()):
            return result.fail("weights, scales and zero points must be initializers", read)
        if weight.shape is None or weight.shape.rank() != 2 or any(v.shape.rank() > 2 for v in constants):
            return result.fail("a 2-D weight only", weight)
        if len(read.uses()) != 1:
            return result.fail("the weight must feed this MatMul alone", read)
        return result

    def rewrite(self, op, x, weight, product, dequantized=None, cast=None, **_):
        def output_major(value: ir.Value) -> ir.Value:  # per-channel 1-D scales stay as they are
            array = value.const_value.numpy()
            array = array.T if array.ndim == 2 else array
            return op.initializer(ir.tensor(np.ascontiguousarray(array)), name=f"{value.name}.output_major")

        if dequantized is None:
            stored = output_major(weight)
        else:
            node = dequantized.producer()
            attributes = {name: attr.value for name, attr in node.attributes.items()}
            attributes["axis"] = 1 - attributes.get("axis", 1) % 2
            stored = op.DequantizeLinear(*map(output_major, node.inputs), **attributes)
            if cast is not None:
                stored = op.Cast(stored, to=cast.producer().attributes.get_int("to"))
        product_major = op.MatMul(x, op.Transpose(stored, perm=[1, 0]))
        product_major.shape, product_major.type = product.shape, product.type
        return product_major


def output_major_weights(model: ir.Model) -> int:
    """Store each linear's weights, float or blocked integers, output-major (see ``OutputMajorWeight``);
    returns how many. NF4 weights, a codebook lookup rather than a DequantizeLinear, stay input-major."""
    rules = pattern.RewriteRuleSet([
        OutputMajorWeight.rule(f"output-major {form} weight", dequantized=form != "float", cast=form == "cast")
        for form in ("cast", "dequantized", "float")
    ])
    count = rules.apply_to_model(model)
    if count:
        common.RemoveUnusedNodesPass()(model)
    log.info("output_major_weights: %d", count)
    return count


def batch_from_input_ids(model: ir.Model) -> int:
    """Read the batch size from ``input_ids`` where the graph reads it from a past input; returns the count.

    The exporter takes the batch dimension from whichever input it met first, a ``past_key_values`` one.
    openvino-genai's PagedAttention conversion (its default on CPU) removes the cache inputs with the
    attention that reads them, and a Reshape still reading the batch from a removed input fails the
    conversion, so genai falls back to the slower stateful pipeline.
    """
    input_ids = next(value for value in model.graph.inputs if value.name == "input_ids")
    changed = 0
    for node in model.graph:
        if node.op_type != "Shape" or not node.inputs[0].name.startswith(PAST_PREFIX):
            continue
        start, end = (node.attributes[key].value if key in node.attributes else None for key in ("start", "end"))
        if (start or 0) == 0 and end == 1:
            node.replace_input_with(0, input_ids)
            changed += 1
    return changed


def _head_reshape(value: ir.Value) -> ir.Node | None:
    """The Reshape of ``[batch, seq, hidden]`` into ``[batch, seq, heads, head_dim]`` that ``value`` comes from."""
    node = value.producer()
    while node is not None and node.op_type in HEAD_PRESERVING_OPS:
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Reshape":
        return None
    flat, heads = node.inputs[0].shape, node.outputs[0].shape
    if flat is None or heads is None or flat.rank() != 3 or heads.rank() != 4:
        return None
    if heads[:2] != flat[:2] or not all(isinstance(d, int) for d in heads[2:]):
        return None
    return node


def _read(onnx_path: Path) -> ov.Model:
    try:
        return ov.Core().read_model(onnx_path)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1]
        raise NanoexportError(f"OpenVINO cannot read the graph ({reason}); report the model") from None


def make_stateful(model: ov.Model) -> None:
    """Turn the explicit cache into ReadValue/Assign states, as optimum-intel does for openvino-genai.

    ``beam_idx`` (int32 ``[batch]``) selects which cache row each batch row continues from: genai's beam
    search reorders the cache through it. New states start empty: ``[batch, kv_heads, 0, head_dim]``.
    """
    past = [value for value in model.inputs if value.get_any_name().startswith(PAST_PREFIX)]
    if not past:
        raise NanoexportError("the graph has no past_key_values inputs; this graph is not in canonical form")
    batch = model.input("input_ids").get_partial_shape()[0]
    beam_idx = ops.parameter(ov.PartialShape([batch]), ov.Type.i32, name="beam_idx")
    beam_idx.output(0).get_tensor().set_names({"beam_idx"})
    model.add_parameters([beam_idx])
    for value in past:
        users = value.get_target_inputs()
        reordered = ops.gather(value, beam_idx, ops.constant(np.int64(0)))
        for user in users:
            user.replace_source_output(reordered.output(0))
    model.validate_nodes_and_infer_types()
    apply_make_stateful_transformation(model, {value.get_any_name(): present_name(value.get_any_name())
                                               for value in past})
    _empty_initial_states(model)


def present_name(past_name: str) -> str:
    return PRESENT_PREFIX + past_name.removeprefix(PAST_PREFIX)


def _empty_initial_states(model: ov.Model) -> None:
    """Each ReadValue starts from zeros of ``[batch of input_ids, kv_heads, 0, head_dim]``."""
    batch = ops.gather(ops.shape_of(model.input("input_ids"), "i64"), ops.constant(np.array([0], np.int64)),
                       ops.constant(np.int64(0)))
    for node in model.get_ops():
        if node.get_type_name() != "ReadValue":
            continue
        _, kv_heads, _, head_dim = node.get_output_partial_shape(0)
        rest = ops.constant(np.array([kv_heads.get_length(), 0, head_dim.get_length()], np.int64))
        zeros = ops.broadcast(ops.constant(np.zeros((), node.get_output_element_type(0).to_dtype())),
                              ops.concat([batch, rest], 0))
        node.set_arguments([zeros])
    model.validate_nodes_and_infer_types()


def broadcast_kv_heads(model: ov.Model) -> int:
    """Repeat KV heads for grouped-query attention with Broadcast instead of Tile; returns the count.

    The frontend's ``Attention`` repeats them with Unsqueeze -> Tile -> Reshape. The CPU plugin fuses the
    cache (ReadValue -> Gather -> Concat -> Assign) into its attention kernel, which then appends in place
    instead of copying the cache each step, only when the repeat is a bidirectional Broadcast, the form
    PyTorch's ``repeat_kv`` converts to. Same values: the repeated axis has length 1.
    """
    changed = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "ScaledDotProductAttention":
            continue
        for index in (1, 2):
            reshape = node.input_value(index).get_node()
            tile = reshape.input_value(0).get_node() if reshape.get_type_name() == "Reshape" else None
            if tile is None or tile.get_type_name() != "Tile" or not _repeats_unit_axes(tile):
                continue
            repeats = tile.input_value(1).get_node().get_data().astype(np.int64)
            broadcast = ops.broadcast(tile.input_value(0), ops.constant(repeats), broadcast_spec="BIDIRECTIONAL")
            tile.output(0).replace(broadcast.output(0))
            changed += 1
    model.validate_nodes_and_infer_types()
    return changed


def additive_attention_mask(model: ov.Model) -> int:
    """Give attention a float mask (0 or -inf) where it has a boolean one; returns how many attentions changed.

    The frontend passes ``Attention``-23's boolean mask on as it is (opset 24's conversion already makes it
    float). The CPU plugin's fused attention-with-cache kernel ran three times slower with the boolean mask
    (0.86 ms against 0.29 ms a decode step on the int4 demo model), for the same logits to the bit.
    """
    changed = 0
    additive = {}
    for node in model.get_ordered_ops():
        if node.get_type_name() != "ScaledDotProductAttention" or node.get_input_size() < 4:
            continue
        mask = node.input_value(3)
        if mask.get_element_type() != ov.Type.boolean:
            continue
        if mask not in additive:
            dtype = node.get_output_element_type(0).to_dtype()
            additive[mask] = ops.select(mask, ops.constant(np.array(0, dtype)),
                                        ops.constant(np.array(-np.inf, dtype))).output(0)
        node.input(3).replace_source_output(additive[mask])
        changed += 1
    model.validate_nodes_and_infer_types()
    return changed


def drop_nan_guards(model: ov.Model) -> int:
    """Clamp attention masks to a finite lowest value and drop the NaN guard after attention; returns the count.

    The frontend follows each ``Attention`` with Select(IsNaN(out), 0, out), for rows whose every key is
    masked (-inf everywhere can give NaN: a left-padded row's padding; the CPU kernel returns numbers there
    anyway, other devices' need not). With the mask clamped, such a row averages its masked keys instead,
    finite, and every other row is unchanged, its masked keys still weighing exp(-65504) = 0. Without the
    guard the CPU plugin folds the Transposes around attention into the kernel (with ``static_heads``, 74
    nodes run a demo decode step instead of 81, optimum-intel's IR 73).
    """
    changed = 0
    clamped = {}
    for node in model.get_ordered_ops():
        if node.get_type_name() != "ScaledDotProductAttention" or node.get_input_size() < 4:
            continue
        guards = [target.get_node() for target in node.output(0).get_target_inputs()]
        # Select(IsNaN(out), ConvertLike(0, out), out): ConvertLike reads the output for its type only.
        if sorted(guard.get_type_name() for guard in guards) not in (["IsNaN", "Select"],
                                                                      ["ConvertLike", "IsNaN", "Select"]):
            continue
        select = next(guard for guard in guards if guard.get_type_name() == "Select")
        if select.input_value(2) != node.output(0) or select.input_value(0).get_node() not in guards:
            continue
        mask = node.input_value(3)
        if mask.get_element_type() == ov.Type.boolean:  # a masked key is -inf inside the kernel
            continue
        if mask not in clamped:
            # Lowest float16: still finite wherever the plugin computes in f16 or bf16.
            lowest = ops.constant(np.array(np.finfo(np.float16).min, mask.get_element_type().to_dtype()))
            clamped[mask] = ops.maximum(mask, lowest).output(0)
        node.input(3).replace_source_output(clamped[mask])
        select.output(0).replace(node.output(0))
        changed += 1
    model.validate_nodes_and_infer_types()
    return changed


def _repeats_unit_axes(tile: ov.Node) -> bool:
    """Whether ``tile`` has constant repeats and repeats only axes of length 1 (so Broadcast is the same)."""
    repeats = tile.input_value(1).get_node()
    if repeats.get_type_name() != "Constant":
        return False
    shape = tile.input_value(0).get_partial_shape()
    return all(count == 1 or (shape[axis].is_static and shape[axis].get_length() == 1)
               for axis, count in enumerate(repeats.get_data()))


def compress_nf4(model: ov.Model) -> int:
    """NF4 codebook lookups (Gather of the 16 levels by u4 indices) -> nf4 Constants; returns the count.

    Our codebook is OpenVINO's nf4 one, so the indices are the nf4 codes, bit for bit. The constant takes the
    blocked shape of the Reshape after the lookup, so that Convert -> Multiply by the block scales is the
    pattern the CPU plugin runs as a 4-bit FullyConnected instead of folding it into an fp32 matrix.
    """
    changed = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Gather" or not _is_nf4_lookup(node):
            continue
        users = node.output(0).get_target_inputs()
        blocks = next(iter(users)).get_node()
        if len(users) != 1 or blocks.get_type_name() != "Reshape":
            continue
        indices = node.input_value(1).get_node().input_value(0).get_node()
        codes = ov.Tensor(ov.Type.nf4, blocks.get_output_shape(0))
        codes.data[...] = indices.get_data()  # u4 and nf4 pack alike, two codes a byte; a Reshape keeps the order
        levels = ops.convert(ops.constant(codes), node.get_output_element_type(0))
        blocks.output(0).replace(levels.output(0))
        changed += 1
    model.validate_nodes_and_infer_types()
    return changed


def _is_nf4_lookup(gather: ov.Node) -> bool:
    table, index = (gather.input_value(i).get_node() for i in (0, 1))
    if table.get_type_name() != "Constant" or index.get_type_name() != "Convert":
        return False
    codes = index.input_value(0).get_node()
    return (codes.get_type_name() == "Constant" and codes.get_output_element_type(0) == ov.Type.u4
            and np.array_equal(table.get_data().reshape(-1), NF4_CODEBOOK))


def set_runtime_options(model: ov.Model, quant: QuantConfig) -> None:
    """The compile options an IR carries (``rt_info`` ``runtime_options``), which OpenVINO applies when it compiles.

    A float model gets an f16 KV cache, as optimum-intel gives its float exports: the CPU plugin's default,
    u8, costs a float model accuracy (0.037 on the demo's KV consistency) and, on the demo in openvino-genai,
    7-11% of its decode speed. Quantized models keep the default, as optimum-intel leaves them.

    ``quant.dynamic_int8`` is the CPU plugin's default for quantized weights (activations quantized to int8
    in groups of 32, as optimum-intel's IRs run); turned off, a quantized model asks for float activations
    (``DYNAMIC_QUANTIZATION_GROUP_SIZE`` 0).
    """
    if quant.weights in FLOAT_WEIGHTS:
        model.set_rt_info("f16", ["runtime_options", "KV_CACHE_PRECISION"])
    elif not quant.dynamic_int8:
        model.set_rt_info("0", ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"])


def _name_deterministically(model: ov.Model) -> None:
    """Nodes and tensors that OpenVINO names ``<Type>_<n>`` from a process-wide counter get ``<Type>_<position>``
    instead, so the same graph gives the same XML whatever ran before it in the process."""
    for position, node in enumerate(model.get_ordered_ops()):
        node.set_friendly_name(_numbered(node.get_friendly_name(), position))
        for output in node.outputs():
            names = output.get_tensor().get_names()
            if names:
                output.get_tensor().set_names({_numbered(name, position) for name in names})


def _numbered(name: str, position: int) -> str:
    match = AUTO_NAME.fullmatch(name)
    return f"{match['type']}_{position}{match['output']}" if match else name


def _write_tokenizers(folder: Path) -> list[str]:
    """openvino-genai's tokenizer and detokenizer IRs, converted from the artifact's Hugging Face tokenizer."""
    tokenizer_folder = folder / "tokenizer"
    if not tokenizer_folder.is_dir():
        log.warning("openvino: no tokenizer, so openvino-genai needs one passed in to run the artifact")
        return []
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    tokenizer, detokenizer = convert_tokenizer(AutoTokenizer.from_pretrained(tokenizer_folder),
                                               with_detokenizer=True)
    files = []
    for ov_model, file_name in ((tokenizer, TOKENIZER_FILE), (detokenizer, DETOKENIZER_FILE)):
        _name_deterministically(ov_model)
        ov.save_model(ov_model, folder / file_name)
        files += [file_name, file_name.replace(".xml", ".bin")]
    return files


def _write_configs(folder: Path, checkpoint: Checkpoint) -> list[str]:
    """``generation_config.json`` (genai's end-of-sequence and search defaults) and the model's ``config.json``."""
    checkpoint.model.generation_config.to_json_file(folder / "generation_config.json", use_diff=True)
    checkpoint.config.to_json_file(folder / "config.json", use_diff=True)
    return ["config.json", "generation_config.json"]


class Runner:
    """Runs an openvino artifact on OpenVINO CPU through the explicit-cache interface.

    Each call writes the past tensors into the model's states (or resets them when the past is empty), runs
    one inference and returns the states as the present tensors: validation drives every target the same way.
    """

    def __init__(self, artifact: Artifact):
        compiled = ov.Core().compile_model(artifact.file(MODEL_FILE), "CPU", VALIDATION_PROPERTIES)
        self.request = compiled.create_infer_request()
        # apply_make_stateful_transformation names each state after its input and output, concatenated.
        self.states = {state.name: state for state in self.request.query_state()}

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        past = {name: value for name, value in feeds.items() if name.startswith(PAST_PREFIX)}
        if all(value.shape[2] == 0 for value in past.values()):
            self.request.reset_state()
        else:
            for name, value in past.items():
                self._state(name).state = ov.Tensor(np.ascontiguousarray(value))
        inputs = {name: feeds[name] for name in MODEL_INPUTS}
        inputs["beam_idx"] = np.arange(feeds["input_ids"].shape[0], dtype=np.int32)
        logits = self.request.infer(inputs)["logits"].copy()
        present = {present_name(name): self._state(name).state.data.copy() for name in past}
        return {"logits": logits, **present}

    def _state(self, past_name: str) -> ov.VariableState:
        return self.states[past_name + present_name(past_name)]
