"""An ONNX decoder exported by Optimum, read as the capture of its checkpoint.

``optimum-cli export onnx --task text-generation-with-past`` writes ``model.onnx`` with the interface our
capture gives (``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/.value`` in;
``logits``, ``present.{i}.key/.value`` out; caches ``[batch, kv_heads, seq, head_dim]``), through torch's
TorchScript exporter at an opset below 23: attention, norms and rotary op by op, sizes computed from
shapes, projection weights anonymous. ``import_optimum_onnx`` leaves it as ``export_onnx`` leaves a torch
capture: opset 23, weights named after their modules, static sizes folded, rotary fused; the canonical
passes fuse the rest. The checkpoint's config.json and tokenizer beside it describe the model; its
safetensors, when they are there too, are validation's reference, and when they are not the ONNX file holds
the only copy of the weights (``load_checkpoint`` then reads the folder as a weightless checkpoint).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnxscript.rewriter.onnx_fusions
from onnxscript import version_converter
from onnxscript.rewriter import pattern

from nanoexport.capture.weights import EMBEDDING_KEYS
from nanoexport.errors import NanoexportError, first_line
from nanoexport.interface import io_names, kv_shape
from nanoexport.onnx_file import tensors_of
from nanoexport.passes import fold_constants
from nanoexport.passes.torchscript import TORCHSCRIPT_RULES, TiedHead

log = logging.getLogger(__name__)

OPTIMUM_FILE = "model.onnx"  # the merged decoder (with and without past) Optimum writes
OPSET = 23
REEXPORT = "export it with `optimum-cli export onnx --model CHECKPOINT --task text-generation-with-past DIR`"
# Optimum's name for the growing cache's length; ours is total_sequence_length.
OPTIMUM_TOTAL_LENGTH = "past_sequence_length + sequence_length"


def optimum_onnx_file(model: Any) -> Path | None:
    """The Optimum ONNX decoder in ``model`` when it is a folder holding ``model.onnx``, else None."""
    if not isinstance(model, (str, Path)):
        return None
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return None
    if (folder / OPTIMUM_FILE).is_file():
        return folder / OPTIMUM_FILE
    if any(folder.glob("decoder*_model.onnx")):
        raise NanoexportError(f"{folder} holds Optimum's older split decoder files (decoder_model.onnx, "
                              f"decoder_with_past_model.onnx); {REEXPORT}")
    return None


def check_optimum_folder(folder: Path) -> None:
    """The checkpoint file an Optimum folder needs beside its ONNX file: the config (the architecture; the
    weights may be in the ONNX file alone)."""
    if not (folder / "config.json").is_file():
        raise NanoexportError(f"{folder} holds {OPTIMUM_FILE} but no config.json; copy the checkpoint's "
                              "config.json (and its tokenizer files) beside it")


def onnx_weight_files(path: Path) -> list[Path]:
    """The files holding the weights of the ONNX model at ``path``: the file itself, then the external data
    files its tensors name, for the digest that identifies a weightless checkpoint. Raises
    ``NanoexportError`` for a file that is not ONNX, or names an external data file that is missing."""
    # Reads the protobuf without its external data: a model over 2 GB keeps its weights outside and parses
    # in a moment; a smaller one is read once more, as large as the file, which the import reads anyway.
    return [path, *_external_data_files(_load_proto(path), path)]


def _load_proto(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as error:  # protobuf's DecodeError, OSError: any means "not an ONNX file we can read"
        raise NanoexportError(f"{path} is not a readable ONNX file ({first_line(error)[:200]}); {REEXPORT}") \
            from None


def _external_data_files(proto: onnx.ModelProto, path: Path) -> list[Path]:
    """The external data files ``proto`` (read from ``path``) names, sorted; refused in one line when one is
    missing, before a stage meets it half-way through reading the weights."""
    locations = sorted({entry.value for tensor in tensors_of(proto)
                        if tensor.data_location == onnx.TensorProto.EXTERNAL
                        for entry in tensor.external_data if entry.key == "location"})
    missing = [location for location in locations if not (path.parent / location).is_file()]
    if missing:
        raise NanoexportError(f"{path} keeps weights in {missing[0][:200]!r}, which is not beside it; copy every "
                              "file Optimum wrote")
    return [path.parent / location for location in locations]


def import_optimum_onnx(path: Path, hf_config: Any) -> ir.Model:
    """Read Optimum's decoder at ``path`` (the model ``hf_config``, its transformers config, describes) in the
    form ``export_onnx`` gives.

    The weights stay on disk (external data is read when a stage needs it). Raises ``NanoexportError`` for a
    file that is not ONNX, not a decoder with this KV-cache interface, or of other sizes than the config's.
    """
    num_layers = hf_config.num_hidden_layers
    proto = _load_proto(path)
    _check_interface(proto.graph, num_layers, path)
    _check_sizes(proto.graph, hf_config, path)
    _external_data_files(proto, path)
    proto = _infer_shapes(proto, path)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    version_converter.convert_version(model, OPSET)
    _name_weights(model)
    _order_interface(model, num_layers)
    _name_total_length(model)
    fold_constants(model)  # the rules read constants as initializers, which folding lifts them to
    rewrites = TORCHSCRIPT_RULES.apply_to_model(model) + _tie_head(model, hf_config)
    fold_constants(model)
    fused = onnxscript.rewriter.onnx_fusions.fuse(model)
    log.info("optimum import: %d static sizes and rotary angles rewritten, fused %s", rewrites, fused)
    return model


def _check_interface(graph: onnx.GraphProto, num_layers: int, path: Path) -> None:
    """The graph's inputs and outputs are our captured interface, in any order; raises naming what differs."""
    weights = {initializer.name for initializer in graph.initializer}
    inputs = {value.name for value in graph.input} - weights
    outputs = {value.name for value in graph.output}
    expected_inputs, expected_outputs = io_names(num_layers)
    missing = sorted(set(expected_inputs) - inputs) + sorted(set(expected_outputs) - outputs)
    extra = sorted(inputs - set(expected_inputs)) + sorted(outputs - set(expected_outputs))
    if missing or extra:
        found = "missing " + ", ".join(missing[:4]) if missing else "unexpected " + ", ".join(extra[:4])
        raise NanoexportError(f"{path} is not a decoder with the {num_layers}-layer KV-cache interface of "
                              f"config.json ({found}); {REEXPORT}")


def _check_sizes(graph: onnx.GraphProto, hf_config: Any, path: Path) -> None:
    """The sizes the graph states (the token embedding's shape, the static dimensions of the logits and of
    the caches) are the config's: the config is all that describes the model when no safetensors are beside
    it, and the manifest, the targets' configs and the KV-cache shapes are written from it."""
    kv_heads, head_dim = kv_shape(hf_config)
    expected = {"logits": [None, None, hf_config.vocab_size],
                "past_key_values.0.key": [None, kv_heads, None, head_dim]}
    stated = {value.name: [dim.dim_value if dim.HasField("dim_value") else None
                           for dim in value.type.tensor_type.shape.dim]
              for value in [*graph.input, *graph.output] if value.name in expected}
    for initializer in graph.initializer:
        if initializer.name.endswith(EMBEDDING_KEYS):
            expected[initializer.name] = [hf_config.vocab_size, hf_config.hidden_size]
            stated[initializer.name] = list(initializer.dims)
    for name, sizes in expected.items():
        shape = stated.get(name, [])
        if len(shape) == len(sizes) and any(a is not None and b is not None and a != b for a, b in zip(shape, sizes)):
            raise NanoexportError(f"{path} gives {name} the shape {shape}, but config.json implies {sizes} "
                                  "(None: any); the config belongs to another model: copy the checkpoint's own "
                                  "config.json beside the ONNX file")


def _infer_shapes(proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """Shapes with symbolic arithmetic (ONNX Runtime's inference), which the fusions need: ONNX's own
    inference leaves the head count of ``Reshape(q, [batch, seq, -1, head_dim])`` unknown."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        return SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    except Exception as error:  # the tool raises bare Exceptions and asserts on graphs it cannot follow
        raise NanoexportError(f"cannot infer the shapes in {path} ({first_line(error)[:200]}); {REEXPORT}") \
            from None


def _module_of(node: ir.Node) -> str | None:
    """The module the TorchScript exporter named ``node`` after: ``/model/layers.0/mlp/up_proj/MatMul`` ->
    ``model.layers.0.mlp.up_proj``."""
    parts = (node.name or "").strip("/").split("/")
    return ".".join(parts[:-1]) if len(parts) > 1 else None


def _name_weights(model: ir.Model) -> None:
    """Name the projection weights as the torch capture does, after their modules (quantization plans,
    per-layer overrides and cuts at layer boundaries go by these names).

    The exporter stores a projection's weight transposed under an anonymous name (``onnx::MatMul_733``): it
    becomes ``<module>.weight.T``. The other weights keep their checkpoint names; where the exporter stored
    equal weights once (every all-ones norm of a random-weight checkpoint), it gives each module an Identity
    of its own name, which constant folding turns into an initializer of that name.
    """
    graph = model.graph
    for value in list(graph.initializers.values()):
        uses = value.uses()
        if not value.name.startswith("onnx::") or len(uses) != 1 or value.is_graph_output():
            continue
        node, index = uses[0].node, uses[0].idx
        if node.op_type != "MatMul" or index != 1 or value.shape is None or value.shape.rank() != 2:
            continue
        module = _module_of(node)
        if module is not None and f"{module}.weight.T" not in graph.initializers:
            graph.initializers.pop(value.name)
            value.name = f"{module}.weight.T"
            graph.register_initializer(value)


def _tie_head(model: ir.Model, hf_config: Any) -> int:
    """The head of a checkpoint that ties it to its embedding read as the table transposed (see ``TiedHead``),
    as the torch capture reads it; returns how many heads were tied (0 or 1)."""
    if not getattr(hf_config, "tie_word_embeddings", False):
        return 0
    tables = [value for name, value in model.graph.initializers.items() if name.endswith(EMBEDDING_KEYS)]
    if len(tables) != 1:
        return 0
    return pattern.RewriteRuleSet([TiedHead.rule(tables[0])]).apply_to_model(model)


def _order_interface(model: ir.Model, num_layers: int) -> None:
    """Inputs and outputs in the captured order (Optimum's is the same today; the targets index by position)."""
    input_names, output_names = io_names(num_layers)
    inputs = {value.name: value for value in model.graph.inputs}
    outputs = {value.name: value for value in model.graph.outputs}
    model.graph.inputs[:] = [inputs[name] for name in input_names]
    model.graph.outputs[:] = [outputs[name] for name in output_names]


def _name_total_length(model: ir.Model) -> None:
    """Optimum's ``past_sequence_length + sequence_length`` dimension -> ``total_sequence_length``, as captured."""
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is not None and any(str(dim) == OPTIMUM_TOTAL_LENGTH for dim in value.shape):
            value.shape = ir.Shape([ir.SymbolicDim("total_sequence_length") if str(dim) == OPTIMUM_TOTAL_LENGTH
                                    else dim for dim in value.shape])
