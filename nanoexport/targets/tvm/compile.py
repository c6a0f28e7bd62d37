"""The compiled module: the prefill and decode graphs as two Relax functions over one parameter list,
compiled by TVM for one device, and the artifact's files (the library, the parameters, the signatures).

Both functions take their graph's inputs and then every parameter, in the same order, so one set of
weights serves both. Parameters are the graph's weights as the canonical graph stores them: packed
INT4/UINT4 as their raw bytes (two elements a byte, flat), INT8 as they are, scales in their type. What is
small (shape constants, rotary frequencies) is compiled into the library as constants.

Schedules: the kernels as TVM legalizes them, then TVM's default CPU rules (dlight's GEMV and reduction),
after the tuned schedules of a meta-schedule database when ``--tvm-database`` names one.
"""

from __future__ import annotations

import functools
import json
import tarfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx_ir as ir
import tvm
from tvm import relax

from nanoexport.errors import NanoexportError
from nanoexport.targets.tvm import safetensors_stream
from nanoexport.targets.tvm.relax_graph import DTYPES, QUANTIZED, GraphConverter
from nanoexport.targets.tvm.schedules import schedule_weight_matmuls

LIBRARY = "model.so"  # a shared library for this machine, which validation loads
ARCHIVE = "model.tar"  # object files for another device, linked there (TVM's exportable archive)
PARAMS = "params.safetensors"
SIGNATURES = "signatures.json"
CONSTANT_ELEMENTS = 64  # float initializers this small are compiled in as constants, not parameters


def is_parameter(value: ir.Value) -> bool:
    """Weights and what dequantizes them are parameters; shape constants and small tables are compiled in."""
    if value.const_value is None:
        return False
    if any(use.node.op_type == "DequantizeLinear" for use in value.uses()):
        return True
    return value.dtype.is_floating_point() and value.const_value.size > CONSTANT_ELEMENTS


def parameter_array(tensor: ir.TensorProtocol) -> np.ndarray:
    """A parameter's data as the function takes it: 4-bit integers as their packed bytes, flat."""
    if tensor.dtype in (ir.DataType.INT4, ir.DataType.UINT4):
        return np.frombuffer(tensor.tobytes(), np.uint8)
    if tensor.dtype in (ir.DataType.INT8, ir.DataType.UINT8):
        return tensor.numpy().reshape(-1)
    return tensor.numpy()


def _parameter_type(value: ir.Value) -> tuple[list[int], str]:
    count = int(np.prod([int(d) for d in value.shape]))
    if value.dtype in (ir.DataType.INT4, ir.DataType.UINT4):
        return [(count + 1) // 2], "uint8"
    if value.dtype in (ir.DataType.INT8, ir.DataType.UINT8):
        return [count], DTYPES[value.dtype]
    return [int(d) for d in value.shape], DTYPES[value.dtype]


def _describe(value: ir.Value) -> dict:
    return {"name": value.name, "shape": [int(d) for d in value.shape], "dtype": DTYPES[value.dtype]}


def build_module(graphs: dict[str, ir.Model]) -> tuple[tvm.IRModule, dict[str, ir.Value], dict]:
    """The Relax module of ``graphs`` (function name -> static graph), its parameters by name, and the
    functions' signatures."""
    parameters: dict[str, ir.Value] = {}
    for graph in graphs.values():
        for name, value in graph.graph.initializers.items():
            if is_parameter(value):
                known = parameters.setdefault(name, value)
                if _parameter_type(known) != _parameter_type(value):
                    raise NanoexportError(f"the prefill and decode graphs disagree on the weight {name}; report "
                                          "the model")
    names = sorted(parameters)
    quantized = {name for name in names if parameters[name].dtype in QUANTIZED}
    bb = relax.BlockBuilder()
    signatures = {}
    for function, model in graphs.items():
        inputs = {value.name: relax.Var(value.name, relax.TensorType([int(d) for d in value.shape],
                                                                          DTYPES[value.dtype]))
                  for value in model.graph.inputs}
        params = {name: relax.Var(name, relax.TensorType(*_parameter_type(parameters[name])))
                  for name in names}
        with bb.function(function, [*inputs.values(), *params.values()]):
            with bb.dataflow():
                graph_params = {name: params[name] for name in model.graph.initializers if name in params}
                outputs = GraphConverter(bb, graph_params, quantized).convert(model.graph, inputs)
                result = bb.emit_output(relax.Tuple(outputs))
            bb.emit_func_output(result)
        signatures[function] = {"inputs": [_describe(value) for value in model.graph.inputs],
                                "outputs": [_describe(value) for value in model.graph.outputs]}
    return bb.get(), parameters, {"params": names, "functions": signatures, "quantized": _quantized(graphs)}


def _quantized(graphs: dict[str, ir.Model]) -> dict[str, dict]:
    """Per packed parameter, what reading it back needs: its logical shape and type, its scale and zero point."""
    described = {}
    for model in graphs.values():
        for node in model.graph:
            if node.op_type == "DequantizeLinear" and is_parameter(node.inputs[0]) and \
                    node.inputs[0].dtype in QUANTIZED:
                zero = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
                described[node.inputs[0].name] = {
                    "shape": [int(d) for d in node.inputs[0].shape], "type": QUANTIZED[node.inputs[0].dtype],
                    "scale": node.inputs[1].name, "zero_point": zero.name if zero is not None else None}
    return dict(sorted(described.items()))


def compile_module(module: tvm.IRModule, target: tvm.target.Target, database: str = "") -> relax.VMExecutable:
    """``module`` compiled for ``target``: legalized kernels, tuned schedules from ``database`` if given,
    then TVM's default CPU schedule rules."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight

    passes = [*cpu_generic.library_dispatch_passes(target), *cpu_generic.legalize_passes(target)]
    if database:  # checked to be a folder before capture
        passes.append(relax.transform.MetaScheduleApplyDatabase(database))
    passes.append(schedule_weight_matmuls)
    passes.append(dlight.ApplyDefaultSchedule(dlight.cpu.GEMV(), dlight.cpu.Reduction()))
    passes += [*cpu_generic.dataflow_lower_passes(target), *cpu_generic.finalize_passes(target)]

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod: tvm.IRModule, _context) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return tvm.compile(module, target, relax_pipeline=pipeline)


def _deterministic_tar(output: str, files: list[str], options=None, **_) -> None:
    """TVM's archive of object files, without the timestamps and owners a plain ``tar`` records."""
    with tarfile.open(output, "w") as archive:
        for path in sorted(files):
            info = archive.gettarinfo(path, arcname=Path(path).name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(path, "rb") as data:
                archive.addfile(info, data)


_deterministic_tar.output_format = "tar"


def write_library(executable: relax.VMExecutable, folder: Path, host: bool) -> str:
    """The shared library for this machine, or the archive of object files for another device."""
    if host:
        executable.export_library(str(folder / LIBRARY))
        return LIBRARY
    executable.export_library(str(folder / ARCHIVE), fcompile=_deterministic_tar)
    return ARCHIVE


def write_parameters(parameters: dict[str, ir.Value], folder: Path) -> str:
    """The parameters as one safetensors file, each as the functions take it (``parameter_array``): the bytes
    ``safetensors.numpy.save_file`` writes from all the arrays at once, written holding one at a time."""
    sources = {}
    for name, value in parameters.items():
        shape, dtype = _parameter_type(value)
        sources[name] = safetensors_stream.Source(dtype, tuple(shape),
                                                  functools.partial(_write_parameter, value.const_value))
    safetensors_stream.save_file(sources, folder / PARAMS)
    return PARAMS


def _write_parameter(tensor: ir.TensorProtocol, file: BinaryIO) -> None:
    """``tensor``'s bytes as ``parameter_array`` gives them. A weight in an external data file (the scratch
    canonical graph's) is copied from that file in chunks: neither mapped (a mapped file's pages count in the
    process's resident memory until it is unmapped) nor unpacked (``ExternalTensor`` loads 4-bit data at a
    byte per element). Any other tensor is read, written and dropped."""
    if isinstance(tensor, ir.ExternalTensor):
        tensor.tofile(file)
    else:
        safetensors_stream.write_array(file, parameter_array(tensor))


def write_signatures(signatures: dict, target: tvm.target.Target, library: str, folder: Path) -> str:
    """Which file holds what, the device compiled for, and each function's inputs and outputs (the parameters
    follow the inputs, in the order of ``params``)."""
    description = {"library": library, "params_file": PARAMS, "target": json.loads(str(target)), **signatures}
    (folder / SIGNATURES).write_text(json.dumps(description, indent=1, sort_keys=True) + "\n")
    return SIGNATURES
