"""The ``qnn`` target: static-shape QDQ ONNX graphs for Qualcomm's HTP, compiled to context binaries.

The artifact holds ``prefill.onnx`` (``prefill_chunk`` tokens) and ``decode.onnx`` (one token), batch 1 and
every shape static, reading one weights file ``model.onnx.data``. When ``onnxruntime-qnn`` is installed, each
is also compiled by the QNN execution provider into an EPContext model (``*_ctx.onnx``) and its HTP context
binary, for the SoC of ``--soc-model`` / ``--htp-arch`` (recorded in ``qnn_compile.json``).

Parts: when the weights of one graph would exceed ``--max-part-bytes``, the layers are split into consecutive
parts, each a folder ``part{p}/`` with its own ``prefill.onnx``, ``decode.onnx`` and ``model.onnx.data``. Part 0
reads ``input_ids`` and holds the embedding, the last part holds the final norm and ``lm_head`` and gives
``logits`` (either may be a part without layers, when a large vocabulary would not fit beside a layer);
between parts flows ``hidden_states.{k}`` (the residual stream entering layer ``k``), and each part takes and
gives only its own layers' KV cache. ``qnn_parts.json`` lists the parts in order with their layers,
files and I/O (one part, the files above, when the model fits).

What the lowering changes in the canonical graph, and why:
- weights: HTP takes int4 block quantization as LPBQ: block scales that are levels 1..16 of one float scale per
  output channel (on the onnxruntime-qnn 2.7 emulator, higher levels compute wrong values). Each block takes
  the level that best reproduces our dequantized block, and our integers are rounded again to it (on the
  demo model: weight error 1.17x the canonical int4's). int8 weights become per output channel (the
  provider refuses block-wise int8 beside uint8 activations), also rounded again from our dequantized
  weights.
- KV cache: HTP has no scatter into a graph input. Each layer attends over ``Concat(past, new rows)`` and
  ``present.{i}.key/value`` are only the new rows ``[1, kv_heads, tokens, head_dim]``; the host (our Runner,
  an app on the device) writes them into its buffer at ``cache_position``.
- attention: the ``Attention`` op becomes MatMul -> Softmax -> MatMul with the key/value heads shared by
  grouping query heads (no repeated cache), under an additive mask built from ``attention_mask`` and
  ``cache_position``.
- rotary: cos and sin are tables of ``max_context`` rows gathered by ``position_ids``.
Activations calibrated to uint16 run as W4A16 on HTP; what calibration leaves float (attention, softmax,
norms, the float ``lm_head``) runs in fp16 on HTP (SoC 60 and later).

Inputs: ``input_ids``, ``position_ids`` ``[1, tokens]``, ``attention_mask`` ``[1, max_context]``,
``cache_position`` ``[1]`` (int64), ``past_key_values.{i}.key/value`` ``[1, kv_heads, max_context, head_dim]``.
Outputs: ``logits`` ``[1, tokens, vocab]`` and the new rows ``present.{i}.key/value``.

The package: ``lowering`` runs the steps in order; ``weights`` (LPBQ and per-channel int8), ``rewrites``
(rotary, KV cache, attention), ``rules`` (how their rewrite rules keep the artifacts' names), ``activations``
(quantized weight-MatMul outputs), ``parts`` (the files, whole or in parts), ``compile`` (QNN session
options, SoC check, context binaries), ``runtime`` (the validation runner and notes), ``options`` (the
``[qnn]`` settings).
"""

from __future__ import annotations

from nanoexport.errors import NanoexportError
from nanoexport.targets import Target
from nanoexport.targets.qnn.options import QnnOptions


def _validation_defaults(config) -> dict[str, float]:
    """Integer activations move logits more than fp16 does. Measured on the demo model: W4A16 cosine >= 0.99,
    top-1 >= 0.9, KV consistency <= 0.03; W8A8 KV consistency 0.55, as prefill and decode round activations
    per call, to uint8 levels 256 times coarser."""
    return {"quantized_kv_max_abs": 1.0 if config.quant.activations == "a8" else 0.1}


def _check(config) -> None:
    """Refuse, before any work, settings this target cannot build."""
    if config.quant.weights == "none" or config.quant.activations == "none":
        raise NanoexportError("the qnn target needs quantized weights and activations; pass --quant int4 and "
                              "--activations a16 (or leave both unset for W4A16)")
    from nanoexport.targets.qnn.compile import check_settings
    from nanoexport.targets.qnn.parts import check_table_fits

    settings = config.options["qnn"]
    check_table_fits(config.model, check_settings(settings), settings.max_part_bytes)


def _lowering():
    # Imported when used, so that listing targets and building the command line import no runtime.
    from nanoexport.targets.qnn import lowering

    return lowering


def _runtime():
    # Imported when used, so that listing targets and building the command line import no runtime.
    from nanoexport.targets.qnn import runtime

    return runtime


def _stored():
    # Imported when used: the manifest's digests read the weights back with the runtime's own reader.
    from nanoexport.targets.qnn import stored

    return stored


TARGET = Target(
    name="qnn",
    runtime="onnxruntime",  # the CPU path; the HTP path needs onnxruntime-qnn (extra "qnn")
    install="pip install 'nanoexport[qnn]'",
    kv_cache_forms=("static",),
    split_prefill_decode=True,
    quant_defaults={"weights": "int4", "activations": "a16"},  # W4A16 unless the user chose
    validation_defaults=_validation_defaults,
    check=_check,
    passes=lambda build: _lowering().lowering_passes(build),
    lower=lambda model, build: _lowering().lower(model, build),
    runner=lambda artifact: _runtime().Runner(artifact),
    # The same QDQ graphs on ONNX Runtime CPU. On the demo's W4A16 artifact, 2 windows of 256 tokens: 0.5 s on
    # CPU, 76 s on the emulator, perplexities 0.02% apart; compare reports how the two agree on its prompts.
    scoring_runner=lambda artifact: _runtime().Runner(artifact, backend="cpu"),
    notes=lambda artifact: _runtime().validation_notes(artifact),
    options=QnnOptions,
    stored_weights=lambda folder: _stored().stored_weights(folder),
)
