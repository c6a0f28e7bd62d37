"""The ``onnx`` target: the graph as ``model.onnx`` plus ``model.onnx.data``, run by ONNX Runtime.

With the growing (dynamic) cache the artifact is also an onnxruntime-genai model folder:
``genai_config.json`` and, beside it where genai looks for them, the tokenizer files.
With ``split_prefill_decode``, ``prefill.onnx`` (a fixed chunk of tokens) and ``decode.onnx`` (one token)
replace ``model.onnx``; both read their weights from the one ``model.onnx.data``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from nanoexport.artifact import Artifact, write_json
from nanoexport.capture.checkpoint import Checkpoint
from nanoexport.capture.onnx_export import kv_shape
from nanoexport.config import ExportConfig
from nanoexport.passes.kv_cache import specialize

NAME = "onnx"
RUNTIME = "onnxruntime"
KV_CACHE_FORMS = ("dynamic", "static", "sliding")  # the first is the default
MODEL_FILE = "model.onnx"
PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
WEIGHTS_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
GENAI_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class SkipRMSNorm(pattern.RewriteRuleClassBase):
    """Residual Add feeding an RMSNormalization -> ONNX Runtime's SkipSimplifiedLayerNormalization.

    One kernel reads both addends once and returns the normalized value and the sum (the next residual).
    """

    def pattern(self, op, x, skip, weight):
        total = op.Add(x, skip)
        normalized = op.RMSNormalization(total, weight, _allow_other_attributes=True, _outputs=["normalized"])
        return normalized, total

    def check(self, context, x, skip, weight, normalized, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        norm = normalized.producer()
        if norm.attributes.get_int("axis", -1) not in (-1, 2):
            return result.fail("only normalization over the last axis fuses")
        if x.shape is None or skip.shape is None or x.shape != skip.shape or x.shape.rank() != 3:
            return result.fail("both addends must be [batch, sequence, hidden] of one shape")
        if weight.shape is None or weight.shape.rank() != 1:
            return result.fail("the scale must be 1-D", weight)
        return result

    def rewrite(self, op, x, skip, weight, normalized, **_):
        epsilon = normalized.producer().attributes.get_float("epsilon", 1e-5)
        outputs = op.SkipSimplifiedLayerNormalization(
            x, skip, weight, epsilon=epsilon, _domain="com.microsoft", _outputs=4
        )
        # ONNX shape inference does not know vendor ops: record the shapes it cannot work out.
        statistics_shape = ir.Shape([*x.shape[:-1], 1])
        for value, shape in zip(outputs, (x.shape, statistics_shape, statistics_shape, x.shape)):
            value.shape, value.type = shape, ir.TensorType(ir.DataType.FLOAT)
        output, _mean, _inverse_std, total = outputs
        output.type = total.type = x.type
        return output, total


ORT_KERNEL_RULES = pattern.RewriteRuleSet([SkipRMSNorm.rule()])


def lower(model: ir.Model, config: ExportConfig, folder: Path, checkpoint: Checkpoint) -> list[str]:
    """Write ``model`` into ``folder`` for ONNX Runtime; returns the model files written."""
    if not config.split_prefill_decode:
        _use_ort_kernels(model)
        ir.save(model, folder / MODEL_FILE, external_data=WEIGHTS_FILE)
        genai_files = _write_genai_config(folder, checkpoint) if config.kv_cache == "dynamic" else []
        return [MODEL_FILE, WEIGHTS_FILE, *genai_files]
    # Reloaded copies are cheap (weights stay on disk) and their initializers keep pointing into the one
    # weights file, which each specialized graph then references rather than copies.
    ir.save(model, folder / MODEL_FILE, external_data=WEIGHTS_FILE)
    for file_name, sequence_length in ((PREFILL_FILE, config.prefill_chunk), (DECODE_FILE, 1)):
        graph = ir.load(folder / MODEL_FILE)
        specialize(graph, sequence_length)  # before the vendor ops, which ONNX shape inference does not know
        _use_ort_kernels(graph)
        ir.save(graph, folder / file_name)
    (folder / MODEL_FILE).unlink()
    return [PREFILL_FILE, DECODE_FILE, WEIGHTS_FILE]


def _use_ort_kernels(model: ir.Model) -> None:
    if ORT_KERNEL_RULES.apply_to_model(model):
        model.opset_imports.setdefault("com.microsoft", 1)


def _write_genai_config(folder: Path, checkpoint: Checkpoint) -> list[str]:
    """onnxruntime-genai's description of the decoder (greedy search by default); returns the files written."""
    hf = checkpoint.config
    kv_heads, head_dim = kv_shape(hf)
    eos = hf.eos_token_id if hf.eos_token_id is not None else 0
    first_eos = eos[0] if isinstance(eos, list) else eos
    context = getattr(hf, "max_position_embeddings", None) or getattr(hf, "n_positions", 2048)
    genai = {
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
            "past_present_share_buffer": False, "early_stopping": True, "length_penalty": 1.0,
            "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
    write_json(folder / GENAI_CONFIG, genai)
    # genai reads the tokenizer from the folder that holds genai_config.json.
    tokenizer_files = sorted(name for name in checkpoint.tokenizer_files if name in GENAI_TOKENIZER_FILES)
    for name in tokenizer_files:
        (folder / name).write_bytes(checkpoint.tokenizer_files[name])
    return [GENAI_CONFIG, *tokenizer_files]


class Runner:
    """Runs an onnx-target artifact on ONNX Runtime CPU, one call per forward step."""

    def __init__(self, artifact: Artifact):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        files = artifact.manifest["model_files"]

        def session(file_name: str):
            return ort.InferenceSession(str(artifact.file(file_name)), options, providers=["CPUExecutionProvider"])

        if PREFILL_FILE in files:
            self.sessions = {"prefill": session(PREFILL_FILE), "decode": session(DECODE_FILE)}
        else:
            self.sessions = {"prefill": session(MODEL_FILE)}
        self.output_names = [output.name for output in self.sessions["prefill"].get_outputs()]

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        one_token = feeds["input_ids"].shape[1] == 1
        session = self.sessions["decode"] if one_token and "decode" in self.sessions else self.sessions["prefill"]
        return dict(zip(self.output_names, session.run(self.output_names, feeds)))
