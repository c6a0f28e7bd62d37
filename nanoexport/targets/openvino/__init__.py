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


def _passes(build):
    from nanoexport.targets.openvino.lowering import lowering_passes

    return lowering_passes(build)


def _lower(model, build) -> list[str]:
    from nanoexport.targets.openvino.lowering import lower

    return lower(model, build)


def _runner(artifact):
    from nanoexport.targets.openvino.runtime import Runner

    return Runner(artifact)


TARGET = Target(
    name="openvino",
    runtime="openvino",
    install="pip install 'nanoexport[openvino]'",
    kv_cache_forms=("stateful",),  # the canonical growing cache, held in the IR as ReadValue/Assign states
    passes=_passes,
    lower=_lower,
    runner=_runner,
)
