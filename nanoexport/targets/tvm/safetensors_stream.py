"""A safetensors file written one tensor at a time.

``safetensors.numpy.save_file`` takes every array at once: for a model's parameters, every weight in memory
together. The file's header needs only each tensor's name, type and shape, so here it is written first and
each tensor's bytes follow in turn, produced when their turn comes and released before the next.

The bytes are those ``save_file`` writes for the same arrays (safetensors 0.8, checked by the tests): tensors
ordered by type, in the reverse of safetensors' own dtype order (widest first), then by name; the header the
compact JSON of those entries in that order, no ``__metadata__``, padded with spaces to a multiple of 8 bytes
after its 8-byte little-endian length.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

# numpy's dtype name -> (safetensors' dtype, bytes per element), in safetensors' declaration order of its dtypes,
# which its writer sorts by (descending). Only types numpy (with ml_dtypes' bfloat16) names and save_file takes.
DTYPES: dict[str, tuple[str, int]] = {
    "bool": ("BOOL", 1), "uint8": ("U8", 1), "int8": ("I8", 1), "int16": ("I16", 2), "uint16": ("U16", 2),
    "float16": ("F16", 2), "bfloat16": ("BF16", 2), "int32": ("I32", 4), "uint32": ("U32", 4),
    "float32": ("F32", 4), "complex64": ("C64", 8), "float64": ("F64", 8), "int64": ("I64", 8),
    "uint64": ("U64", 8),
}
_RANK = {name: rank for rank, name in enumerate(DTYPES)}
_ALIGNMENT = 8  # the header is padded to this many bytes


@dataclass(frozen=True)
class Source:
    """A tensor to be written: its type (numpy's name, a key of ``DTYPES``) and shape known now, its bytes
    (little-endian, C order) written by ``write(file)`` when its turn comes; ``write`` must write exactly
    ``nbytes`` of them and keep none of them alive after it returns."""

    dtype: str
    shape: tuple[int, ...]
    write: Callable[[BinaryIO], object]

    @property
    def nbytes(self) -> int:
        return DTYPES[self.dtype][1] * math.prod(self.shape)


def write_array(file: BinaryIO, array: np.ndarray) -> None:
    """Write ``array``'s bytes, little-endian in C order, without a copy when it is laid out so already (as bytes:
    ml_dtypes' types such as bfloat16 have no buffer format for ``write`` to take)."""
    file.write(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8).data)


def ordered(tensors: Mapping[str, Source]) -> list[str]:
    """The names of ``tensors`` in the order their data is stored: widest type first (safetensors' order of
    its dtypes, reversed), then by name (Python's order of str is that of their UTF-8 bytes, as Rust's)."""
    return sorted(tensors, key=lambda name: (-_RANK[tensors[name].dtype], name))


def header(tensors: Mapping[str, Source]) -> bytes:
    """The file's first bytes, before any tensor's data: the header's length and the padded JSON header."""
    entries, offset = {}, 0
    for name in ordered(tensors):
        source = tensors[name]
        entries[name] = {"dtype": DTYPES[source.dtype][0], "shape": list(source.shape),
                         "data_offsets": [offset, offset + source.nbytes]}
        offset += source.nbytes
    # serde_json's compact form: no spaces, non-ASCII as UTF-8, the same escapes as Python's json.
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % _ALIGNMENT)
    return struct.pack("<Q", len(text)) + text


def save_file(tensors: Mapping[str, Source], path: Path) -> None:
    """Write ``tensors`` to ``path`` as ``safetensors.numpy.save_file`` would write their arrays, holding one
    tensor's bytes at a time (however its ``write`` produces them)."""
    unknown = sorted({source.dtype for source in tensors.values()} - DTYPES.keys())
    if unknown:
        raise ValueError(f"safetensors stores no dtype {', '.join(unknown)}")
    with open(path, "wb") as file:
        file.write(header(tensors))
        for name in ordered(tensors):
            start = file.tell()
            tensors[name].write(file)
            # A short or long write would shift every later tensor: fail here, naming the tensor.
            if file.tell() - start != tensors[name].nbytes:
                raise ValueError(f"{name}: wrote {file.tell() - start} bytes, its dtype and shape take "
                                 f"{tensors[name].nbytes}")
