"""Running a qnn artifact: its parts in order on the HTP backend (emulated on x86) or ONNX Runtime CPU, and
validation's note comparing the two on the same QDQ graphs."""

from __future__ import annotations

import importlib.util

import numpy as np

from nanoexport.artifact import Artifact
from nanoexport.interface import ArtifactDecoder, prompts_for
from nanoexport.onnx_file import check_onnx_file, open_session
from nanoexport.targets.qnn.compile import context_file, qnn_session_options
from nanoexport.targets.qnn.options import QnnOptions
from nanoexport.targets.qnn.parts import parts_of

# ONNX Runtime CPU runs the QDQ graphs as written (float ops between Q/DQ pairs) instead of fusing uint8
# pairs into integer kernels, whose MatMulIntegerToFloat fails on the batched attention MatMuls of W8A8.
QDQ_AS_FLOAT = {"session.disable_quant_qdq": "1"}


def settings_of(artifact: Artifact) -> QnnOptions:
    """The SoC settings the artifact was built for (the defaults for artifacts written before the options)."""
    return QnnOptions(**artifact.manifest["config"].get("qnn", {}))


class Runner:
    """Runs a qnn artifact through the explicit-cache interface, writing the new rows into the buffers.

    The parts run in order, each fed the hidden state the one before it gave. ``backend="htp"``: the QNN
    provider's HTP backend (emulated on x86) for the artifact's SoC, no CPU fallback, on the compiled EPContext
    models when the artifact has them; ``"cpu"``: the same QDQ graphs on ONNX Runtime CPU. Default: HTP when
    onnxruntime-qnn is installed.
    """

    def __init__(self, artifact: Artifact, backend: str | None = None):
        import onnxruntime as ort

        if backend is None:
            backend = "htp" if importlib.util.find_spec("onnxruntime_qnn") else "cpu"
        self.backend = backend
        files = artifact.manifest["model_files"]
        settings = settings_of(artifact)
        self.parts = []  # per part: graph name -> session
        for part in parts_of(artifact):
            sessions = {}
            for name, file_name in part["graphs"].items():
                if backend == "htp":
                    compiled = context_file(file_name)
                    # The emulator cannot load a weight-shared binary: compile the same QDQ graph in the session.
                    loadable = compiled in files and not settings.share_weights
                    path = artifact.file(compiled if loadable else file_name)
                    check_onnx_file(path, artifact.path)
                    sessions[name] = ort.InferenceSession(str(path), qnn_session_options(settings))
                else:
                    sessions[name] = open_session(artifact.file(file_name), artifact.path,
                                                  session_config=QDQ_AS_FLOAT)
            self.parts.append(sessions)

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = "decode" if feeds["input_ids"].shape[1] == 1 else "prefill"
        values = dict(feeds)
        for sessions in self.parts:
            session = sessions[name]
            names = [output.name for output in session.get_outputs()]
            values.update(zip(names, session.run(names, {value.name: values[value.name]
                                                         for value in session.get_inputs()})))
        outputs = {"logits": values["logits"]}
        start = int(feeds["cache_position"][0])
        for past in feeds:
            if past.startswith("past_key_values."):
                present = past.replace("past_key_values.", "present.", 1)
                buffer, rows = feeds[past].copy(), values[present]
                buffer[:, :, start : start + rows.shape[2]] = rows[:, :, : buffer.shape[2] - start]
                outputs[present] = buffer
        return outputs


def validation_notes(artifact: Artifact) -> list[str]:
    """HTP against ONNX Runtime CPU on the same QDQ graphs: backend error, apart from quantization error."""
    if importlib.util.find_spec("onnxruntime_qnn") is None:
        return ["validated on ONNX Runtime CPU only; pip install 'nanoexport[qnn]' to run the HTP emulator too"]
    kv_cache = artifact.manifest["io"]["kv_cache"]
    htp = ArtifactDecoder(Runner(artifact, "htp"), kv_cache)
    cpu = ArtifactDecoder(Runner(artifact, "cpu"), kv_cache)
    worst, agree, positions = 0.0, 0, 0
    for prompt in prompts_for(artifact.path, htp.vocab_size):
        ours, theirs = htp.full_logits(prompt), cpu.full_logits(prompt)
        worst = max(worst, float(np.abs(ours - theirs).max()))
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        positions += len(prompt)
    settings = settings_of(artifact)
    notes = [
        f"HTP (QNN provider, soc {settings.soc_model}, every node on QNN) vs ONNX Runtime CPU on the same QDQ "
        f"graphs: logits max-abs {worst:.4f}, top-1 agreement {agree / positions:.3f} over {positions} positions",
    ]
    if settings.share_weights:
        notes.append("HTP ran the QDQ graphs compiled again: the x86 emulator cannot load the weight-shared "
                     "context binaries, which were not run")
    return notes
