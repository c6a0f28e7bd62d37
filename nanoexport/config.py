"""One typed configuration, read from ``nanoexport.toml`` (or ``--config FILE``) and overridden by flags.

Example ``nanoexport.toml``::

    model = "path/to/checkpoint"
    target = "onnx"

    [validate]
    logits_max_abs = 1e-4
    greedy_tokens = 32
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoexport.errors import NanoexportError

DEFAULT_CONFIG_FILE = "nanoexport.toml"


@dataclass
class ValidationConfig:
    """What validation measures and the thresholds that make it fail."""

    logits_max_abs: float = 1e-4
    logits_min_cosine: float = 0.9999
    top1_agreement: float = 1.0
    kv_max_abs: float = 1e-4
    greedy_agreement: float = 1.0
    greedy_tokens: int = 32
    decode_steps: int = 4


@dataclass
class ExportConfig:
    """Everything that decides what an export produces. ``out`` only decides where it goes."""

    model: str = ""
    target: str = "onnx"
    out: str = ""
    passes: list[str] = field(default_factory=list)  # empty: every pass
    skip_passes: list[str] = field(default_factory=list)
    verify_passes: bool = False
    kv_cache: str = ""  # dynamic | static | sliding; empty: the target's default
    max_context: int = 2048  # capacity of a static cache
    split_prefill_decode: bool = False  # two static-shape graphs sharing one weights file
    prefill_chunk: int = 128  # tokens per call of the prefill graph
    validate: ValidationConfig = field(default_factory=ValidationConfig)

    def manifest_view(self) -> dict[str, Any]:
        """The settings that shape the artifact's bytes, without where it was written."""
        view = dataclasses.asdict(self)
        view.pop("out")
        return view


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> ExportConfig:
    """Defaults, then ``path`` (or ``./nanoexport.toml`` when it exists), then ``overrides`` (flags set)."""
    config = ExportConfig()
    if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        path = Path(DEFAULT_CONFIG_FILE)
    if path is not None:
        _apply(config, _read_toml(path), str(path))
    _apply(config, {key: value for key, value in (overrides or {}).items() if value is not None}, "flags")
    return config


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NanoexportError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise NanoexportError(f"config file {path} is not valid TOML: {error}") from None


def _apply(target: Any, values: dict[str, Any], origin: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise NanoexportError(f"unknown setting {key!r} in {origin}; known settings: {known}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise NanoexportError(f"setting {key!r} in {origin} must be a table")
            _apply(current, value, f"{origin} [{key}]")
            continue
        expected = type(current)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
            raise NanoexportError(
                f"setting {key!r} in {origin} must be {expected.__name__}, not {type(value).__name__}"
            )
        setattr(target, key, value)
