"""onnxruntime-genai's files: ``genai_config.json`` describing the decoder, and the tokenizer files beside it.

genai runs the growing-cache artifact as it is; with every layer's cache appended inside
GroupQueryAttention it hands each layer one buffer as both past and present (``past_present_share_buffer``).
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from nanoexport.artifact import write_json
from nanoexport.capture.checkpoint import Checkpoint
from nanoexport.interface import kv_shape
from nanoexport.targets.onnx import MODEL_FILE
from nanoexport.targets.onnx.gqa import context_length

GENAI_CONFIG = "genai_config.json"
GENAI_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_genai_files(model: ir.Model, folder: Path, checkpoint: Checkpoint) -> list[str]:
    """Write genai's description of ``model`` (saved as ``MODEL_FILE``) and the tokenizer files genai reads into
    ``folder``; returns the files written."""
    write_json(folder / GENAI_CONFIG, _genai_config(checkpoint.config, _appends_in_kernel(model)))
    # genai reads the tokenizer from the folder that holds genai_config.json.
    tokenizer_files = sorted(name for name in checkpoint.tokenizer_files if name in GENAI_TOKENIZER_FILES)
    for name in tokenizer_files:
        (folder / name).write_bytes(checkpoint.tokenizer_files[name])
    return [GENAI_CONFIG, *tokenizer_files]


def _appends_in_kernel(model: ir.Model) -> bool:
    """Whether every layer appends to its cache inside GroupQueryAttention, so that genai may pass one
    buffer as both past and present."""
    presents = [value for value in model.graph.outputs if value.name.startswith("present.")]
    return bool(presents) and all(value.producer().op_type == "GroupQueryAttention" for value in presents)


def _genai_config(hf, shares_buffer: bool) -> dict:
    """genai's description of the decoder of ``hf`` (a transformers config), greedy search by default.

    ``shares_buffer``: genai allocates each layer's cache once at full length and passes it as both past and
    present, which the graph must write in place (GroupQueryAttention does; a Concat would not).
    """
    kv_heads, head_dim = kv_shape(hf)
    eos = hf.eos_token_id if hf.eos_token_id is not None else 0
    first_eos = eos[0] if isinstance(eos, list) else eos
    context = context_length(hf)
    return {
        "model": {
            # genai's gpt2 type expects one combined past tensor per layer; its generic decoder reads ours.
            "type": "llama" if hf.model_type == "gpt2" else hf.model_type,
            "bos_token_id": hf.bos_token_id if hf.bos_token_id is not None else first_eos,
            "eos_token_id": eos,
            "pad_token_id": hf.pad_token_id if hf.pad_token_id is not None else first_eos,
            "vocab_size": hf.vocab_size,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": head_dim,
                "hidden_size": hf.hidden_size,
                "num_attention_heads": hf.num_attention_heads,
                "num_hidden_layers": hf.num_hidden_layers,
                "num_key_value_heads": kv_heads,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context, "min_length": 0,
            "past_present_share_buffer": shares_buffer, "early_stopping": True, "length_penalty": 1.0,
            "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
