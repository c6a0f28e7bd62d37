"""Settings of the ``onnx`` target: the ``[onnx]`` table of the config file and the "onnx target" flags."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OnnxOptions:
    """Settings of the ``onnx`` target (ONNX Runtime, onnxruntime-genai)."""

    # Growing-cache artifacts hide the attention_mask's zero slots in attention, so left-padded batches give
    # each row's own results. Off, every attention_mask entry must be 1, the contract of onnxruntime-genai's
    # own artifacts (genai feeds such masks): the padding bias costs about 3% of the demo model's decode speed.
    padded_batches: bool = field(default=True, metadata={"help": (
        "left-padded batches give each row's own results: attention hides the attention_mask's zeros "
        "(default: on). --no-padded-batches: every mask entry must be 1, as in onnxruntime-genai's own "
        "artifacts; a few %% faster decode on small models")})
