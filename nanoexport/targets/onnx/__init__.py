"""The ``onnx`` target: the graph as ``model.onnx`` plus ``model.onnx.data``, run by ONNX Runtime.

With the growing (dynamic) cache the artifact is also an onnxruntime-genai model folder:
``genai_config.json`` and, beside it where genai looks for them, the tokenizer files. Its attention runs as
ONNX Runtime's ``GroupQueryAttention``, which appends to the cache inside the kernel, so genai can hand it
one buffer per layer as both past and present (``past_present_share_buffer``) instead of a copy per step.
The fixed-size caches (``--kv-cache static|sliding``) keep the standard ``Attention``: they write the cache
at ``cache_position`` (``TensorScatter``, round-robin when sliding), which ``GroupQueryAttention`` cannot.
With ``split_prefill_decode``, ``prefill.onnx`` (a fixed chunk of tokens) and ``decode.onnx`` (one token)
replace ``model.onnx``; both read their weights from the one ``model.onnx.data``. Block-quantized 4-bit
weights run as ``MatMulNBits`` over our integers and scales (fp32 scales, as the kernel takes them).
"""

from __future__ import annotations

from nanoexport.targets import Target
from nanoexport.targets.onnx.options import OnnxOptions

# The artifact's files, named here for the writer, the runner and genai_config.json alike.
MODEL_FILE = "model.onnx"
PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
WEIGHTS_FILE = "model.onnx.data"  # every graph's weights, one copy shared by prefill and decode


def _lowering():
    # Imported when used, so that listing targets and building the command line import no runtime.
    from nanoexport.targets.onnx import lowering

    return lowering


def _runtime():
    # Imported when used, so that listing targets and building the command line import no runtime.
    from nanoexport.targets.onnx import runtime

    return runtime


def _stored():
    # Imported when used: the manifest's digests read the weights back with the runtime's own reader.
    from nanoexport.targets.onnx import stored

    return stored


def _validation_defaults(config) -> dict[str, float]:
    """MatMulNBits' dynamic int8 quantizes each block of activations per call, so a prefill and a decode step
    can round one value a level apart: measured on the demo model, cache values 0.021 apart (GPTQ, blocks of
    32) and 0.083 (GPTQ, asymmetric blocks of 128), against 1.1e-5 with it off. A cache written at the wrong
    position is off by whole units."""
    dynamic = config.quant.dynamic_int8 and config.quant.weights in ("int4", "uint4", "int8")
    return {"quantized_kv_max_abs": 0.2} if dynamic else {}


TARGET = Target(
    name="onnx",
    runtime="onnxruntime",
    install="pip install onnxruntime",
    kv_cache_forms=("dynamic", "static", "sliding"),
    passes=lambda build: _lowering().lowering_passes(build),
    lower=lambda model, build: _lowering().lower(model, build),
    runner=lambda artifact: _runtime().Runner(artifact),
    options=OnnxOptions,
    stored_weights=lambda folder: _stored().stored_weights(folder),
    validation_defaults=_validation_defaults,
)
