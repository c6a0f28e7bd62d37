"""Large MIL constants kept on disk from lowering until ``weight.bin`` is written, so an export holds about one
weight tensor in memory at a time instead of whole programs.

Lowering hands each large array to a ``WeightStore``: its bytes go once per distinct content into a scratch
file, and the program gets a zero-stride placeholder of the same shape and dtype (one element in memory), which
is all MIL type inference reads. ``StreamingExporter`` is coremltools' own program exporter, except that a
placeholder's real array is read back from the scratch file just while coremltools' blob writer writes it; so
``weight.bin`` and the offsets in the program are what coremltools writes for the real arrays.

``deduplicate`` does what coremltools' ``save_multifunction`` does to a multifunction program (the
``const_deduplication`` pass within each function, then weight sharing across functions), comparing contents
by digest where the pass compares values with ``np.allclose``: the same result unless two constants differ only
within the pass's tolerance (fp16 zeros of opposite sign, say), which the pass would merge and we keep apart.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
from coremltools.converters.mil.backend.mil.load import MILProtoExporter
from coremltools.converters.mil.mil import Block, Program, Var

# Arrays this small stay in the program: a placeholder would save little and cost a scratch-file read.
PLACEHOLDER_MIN_ELEMENTS = 4096
# coremltools' const_deduplication: within a function, constants of fewer elements are not merged.
DEDUPLICATION_MIN_ELEMENTS = 100


class WeightStore:
    """Constants by content: each distinct array is written once to ``path`` and stood for by one placeholder."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.keys: dict[tuple, np.ndarray] = {}  # content key -> its placeholder
        self.entries: dict[int, tuple[tuple, int]] = {}  # id(placeholder) -> (content key, offset in the file)

    def __enter__(self) -> WeightStore:
        return self

    def __exit__(self, *exception) -> None:
        self.file.close()

    def hold(self, array: np.ndarray) -> np.ndarray:
        """``array`` itself when small, else the placeholder for its content (the same object for equal arrays,
        whichever function or graph they come from)."""
        if array.size < PLACEHOLDER_MIN_ELEMENTS:
            return array
        key = content_key(array)
        if key not in self.keys:
            offset = self.file.tell()
            self.file.write(np.ascontiguousarray(array).data)  # no bytes copy of a large array
            placeholder = np.broadcast_to(np.zeros((), array.dtype), array.shape)
            self.keys[key] = placeholder
            self.entries[id(placeholder)] = (key, offset)
        return self.keys[key]

    def key(self, value) -> tuple | None:
        """The content key of a constant's value (placeholder or array), None for non-array values."""
        entry = self.entries.get(id(value))
        if entry is not None:
            return entry[0]
        return content_key(value) if isinstance(value, (np.ndarray, np.generic)) else None

    def holds(self, value) -> bool:
        return id(value) in self.entries

    def load(self, placeholder: np.ndarray) -> np.ndarray:
        """The real array a placeholder stands for, read from the scratch file."""
        self.file.flush()
        _, offset = self.entries[id(placeholder)]
        count = placeholder.size
        array = np.fromfile(self.path, dtype=placeholder.dtype, count=count, offset=offset)
        return array.reshape(placeholder.shape)


def mil_weight_name(name: str) -> str:
    """``name`` as a MIL op name that keeps it: coremltools turns every character but letters, digits and ``_``
    into ``_``, so each byte of those (and of ``_`` itself) is written as ``_`` and two hex digits."""
    return "".join(char if char.isascii() and char.isalnum() else "".join(f"_{byte:02x}" for byte in char.encode())
                   for char in name)


def name_of_mil_weight(mil_name: str) -> str:
    """The name ``mil_weight_name`` was given."""
    return re.sub(r"(?:_[0-9a-f]{2})+", lambda match: bytes.fromhex(match[0].replace("_", "")).decode(errors="replace"),
                  mil_name)


def content_key(array: np.ndarray | np.generic) -> tuple:
    """Equal for arrays of the same MIL type, shape and bytes (int4 is int8 in numpy, told apart by metadata)."""
    digest = hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()
    return str(array.dtype), repr(array.dtype.metadata), array.shape, digest


class StreamingExporter(MILProtoExporter):
    """coremltools' program exporter, writing each placeholder's real array while it serializes that constant."""

    def __init__(self, program: Program, weights_dir: str, specification_version: int, store: WeightStore):
        super().__init__(program, weights_dir, specification_version)
        self.store = store

    def create_file_value(self, var: Var):
        if self.store.holds(var.val):
            var = _Loaded(var, self.store)
        return super().create_file_value(var)

    def close(self) -> None:
        """Flush and close ``weight.bin``: the blob writer writes its file when it is destroyed."""
        self.blob_writers.clear()


class _Loaded:
    """A const var whose ``val`` is read from the store on first use (only when coremltools writes it, not when
    the weight is already in ``weight.bin`` for another function) and dropped with this wrapper."""

    def __init__(self, var: Var, store: WeightStore):
        self._var, self._store = var, store

    def __getattr__(self, name: str):
        return getattr(self._var, name)

    @functools.cached_property
    def val(self) -> np.ndarray:
        return self._store.load(self._var.val)


def deduplicate(program: Program, store: WeightStore) -> None:
    """Merge equal constants within each function, then let equal constants of all functions share one blob."""
    for function in program.functions.values():
        _merge_constants(function, store)
        _merge_constexprs(function)
    groups: dict[tuple, list[Var]] = {}
    for function in program.functions.values():
        for op in function.operations:
            key = store.key(op.outputs[0].val) if op.op_type == "const" else None
            if key is not None:
                groups.setdefault(key, []).append(op.outputs[0])
    for index, group in enumerate(groups.values()):
        if len(group) > 1:
            for var in group:
                var.op.weight_id = str(index)


def _merge_constants(block: Block, store: WeightStore) -> None:
    """Later ``const`` ops equal to an earlier one (of 100 elements or more) are replaced by it."""
    first: dict[tuple, Var] = {}
    for op in list(block.operations):
        if op.op_type != "const" or np.size(op.outputs[0].val) < DEDUPLICATION_MIN_ELEMENTS:
            continue
        key = store.key(op.outputs[0].val)
        if key is None:
            continue
        if key not in first:
            first[key] = op.outputs[0]
        elif op.outputs[0] not in block.outputs:
            _replace(block, op.outputs[0], first[key], force=False)


def _merge_constexprs(block: Block) -> None:
    """Later ``constexpr_*`` ops with the same type and inputs as an earlier one are replaced by it."""
    first: dict[tuple, Var] = {}
    for op in list(block.operations):
        if not op.op_type.startswith("constexpr_"):
            continue
        key = [op.op_type]
        for var in op.inputs.values():
            small = var.val is not None and (isinstance(var.val, (str, bool))
                                             or np.size(var.val) < DEDUPLICATION_MIN_ELEMENTS)
            key += [var.dtype, str(var.val) if small else var]
        key = tuple(key)
        if key not in first:
            first[key] = op.outputs[0]
        elif op.outputs[0] not in block.outputs:
            _replace(block, op.outputs[0], first[key], force=True)


def _replace(block: Block, duplicate: Var, unique: Var, force: bool) -> None:
    block.replace_uses_of_var_after_op(anchor_op=duplicate.op, old_var=duplicate, new_var=unique,
                                       force_replace=force)
    block.remove_ops([duplicate.op])


def read_external(tensor: ir.ExternalTensor) -> np.ndarray:
    """An external tensor's array in memory of its own. ``tensor.numpy()`` would cache what it loads for as
    long as the graph lives (4-bit integers unpacked to a byte each) and map the file, whose pages then count
    in this process's memory on top of any copy."""
    if tensor.dtype.bitwidth < 8:
        array = tensor.numpy()  # unpacked into a new array, which outlives the mapping
        tensor.release()
        return array
    dtype = np.dtype(tensor.dtype.numpy()).newbyteorder("<")
    array = np.fromfile(tensor.path, dtype=dtype, count=tensor.size, offset=tensor.offset or 0)
    return array.reshape(tensor.shape.numpy())
