"""What in a saved package may keep work off the Neural Engine, found before a device run.

Apple does not publish the Neural Engine's rules. These checks encode limits that are documented by
Apple's tools (it computes in fp16) or reported by users with reproductions (the sources are named in each
finding); a clean report is no guarantee, and a finding is a risk, not a verdict.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from coremltools.proto import MIL_pb2, Model_pb2

from nanoexport.targets.coreml.interpreter import MODEL_FILE, WEIGHTS_FOLDER

REPORT_FILE = "neural_engine.json"
LARGEST_DIMENSION = 16384  # ONNX Runtime's Core ML provider refuses larger dimensions
STATE_ALIGNMENT = 32
LARGEST_WEIGHTS_FILE = 2**31
EXAMPLES = 6  # ops named per finding and function; the count covers the rest
INDEX_ARGUMENTS = ("indices", "begin", "end")  # integer by nature: not integer arithmetic

RULES = {
    "wide types": ("fp32 or int32 tensors: the Neural Engine computes in fp16, so these ops run on the CPU or GPU",
                   "coremltools documentation, 'Typed execution'"),
    "large dimension": (f"a dimension over {LARGEST_DIMENSION}: split the tensor (usually the output head)",
                        "onnxruntime Core ML provider: 'input dim > 16384'"),
    "dynamic shape": ("a dimension fixed only at run time: the Neural Engine compiles static shapes",
                      "coremltools documentation, 'Flexible input shapes'"),
    "state alignment": (f"a state whose last dimension is not a multiple of {STATE_ALIGNMENT}",
                        "coremltools issue #2631"),
    "run-time cache write": ("slice_update at a position computed at run time (the KV-cache write)",
                             "coremltools issue #2553, apple/coreai-torch issue #6"),
    "weights over 2 GB": ("a weight file over 2 GB fails to load", "coremltools issue #1807"),
}


def neural_engine_report(package: Path) -> list[dict[str, Any]]:
    """Findings in the package at ``package``: rule, why, source, and per function the ops concerned."""
    spec = Model_pb2.Model()
    spec.ParseFromString((package / MODEL_FILE).read_bytes())
    found: dict[str, dict[str, list[str]]] = {}
    for function_name, function in sorted(spec.mlProgram.functions.items()):
        for rule, where in [*_input_findings(function), *_op_findings(function)]:
            found.setdefault(rule, {}).setdefault(function_name, []).append(where)
    for weights in sorted((package / WEIGHTS_FOLDER).glob("*")):
        if weights.stat().st_size > LARGEST_WEIGHTS_FILE:
            found.setdefault("weights over 2 GB", {}).setdefault("package", []).append(weights.name)
    return [
        {"rule": rule, "why": RULES[rule][0], "source": RULES[rule][1],
         "functions": {name: _summary(places) for name, places in sorted(functions.items())}}
        for rule, functions in found.items()
    ]


def _input_findings(function) -> Iterator[tuple[str, str]]:
    for value in function.inputs:
        tensor = _tensor(value.type)
        if any(not dimension.HasField("constant") for dimension in tensor.dimensions):
            yield "dynamic shape", f"input {value.name}"
        if value.type.HasField("stateType") and _shape(tensor)[-1] % STATE_ALIGNMENT:
            yield "state alignment", f"state {value.name} {_shape(tensor)}"


def _op_findings(function) -> Iterator[tuple[str, str]]:
    types = {value.name: _tensor(value.type) for value in function.inputs}  # of every computed value so far
    for op in function.block_specializations[function.opset].operations:
        if op.type == "const" or op.type.startswith("constexpr_"):
            continue
        computed = {name: [types[binding.name] for binding in argument.arguments
                           if binding.WhichOneof("binding") == "name" and binding.name in types]
                    for name, argument in op.inputs.items()}
        outputs = [_tensor(output.type) for output in op.outputs]
        types.update({output.name: tensor for output, tensor in zip(op.outputs, outputs)})
        tensors = [tensor for name, read in computed.items() if name not in INDEX_ARGUMENTS for tensor in read]
        tensors += outputs
        described = f"{op.type} {op.outputs[0].name if op.outputs else op.inputs['input'].arguments[0].name}"
        if any(tensor.dataType in (MIL_pb2.FLOAT32, MIL_pb2.INT32) for tensor in tensors):
            yield "wide types", described
        shapes = [_shape(tensor) for tensor in tensors]
        if any(size > LARGEST_DIMENSION for shape in shapes for size in shape):
            yield "large dimension", f"{described} {max(shapes, key=lambda shape: max(shape, default=0))}"
        if op.type == "slice_update" and computed.get("begin"):
            yield "run-time cache write", described


def _tensor(value_type):
    return value_type.stateType.wrappedType.tensorType if value_type.HasField("stateType") else value_type.tensorType


def _shape(tensor) -> tuple[int, ...]:
    return tuple(dimension.constant.size for dimension in tensor.dimensions)


def _summary(places: list[str]) -> dict[str, Any]:
    return {"count": len(places), "examples": places[:EXAMPLES]}
