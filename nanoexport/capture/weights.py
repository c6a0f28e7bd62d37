"""Checkpoint weights that stay on disk until a stage reads them, one tensor at a time.

Capture traces the architecture with parameters that have shapes but no data (``meta_model``), so no float
copy of the model exists during export. The traced graph's parameter initializers are then bound to the
checkpoint's safetensors files (``bind_weights``): each becomes an ``onnx_ir.LazyTensor`` that reads its
tensor when a pass, a quantizer or a writer asks for the bytes, widens bf16/fp16 to fp32 there, and keeps
nothing afterwards. Weights the exporter transposes (every linear layer: ``x @ W.T``) become lazy transposed
initializers, so the graph matches what the eager exporter folds, without holding the transposes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from nanoexport.errors import NanoexportError
from nanoexport.passes.initializers import FINGERPRINT

FLOAT_DTYPES = ("F32", "F16", "BF16")
# Bits per element of each dtype the safetensors format names; the library refuses any other.
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
              "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
READ_PIECE = 1 << 24  # bytes read at a time when hashing or widening a tensor
# The token embedding's name in each family's checkpoint (gpt2: wte).
EMBEDDING_KEYS = ("embed_tokens.weight", "wte.weight")


class SafetensorsWeights:
    """The tensors of a (sharded) safetensors checkpoint by name: shape and dtype from the headers, data read
    on demand, one tensor at a time, as float32."""

    def __init__(self, files: list[Path]):
        self.entries: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
        self.byte_ranges: dict[str, tuple[int, int]] = {}  # where each tensor's bytes are in its file
        for path in files:
            header, data_start = safetensors_header(path)
            for name, entry in header.items():
                if name != "__metadata__":
                    self.entries[name] = (path, entry["dtype"], tuple(entry["shape"]))
                    begin, end = entry["data_offsets"]
                    self.byte_ranges[name] = (data_start + begin, data_start + end)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a float32 array (read now; nothing is kept).

        Read with plain file reads, a few rows at a time, and widened piece by piece: the stored copy never
        exists whole beside the float32 one (a 150k x 1536 embedding is 0.47 GB in bf16), and no pages of
        the checkpoint are mapped into the process (safetensors' memory map kept every page it touched
        resident until the file closed: 0.5 GB more for that embedding in fp32).
        """
        path, dtype, shape = self.entries[name]
        if dtype not in FLOAT_DTYPES:
            raise NanoexportError(f"weight {name} in {path.name} is {dtype}, not a float type; "
                                  "convert the checkpoint's weights to float")
        widened = np.empty(shape, np.float32)
        flat = widened.reshape(-1)
        begin, _ = self.byte_ranges[name]
        stored_bytes = DTYPE_BITS[dtype] // 8
        count, row = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
        rows = max(1, READ_PIECE // max(1, row * stored_bytes))
        with path.open("rb") as handle:
            handle.seek(begin)
            for start in range(0, count, rows):
                piece = flat[start * row : (start + rows) * row]
                data = handle.read(piece.size * stored_bytes)
                if len(data) != piece.size * stored_bytes:
                    raise NanoexportError(f"weight {name} in {path} ends early: the file was cut short; "
                                          "re-download or re-save the checkpoint")
                _widen(data, dtype, piece)
                _check_finite(widened[start : start + rows] if shape else widened, name, path, start)
        return widened

    def digest(self, name: str) -> str:
        """A digest of the tensor's stored dtype and bytes, read in pieces: equal digests, equal float32
        tensors, found without widening anything."""
        path, dtype, _ = self.entries[name]
        begin, end = self.byte_ranges[name]
        digest = hashlib.sha256(dtype.encode())
        with path.open("rb") as handle:
            handle.seek(begin)
            for start in range(begin, end, READ_PIECE):
                digest.update(handle.read(min(READ_PIECE, end - start)))
        return digest.hexdigest()


def _widen(data: bytes, dtype: str, out: np.ndarray) -> None:
    """Stored little-endian ``dtype`` bytes -> float32 into ``out`` (as many elements as ``data`` holds)."""
    if dtype == "BF16":  # bf16 is the upper half of a float32
        out.view(np.uint32)[...] = np.frombuffer(data, "<u2").astype(np.uint32) << 16
    else:
        out[...] = np.frombuffer(data, "<f4" if dtype == "F32" else "<f2")


def _check_finite(piece: np.ndarray, name: str, path: Path, first_row: int) -> None:
    """Refuse a NaN or infinity: it would poison every output it reaches, silently."""
    if np.isfinite(piece).all():
        return
    index = np.unravel_index(np.flatnonzero(~np.isfinite(piece))[0], piece.shape)
    where = [first_row + int(index[0]), *map(int, index[1:])] if piece.ndim else []
    raise NanoexportError(f"weight {name} in {path.name} holds {piece[index]} at {where}; the checkpoint is "
                          "damaged: re-download it, or re-save it from a model that computes finite outputs")


def _transposed_digest(source_digest) -> str:
    return f"transposed:{source_digest()}"


def safetensors_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header, and where its tensor data starts (after the header's 8-byte size),
    checked as the safetensors library checks it before reading a tensor: every entry names a known dtype, a
    shape and the offsets of exactly as many bytes, the tensors lie back to back from the start of the data
    and the last one ends where the file does."""
    size = path.stat().st_size
    fix = "re-download or re-save the checkpoint"
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise NanoexportError(f"corrupt safetensors file {path}: only {size} bytes; {fix}")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(size - 8, MAX_HEADER_BYTES):
            raise NanoexportError(f"corrupt safetensors file {path}: a header of {header_size:,} bytes "
                                  f"{'runs past the end of the file' if header_size > size - 8 else 'is too large'}; "
                                  f"{fix}")
        try:
            text = handle.read(header_size).decode("utf-8")  # not UTF-16 or -32, which json.loads also takes
            header = json.loads(text, parse_constant=_refuse, object_pairs_hook=_table)
            _check_text(header)
        except (ValueError, RecursionError):  # bad JSON or UTF-8, a huge number, deep nesting
            raise NanoexportError(f"corrupt safetensors file {path}: unreadable header; {fix}") from None
    if not isinstance(header, dict):
        raise NanoexportError(f"corrupt safetensors file {path}: the header is not a table; {fix}")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise NanoexportError(f"corrupt safetensors file {path}: __metadata__ is not a table of strings; {fix}")
    end = 0
    tensors = sorted(((name, entry) for name, entry in header.items() if name != "__metadata__"),
                     key=lambda item: _offsets(item[1]) or (-1, -1))
    for name, entry in tensors:
        offsets, shape = _offsets(entry), entry.get("shape") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if offsets is None or not isinstance(dtype, str) or dtype not in DTYPE_BITS or not isinstance(shape, list) \
                or not all(_is_count(dim) for dim in shape):
            raise NanoexportError(f"corrupt safetensors file {path}: tensor {name[:200]!r} needs a known dtype, a "
                                  f"shape of counts and two data_offsets; {fix}")
        begin, stop = offsets
        if begin != end:
            raise NanoexportError(f"corrupt safetensors file {path}: tensor {name[:200]!r} starts at byte {begin:,} "
                                  f"of the data, not {end:,} where the tensor before it ends; {fix}")
        count = _element_count(shape)
        needed, odd_bits = divmod(count * DTYPE_BITS[dtype], 8) if count is not None else (None, 0)
        if odd_bits or stop - begin != needed:
            needs = "more bytes than a file holds" if needed is None else f"{needed:,} bytes" + (
                f" and {odd_bits} bits" if odd_bits else "")
            raise NanoexportError(f"corrupt safetensors file {path}: tensor {name[:200]!r} is {dtype} "
                                  f"{shape[:8]}{'...' if len(shape) > 8 else ''}, {needs}, but its data_offsets "
                                  f"hold {stop - begin:,}; {fix}")
        end = stop
    if 8 + header_size + end != size:
        state = f"truncated ({size} bytes, header needs {8 + header_size + end})" if 8 + header_size + end > size \
            else f"{size - 8 - header_size - end:,} bytes after the last tensor"
        raise NanoexportError(f"corrupt safetensors file {path}: {state}; {fix}")
    return header, 8 + header_size


def _offsets(entry: Any) -> tuple[int, int] | None:
    """A header entry's ``data_offsets`` as (begin, end), or None when they are not two ordered counts."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(offset) for offset in offsets):
        return None
    return (offsets[0], offsets[1]) if offsets[0] <= offsets[1] else None


def _element_count(shape: list[int]) -> int | None:
    """The elements of ``shape``, or None past 2**64 (the library's overflow, even if a later dim is 0)."""
    count = 1
    for dim in shape:
        count *= dim
        if count >= 2**64:
            return None
    return count


def _is_count(value: Any) -> bool:
    """A JSON number the safetensors library reads as a size: a whole number from 0 to 2**64 - 1."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


# Python's JSON reader takes what the safetensors library's (serde_json) refuses: NaN and Infinity, repeated
# keys, and escapes of half a UTF-16 surrogate pair. A header using them cannot be read later, so it is
# refused now.
def _refuse(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def _table(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    table = dict(pairs)
    if len(table) != len(pairs):
        raise ValueError("a key is repeated")
    return table


def _check_text(value: Any) -> None:
    """Raise ValueError at a string (or key) holding half a surrogate pair, which is not UTF-8."""
    stack = [value]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            value.encode("utf-8")
        elif isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (shapes, no data); buffers computed at
    construction (rotary frequencies) stay real, as the trace needs their values."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, parameter: torch.nn.Parameter | None) -> None:
        if parameter is not None and parameter.device.type != "meta":
            parameter = torch.nn.Parameter(parameter.data.to("meta"), requires_grad=False)
        register(module, name, parameter)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def meta_model(hf_config) -> torch.nn.Module:
    """The causal LM of ``hf_config`` in eval mode, its parameters fake CPU tensors without data: traceable
    by torch.export like the real model, at the memory cost of its buffers only."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    # One fake mode for every parameter: torch.export traces in the mode its inputs carry, and real example
    # inputs and buffers join it.
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, torch.nn.Parameter] = {}  # one fake per parameter, so tied weights stay tied
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None:
                if id(parameter) not in fakes:
                    fake = FakeTensor(mode, parameter.data, torch.device("cpu"))
                    fakes[id(parameter)] = torch.nn.Parameter(fake, requires_grad=False)
                module._parameters[name] = fakes[id(parameter)]
    return model


def check_shapes(model: torch.nn.Module, weights: SafetensorsWeights, folder: Path) -> None:
    """Every parameter the config implies exists in the checkpoint with the same shape and a float dtype;
    checked from the headers, before anything is allocated or traced."""
    for name, parameter in model.named_parameters():
        key = _checkpoint_key(name, model, weights)
        if key is None:
            raise NanoexportError(f"the checkpoint in {folder} has no weight {name}, which its config.json implies; "
                                  "the config and the weights belong to different models")
        if tuple(parameter.shape) != weights.shape(key):
            raise NanoexportError(f"weight {key} in {folder} is {list(weights.shape(key))} but config.json implies "
                                  f"{list(parameter.shape)}; the config and the weights belong to different models")
        dtype = weights.entries[key][1]
        if dtype not in FLOAT_DTYPES:
            raise NanoexportError(f"weight {key} in {folder} is {dtype}, not a float type (an already quantized "
                                  "checkpoint?); export from the float checkpoint, and quantize with --quant")


def _checkpoint_key(name: str, model: torch.nn.Module, weights: SafetensorsWeights) -> str | None:
    """The checkpoint's name for parameter ``name``: as named, without or with the base model's prefix, or
    the input embedding for an output head tied to it."""
    prefix = f"{model.base_model_prefix}."
    for key in (name, name.removeprefix(prefix), prefix + name):
        if key in weights:
            return key
    if model.config.tie_word_embeddings and model.get_output_embeddings() is not None and \
            name.startswith(_module_path(model, model.get_output_embeddings())):
        embedding_name = _module_path(model, model.get_input_embeddings()) + ".weight"
        return _checkpoint_key(embedding_name, model, weights)
    return None


def _module_path(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(path for path, candidate in model.named_modules() if candidate is module)


def bind_weights(graph: ir.Model, model: torch.nn.Module, weights: SafetensorsWeights,
                 prefix: str = "model.") -> int:
    """Point the traced ``graph``'s parameter initializers (named ``prefix`` + parameter name) at
    ``weights``; returns how many were bound. Shapes were checked by ``check_shapes``."""
    parameters = dict(model.named_parameters(remove_duplicate=False))  # a tied weight under either name
    bound = 0
    for name, value in graph.graph.initializers.items():
        parameter_name = name.removeprefix(prefix)
        if parameter_name not in parameters:
            continue
        key = _checkpoint_key(parameter_name, model, weights)
        value.const_value = ir.LazyTensor(_reader(weights, key), dtype=ir.DataType.FLOAT,
                                          shape=ir.Shape(weights.shape(key)), name=name)
        value.const_value.meta[FINGERPRINT] = functools.partial(weights.digest, key)
        bound += 1
    return bound


def _reader(weights: SafetensorsWeights, key: str):
    return lambda: ir.tensor(weights.read(key))


def fold_weight_transposes(graph: ir.Model) -> int:
    """``Transpose(W)`` of a 2-D initializer read only there -> an initializer holding ``W.T``, read from ``W``
    when asked (lazily: nothing is computed here); returns how many. The value keeps the Transpose output's
    name and the initializer takes its place, as the exporter's constant folding gives it. A weight read
    elsewhere too (a tied embedding) keeps its Transpose, so it is stored once."""
    folded = 0
    for node in list(graph.graph):
        if node.op_type != "Transpose" or not node.inputs[0].is_initializer():
            continue
        source = node.inputs[0]
        if source.shape is None or source.shape.rank() != 2 or source.const_value is None:
            continue
        if len(source.uses()) != 1:  # a tied embedding: the head reads it transposed, the lookup as it is
            continue
        if list(node.attributes.get_ints("perm", [1, 0])) != [1, 0]:
            continue
        output = node.outputs[0]
        rows, columns = source.shape
        tensor = ir.LazyTensor(_transposer(source.const_value), dtype=source.dtype, shape=ir.Shape([columns, rows]),
                               name=output.name)
        source_digest = source.const_value.meta.get(FINGERPRINT)
        if source_digest is not None:
            tensor.meta[FINGERPRINT] = functools.partial(_transposed_digest, source_digest)
        replacement = ir.Value(name=output.name, shape=ir.Shape([columns, rows]), type=source.type,
                               const_value=tensor)
        output.replace_all_uses_with(replacement, replace_graph_outputs=True)
        graph.graph.remove(node, safe=True)
        graph.graph.register_initializer(replacement)
        folded += 1
    for name in [name for name, value in graph.graph.initializers.items() if not value.uses()
                 and not value.is_graph_output()]:
        del graph.graph.initializers[name]
    return folded


def _transposer(tensor):
    return lambda: ir.tensor(np.ascontiguousarray(tensor.numpy().T))
