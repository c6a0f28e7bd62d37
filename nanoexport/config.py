"""One typed configuration, read from ``nanoexport.toml`` (or ``--config FILE``) and overridden by flags.

Example ``nanoexport.toml``::

    model = "path/to/checkpoint"
    target = "onnx"
    targets = ["onnx", "openvino", "coreml", "qnn"]   # for `nanoexport build`

    [quant]
    weights = "int4"
    block_size = 32
    algo = "gptq"
    overrides = { lm_head = "int8" }

    # `nanoexport build` quantizes once per variant: [quant] with the variant's settings over it
    [quant_variants.int4-gptq]
    [quant_variants.int8-rtn]
    weights = "int8"
    algo = "rtn"

    [validate]
    logits_max_abs = 1e-4
    greedy_tokens = 32

    [compare]
    quantized_perplexity_spread = 0.005

    [onnx]
    padded_batches = false

    [qnn]
    soc_model = 57
    max_part_bytes = "300MB"
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoexport.errors import NanoexportError

DEFAULT_CONFIG_FILE = "nanoexport.toml"
# A quantization variant's name is the folder its artifacts go into: one path component, never hidden.
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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
    perplexity_increase: float = 0.001  # relative to the reference's perplexity
    # Artifacts with quantized weights are held to these instead (logits max-abs is then not gated).
    quantized_logits_min_cosine: float = 0.99
    quantized_top1_agreement: float = 0.85
    quantized_greedy_agreement: float = 0.1  # greedy paths part at the first near-tie
    quantized_perplexity_increase: float = 0.05
    # Quantized activations round per call: a prefill and a decode step can land one level apart (targets
    # that quantize activations set their own, see Target.validation_defaults).
    quantized_kv_max_abs: float = 1e-2
    eval_text: str = ""  # default: the demo model's held-out plays
    eval_window: int = 256  # tokens per perplexity window
    eval_windows: int = 16  # windows scored; 0 scores the whole text


DATA_AWARE_DEFAULT = "gptq"


@dataclass
class QuantConfig:
    """How weights (and, for QDQ targets, activations) are quantized. ``weights = "none"`` keeps fp32.

    Layer names are the weights' module paths (``model.layers.0.mlp.down_proj``; merged projections as
    ``model.layers.0.self_attn.q_proj+k_proj+v_proj``); patterns are shell-style (``*.mlp.*``).
    """

    weights: str = "none"  # none | fp16 | int4 | uint4 | int8 | nf4
    block_size: int = 32  # input rows per scale, 16 to 256
    algo: str = ""  # rtn | se | gptq | awq; unset: gptq given --calib data, else rtn (see ``algorithm``)
    asymmetric: bool = False  # zero points per block
    # 4-bit MatMuls quantize their activations to int8 on the fly where the runtime can (ONNX Runtime's
    # MatMulNBits accuracy_level 4, as onnxruntime-genai's model builder does): about twice the int4 decode
    # speed on CPU for +0.01% perplexity on the demo model.
    dynamic_int8: bool = True
    pad_blocks: bool = False  # allow a last partial block where block_size does not divide the input dim
    scale_dtype: str = "fp16"  # fp16 | fp32
    # Layers left unquantized, stored in fp16: the output head and an embedding table of its own (a tied
    # one is the head's). An ``overrides`` entry "float" keeps a layer in fp32.
    keep_float: list[str] = field(default_factory=lambda: ["lm_head", "*embed_tokens"])
    overrides: dict[str, str] = field(default_factory=dict)  # layer pattern -> weight type, e.g. lm_head = "int8"
    calib: str = ""  # text, JSONL, folder or saved dataset; default: calibration.txt in the checkpoint folder
    calib_samples: int = 128  # as many windows as NNCF takes by default
    calib_window: int = 256  # tokens per calibration sample
    seed: int = 0
    # Added to the Hessian's diagonal, as a fraction of its mean: 0.1 rather than the paper's 0.01 lowered
    # the perplexity change on all four models of quant_bench's set (a GPTQ fitted less to its calibration).
    gptq_damp: float = 0.1
    gptq_act_order: bool = False
    size_budget: str = ""  # e.g. "2.2GB": per-layer int4/int8 chosen by sensitivity to fit
    activations: str = "none"  # none | a16 | a8: QuantizeLinear/DequantizeLinear on activations (QDQ targets)
    observer: str = "minmax"  # minmax | percentile | mse
    activation_exclude: list[str] = field(
        default_factory=lambda: ["Softmax", "RMSNormalization", "LayerNormalization", "Attention"]
    )

    @property
    def algorithm(self) -> str:
        """The quantizer that runs: ``algo`` when set; otherwise, given calibration data (``calib``), the
        data-aware one with the best mean and worst case on the quality set (GPTQ with data-aware block
        scales, see benchmarks/quant_bench.py), else round to nearest, which needs no data."""
        return self.algo or (DATA_AWARE_DEFAULT if self.calib else "rtn")


@dataclass
class CompareConfig:
    """When ``nanoexport compare`` calls two artifacts of one model apart."""

    # Both with quantized weights: |perplexity a / perplexity b - 1| at most this.
    quantized_perplexity_spread: float = 0.005
    # Both float: the share of prompt positions where their top-1 tokens agree, at least this.
    float_top1_agreement: float = 0.99


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
    quant: QuantConfig = field(default_factory=QuantConfig)
    validate: ValidationConfig = field(default_factory=ValidationConfig)
    targets: list[str] = field(default_factory=list)  # what `nanoexport build` lowers the one quantization for
    # Variant name -> the [quant] settings it changes: `nanoexport build` quantizes once per variant and lowers
    # every target from each (see ``quant_settings``). Empty: one quantization, as [quant] says.
    quant_variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    compare: CompareConfig = field(default_factory=CompareConfig)
    # Target name -> that target's settings (its ``Target.options`` dataclass): the ``[onnx]``, ``[qnn]``...
    # tables of the config file, each checked by the target that declares it.
    options: dict[str, Any] = field(default_factory=lambda: target_options())

    def manifest_view(self) -> dict[str, Any]:
        """The settings that shape the artifact's bytes, without where it was written; each target's
        settings as a table of its own name, as in the config file."""
        view = dataclasses.asdict(self)
        # Where it goes, its siblings, how they are compared; a variant's settings are in its own "quant".
        for elsewhere in ("out", "targets", "quant_variants", "compare"):
            view.pop(elsewhere)
        view.update(view.pop("options"))
        return view


def target_options() -> dict[str, Any]:
    """Every target's settings at their defaults."""
    from nanoexport.targets import TARGETS

    return {name: target.options() for name, target in TARGETS.items() if target.options is not None}


def parse_size(text: str, flag: str) -> int:
    """``2.2GB``, ``900MB``, ``1.5GiB`` or a byte count -> bytes; ``flag`` names the setting in the error."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise NanoexportError(f"{flag} {text!r} is not a size; write it like 2.2GB or 900MB")
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(prefix.upper() or " "))


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None, preset: str = "") -> ExportConfig:
    """Defaults, then the target's ``preset`` (``presets/<target>-<preset>.toml`` in the package), then ``path``
    (or ``./nanoexport.toml`` when it exists), then ``overrides`` (flags set)."""
    config = ExportConfig()
    if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        path = Path(DEFAULT_CONFIG_FILE)
    settings = _read_toml(path) if path is not None else {}
    flags = _without_unset(overrides or {})
    if preset:
        target = flags.get("target") or settings.get("target") or config.target
        _apply(config, _read_toml(preset_file(str(target), preset)), f"preset {preset!r}")
    _apply(config, settings, str(path))
    _apply(config, flags, "flags")
    for variant in config.quant_variants.values():  # flags are the last word, in every variant too
        variant.update(flags.get("quant", {}))
    return config


def quant_settings(config: ExportConfig) -> dict[str, QuantConfig]:
    """The quantizations ``nanoexport build`` runs, by name: each variant of ``quant_variants`` is ``quant``
    with the variant's settings over it; without variants, ``{"": quant}``. Two variants that would quantize
    alike are refused (one would redo the other's work into another folder)."""
    if not config.quant_variants:
        return {"": copy.deepcopy(config.quant)}
    settings: dict[str, QuantConfig] = {}
    for name, table in _checked_variants(config.quant_variants, "the config").items():
        quant = copy.deepcopy(config.quant)
        _apply(quant, table, f"[quant_variants.{name}]")
        alike = next((other for other, theirs in settings.items() if _effective(theirs) == _effective(quant)), None)
        if alike is not None:
            raise NanoexportError(f"quantization variants {alike} and {name} quantize alike; remove one or make "
                                  "them differ (a quant flag such as --algo sets every variant)")
        settings[name] = quant
    return settings


def _effective(quant: QuantConfig) -> QuantConfig:
    """``quant`` with its quantizer resolved: ``algo = ""`` and ``algo = "rtn"`` without data quantize alike."""
    return dataclasses.replace(quant, algo=quant.algorithm)


def _checked_variants(variants: Any, origin: str) -> dict[str, dict[str, Any]]:
    """``quant_variants`` read from ``origin``: tables of [quant] settings (names and types checked now, values
    with each target's plan), named so that each can be a folder."""
    if not isinstance(variants, dict):
        raise NanoexportError(f"setting 'quant_variants' in {origin} must be a table of tables, like "
                              "[quant_variants.int4-gptq]")
    for name, table in variants.items():
        if not VARIANT_NAME.fullmatch(name):
            raise NanoexportError(f"quantization variant name {name!r} in {origin} cannot name a folder; use at most "
                                  "64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        if not isinstance(table, dict):
            raise NanoexportError(f"setting 'quant_variants.{name}' in {origin} must be a table of [quant] settings")
        _apply(QuantConfig(), table, f"{origin} [quant_variants.{name}]")
    return copy.deepcopy(variants)


PRESETS = Path(__file__).resolve().parent / "presets"


def preset_file(target: str, name: str) -> Path:
    """The settings file of preset ``name`` for ``target``; refused in one line, listing those that exist."""
    path = PRESETS / f"{target}-{name}.toml"
    if not path.is_file():
        known = sorted(file.stem.removeprefix(f"{target}-") for file in PRESETS.glob(f"{target}-*.toml"))
        raise NanoexportError(f"no preset {name!r} for target {target}; "
                              f"{'choose one of ' + ', '.join(known) if known else 'it has none'}")
    return path


def validation_config(values: dict[str, Any], origin: str) -> ValidationConfig:
    """Thresholds from a table of settings (an artifact's manifest records its export's), checked as a config
    file's are: an unknown name or a wrong type is refused, naming ``origin``."""
    config = ValidationConfig()
    _apply(config, values, origin)
    return config


def _without_unset(values: dict[str, Any]) -> dict[str, Any]:
    """Flags left unset are None; nested tables (``{"quant": {...}}``) are pruned the same way."""
    kept = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _without_unset(value)
        if value is not None and value != {}:
            kept[key] = value
    return kept


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NanoexportError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as error:
        raise NanoexportError(f"config file {path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                              "save it as UTF-8") from None
    except tomllib.TOMLDecodeError as error:
        raise NanoexportError(f"config file {path} is not valid TOML: {error}") from None


def _apply(target: Any, values: dict[str, Any], origin: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(target)}
    tables = target.options if isinstance(target, ExportConfig) else {}
    for key, value in values.items():
        if key in tables:  # a target's settings table
            if not isinstance(value, dict):
                raise NanoexportError(f"setting {key!r} in {origin} must be a table")
            _apply(tables[key], value, f"{origin} [{key}]")
            continue
        if key == "quant_variants" and isinstance(target, ExportConfig):
            target.quant_variants = _checked_variants(value, origin)
            continue
        if key not in fields or key == "options":
            known = ", ".join(sorted([*(set(fields) - {"options"}), *tables]))
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
        if expected is str and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # ids and byte counts written as numbers: soc_model = 57
        if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
            raise NanoexportError(
                f"setting {key!r} in {origin} must be {expected.__name__}, not {type(value).__name__}"
            )
        item_type = _item_type(type(target), key)
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        if item_type is not None and not all(isinstance(item, item_type) for item in items):
            raise NanoexportError(f"setting {key!r} in {origin} must be a {expected.__name__} of "
                                  f"{item_type.__name__} values")
        setattr(target, key, value)


@functools.cache
def _item_type(settings: type, name: str) -> type | None:
    """The type of the items of a list or table setting (``list[str]`` -> str); None for other settings."""
    arguments = typing.get_args(typing.get_type_hints(settings)[name])
    return arguments[-1] if arguments and isinstance(arguments[-1], type) else None
