"""Fuzz targets for the loaders that read files a user hands us, and the oracle that tells our errors from bugs.

A ``Loader`` feeds one input to one loader through a scratch copy of a real artifact or checkpoint. The
input's first byte picks which of the loader's files it replaces; the rest is that file's new contents. A
loader may refuse an input only with a one-line ``NanoexportError`` (at the command line: exit code 2 and one
``error:`` line); anything else that escapes is a bug, reported as a ``Crash``: the exception's type and the
innermost line of nanoexport it escaped from.

``mutate`` (``fuzz_mutations.py``) makes inputs from the seeds (the files of a real export): byte edits, and
edits that know the format. ``tests/test_fuzz.py`` runs a few thousand inputs per loader
from a fixed seed; ``benchmarks/fuzz.py`` hands the same targets and mutator to atheris for long runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import random
import shutil
import signal
import struct
import traceback
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nanoexport
from fuzz_mutations import mutate, toml_text
from nanoexport.errors import NanoexportError

PACKAGE_ROOT = Path(nanoexport.__file__).resolve().parent
DEMO_CHECKPOINT = PACKAGE_ROOT / "assets" / "demo"  # the bundled demo model: weights, config and tokenizer
INPUT_SECONDS = 20.0  # an input that takes longer is reported as a hang



class InputTimeout(BaseException):
    """An input ran past its loader's ``input_seconds``. A BaseException, so that ``except Exception``
    cannot swallow it."""


class BadOutcome(Exception):
    """A loader returned what no input may make it return: an exit code outside 0-2, an error of several lines,
    a config holding a value of the wrong type. The first argument names the kind, the same for every input."""


class Reached(BaseException):
    """A damaged artifact was accepted up to where validation writes its report: a pass, and where the input
    stops."""


@dataclass(frozen=True)
class Crash:
    """A distinct bug: the exception's type and the innermost line of nanoexport it escaped from."""

    kind: str
    where: str

    def __str__(self) -> str:
        return f"{self.kind} at {self.where}"


@dataclass
class Loader:
    """One loader under fuzzing: the files an input may replace, their formats and seeds, and ``run``, which
    feeds it the contents of file number ``index``."""

    name: str
    files: tuple[str, ...]
    formats: tuple[str, ...]  # per file: json | toml | safetensors | onnx | bytes
    originals: tuple[bytes, ...]
    run: Callable[[int, bytes], None]
    input_seconds: float = INPUT_SECONDS  # longer, and the input counts as a hang

    @property
    def seeds(self) -> list[bytes]:
        return [bytes([index]) + contents for index, contents in enumerate(self.originals)]

    def split(self, data: bytes) -> tuple[int, bytes]:
        return (data[0] % len(self.files), data[1:]) if data else (0, b"")

    def check(self, data: bytes) -> Crash | None:
        """Feed ``data``; None when the loader accepted it or refused it with one line, else the bug."""
        index, contents = self.split(data)
        try:
            with _time_limit(self.input_seconds):
                self.run(index, contents)
        except (Reached, NanoexportError) as error:
            if "\n" in str(error):
                return Crash("NanoexportError of several lines", _where(error))
            return None
        except BadOutcome as error:
            return Crash(f"BadOutcome: {error.args[0]}", _where(error))
        except InputTimeout as error:
            return Crash(f"hang (over {self.input_seconds:.0f} s)", _where(error))
        except Exception as error:  # the oracle: every other exception type is the bug we look for
            return Crash(type(error).__name__, _where(error))
        return None

    def mutate(self, data: bytes, rng: random.Random) -> bytes:
        """One to four stacked edits of ``data``, in the format of the file it replaces."""
        index, contents = self.split(data)
        for _ in range(1 + min(3, int(rng.expovariate(1.0)))):
            contents = mutate(contents, self.formats[index], rng)
        return bytes([index]) + contents


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def expire(signal_number, frame):
        raise InputTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)


def _where(error: BaseException) -> str:
    """The innermost frame in nanoexport (where the exception left our code), else the innermost frame."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [frame for frame in frames if Path(frame.filename).resolve().is_relative_to(PACKAGE_ROOT)]
    frame = (ours or frames)[-1]
    path = Path(frame.filename).resolve()
    shown = path.relative_to(PACKAGE_ROOT.parent) if path.is_relative_to(PACKAGE_ROOT.parent) else path.name
    return f"{shown}:{frame.lineno} in {frame.name}"


# Mutation --------------------------------------------------------------------------------------------------
# Loaders ---------------------------------------------------------------------------------------------------

LOADERS = ("manifest", "inspect", "validate", "safetensors", "config", "toml", "tokenizer", "onnx", "openvino",
           "coreml", "qnn")
# The target whose artifact a loader damages; the others damage the checkpoint.
ARTIFACT_TARGETS = {"manifest": "onnx", "inspect": "onnx", "validate": "onnx", "onnx": "onnx",
                    "openvino": "openvino", "coreml": "coreml", "qnn": "qnn"}


def make_loader(name: str, artifact_for: Callable[[str], Path], checkpoint: Path, scratch: Path) -> Loader:
    """Loader ``name`` over copies (under ``scratch``) of the ``checkpoint`` folder, which holds safetensors
    weights and tokenizer files, or of ``artifact_for(target)``, an export of it for that target."""
    folder = scratch / name
    shutil.rmtree(folder, ignore_errors=True)
    target = ARTIFACT_TARGETS.get(name)
    shutil.copytree(artifact_for(target) if target else checkpoint, folder)
    return globals()[f"_{name}_loader"](folder)


def _files(folder: Path, names: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple((folder / name).read_bytes() for name in names)


def _restore(folder: Path, names: tuple[str, ...], originals: tuple[bytes, ...]) -> None:
    for name, contents in zip(names, originals):
        (folder / name).write_bytes(contents)


def _rehash(folder: Path, manifest: bytes, changed: str, contents: bytes) -> None:
    """Write ``manifest`` with the entry of ``changed`` agreeing with its new ``contents``: a damaged
    artifact whose checksums were recomputed, which ``Artifact.verify`` cannot tell from a sound one."""
    document = json.loads(manifest)
    for entry in document["files"]:
        if entry["path"] == changed:
            entry["size"], entry["sha256"] = len(contents), hashlib.sha256(contents).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(document, indent=2, sort_keys=True))


def cli_outcome(argv: list[str], allowed: tuple[int, ...]) -> int:
    """Run ``nanoexport`` in this process, its output discarded; refuse an exit code outside ``allowed`` and an
    error of more than one line (warnings logged before it are fine)."""
    from nanoexport.cli import main

    errors = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
        code = main(argv)
    if code not in allowed:
        raise BadOutcome(f"exit code {code}")
    lines = errors.getvalue().strip().splitlines()
    if code == 2 and not (lines and lines[-1].startswith("error: ") and sum(line.startswith("error:")
                                                                            for line in lines) == 1):
        raise BadOutcome("an error of several lines")
    return code


def _manifest_loader(folder: Path) -> Loader:
    from nanoexport.artifact import Artifact

    def run(index: int, contents: bytes) -> None:
        (folder / "manifest.json").write_bytes(contents)
        artifact = Artifact.load(folder)
        artifact.verify()
        assert isinstance(artifact.target, str)

    return Loader("manifest", ("manifest.json",), ("json",), _files(folder, ("manifest.json",)), run)


def _inspect_loader(folder: Path) -> Loader:
    names = ("manifest.json", "build.json")
    originals = _files(folder, names)

    def run(index: int, contents: bytes) -> None:
        _restore(folder, names, originals)
        (folder / names[index]).write_bytes(contents)
        cli_outcome(["inspect", str(folder)], allowed=(0, 2))

    return Loader("inspect", names, ("json", "json"), originals, run)


def _validate_loader(folder: Path) -> Loader:
    """``nanoexport validate`` on a damaged manifest, or on a damaged tokenizer whose checksum the manifest
    agrees with (see ``_validating_loader``)."""
    names = ("manifest.json", *(f"tokenizer/{name}" for name in ("tokenizer.json", "tokenizer_config.json")
                                if (folder / "tokenizer" / name).is_file()))
    return _validating_loader("validate", folder, names, ("json",) * len(names))


def _openvino_loader(folder: Path) -> Loader:
    """An openvino artifact's IR (``openvino_model.xml``), checksum recomputed, through ``nanoexport
    validate``: OpenVINO reading and compiling it, then running the prompts."""
    return _validating_loader("openvino", folder, ("openvino_model.xml",), ("bytes",))


def _coreml_loader(folder: Path) -> Loader:
    """A coreml artifact's program (the ``model.mlmodel`` protobuf), checksum recomputed, through ``nanoexport
    validate``: the interpreter reading it and running the prompts."""
    return _validating_loader("coreml", folder, ("model.mlpackage/Data/com.apple.CoreML/model.mlmodel",),
                              ("bytes",))


def _qnn_loader(folder: Path) -> Loader:
    """A qnn artifact's parts list, decode QDQ graph and compiled decode graph, checksums recomputed, through
    ``nanoexport validate``: the runner opening its sessions (HTP emulator when installed, CPU for the note
    comparing the two) and running the prompts."""
    # An intact artifact takes ~4 s per input here and over 20 s on a busy machine (the HTP emulator).
    return _validating_loader("qnn", folder, ("qnn_parts.json", "decode.onnx", "decode_ctx.onnx"),
                              ("json", "onnx", "onnx"), input_seconds=120.0)


def _validating_loader(name: str, folder: Path, names: tuple[str, ...], formats: tuple[str, ...],
                       input_seconds: float = INPUT_SECONDS) -> Loader:
    """``nanoexport validate`` on the artifact in ``folder`` with one of ``names`` damaged: the manifest as
    written, any other file with its checksum recomputed in the manifest. Validation's measures are skipped
    (they read nothing more from the folder and cost seconds), the target's notes run, and the input stops
    where the report would be written (see ``Reached``); the reference model is loaded once."""
    validation = importlib.import_module("nanoexport.validate")  # the module; nanoexport.validate is the function

    manifest = (folder / "manifest.json").read_bytes()
    originals = _files(folder, names)
    references: dict[str, Any] = {}

    def load_reference_once(source, lazy: bool = False):
        if str(source) not in references:
            references[str(source)] = real_load_checkpoint(source, lazy)
        return references[str(source)]

    def skip(*args, **kwargs):
        pass

    def stop(*args, **kwargs):
        raise Reached()

    real_load_checkpoint = validation.load_checkpoint

    def run(index: int, contents: bytes) -> None:
        (folder / "manifest.json").write_bytes(manifest)
        _restore(folder, names, originals)
        (folder / names[index]).write_bytes(contents)
        if names[index] != "manifest.json":
            _rehash(folder, manifest, names[index], contents)
        with _patched(validation, load_checkpoint=load_reference_once, _compare_logits=skip, _kv_consistency=skip,
                      _greedy_agreement=skip, _perplexity=skip, write_report=stop):
            cli_outcome(["validate", str(folder)], allowed=(0, 1, 2))

    return Loader(name, names, formats, originals, run, input_seconds)


@contextlib.contextmanager
def _patched(module: Any, **replacements: Any) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in replacements}
    for name, value in replacements.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _safetensors_loader(folder: Path) -> Loader:
    """The header of ``model.safetensors`` (its 8-byte length and JSON) checked as ``load_checkpoint`` does,
    then read by ``SafetensorsWeights``: shapes, digests, and the smallest tensors' values. The tensor data
    after the header is the real file's length of zeros."""
    from nanoexport.capture.checkpoint import _weight_files
    from nanoexport.capture.weights import SafetensorsWeights

    path = folder / "model.safetensors"
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = struct.pack("<Q", length) + handle.read(length)
    data_bytes = path.stat().st_size - len(header)

    def run(index: int, contents: bytes) -> None:
        with path.open("wb") as handle:
            handle.write(contents)
            handle.truncate(len(contents) + data_bytes)  # sparse: costs no writing
        weights = SafetensorsWeights(_weight_files(folder))
        names = sorted(weights.entries, key=lambda name: weights.byte_ranges[name][1] - weights.byte_ranges[name][0])
        for name in names:
            weights.shape(name)
        for name in names[:3]:
            weights.digest(name)
            weights.read(name)

    return Loader("safetensors", ("model.safetensors",), ("safetensors",), (header,), run)


def _config_loader(folder: Path) -> Loader:
    """A checkpoint's ``config.json`` read by ``load_checkpoint`` as export reads it (lazily)."""
    from nanoexport.capture.checkpoint import load_checkpoint

    def run(index: int, contents: bytes) -> None:
        (folder / "config.json").write_bytes(contents)
        load_checkpoint(folder, lazy=True)

    return Loader("config", ("config.json",), ("json",), _files(folder, ("config.json",)), run)


def _toml_loader(folder: Path) -> Loader:
    """``nanoexport.toml`` read by ``load_config``; the seed holds the settings of the real export."""
    from nanoexport.config import ExportConfig, load_config

    path = folder / "nanoexport.toml"
    settings = ExportConfig(model=str(folder), out="out").manifest_view()
    seed = toml_text({key: value for key, value in settings.items() if value not in ([], "")}).encode()

    def run(index: int, contents: bytes) -> None:
        path.write_bytes(contents)
        _check_types(load_config(path))

    return Loader("toml", ("nanoexport.toml",), ("toml",), (seed,), run)


def _check_types(settings: Any, where: str = "") -> None:
    """Refuse a config that ``load_config`` accepted with a value its dataclass field does not declare (the
    stage that reads it would fail instead, far from the file)."""
    hints = typing.get_type_hints(type(settings))
    for field in dataclasses.fields(settings):
        value, hint = getattr(settings, field.name), hints[field.name]
        if dataclasses.is_dataclass(value):
            _check_types(value, f"{where}{field.name}.")
        elif field.name == "options":
            for name, options in value.items():
                _check_types(options, f"{where}[{name}].")
        elif not _fits(value, hint):
            raise BadOutcome(f"load_config accepted a wrong type in {where}{field.name}", value)


def _fits(value: Any, hint: Any) -> bool:
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:  # a quantization variant's settings, checked as [quant]'s are
        return True
    if origin is list:
        return isinstance(value, list) and all(_fits(item, arguments[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(key, arguments[0]) and _fits(item, arguments[1])
                                               for key, item in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) and (hint is bool or not isinstance(value, bool))


def _tokenizer_loader(folder: Path) -> Loader:
    """A checkpoint's tokenizer files as export meets them: checked when the checkpoint is loaded, then made
    into the tokenizer calibration encodes text with."""
    from nanoexport.calibration.data import load_tokenizer
    from nanoexport.capture.checkpoint import _load_config, check_tokenizer

    names = ("tokenizer.json", "tokenizer_config.json")
    originals = _files(folder, names)
    hf_config = _load_config(folder)

    def run(index: int, contents: bytes) -> None:
        files = dict(zip(names, originals))
        files[names[index]] = contents
        check_tokenizer(files, hf_config, folder)
        load_tokenizer(files).encode("To be, or not to be, that is the question:")

    return Loader("tokenizer", names, ("json", "json"), originals, run)


def _onnx_loader(folder: Path) -> Loader:
    """An onnx-target artifact's ``model.onnx`` (checksum recomputed in the manifest) opened by the target's
    validation runner, its weights file intact."""
    from nanoexport.artifact import Artifact
    from nanoexport.targets import get_target

    import onnxruntime

    onnxruntime.set_default_logger_severity(4)  # the runtime logs each refused model; the outcome is what counts
    manifest = (folder / "manifest.json").read_bytes()

    def run(index: int, contents: bytes) -> None:
        (folder / "model.onnx").write_bytes(contents)
        _rehash(folder, manifest, "model.onnx", contents)
        artifact = Artifact.load(folder)
        with contextlib.redirect_stdout(io.StringIO()):  # where onnxruntime prints the providers it retries with
            get_target(artifact.target).runner(artifact)

    return Loader("onnx", ("model.onnx",), ("onnx",), _files(folder, ("model.onnx",)), run)


def fuzz(loader: Loader, inputs: int, seed: int = 0) -> dict[Crash, bytes]:
    """Feed ``loader`` ``inputs`` inputs mutated from its seeds (the seeds first) by a generator seeded with
    ``seed``; returns each distinct crash with the first input that showed it."""
    rng = random.Random(seed)
    crashes: dict[Crash, bytes] = {}
    for number in range(inputs):
        seeds = loader.seeds
        data = seeds[number] if number < len(seeds) else loader.mutate(rng.choice(seeds), rng)
        crash = loader.check(data)
        if crash is not None and crash not in crashes:
            crashes[crash] = data
    return crashes
