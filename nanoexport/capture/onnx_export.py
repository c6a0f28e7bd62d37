"""torch -> ONNX with an explicit per-layer KV cache, through the dynamo exporter.

The graph's interface is the one Optimum and onnxruntime-genai use:
inputs ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/.value``;
outputs ``logits``, ``present.{i}.key/.value``; caches laid out ``[batch, kv_heads, seq, head_dim]``.
"""

from __future__ import annotations

import logging
import warnings

import onnx_ir as ir
import onnxscript.rewriter.onnx_fusions
import torch

from nanoexport.capture.checkpoint import Checkpoint
from nanoexport.capture.stamp import TRACED_LAYERS, LayersDiffer, stamp_layers, stampable, traced_config
from nanoexport.capture.weights import bind_weights, fold_weight_transposes, meta_model
from nanoexport.interface import io_names, kv_shape
from nanoexport.passes import fold_constants

log = logging.getLogger(__name__)

OPSET = 23


class FlatCacheLM(torch.nn.Module):
    """Wraps a causal LM so the KV cache travels as flat tensors rather than a Cache object."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        # One full-length layer per model layer, also for sliding-window families: the exported cache keeps
        # every position and the attention mask decides what each layer sees.
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        present = []
        for layer in outputs.cache.layers:
            present += [layer.keys, layer.values]
        return (outputs.logits, *present)


def export_onnx(checkpoint: Checkpoint, trace_all_layers: bool = False) -> ir.Model:
    """Export ``checkpoint`` to an in-memory ONNX model (opset 23) with explicit KV-cache I/O.

    Dimensions ``batch``, ``sequence_length``, ``past_sequence_length`` and
    ``total_sequence_length`` stay symbolic. Weights are fp32; a checkpoint with lazy ``weights`` is traced
    without them and its initializers read the checkpoint's files when a later stage needs the bytes; when
    its layers are alike (``stampable``), three are traced and the rest stamped out (``stamp_layers``),
    unless ``trace_all_layers``.
    """
    config = checkpoint.config
    num_layers = config.num_hidden_layers
    if trace_all_layers or checkpoint.weights is None or not stampable(config):
        model = _trace(checkpoint.model, num_layers)
    else:
        model = _trace(meta_model(traced_config(config)), TRACED_LAYERS)
        try:
            stamp_layers(model, num_layers)
        except LayersDiffer as error:
            log.warning("tracing all %d layers: %s", num_layers, error)
            model = _trace(checkpoint.model, num_layers)
    if checkpoint.weights is not None:
        bind_weights(model, checkpoint.model, checkpoint.weights)
    fold_weight_transposes(model)
    fold_constants(model)  # what the exporter's optimize=True would run, now that the weights are bound
    onnxscript.rewriter.onnx_fusions.fuse(model)
    _name_dimensions(model, num_layers)
    return model


def _trace(model: torch.nn.Module, num_layers: int) -> ir.Model:
    """``model`` (of ``num_layers`` layers) through the dynamo exporter, unoptimized."""
    kv_heads, head_dim = kv_shape(model.config)
    # Distinct sizes for every dimension so the tracer cannot confuse one with another.
    batch, seq, past = 2, 3, 5
    example = (
        torch.zeros(batch, seq, dtype=torch.long),
        torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq).repeat(batch, 1),
        *[torch.zeros(batch, kv_heads, past, head_dim) for _ in range(2 * num_layers)],
    )
    batch_dim = torch.export.Dim("batch")
    seq_dim = torch.export.Dim("sequence_length")
    past_dim = torch.export.Dim("past_sequence_length")
    dynamic_shapes = (
        {0: batch_dim, 1: seq_dim},
        {0: batch_dim, 1: torch.export.Dim.DYNAMIC},
        {0: batch_dim, 1: seq_dim},
        tuple({0: batch_dim, 2: past_dim} for _ in range(2 * num_layers)),
    )
    input_names, output_names = io_names(num_layers)
    wrapper = FlatCacheLM(model).eval()
    # The exporter warns about optional torchvision ops and tracing details that users cannot act on.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            example,
            dynamo=True,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            optimize=False,  # after export_onnx binds the weights: folding reads them
            verbose=False,
        )
    return program.model


def _name_dimensions(model: ir.Model, num_layers: int) -> None:
    """Give the symbolic dimensions the names runtimes and users expect instead of the tracer's s0, s1..."""
    graph = model.graph
    names = {
        graph.inputs[0].shape[0]: "batch_size",
        graph.inputs[0].shape[1]: "sequence_length",
        graph.inputs[1].shape[1]: "total_sequence_length",
        graph.inputs[3].shape[2]: "past_sequence_length",
    }
    renames = {str(dim): name for dim, name in names.items() if isinstance(dim, ir.SymbolicDim)}
    for value in [*graph.inputs, *graph.outputs]:
        if value.shape is None:
            continue
        value.shape = ir.Shape([ir.SymbolicDim(renames.get(str(d), str(d))) if isinstance(d, ir.SymbolicDim) else d
                                for d in value.shape])
    for index in range(num_layers):
        for value in graph.outputs[1 + 2 * index : 3 + 2 * index]:
            value.shape = ir.Shape([value.shape[0], value.shape[1], ir.SymbolicDim("total_sequence_length"),
                                    value.shape[3]])
