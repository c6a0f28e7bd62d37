"""An artifact's ONNX file, checked before a runtime opens it.

A model file names where each large tensor's bytes live (``location``, ``offset``, ``length`` in the tensor's
``external_data``). From a damaged or hostile artifact those can point out of the folder (``../../etc/passwd``,
an absolute path, a symlink), past the end of the data file, or at a byte count its shape and type do not
take. ONNX Runtime refuses most of these itself, but as a many-line ``Fail`` from deep in session creation;
``check_onnx_file`` refuses them first, in one line naming the file, the tensor and the fix, having read
nothing but the model file itself.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nanoexport.errors import NanoexportError, first_line

FIX = "the artifact is damaged or was not written by nanoexport: re-export it"
BYTE_COUNT = re.compile(r"[0-9]+")


def check_onnx_file(path: Path, folder: Path) -> None:
    """Refuse ``path`` unless it parses as an ONNX model whose inputs and outputs have UTF-8 names (ONNX
    Runtime opens others, then fails on reading them) and whose external data all lies inside ``folder``, each
    tensor's bytes within its data file and as many as its shape and element type take; the context binaries
    its ``EPContext`` nodes name must be files inside ``folder`` too."""
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise NanoexportError(f"{path} is missing; {FIX}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeWarning, OSError) as error:  # a truncated or damaged protobuf
        reason = first_line(error)
        raise NanoexportError(f"{path} is not a readable ONNX model ({reason}); {FIX}") from None
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not all(isinstance(text, str) for text in (value.name, *(dim.dim_param for dim in dims))):
            raise NanoexportError(f"{path} names an input or output (or one of its dimensions) in bytes that are "
                                  f"not UTF-8; {FIX}")
    data_sizes: dict[Path, int] = {}
    for tensor in tensors_of(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_external_data(tensor, path, folder, data_sizes)
    for node in model.graph.node:
        if node.op_type == "EPContext":
            _check_context_binary(node, path, folder)


def open_session(path: Path, folder: Path, **options: Any):
    """An ONNX Runtime CPU session (``nanoexport.runtime.cpu_session`` with ``options``) on the artifact file
    ``path``, checked first; a file the runtime still refuses is a one-line error."""
    from nanoexport.runtime import cpu_session

    check_onnx_file(path, folder)
    try:
        return cpu_session(path, **options)
    except Exception as error:  # the runtime's many exception types all mean "cannot load this file"
        reason = first_line(error)
        raise NanoexportError(f"ONNX Runtime cannot load {path} ({reason[:400]}); {FIX}") from None


def tensors_of(model) -> Iterator[Any]:
    """Every TensorProto of ``model``: initializers and tensor attributes, in subgraphs and functions too."""
    graphs = [model.graph]
    nodes = [node for function in model.functions for node in function.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            for sparse in graph.sparse_initializer:
                yield sparse.values
                yield sparse.indices
            nodes.extend(graph.node)
            continue
        for attribute in nodes.pop().attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                graphs.append(attribute.g)
            graphs.extend(attribute.graphs)


def _check_external_data(tensor, model_path: Path, folder: Path, data_sizes: dict[Path, int]) -> None:
    # A string field that is not UTF-8 reaches Python as bytes; as text it cannot name a file or a count.
    entries = {_text(entry.key): _text(entry.value) for entry in tensor.external_data}
    what = f"tensor {_text(tensor.name)[:200]!r} of {model_path}"
    location = entries.get("location", "")
    if not location:
        raise NanoexportError(f"{what} keeps its data in another file but does not name it; {FIX}")
    data_path = _inside(location, model_path, folder, f"{what} reads its data from")
    if data_path not in data_sizes:
        try:
            data_sizes[data_path] = data_path.stat().st_size if data_path.is_file() else -1
        except OSError:
            data_sizes[data_path] = -1
    if data_sizes[data_path] < 0:
        raise NanoexportError(f"{what} reads its data from {location[:200]!r}, which is not a file in the artifact; "
                              f"{FIX}")
    offset = _byte_count(entries, "offset", what) or 0
    length = _byte_count(entries, "length", what)
    expected = _data_bytes(tensor, what)
    if length is not None and length != expected:
        raise NanoexportError(f"{what} is {_shape(tensor)} of type {tensor.data_type}, {expected:,} bytes, but its "
                              f"external data says {length:,}; {FIX}")
    if offset + expected > data_sizes[data_path]:
        raise NanoexportError(f"{what} reads bytes {offset:,} to {offset + expected:,} of {location[:200]!r}, which "
                              f"holds {data_sizes[data_path]:,}; {FIX}")


def _inside(location: str, model_path: Path, folder: Path, what: str) -> Path:
    """The file ``location`` (relative to ``model_path``'s folder) names, refused unless it is a file name inside
    ``folder``; ``what`` begins the error (e.g. "tensor 'w' of model.onnx reads its data from")."""
    try:
        path = (model_path.parent / location).resolve()
        os.fsencode(path)  # a NUL byte or a lone surrogate cannot name a file
    except (ValueError, OSError):
        raise NanoexportError(f"{what} {location[:200]!r}, which is not a file name; {FIX}") from None
    if Path(location).is_absolute() or not path.is_relative_to(folder.resolve()):
        raise NanoexportError(f"{what} {location[:200]!r}, outside the artifact folder {folder}; refusing to open "
                              f"it: {FIX}")
    return path


def _check_context_binary(node, model_path: Path, folder: Path) -> None:
    """An ``EPContext`` node that keeps its compiled context in a file (``embed_mode`` 0) names it in
    ``ep_cache_context``; the provider reads that file as it is named, so it must be one of the artifact's."""
    attributes = {_text(attribute.name): attribute for attribute in node.attribute}
    embedded = attributes["embed_mode"].i if "embed_mode" in attributes else 1
    if embedded or "ep_cache_context" not in attributes:
        return
    location = _text(attributes["ep_cache_context"].s)
    what = f"EPContext node {_text(node.name)[:200]!r} of {model_path} reads its compiled context from"
    if not _inside(location, model_path, folder, what).is_file():
        raise NanoexportError(f"{what} {location[:200]!r}, which is not a file in the artifact; {FIX}")


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _byte_count(entries: dict[str, str], key: str, what: str) -> int | None:
    if key not in entries:
        return None
    if not BYTE_COUNT.fullmatch(entries[key]):
        raise NanoexportError(f"{what} has external data {key} {entries[key][:50]!r}, not a byte count; {FIX}")
    return int(entries[key])


def _data_bytes(tensor, what: str) -> int:
    """The bytes ``tensor``'s shape and element type take (sub-byte types packed, as ONNX stores them)."""
    import onnx_ir as ir

    if any(dim < 0 for dim in tensor.dims):
        raise NanoexportError(f"{what} has the negative shape {_shape(tensor)}; {FIX}")
    try:
        bits = ir.DataType(tensor.data_type).bitwidth
    except (ValueError, TypeError):  # an unknown type code, or one without a fixed size (strings)
        raise NanoexportError(f"{what} has element type {tensor.data_type}, which cannot be stored in an external "
                              f"data file; {FIX}") from None
    return (math.prod(tensor.dims) * bits + 7) // 8


def _shape(tensor) -> str:
    shown = list(tensor.dims[:8])
    return f"{shown}{'...' if len(tensor.dims) > 8 else ''}"
