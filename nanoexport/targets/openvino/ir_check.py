"""An openvino artifact's IR checked before OpenVINO reads it.

OpenVINO's IR reader trusts its input: fuzzing found an ``Assign`` layer without a ``variable_id`` that
crashes the process (SIGSEGV) inside ``Core.compile_model``, where no exception can be caught. ``check_ir``
refuses such files first, in one line, from the XML alone and the size of the weights file: the structure the
reader relies on (unique layer ids, every edge between ports that exist, named variables for the state
layers) and every constant's bytes inside the weights file, as many as its shape and element type take. It
cannot prove OpenVINO will read what passes; it closes the crashes found, and the class they belong to.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from nanoexport.errors import NanoexportError, first_line

FIX = "the artifact is damaged or was not written by nanoexport: re-export it"
# Bits per element of the types a constant may hold.
ELEMENT_BITS = {"boolean": 8, "u1": 1, "i4": 4, "u4": 4, "nf4": 4, "f4e2m1": 4, "i8": 8, "u8": 8, "f8e4m3": 8,
                "f8e5m2": 8, "f8e8m0": 8, "f16": 16, "bf16": 16, "i16": 16, "u16": 16, "f32": 32, "i32": 32,
                "u32": 32, "f64": 64, "i64": 64, "u64": 64}
STATE_LAYERS = ("ReadValue", "Assign")


@dataclass(frozen=True)
class IrConstant:
    """Where a Const layer's bytes are in the weights file, and what they hold."""

    element_type: str  # OpenVINO's element type name: i4, u8, f16...
    shape: tuple[int, ...]
    offset: int
    size: int


def check_ir(xml_path: Path, weights_path: Path) -> dict[str, IrConstant]:
    """Refuse the IR ``xml_path`` unless its layers, ports, edges, variables and constants are sound (see the
    module docstring); ``weights_path`` is the ``.bin`` its constants read. Returns the constants by name."""
    what = f"{xml_path.name} in {xml_path.parent}"
    try:
        root = ElementTree.parse(xml_path).getroot()
    except (ElementTree.ParseError, OSError) as error:
        raise NanoexportError(f"{what} is not readable XML ({first_line(error)}); {FIX}") from None
    layers, edges = root.find("layers"), root.find("edges")
    if root.tag != "net" or layers is None or edges is None:
        raise NanoexportError(f"{what} is not an OpenVINO IR (no net with layers and edges); {FIX}")
    weights_bytes = weights_path.stat().st_size if weights_path.is_file() else 0
    ports: dict[int, tuple[set[int], set[int]]] = {}  # layer id -> (input ports, output ports)
    constants: dict[str, IrConstant] = {}
    for layer in layers.iter("layer"):
        layer_id = _integer(layer.get("id"), f"a layer of {what} has the id")
        if layer_id in ports:
            raise NanoexportError(f"{what} has two layers with the id {layer_id}; {FIX}")
        ports[layer_id] = (_port_ids(layer, "input", what), _port_ids(layer, "output", what))
        kind = layer.get("type")
        data = layer.find("data")
        if not kind or not layer.get("version"):
            raise NanoexportError(f"layer {layer_id} of {what} has no type or version; {FIX}")
        if kind in STATE_LAYERS and (data is None or not data.get("variable_id")):
            raise NanoexportError(f"{kind} layer {layer_id} of {what} names no variable_id; {FIX}")
        if kind == "Const":
            constants[layer.get("name", "")] = _check_constant(layer_id, data, what, weights_bytes)
    for edge in edges.iter("edge"):
        ends = [_integer(edge.get(key), f"an edge of {what} has {key}")
                for key in ("from-layer", "from-port", "to-layer", "to-port")]
        source, target = ports.get(ends[0]), ports.get(ends[2])
        if source is None or target is None or ends[1] not in source[1] or ends[3] not in target[0]:
            raise NanoexportError(f"{what} has an edge from layer {ends[0]} port {ends[1]} to layer {ends[2]} port "
                                  f"{ends[3]}, which do not exist; {FIX}")
    return constants


def _port_ids(layer: ElementTree.Element, side: str, what: str) -> set[int]:
    element = layer.find(side)
    if element is None:
        return set()
    return {_integer(port.get("id"), f"a port of layer {layer.get('id')} of {what} has the id")
            for port in element.iter("port")}


def _check_constant(layer_id: int, data: ElementTree.Element | None, what: str, weights_bytes: int) -> IrConstant:
    where = f"constant layer {layer_id} of {what}"
    if data is None:
        raise NanoexportError(f"{where} has no data element; {FIX}")
    element_type = data.get("element_type", "")
    if element_type not in ELEMENT_BITS:
        raise NanoexportError(f"{where} has the element type {element_type[:50]!r}, which nanoexport does not "
                              f"write; {FIX}")
    shape_text = data.get("shape", "").strip()
    shape = [_integer(dim.strip(), f"{where} has the dimension") for dim in shape_text.split(",")] \
        if shape_text else []
    offset = _integer(data.get("offset"), f"{where} has the offset")
    size = _integer(data.get("size"), f"{where} has the size")
    expected = math.ceil(math.prod(shape) * ELEMENT_BITS[element_type] / 8)
    if size != expected:
        raise NanoexportError(f"{where} is {shape} of {element_type}, {expected:,} bytes, but says {size:,}; {FIX}")
    if offset + size > weights_bytes:
        raise NanoexportError(f"{where} reads bytes {offset:,} to {offset + size:,} of a weights file of "
                              f"{weights_bytes:,}; {FIX}")
    return IrConstant(element_type, tuple(shape), offset, size)


def _integer(text: str | None, what: str) -> int:
    """``text`` as a non-negative integer, else a one-line error beginning with ``what``."""
    if text is None or not text.isascii() or not text.isdigit():
        raise NanoexportError(f"{what} {str(text)[:50]!r}, not a non-negative integer; {FIX}")
    return int(text)
