"""The ``openvino`` target: ``openvino_model.xml`` / ``.bin`` with a stateful KV cache, run by OpenVINO.

The artifact is an openvino-genai model folder: ``openvino_genai.LLMPipeline(artifact, "CPU")`` loads it.
Beside the model it holds the tokenizer and detokenizer IRs (openvino-tokenizers), ``config.json`` and
``generation_config.json``.

The model is the canonical graph with the growing cache (``--kv-cache stateful``), converted by OpenVINO's
ONNX frontend and then made stateful the way openvino-genai expects: the ``past_key_values.*`` inputs and
``present.*`` outputs become ReadValue/Assign state pairs, and a ``beam_idx`` input reorders the cache rows
(a Gather before each Concat). Its inputs are ``input_ids``, ``attention_mask``, ``position_ids`` and
``beam_idx``; its output ``logits``. On CPU, openvino-genai by default converts the IR to PagedAttention
(continuous batching), which removes the states and ``beam_idx``: nothing else may read them. For NPU,
openvino-genai (the NPU plugin's NPUW) turns this same IR into static prefill and decode graphs when it
loads it (``MAX_PROMPT_LEN``, ``MIN_RESPONSE_LEN``).

Quantized weights stay as our integers and scales: blocked ``DequantizeLinear`` arrives as an i4/u4/i8
Constant -> Convert -> [Subtract zero point] -> Multiply scale, which the CPU plugin runs as a compressed
FullyConnected; NF4 codebook indices become an nf4 Constant. Weights are stored output-major (``[N, K]``),
the plugin's layout, so that it keeps no transposed copy of them. The model is read with ``Core.read_model``
rather than ``convert_model``, whose transformations fold the fp16 and NF4 weights into fp32 constants.
"""

from __future__ import annotations

from nanoexport.targets import Target


def _lowering():
    # Imported when used, so that listing targets and building the command line import no runtime.
    from nanoexport.targets.openvino import lowering

    return lowering


def _runtime():
    # Imported when used, so that listing targets and building the command line import no runtime.
    from nanoexport.targets.openvino import runtime

    return runtime


def _stored():
    # Imported when used: the manifest's digests read the weights back with the runtime's own reader.
    from nanoexport.targets.openvino import stored

    return stored


TARGET = Target(
    name="openvino",
    runtime="openvino",
    install="pip install 'nanoexport[openvino]'",
    kv_cache_forms=("stateful",),  # the canonical growing cache, held in the IR as ReadValue/Assign states
    passes=lambda build: _lowering().lowering_passes(build),
    lower=lambda model, build: _lowering().lower(model, build),
    runner=lambda artifact: _runtime().Runner(artifact),
    stored_weights=lambda folder: _stored().stored_weights(folder),
)
