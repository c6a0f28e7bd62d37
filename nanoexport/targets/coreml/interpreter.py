"""A numpy interpreter for the MIL program of a saved ``.mlpackage``: Core ML does not run on Linux.

It reads what ships, not in-memory objects: the program from ``Data/com.apple.CoreML/model.mlmodel`` and the
weights from the blob file beside it. Each op computes in fp32 (or int32) and rounds its result to the
dtype the program declares for that output, so fp16 tensors are rounded between ops as on a device; inside
one op (a matmul's sums, a layer norm's statistics) accumulation is fp32, as reported for Apple's GPU (the
Neural Engine may round more). States live in the ``Interpreter`` and persist across calls, as an
``MLState`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from coremltools.proto import MIL_pb2, Model_pb2

from nanoexport.artifact import inside
from nanoexport.errors import NanoexportError

MODEL_FILE = Path("Data/com.apple.CoreML/model.mlmodel")
WEIGHTS_FOLDER = Path("Data/com.apple.CoreML/weights")
BLOB_PREFIX = "@model_path/weights/"
BLOB_SENTINEL = 0xDEADBEEF
DTYPES = {
    MIL_pb2.FLOAT16: np.float16,
    MIL_pb2.FLOAT32: np.float32,
    MIL_pb2.INT32: np.int32,
    MIL_pb2.INT8: np.int8,
    MIL_pb2.UINT8: np.uint8,
    MIL_pb2.INT4: np.int8,  # unpacked from nibbles
    MIL_pb2.UINT4: np.uint8,
    MIL_pb2.BOOL: np.bool_,
}
NIBBLE_TYPES = (MIL_pb2.INT4, MIL_pb2.UINT4)


class Interpreter:
    """The functions of one ``.mlpackage``, its weights, and the current value of each state."""

    def __init__(self, package: Path):
        spec = Model_pb2.Model()
        spec.ParseFromString((package / MODEL_FILE).read_bytes())
        if not spec.HasField("mlProgram"):
            raise NanoexportError(f"{package} holds no ML program; re-export it")
        self.functions = dict(spec.mlProgram.functions)
        self.weights_folder = package / WEIGHTS_FOLDER
        self.blobs: dict[str, np.ndarray] = {}  # weight files, mapped
        self.constants: dict[str, dict[str, Any]] = {}  # per function, evaluated on its first run
        self.states: dict[str, np.ndarray] = {}
        for function in self.functions.values():
            for value in function.inputs:
                if value.type.HasField("stateType"):
                    tensor = value.type.stateType.wrappedType.tensorType
                    self.states[value.name] = np.zeros(_shape(tensor), DTYPES[tensor.dataType])

    def run(self, function_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one function on ``inputs``; reads and writes ``self.states``; returns the function's outputs."""
        function = self.functions[function_name]
        block = function.block_specializations[function.opset]
        env = dict(self._constants(function_name))
        for value in function.inputs:
            if value.type.HasField("stateType"):
                env[value.name] = value.name  # a state is referred to by name
            else:
                tensor = value.type.tensorType
                env[value.name] = np.asarray(inputs[value.name], DTYPES[tensor.dataType]).reshape(_shape(tensor))
        for op in block.operations:
            if not _is_constant(op):
                self._run_op(op, env)
        return {name: env[name] for name in block.outputs}

    def _constants(self, function_name: str) -> dict[str, Any]:
        """The function's constants and decompressed weights, stored widened to fp32 (exact) once."""
        if function_name not in self.constants:
            function = self.functions[function_name]
            env: dict[str, Any] = {}
            for op in function.block_specializations[function.opset].operations:
                if _is_constant(op):
                    self._run_op(op, env)
            self.constants[function_name] = {name: _widen(value) for name, value in env.items()}
        return self.constants[function_name]

    def immediate_inputs(self, op) -> dict[str, np.ndarray]:
        """The inputs of ``op`` given as values in the program (a constexpr op's weights), as stored."""
        return {name: self._value(argument.arguments[0].value) for name, argument in op.inputs.items()
                if argument.arguments and argument.arguments[0].WhichOneof("binding") == "value"}

    def _run_op(self, op, env: dict[str, Any]) -> None:
        if op.type == "const":
            env[op.outputs[0].name] = self._value(op.attributes["val"])
            return
        arguments = {name: [self._argument(binding, env) for binding in argument.arguments]
                     for name, argument in op.inputs.items()}
        if op.type == "read_state":
            env[op.outputs[0].name] = self.states[arguments["input"][0]].copy()
            return
        if op.type == "write_state":
            state = arguments["input"][0]
            self.states[state] = arguments["data"][0].astype(self.states[state].dtype)
            return
        kernel = KERNELS.get(op.type)
        if kernel is None:
            raise NanoexportError(f"the MIL interpreter has no kernel for op {op.type}; it cannot run this package")
        inputs = {name: values if name == "values" else values[0] for name, values in arguments.items()}
        results = kernel(**{name: _widen(value) for name, value in inputs.items()})
        results = results if isinstance(results, (list, tuple)) else [results]
        for output, result in zip(op.outputs, results):
            tensor = output.type.tensorType
            env[output.name] = np.asarray(result, DTYPES[tensor.dataType]).reshape(_shape(tensor))

    def _argument(self, binding, env: dict[str, Any]):
        return env[binding.name] if binding.WhichOneof("binding") == "name" else self._value(binding.value)

    def _value(self, value) -> np.ndarray | str:
        tensor_type = value.type.tensorType
        dtype = tensor_type.dataType
        if dtype == MIL_pb2.STRING:  # op options such as cast's dtype or gelu's mode
            return value.immediateValue.tensor.strings.values[0]
        if value.HasField("blobFileValue"):
            data = self._blob(value.blobFileValue)
        else:
            data = _immediate(value.immediateValue.tensor)
        if dtype in NIBBLE_TYPES:
            data = _unpack_nibbles(data, math.prod(_shape(tensor_type)), signed=dtype == MIL_pb2.INT4)
        elif isinstance(data, bytes):
            data = np.frombuffer(data, DTYPES[dtype])
        return np.asarray(data, DTYPES[dtype]).reshape(_shape(tensor_type))

    def _blob(self, blob) -> bytes:
        """One record of a weight file: a 64-byte header (sentinel, type, size, data offset), then the data."""
        if not blob.fileName.startswith(BLOB_PREFIX):
            raise NanoexportError(f"weight file {blob.fileName} is outside the package; re-export it")
        name = blob.fileName[len(BLOB_PREFIX):]
        if name not in self.blobs:
            self.blobs[name] = np.memmap(inside(self.weights_folder, name), np.uint8, mode="r")
        data = self.blobs[name]
        sentinel, _dtype = data[blob.offset : blob.offset + 8].view("<u4")
        size, offset = data[blob.offset + 8 : blob.offset + 24].view("<u8")
        if sentinel != BLOB_SENTINEL:
            raise NanoexportError(f"weight record at offset {blob.offset} of {name} is damaged; re-export it")
        return data[offset : offset + size].tobytes()


def _is_constant(op) -> bool:
    return op.type == "const" or op.type.startswith("constexpr_")


def _shape(tensor_type) -> tuple[int, ...]:
    return tuple(dimension.constant.size for dimension in tensor_type.dimensions)


def _immediate(tensor) -> Any:
    kind = tensor.WhichOneof("value")
    values = getattr(tensor, kind).values
    return bytes(values) if kind == "bytes" else list(values)


def _unpack_nibbles(data: bytes, count: int, signed: bool) -> np.ndarray:
    """4-bit integers, packed two to a byte, the first in the low nibble."""
    packed = np.frombuffer(data, np.uint8)
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1)[:count].astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles) if signed else nibbles.astype(np.uint8)


def _widen(value: Any) -> Any:
    """fp16 -> fp32 before computing: each kernel computes in fp32, its result is rounded to the declared type."""
    if isinstance(value, list):
        return [_widen(item) for item in value]
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(np.float32)
    return value


# --- kernels: MIL op -> numpy, arguments by their MIL names --------------------------------------------------


def _slice_index(begin, end, stride=None) -> tuple[slice, ...]:
    stride = [1] * len(begin) if stride is None else stride
    return tuple(slice(int(b), int(e), int(s)) for b, e, s in zip(begin, end, stride))


def _slice_by_index(x, begin, end, stride=None):
    return x[_slice_index(begin, end, stride)]


def _slice_update(x, update, begin, end, stride=None):
    result = x.copy()
    result[_slice_index(begin, end, stride)] = update
    return result


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))  # no overflow for large negative x


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def _scaled_dot_product_attention(query, key, value, attn_mask=None):
    scores = query @ np.swapaxes(key, -1, -2) / np.float32(math.sqrt(query.shape[-1]))
    if attn_mask is not None:
        scores = np.where(attn_mask, scores, -np.inf) if attn_mask.dtype == np.bool_ else scores + attn_mask
    return _softmax(scores, -1) @ value


def _layer_norm(x, axes, gamma=None, beta=None, epsilon=1e-5):
    axes = tuple(int(axis) for axis in axes)
    centered = x - x.mean(axis=axes, keepdims=True)
    result = centered / np.sqrt((centered * centered).mean(axis=axes, keepdims=True) + epsilon)
    result = result if gamma is None else result * gamma
    return result if beta is None else result + beta


def _gelu(x, mode="EXACT"):
    if str(mode) == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _blockwise_shift_scale(data, scale, offset=None):
    """``scale * (data - offset)``, each scale and offset repeated over its block."""
    expand = [data_size // scale_size for data_size, scale_size in zip(data.shape, scale.shape)]

    def repeat(array):
        for axis, block in enumerate(expand):
            array = np.repeat(array, block, axis)
        return array

    integers = data.astype(np.float32)
    if offset is not None:
        integers = integers - repeat(offset.astype(np.float32))
    return repeat(scale) * integers


def _lut_to_dense(indices, lut, vector_axis=None):
    """Each index looked up in its block's table: ``lut`` is ``[blocks per axis..., entries, 1]``."""
    if lut.shape[-1] != 1:
        raise NanoexportError("the MIL interpreter reads scalar lookup tables only, not vector palettes")
    block = [size // groups for size, groups in zip(indices.shape, lut.shape[:-2])]
    groups = np.ix_(*(np.arange(size) // step for size, step in zip(indices.shape, block)))  # broadcast, not tiled
    return lut[(*groups, indices.astype(np.intp), 0)]


def _split(x, axis, split_sizes):
    return np.split(x, np.cumsum(split_sizes)[:-1], axis=int(axis))


KERNELS: dict[str, Callable[..., Any]] = {
    "add": lambda x, y: x + y,
    "sub": lambda x, y: x - y,
    "mul": lambda x, y: x * y,
    "real_div": lambda x, y: x / y,
    "less_equal": lambda x, y: x <= y,
    "greater": lambda x, y: x > y,
    "logical_and": lambda x, y: np.logical_and(x, y),
    "cos": lambda x: np.cos(x),
    "sin": lambda x: np.sin(x),
    "tanh": lambda x: np.tanh(x),
    "sigmoid": lambda x: _sigmoid(x),
    "silu": lambda x: x * _sigmoid(x),  # coremltools' backend fuses x * sigmoid(x)
    "gelu": _gelu,
    "cast": lambda x, dtype: x,  # the result is converted to the declared output type
    "expand_dims": lambda x, axes: np.expand_dims(x, tuple(int(axis) for axis in axes)),
    "reshape": lambda x, shape: x.reshape(tuple(int(size) for size in shape)),
    "transpose": lambda x, perm: np.transpose(x, perm),
    "split": _split,
    "concat": lambda values, axis, interleave=False: np.concatenate(values, axis=int(axis)),
    "slice_by_index": _slice_by_index,
    "slice_update": _slice_update,
    "tile": lambda x, reps: np.tile(x, reps),
    "gather": lambda x, indices, axis, batch_dims=0, validate_indices=False: np.take(x, indices, axis=int(axis)),
    "linear": lambda x, weight, bias=None: x @ weight.T + (0 if bias is None else bias),
    "matmul": lambda x, y, transpose_x=False, transpose_y=False: (
        (np.swapaxes(x, -1, -2) if transpose_x else x) @ (np.swapaxes(y, -1, -2) if transpose_y else y)
    ),
    "softmax": _softmax,
    "select": lambda cond, a, b: np.where(cond, a, b),
    "layer_norm": _layer_norm,
    "scaled_dot_product_attention": _scaled_dot_product_attention,
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
    "constexpr_lut_to_dense": _lut_to_dense,
}
