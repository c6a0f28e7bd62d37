"""Running an onnx-target artifact on ONNX Runtime, the way validation drives it."""

from __future__ import annotations

import numpy as np

from nanoexport.artifact import Artifact
from nanoexport.runtime import cpu_session
from nanoexport.targets.onnx import DECODE_FILE, MODEL_FILE, PREFILL_FILE


class Runner:
    """Runs an onnx-target artifact on ONNX Runtime CPU, one call per forward step."""

    def __init__(self, artifact: Artifact):
        files = artifact.manifest["model_files"]

        def session(file_name: str):
            return cpu_session(artifact.file(file_name))

        if PREFILL_FILE in files:
            self.sessions = {"prefill": session(PREFILL_FILE), "decode": session(DECODE_FILE)}
        else:
            self.sessions = {"prefill": session(MODEL_FILE)}
        self.output_names = [output.name for output in self.sessions["prefill"].get_outputs()]

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        one_token = feeds["input_ids"].shape[1] == 1
        session = self.sessions["decode"] if one_token and "decode" in self.sessions else self.sessions["prefill"]
        return dict(zip(self.output_names, session.run(self.output_names, feeds)))
