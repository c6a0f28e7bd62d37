"""Mutations for the fuzz targets of ``fuzzing.py``: byte edits, and edits that know the file's format (a JSON
value of another type, a path out of the folder, an absurd size or offset in a safetensors header or an ONNX
tensor, a truncated protobuf)."""

from __future__ import annotations

import copy
import json
import math
import random
import re
import struct
import tomllib
from typing import Any

# Values that break assumptions: type and range edges, paths out of a folder, markup, encodings.
INTERESTING_INTS = (0, -1, 1, 3, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 + 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64,
                    -(2**63), 10**30)
INTERESTING_FLOATS = (0.5, -0.0, 1e-300, 1e308, math.inf, -math.inf, math.nan)
INTERESTING_STRINGS = ("", ".", "..", "/", "../../etc/passwd", "/etc/passwd", "..\\..\\x", "a\x00b", "model.onnx",
                       "manifest.json", "tokenizer", "~", "[/]", "[bold red]x", "%s%n", "\ud800", "\u202e", "é",
                       "x" * 5000, "onnx", "dynamic", "model.onnx.data", "F32", "BF16", "llama", "int4")
PROTOBUF_STRINGS = tuple(text for text in INTERESTING_STRINGS if text != "\ud800")  # protobuf strings are UTF-8
TOKENS = (b'"', b"{", b"}", b"[", b"]", b",", b":", b"null", b"-1", b"1e999", b"\\u0000", b"\\ud800", b"\xff",
          b"\n", b"=", b"[quant]", b'"../x"', b"18446744073709551616", b"\x00" * 8, b"\xff" * 8)



def mutate(contents: bytes, file_format: str, rng: random.Random) -> bytes:
    """One edit of ``contents``: aware of ``file_format`` most of the time, bytes otherwise."""
    if file_format != "bytes" and rng.random() < 0.6:
        edit = {"json": _mutate_json_text, "toml": _mutate_toml, "safetensors": _mutate_safetensors,
                "onnx": _mutate_onnx}[file_format]
        edited = edit(contents, rng)
        if edited is not None:
            return edited
    return mutate_bytes(contents, rng)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """A byte-level edit: flip, overwrite, insert a token, delete, duplicate or truncate."""
    position = rng.randrange(len(data) + 1)
    span = min(len(data) - position, 1 + int(rng.expovariate(1 / 16)))
    choice = rng.randrange(7)
    if choice == 0 and position < len(data):
        return data[:position] + bytes([data[position] ^ (1 << rng.randrange(8))]) + data[position + 1:]
    if choice == 1 and position < len(data):
        return data[:position] + bytes([rng.randrange(256)]) + data[position + 1:]
    if choice == 2:
        return data[:position] + rng.choice(TOKENS) + data[position:]
    if choice == 3:
        return data[:position] + data[position + span:]
    if choice == 4:
        return data[:position] + data[position:position + span] * 2 + data[position + span:]
    if choice == 5:
        token = rng.choice(TOKENS)
        return data[:position] + token + data[position + len(token):]
    return data[:position]


def random_json_value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value of any type, mostly one from the interesting values above."""
    choice = rng.randrange(8)
    if choice == 0:
        return None
    if choice == 1:
        return rng.random() < 0.5
    if choice == 2:
        return rng.choice(INTERESTING_INTS)
    if choice == 3:
        return rng.choice(INTERESTING_FLOATS)
    if choice == 5 and depth < 2:
        return [random_json_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    if choice == 6 and depth < 2:
        return {rng.choice(INTERESTING_STRINGS): random_json_value(rng, depth + 1) for _ in range(rng.randrange(3))}
    return rng.choice(INTERESTING_STRINGS)


def _nudged(value: Any, rng: random.Random) -> Any:
    """A plausible wrong number near ``value``: off by a little, scaled, negated."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return random_json_value(rng)
    return rng.choice((value + 1, value - 1, value * 2, value * 1000, -value, 0,
                       value // 2 if isinstance(value, int) else value / 2))


def _random_slot(document: Any, rng: random.Random) -> tuple[Any, Any]:
    """A (container, key) of a JSON document, reached by a random walk from the top that stops at each level
    with probability 1/3; (None, None) stands for the document itself. A walk, not a uniform pick: the vocabulary
    of a tokenizer.json would otherwise take nearly every edit."""
    slot: tuple[Any, Any] = (None, None)
    node = document
    while isinstance(node, (dict, list)) and node and (slot == (None, None) or rng.random() > 1 / 3):
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        slot, node = (node, key), node[key]
    return slot


def mutate_json(document: Any, rng: random.Random) -> Any:
    """One edit of a parsed JSON document: a value replaced (by another type, a nearby number, or a value from
    elsewhere in the document), a key deleted or renamed, an element duplicated."""
    container, key = _random_slot(document, rng)
    if container is None:
        return random_json_value(rng)
    choice = rng.randrange(6)
    if choice == 0:
        container[key] = _nudged(container[key], rng)
    elif choice == 1:
        del container[key]
    elif choice == 2 and isinstance(container, dict):
        container[rng.choice(INTERESTING_STRINGS)] = container.pop(key)
    elif choice == 3 and isinstance(container, list):
        container.insert(key, container[key])
    elif choice == 4:
        other, other_key = _random_slot(document, rng)
        container[key] = copy.deepcopy(document if other is None else other[other_key])  # a copy: no cycle
    else:
        container[key] = random_json_value(rng)
    return document


def _mutate_json_text(contents: bytes, rng: random.Random) -> bytes | None:
    try:
        document = json.loads(contents)
    except (ValueError, RecursionError):
        return None
    document = mutate_json(document, rng)
    return json.dumps(document, indent=rng.choice((None, 2)), sort_keys=rng.random() < 0.5).encode()


def _mutate_toml(contents: bytes, rng: random.Random) -> bytes | None:
    try:
        document = tomllib.loads(contents.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return toml_text(mutate_json(document, rng)).encode("utf-8", "surrogatepass")


def toml_text(table: Any, prefix: str = "") -> str:
    """``table`` written as TOML (values TOML cannot hold, such as null, are left out)."""
    if not isinstance(table, dict):
        table = {"value": table}
    lines = [f"{json.dumps(key)} = {_toml_value(value)}" for key, value in table.items()
             if not isinstance(value, dict) and _toml_value(value) is not None]
    for key, value in table.items():
        if isinstance(value, dict):
            name = f"{prefix}{json.dumps(key)}"
            lines.append(f"\n[{name}]\n{toml_text(value, name + '.')}")
    return "\n".join(lines)


def _toml_value(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else "inf" if value == math.inf else "-inf" if value == -math.inf \
            else repr(value)
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(v for v in map(_toml_value, value) if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {v}" for k, v in
                               ((k, _toml_value(v)) for k, v in value.items()) if v is not None) + "}"
    return None


def _mutate_safetensors(contents: bytes, rng: random.Random) -> bytes | None:
    """Edit the header: its JSON (re-packed with its length, or keeping the old length), or the length."""
    if len(contents) < 8:
        return None
    (length,) = struct.unpack("<Q", contents[:8])
    header, rest = contents[8:8 + length], contents[8 + length:]
    if rng.random() < 0.25:
        new_length = _nudged(length, rng) if rng.random() < 0.5 else rng.choice(INTERESTING_INTS)
        return struct.pack("<Q", new_length % 2**64) + contents[8:]
    try:
        document = json.loads(header)
    except (ValueError, RecursionError):
        return None
    text = json.dumps(mutate_json(document, rng)).encode()
    packed_length = len(text) if rng.random() < 0.8 else length
    return struct.pack("<Q", packed_length) + text + rest


def _mutate_onnx(contents: bytes, rng: random.Random) -> bytes | None:
    """Edit the ModelProto: a tensor's external-data entries, dims, type or bytes; a node; or truncate it."""
    import onnx
    from google.protobuf.message import DecodeError

    if rng.random() < 0.2:
        return contents[:rng.randrange(len(contents) + 1)]
    try:
        model = onnx.ModelProto.FromString(contents)
    except (DecodeError, ValueError, RuntimeWarning):
        return None
    tensors = list(model.graph.initializer) + [attribute.t for node in model.graph.node
                                               for attribute in node.attribute if attribute.HasField("t")]
    choice = rng.randrange(8)
    if choice < 5 and tensors:
        _mutate_tensor(rng.choice(tensors), choice, rng)
    elif choice == 5 and len(model.graph.node):
        node = rng.choice(model.graph.node)
        if rng.random() < 0.5:
            node.op_type = rng.choice(("Foo", "Attention", "MatMul", ""))
        elif len(node.input):
            node.input[rng.randrange(len(node.input))] = rng.choice(("", "missing", *node.output))
    elif choice == 6:
        model.ir_version = rng.choice(INTERESTING_INTS) % 2**63
    else:
        if len(model.opset_import):
            model.opset_import[0].version = rng.choice(INTERESTING_INTS) % 2**63
    return model.SerializeToString()


def _mutate_tensor(tensor, choice: int, rng: random.Random) -> None:
    import onnx

    if choice == 0:  # where its external data lives
        locations = [entry for entry in tensor.external_data if entry.key == "location"]
        if locations and rng.random() < 0.8:
            locations[0].value = rng.choice(PROTOBUF_STRINGS)
        else:
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", rng.choice(PROTOBUF_STRINGS)
            tensor.data_location = onnx.TensorProto.EXTERNAL
    elif choice == 1:  # the offset and length of its external data
        key = rng.choice(("offset", "length"))
        entries = [entry for entry in tensor.external_data if entry.key == key]
        number = entries[0].value if entries and isinstance(entries[0].value, str) else ""  # bytes: not UTF-8
        value = str(_nudged(int(number), rng)) if re.fullmatch(r"-?[0-9]+", number) and rng.random() < 0.5 \
            else rng.choice((str(rng.choice(INTERESTING_INTS)), "abc", "", "1e3", " 7"))
        if entries:
            entries[0].value = value
        else:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    elif choice == 2 and len(tensor.dims):  # its shape
        index = rng.randrange(len(tensor.dims))
        tensor.dims[index] = max(-(2**63), min(2**63 - 1, _nudged(tensor.dims[index], rng) if rng.random() < 0.5
                                              else rng.choice(INTERESTING_INTS)))
    elif choice == 3:  # its element type
        tensor.data_type = rng.randrange(0, 26)
    else:  # its bytes stored inline instead
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
        tensor.raw_data = bytes(rng.choice((0, 1, 3, 4, 64, 4096)))
