"""Digests of quantized weights: what the canonical graph holds, and what a target stored, in one layout.

A quantized layer is its integers, block scales and zero points. Targets store them in layouts of their own
(ONNX Runtime's MatMulNBits packs nibbles output-major, OpenVINO transposes, projections merged in the
canonical graph are cut into parts); each target's ``stored_weights`` reads its files back and gives them as
``QuantizedWeight`` arrays, and ``normalized`` brings any of them to one layout: output-major (the block axis
last), integers as int16, scales as float16 when that holds them exactly (a target storing our fp16 scales as
fp32 changed nothing), else float32. Equal digests then mean equal numbers, whatever the target's layout.

A layer digest is the sha256 of that normalized form; a set digest is the sha256 of its layers' digests
sorted, so two artifacts can be compared even when a target does not keep the layers' names (Core ML).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from nanoexport.calibration.blocks import expand_blocks
from nanoexport.errors import NanoexportError

# Initializer names of a quantized layer in the canonical graph: "<layer>.quant", "<layer>.scale".
QUANT_SUFFIX = ".quant"
# A projection merged in the canonical graph and cut into column parts by a target ("<layer>.part1").
PART = re.compile(r"^(?P<layer>.+)\.part(?P<index>\d+)$")


@dataclass
class QuantizedWeight:
    """One layer's integers and per-block scales (and zero points), 2-D, blocks along one axis."""

    integers: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None = None


def normalized(weight: QuantizedWeight) -> QuantizedWeight:
    """``weight`` output-major: ``[N, K]`` integers, ``[N, K / block]`` scales and zero points."""
    integers, scales = np.asarray(weight.integers), np.asarray(weight.scales)
    if integers.ndim != 2 or scales.ndim != 2:
        raise ValueError(f"a quantized weight is 2-D, not integers {integers.shape} with scales {scales.shape}")
    # Blocks run along the axis where there are fewer scales than integers; it goes last.
    transpose = integers.shape[0] != scales.shape[0]
    points = weight.zero_points

    def laid_out(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array.T if transpose else array)

    exact_half = scales.astype(np.float16)
    scales = exact_half if np.array_equal(exact_half.astype(scales.dtype), scales) else scales.astype(np.float32)
    return QuantizedWeight(laid_out(integers.astype(np.int16)), laid_out(scales),
                           None if points is None else laid_out(np.asarray(points).astype(np.int16)))


def layer_digest(weight: QuantizedWeight) -> str:
    """sha256 of the normalized integers, scales and zero points with their shapes and dtypes."""
    weight = normalized(weight)
    digest = hashlib.sha256()
    for array in (weight.integers, weight.scales, weight.zero_points):
        if array is None:
            digest.update(b"none;")
            continue
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(array.data)
    return digest.hexdigest()


def set_digest(layer_digests: Iterable[str]) -> str:
    """sha256 of the distinct layer digests, sorted: independent of names and order."""
    return hashlib.sha256("\n".join(sorted(set(layer_digests))).encode()).hexdigest()


def dequantized(weight: QuantizedWeight) -> np.ndarray:
    """The float32 weight ``[N, K]`` the integers and scales stand for."""
    weight = normalized(weight)
    columns = weight.integers.shape[1]
    block = -(-columns // weight.scales.shape[1])
    integers = weight.integers.astype(np.float32)
    if weight.zero_points is not None:
        integers = integers - expand_blocks(weight.zero_points.T.astype(np.float32), block, columns).T
    return integers * expand_blocks(weight.scales.T.astype(np.float32), block, columns).T


def unpack_nibbles(packed: np.ndarray, signed: bool) -> np.ndarray:
    """Bytes holding two 4-bit integers each, low nibble first -> one int8 per integer (flat)."""
    packed = np.asarray(packed).view(np.uint8).reshape(-1)
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1).astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8) if signed else nibbles


def layer_name(initializer: str, *suffixes: str) -> str:
    """The canonical layer name of a target's initializer: ``suffixes`` (the target's own, ``.nbits``) and
    ``.quant`` removed, a part suffix kept (``X.weight.T.quant.part1.nbits`` -> ``X.weight.T.part1``)."""
    for suffix in suffixes:
        initializer = initializer.removesuffix(suffix)
    match = PART.match(initializer)
    base, part = (match["layer"], f".part{match['index']}") if match else (initializer, "")
    return base.removesuffix(QUANT_SUFFIX) + part


def blocked_dequantize_weights(model: ir.Model) -> Iterator[tuple[str, QuantizedWeight]]:
    """The blocked ``DequantizeLinear`` weights of ``model`` whose integers, scales (and zero points) are all
    initializers, named as ``layer_name`` says: what a target left in the canonical form."""
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or node.attributes.get_int("block_size", 0) <= 0:
            continue
        constants = [value.const_value if value is not None else None for value in node.inputs]
        if any(tensor is None for tensor in constants[:2]) or len(constants[0].shape) != 2:
            continue
        points = read_array(constants[2]) if len(constants) > 2 and constants[2] is not None else None
        yield layer_name(node.inputs[0].name), QuantizedWeight(read_array(constants[0]), read_array(constants[1]),
                                                               points)


def read_array(tensor: ir.TensorProtocol) -> np.ndarray:
    """A copy of ``tensor``'s array, its memory map closed: kept mapped, a file's pages count in the process's
    resident memory until the whole data file does (reading the 3.8B onnx artifact back: 2.7 GB peak, 0.5 GB)."""
    array = np.array(tensor.numpy())
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()
    return array


class CanonicalWeights:
    """The quantized layers of a canonical graph, held as references to its tensors (not copies), so that they
    can be read after a target's passes have replaced them in the graph (to measure the target's changes)."""

    def __init__(self, model: ir.Model):
        self.tensors: dict[str, tuple[ir.TensorProtocol, ...]] = {}
        for node in model.graph:
            if node.op_type != "DequantizeLinear" or node.attributes.get_int("block_size", 0) <= 0:
                continue
            constants = tuple(value.const_value if value is not None else None for value in node.inputs)
            if any(tensor is None for tensor in constants[:2]) or len(constants[0].shape) != 2:
                continue
            self.tensors[layer_name(node.inputs[0].name)] = constants

    def weight(self, name: str) -> QuantizedWeight:
        """One layer's arrays, read now (a lazy weight stays on disk until then)."""
        integers, scales, *points = self.tensors[name]
        zero_points = points[0].numpy() if points and points[0] is not None else None
        return QuantizedWeight(integers.numpy(), scales.numpy(), zero_points)

    def record(self) -> dict[str, Any]:
        """The manifest's record: a digest per layer (named after the integers' initializer without
        ``.quant``, ``model.layers.0.mlp.down_proj.weight.T``) and of the set."""
        layers = {name: layer_digest(self.weight(name)) for name in sorted(self.tensors)}
        return {"layers": layers, "digest": set_digest(layers.values())}


def joined_parts(weights: Iterable[tuple[str, QuantizedWeight]]) -> Iterator[tuple[str, QuantizedWeight]]:
    """``weights`` with the column parts of a merged projection (``<layer>.part0``, ``.part1``...) joined
    back into ``<layer>``, in part order, as the canonical graph holds it.

    A layer's parts come together (the lowering splits one projection into neighbouring nodes), so each is
    joined when the next layer begins: holding every layer's parts to the end held the integers of all merged
    projections at once (2.5 billion of them in the 3.8B Phi-3-mini)."""
    pending_layer, pieces = None, {}
    joined: set[str] = set()
    for name, weight in weights:
        match = PART.match(name)
        layer = match["layer"] if match else None
        if pending_layer is not None and layer != pending_layer:
            yield pending_layer, _joined(pieces)
            joined.add(pending_layer)
            pending_layer, pieces = None, {}
        if match is None:
            yield name, weight
            continue
        if layer in joined:
            # Our writers keep them together; files rewritten otherwise are not an artifact we made.
            raise NanoexportError(f"the parts of {layer} are not stored together; re-export the artifact")
        pending_layer = layer
        pieces[int(match["index"])] = normalized(weight)
    if pending_layer is not None:
        yield pending_layer, _joined(pieces)


def _joined(pieces: dict[int, QuantizedWeight]) -> QuantizedWeight:
    ordered = [pieces[index] for index in sorted(pieces)]
    points = [piece.zero_points for piece in ordered]
    return QuantizedWeight(
        np.concatenate([piece.integers for piece in ordered]), np.concatenate([piece.scales for piece in ordered]),
        None if any(point is None for point in points) else np.concatenate(points))


def stored_digests(stored: Iterable[tuple[str, QuantizedWeight]], canonical: dict[str, Any],
                   canonical_weights: CanonicalWeights | None = None) -> dict[str, Any]:
    """What a target stored (``stored``: its ``stored_weights``) beside the ``canonical`` record: per layer
    digests, the set digest, whether they equal the canonical ones, and, for layers the target changed
    (re-rounded to its own grid), the error of its dequantized weights against the canonical graph's,
    measured when the ``canonical_weights`` are at hand (at export)."""
    layers, errors = {}, {}
    canonical_layers = canonical["layers"]
    for name, weight in joined_parts(stored):
        layers[name] = layer_digest(weight)
        if canonical_weights is not None and name in canonical_layers and canonical_layers[name] != layers[name]:
            # Measured layer by layer: holding every changed layer's float weights took 1.4 GB on a 0.5B model.
            errors[name] = _squared_error(dequantized(weight), dequantized(canonical_weights.weight(name)))
    record: dict[str, Any] = {"layers": dict(sorted(layers.items())), "digest": set_digest(layers.values())}
    record["equals_canonical"] = record["digest"] == canonical["digest"]
    if not record["equals_canonical"]:
        known, stored_set = set(canonical_layers.values()), set(layers.values())
        record["changed_layers"] = sorted(name for name, digest in layers.items() if digest not in known)
        # Canonical layers whose numbers the target's files do not hold (under any name).
        record["missing_layers"] = sorted(name for name, digest in canonical_layers.items()
                                          if digest not in stored_set and name not in layers)
    if errors:
        record["weight_error"] = _weight_error(errors)
    return record


def _squared_error(weight: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """The summed squared difference of ``weight`` from ``reference``, and the summed squares of ``reference``."""
    return float(np.square(weight - reference).sum()), float(np.square(reference).sum())


def _weight_error(errors: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """How far the target's dequantized weights are from the canonical graph's, from each changed layer's
    ``_squared_error``: relative RMS over the changed layers (sqrt of summed squared differences over summed
    squares), the largest per-layer figure, and every changed layer's figure (which the compare report plots)."""
    difference = total = 0.0
    worst_name, worst = "", 0.0
    by_layer = {}
    for name in sorted(errors):
        squared_difference, squared = errors[name]
        difference, total = difference + squared_difference, total + squared
        layer_error = (squared_difference / squared) ** 0.5 if squared else 0.0
        by_layer[name] = round(layer_error, 6)
        if layer_error >= worst:
            worst_name, worst = name, layer_error
    return {"relative_rms": round((difference / total) ** 0.5 if total else 0.0, 6), "layers": len(errors),
            "worst_layer": worst_name, "worst_layer_relative_rms": round(worst, 6), "layer_relative_rms": by_layer}
