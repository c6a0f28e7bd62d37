"""Writing and running ``model.mlpackage``: the prefill and decode functions lowered to MIL, saved
reproducibly, and run for validation (coremltools prediction on macOS, our MIL interpreter elsewhere)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from nanoexport.artifact import Artifact, write_json
from nanoexport.targets import Build
from nanoexport.passes.kv_cache import specialize

# coremltools warns on import about its optional native parts (absent on Linux) and untested torch versions.
logging.getLogger("coremltools").setLevel(logging.ERROR)

import coremltools as ct  # noqa: E402
from coremltools.converters.mil.mil import Program  # noqa: E402
from coremltools.converters.mil.backend.mil.load import CoreMLProtoExporter  # noqa: E402
from coremltools.converters.mil.converter import _construct_other_pipelines  # noqa: E402
from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipelineManager  # noqa: E402
from coremltools.models.utils import _create_mlpackage  # noqa: E402
from coremltools.proto import Model_pb2  # noqa: E402

from nanoexport.targets.coreml.interpreter import MODEL_FILE, Interpreter  # noqa: E402
from nanoexport.targets.coreml.lowering import CACHE_PREFIX, lower_graph, state_name  # noqa: E402
from nanoexport.targets.coreml.neural_engine import REPORT_FILE, neural_engine_report  # noqa: E402
from nanoexport.targets.coreml.weights import StreamingExporter, WeightStore, deduplicate  # noqa: E402

log = logging.getLogger(__name__)

PACKAGE = "model.mlpackage"
FUNCTIONS = ("prefill", "decode")
INPUTS = ("input_ids", "position_ids", "attention_mask", "cache_position")
CONVERSION_DATE = "com.github.apple.coremltools.conversion_date"
SPECIFICATION_VERSION = ct.target.iOS18.value  # multifunction packages need iOS 18 / macOS 15
# The backend passes ct.convert runs on a MIL program when no optional pass is asked for.
_, BACKEND_PIPELINE = _construct_other_pipelines(ct.PassPipeline.EMPTY, "milinternal", "mlprogram")


def lower(model: ir.Model, build: Build) -> list[str]:
    """Write ``model`` as ``model.mlpackage`` into the build folder, with its Neural Engine report; returns the
    files."""
    folder = build.folder
    with tempfile.TemporaryDirectory() as scratch:
        # Each function specializes its own copy; reloaded copies leave the weights on disk until lowered, and
        # lowered weights wait in the store's file, not in memory, until the package is written.
        canonical = Path(scratch) / "canonical.onnx"
        build.save_onnx(model, canonical, external_data="canonical.onnx.data")
        with WeightStore(Path(scratch) / "constants.bin") as store:

            def functions() -> Iterator[tuple[str, Program]]:
                for function, length in zip(FUNCTIONS, (build.cache.prefill_chunk, 1)):
                    graph = ir.load(canonical)
                    specialize(graph, length)
                    yield function, lower_graph(graph, store)

            write_package(functions(), folder / PACKAGE, store)
    findings = neural_engine_report(folder / PACKAGE)
    write_json(folder / REPORT_FILE, findings)
    if findings:
        log.warning("coreml: %d Neural Engine risks (%s); see %s", len(findings),
                    ", ".join(finding["rule"] for finding in findings), REPORT_FILE)
    return [PACKAGE, REPORT_FILE]


def write_package(functions: Iterable[tuple[str, Program]], package: Path, store: WeightStore | None = None) -> None:
    """Save MIL programs as the named functions of one ``.mlpackage`` (the last is the default one); ``store``
    holds the real arrays of the programs' placeholders, if they were lowered with one.

    Constants that the functions share are stored once, and the bytes depend only on the programs: they are
    the bytes coremltools' ``convert`` of each program and ``save_multifunction`` of the results give, written
    without the two intermediate packages and their in-memory reloads.
    """
    if store is None:
        with tempfile.TemporaryDirectory() as scratch, WeightStore(Path(scratch) / "constants.bin") as store:
            return write_package(functions, package, store)
    with tempfile.TemporaryDirectory() as scratch, _quiet():
        program = Program()
        for name, function_program in functions:
            # What convert runs with no optional passes: the backend's own rewrites (names, IO types).
            PassPipelineManager.apply_pipeline(function_program, BACKEND_PIPELINE)
            program.add_function(name, function_program.functions["main"])
            program.default_function_name = name
        deduplicate(program, store)
        _number_state_writes(program)
        program.export_as_multifunction = True
        weights = Path(scratch) / "weights"
        weights.mkdir()
        exporter = StreamingExporter(program, str(weights), SPECIFICATION_VERSION, store)
        mil = exporter.export()
        exporter.close()
        spec = CoreMLProtoExporter(
            program, mil, None, None, classifier_config=None, convert_to="mlprogram", convert_from="milinternal",
            specification_version=SPECIFICATION_VERSION,
        ).export(SPECIFICATION_VERSION)
        _create_mlpackage(spec, str(weights), str(package))
    _make_reproducible(package)


def _number_state_writes(program: Program) -> None:
    """Name the state writes with one count over all functions, as coremltools named them when it reloaded
    each function's package to merge them (how packages were written before): the same programs keep giving
    the same bytes."""
    writes = (op for function in program.functions.values() for op in function.operations
              if op.op_type == "coreml_update_state")
    for index, op in enumerate(writes):
        op.name = f"coreml_update_state_{index}"
        op.outputs[0].set_name(op.name)


@contextlib.contextmanager
def _quiet():
    """coremltools draws progress bars on stderr for every pass pipeline it runs; errors still raise."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _make_reproducible(package: Path) -> None:
    """Same inputs, same bytes: drop the conversion date, serialize deterministically, and replace the
    package manifest's random item identifiers with ones derived from the item paths."""
    model_file = package / MODEL_FILE
    spec = Model_pb2.Model()
    spec.ParseFromString(model_file.read_bytes())
    spec.description.metadata.userDefined.pop(CONVERSION_DATE, None)
    model_file.write_bytes(spec.SerializeToString(deterministic=True))

    manifest_file = package / "Manifest.json"
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    renamed = {key: str(uuid.uuid5(uuid.NAMESPACE_URL, item["path"])).upper()
               for key, item in manifest["itemInfoEntries"].items()}
    manifest["itemInfoEntries"] = {renamed[key]: item for key, item in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_file.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n", encoding="utf-8")


def validation_notes(artifact: Artifact) -> list[str]:
    """The Neural Engine report, re-read from the saved package, as lines for the validation report."""
    notes = []
    for finding in neural_engine_report(artifact.file(PACKAGE)):
        where = ", ".join(f"{name}: {places['count']} ops" for name, places in finding["functions"].items())
        notes.append(f"Neural Engine risk, {finding['rule']}: {finding['why']} ({where}; {finding['source']})")
    return notes


class Runner:
    """Runs a coreml artifact through the explicit-cache interface: the past tensors are written into the
    states, the function for the call's length runs, and the states come back as the present tensors."""

    def __init__(self, artifact: Artifact):
        package = artifact.file(PACKAGE)
        self.run = _predict_with_coreml(package) if sys.platform == "darwin" else _interpret(package)

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        function = "decode" if feeds["input_ids"].shape[1] == 1 else "prefill"
        inputs = {name: feeds[name].astype(np.int32) for name in INPUTS}
        caches = [name for name in feeds if name.startswith(CACHE_PREFIX)]
        states = {state_name(name): feeds[name].astype(np.float16) for name in caches}
        logits, states = self.run(function, inputs, states)
        present = {name.replace(CACHE_PREFIX, "present.", 1): states[state_name(name)].astype(np.float32)
                   for name in caches}
        return {"logits": logits.astype(np.float32), **present}


StatefulRun = Callable[[str, dict[str, np.ndarray], dict[str, np.ndarray]], tuple[np.ndarray, dict[str, np.ndarray]]]


def _interpret(package: Path) -> StatefulRun:
    interpreter = Interpreter(package)

    def run(function: str, inputs: dict[str, np.ndarray], states: dict[str, np.ndarray]):
        interpreter.states.update(states)
        logits = interpreter.run(function, inputs)["logits"]
        return logits, {name: interpreter.states[name] for name in states}

    return run


def _predict_with_coreml(package: Path) -> StatefulRun:
    """Core ML itself (macOS 15 or later). Not exercised by our Linux CI."""
    models = {function: ct.models.MLModel(str(package), function_name=function) for function in FUNCTIONS}

    def run(function: str, inputs: dict[str, np.ndarray], states: dict[str, np.ndarray]):
        model = models[function]
        state = model.make_state()
        for name, value in states.items():
            state.write_state(name, value)
        logits = model.predict(inputs, state=state)["logits"]
        return logits, {name: state.read_state(name) for name in states}

    return run
