"""Validation's way to run an openvino artifact: the model on OpenVINO CPU, driven through the explicit-cache
interface every target's runner offers."""

from __future__ import annotations

import numpy as np
import openvino as ov

from nanoexport.artifact import Artifact
from nanoexport.targets.openvino.files import MODEL_FILE, WEIGHTS_FILE
from nanoexport.targets.openvino.ir_check import check_ir
from nanoexport.targets.openvino.onnx_rules import PAST_PREFIX
from nanoexport.targets.openvino.ov_passes import present_name

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# Validation measures our graph, so the CPU plugin computes as the reference does. Its defaults on this CPU
# moved the demo's logits by 0.05 (bf16 compute), KV consistency by 0.037 (u8 KV cache) and the int4 model's
# logits by 0.077 (int8-quantized activations); with these the fp32 artifact matches PyTorch within 2e-5.
VALIDATION_PROPERTIES = {
    "INFERENCE_PRECISION_HINT": "f32",
    "KV_CACHE_PRECISION": "f32",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0",
}


class Runner:
    """Runs an openvino artifact on OpenVINO CPU through the explicit-cache interface.

    Each call writes the past tensors into the model's states (or resets them when the past is empty), runs
    one inference and returns the states as the present tensors: validation drives every target the same way.
    """

    def __init__(self, artifact: Artifact):
        check_ir(artifact.file(MODEL_FILE), artifact.file(WEIGHTS_FILE))  # OpenVINO crashes on some damage
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
