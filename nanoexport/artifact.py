"""The artifact folder: model files, tokenizer, and a manifest with a checksum for every file.

Writes are atomic: everything is written into a temporary folder beside the destination, the manifest
last, and the folder is renamed into place only when complete. Nothing in the hashed set depends on
time or on where the artifact was written, so the same inputs give byte-identical artifacts.

One export at a time writes a destination: it holds a lock (``flock`` on ``.NAME.lock`` beside it) from
the start to the rename, so a second export to the same ``--out`` is refused, and a temporary folder found
beside the destination by the lock's holder is known to be left by a killed run and is removed.
"""

from __future__ import annotations

import errno
import glob
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoexport.config import ValidationConfig, validation_config
from nanoexport.errors import NanoexportError, first_line
from nanoexport.interrupts import uninterrupted

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
# Written by validation after the export; outside the hashed set.
# Written about the artifact, not part of it: outside the manifest's hashed set, and free to hold timings.
REPORT_FILES = ("report.json", "report.html", "build.json")
BUILD_LOG = "build.json"
SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
PARTIAL_FOLDER = re.compile(r"^\..+\.(partial|old)-[^/]+$")


@dataclass
class Artifact:
    """An artifact folder on disk and its manifest."""

    path: Path
    manifest: dict[str, Any]
    # The loaded source model when the artifact was exported in this process: validation's reference.
    checkpoint: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        """Open an artifact folder, checking that its manifest is readable and its paths stay inside it."""
        folder = Path(path)
        manifest_path = folder / MANIFEST
        if PARTIAL_FOLDER.match(folder.name):
            raise NanoexportError(f"{folder} is the unfinished folder of an export that did not complete, not an "
                                  "artifact; export again (the next export to that destination removes it)")
        if not manifest_path.is_file():
            raise NanoexportError(f"{folder} is not a nanoexport artifact: {MANIFEST} is missing")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as error:  # bad JSON or UTF-8, a huge number, deep nesting
            reason = first_line(error)
            raise NanoexportError(f"{manifest_path} is not valid JSON ({reason}); re-export the artifact") from None
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        if version != SCHEMA_VERSION:
            raise NanoexportError(
                f"{manifest_path} has schema_version {_shown(repr(version))}; "
                f"this nanoexport reads version {SCHEMA_VERSION}: re-export with this version"
            )
        _check_fields(manifest, MANIFEST_FIELDS, manifest_path, "the artifact is corrupt: re-export it")
        for entry in manifest["files"]:
            inside(folder, entry["path"])
        return cls(folder, manifest)

    @property
    def target(self) -> str:
        return self.manifest["target"]

    def thresholds(self) -> ValidationConfig:
        """The validation thresholds its export recorded in the manifest, checked as a config file's are."""
        return validation_config(self.manifest["config"]["validate"], f"{self.path / MANIFEST} [config.validate]")

    def file(self, relative: str) -> Path:
        """The path of one of the artifact's files (or folders); refuses paths that escape the folder, and files
        the artifact does not have (its manifest may name another target's)."""
        path = inside(self.path, relative)
        if not path.exists():
            raise NanoexportError(f"the artifact {self.path} has no {_shown(relative)}, which its {self.target} "
                                  "runtime needs; the artifact is incomplete or its manifest damaged: re-export it")
        return path

    def verify(self) -> list[str]:
        """Files whose size or sha256 differ from the manifest, or that are missing."""
        problems = []
        for entry in self.manifest["files"]:
            path = inside(self.path, entry["path"])
            name = _shown(entry["path"])
            try:
                if not path.is_file():
                    problems.append(f"{name}: missing")
                elif path.stat().st_size != entry["size"] or sha256_of(path) != entry["sha256"]:
                    problems.append(f"{name}: contents differ from the manifest")
            except OSError as error:  # a name too long for the file system, a file we may not read
                problems.append(f"{name}: unreadable ({error.strerror})")
        return problems


def inside(folder: Path, relative: str) -> Path:
    """``folder / relative``, refusing absolute paths and paths that escape ``folder``."""
    root = folder.resolve()
    try:
        candidate = (root / relative).resolve()
        os.fsencode(candidate)  # a NUL byte or a lone surrogate cannot name a file
    except ValueError:
        raise NanoexportError(f"path {_shown(relative)!r} in the artifact {folder} is not a file name; the artifact "
                              "is corrupt: re-export it") from None
    if Path(relative).is_absolute() or not candidate.is_relative_to(root):
        raise NanoexportError(f"path {_shown(relative)!r} escapes the artifact folder {folder}; the artifact is "
                              "corrupt")
    return candidate


def _shown(text: str) -> str:
    """``text`` cut to a length an error line can show."""
    return text if len(text) <= 200 else text[:200] + "..."


# What readers take from a manifest, checked on load so that a damaged one is refused in one line naming the
# field rather than met later as a KeyError. A dict lists the keys a table must have (others are free to
# come and go between versions); ``{str: x}`` is a table of any keys with values x; ``[x]`` a list of x; a
# tuple a choice, where None also allows the key to be missing. Validation reads its thresholds through
# ``ValidationConfig``, which checks them itself.
_IO_VALUE = {"name": str, "dtype": str, "shape": (None, [(int, str)])}
_DIGESTS = {"layers": {str: str}, "digest": str}
MANIFEST_FIELDS = {
    "target": str,
    "model_files": [str],
    "files": [{"path": str, "size": int, "sha256": str}],
    # weights_file: the file beside the source's config whose digest weights_sha256 is, when not its safetensors
    "source": {"name": str, "source": str, "family": str, "parameters": int, "weights_sha256": str,
               "weights_file": (None, str)},
    "config": {"validate": dict},
    "io": {
        "inputs": [_IO_VALUE],
        "outputs": [_IO_VALUE],
        "kv_cache": {"num_layers": int, "kv_heads": int, "head_dim": int, "vocab_size": int, "form": str,
                     "capacity": (None, int), "prefill_chunk": (None, int)},
    },
    "passes": [{"name": str, "nodes_before": int, "nodes_after": int}],
    "quantization": (None, {"layers": {str: str}, "bits_per_weight": (None, int, float)}),
    # Digests of the quantized layers: as the canonical graph held them, and as the target stored them.
    "weight_digests": (None, {"canonical": _DIGESTS, "stored": (None, {**_DIGESTS, "equals_canonical": bool})}),
}
BUILD_LOG_FIELDS = {
    "passes": (None, [{"name": str, "seconds": float}]),
    "target_passes": (None, [{"name": str, "nodes_before": int, "nodes_after": int, "seconds": float,
                              "logits_change": (None, float)}]),
}


def read_build_log(folder: Path) -> dict[str, Any]:
    """The pass timings an export wrote beside its artifact (``build.json``), or {} when there are none."""
    path = folder / BUILD_LOG
    if not path.is_file():
        return {}
    fix = f"delete {BUILD_LOG} (it only holds timings) or re-export the artifact"
    try:
        build = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:
        reason = first_line(error)
        raise NanoexportError(f"{path} is not valid JSON ({reason}); {fix}") from None
    _check_fields(build, BUILD_LOG_FIELDS, path, fix)
    return build


def _check_fields(value: Any, schema: Any, path: Path, fix: str, where: str = "") -> None:
    """Refuse, naming the field, a ``value`` read from the JSON file ``path`` that does not fit ``schema``."""
    if isinstance(schema, tuple):
        if value is None and None in schema:
            return
        for choice in schema:
            if choice is not None and _matches(value, choice):
                _check_fields(value, choice, path, fix, where)
                return
    elif _matches(value, schema):
        if isinstance(schema, list):
            for index, item in enumerate(value):
                _check_fields(item, schema[0], path, fix, f"{where}[{index}]")
        elif isinstance(schema, dict) and str in schema:
            for key, item in value.items():
                _check_fields(item, schema[str], path, fix, f"{where}.{key}")
        elif isinstance(schema, dict):
            for key, item_schema in schema.items():
                if key not in value and not (isinstance(item_schema, tuple) and None in item_schema):
                    raise NanoexportError(f"{path} has no field {f'{where}.{key}'.lstrip('.')!r}; {fix}")
                _check_fields(value.get(key), item_schema, path, fix, f"{where}.{key}")
        return
    held = f"field {_shown(where.lstrip('.'))!r} is" if where else "holds"
    raise NanoexportError(f"{path}: {held} {_json_type(value)}, not {_describe(schema)}; {fix}")


def _matches(value: Any, schema: Any) -> bool:
    """Whether ``value`` has the outer type of ``schema`` (a bool is not a number here)."""
    if isinstance(schema, list):
        return isinstance(value, list)
    if isinstance(schema, dict) or schema is dict:
        return isinstance(value, dict)
    if schema in (int, float):
        return isinstance(value, (int, float) if schema is float else int) and not isinstance(value, bool)
    return isinstance(value, schema)


def _describe(schema: Any) -> str:
    if isinstance(schema, tuple):
        return " or ".join("null" if choice is None else _describe(choice) for choice in schema)
    if isinstance(schema, list):
        return "a list"
    if isinstance(schema, dict) or schema is dict:
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}[schema]


def _json_type(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(folder: Path) -> list[dict[str, Any]]:
    """Every file under ``folder`` (sorted, posix paths) with its size and sha256."""
    files = sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file())
    return [
        {"path": relative, "size": path.stat().st_size, "sha256": sha256_of(path)}
        for relative, path in files
        if relative not in (MANIFEST, *REPORT_FILES)
    ]


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, a destination that would lose someone's files."""
    if out.exists() and not out.is_dir():
        raise NanoexportError(f"output path {out} is a file; choose a folder with --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a different artifact" if (out / MANIFEST).is_file() else "other files"
        raise NanoexportError(f"output folder {out} already holds {what}; pass --overwrite or choose another --out")


@contextmanager
def staging(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``out``; on success it replaces ``out``, on failure or interrupt it is
    removed. Holds ``out``'s lock throughout; a full disk becomes a one-line error naming the folder."""
    check_destination(out, overwrite)
    lock = temporary = None
    staged = False
    try:
        with uninterrupted():
            lock = _lock_destination(out)
            _remove_leftovers(out)
            temporary = out.parent / f"{_hidden_prefix(out)}partial-{secrets.token_hex(4)}"
            temporary.mkdir(mode=0o700)
            staged = True
        yield temporary
        with uninterrupted():
            check_destination(out, overwrite)  # someone may have filled it by hand while we worked
            _replace(temporary, out)
    except OSError as error:
        if not staged:
            raise NanoexportError(f"cannot write to {out}: {error.strerror}; choose a writable --out") from None
        if not _disk_full(error):
            raise
        free = shutil.disk_usage(out.parent).free
        raise NanoexportError(
            f"no space left writing {out}: the artifact needs more than the {_bytes_under(temporary):,} bytes "
            f"written before the disk (or file-size limit) was full, {free:,} bytes are free; free space or "
            "choose another --out"
        ) from None
    finally:
        with uninterrupted():
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)
            if lock is not None:
                _unlock_destination(out, lock)


@contextmanager
def scratch(out: Path) -> Iterator[Path]:
    """A private working folder beside ``out`` that never becomes an artifact, removed on leaving. Holds
    ``out``'s lock while it exists, as ``staging`` does, so a scratch folder left by a killed run (named as a
    partial folder) is recognized and removed by the next one, and two runs never share one."""
    with uninterrupted():
        lock = _lock_destination(out)
        _remove_leftovers(out)
        folder = out.parent / f"{_hidden_prefix(out)}partial-{secrets.token_hex(4)}"
        folder.mkdir(mode=0o700)
    try:
        yield folder
    finally:
        with uninterrupted():
            shutil.rmtree(folder, ignore_errors=True)
            _unlock_destination(out, lock)


def _disk_full(error: OSError) -> bool:
    """ENOSPC, a quota, a file-size limit, or numpy's short write (``tofile`` reports it without an errno)."""
    return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or (
        error.errno is None and bool(SHORT_WRITE.fullmatch(str(error))))


def _hidden_prefix(out: Path) -> str:
    return f".{out.name}."


def _lock_destination(out: Path) -> int:
    """An open, exclusively ``flock``-ed descriptor of ``.NAME.lock`` beside ``out`` (its parent created if
    needed), or a one-line error when another export holds it. Its holder unlinks the file when done, so a
    lock taken on a file that was unlinked meanwhile is retried on the new one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{_hidden_prefix(out)}lock"
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 64).decode(errors="replace").strip() or "another process"
            os.close(descriptor)
            raise NanoexportError(f"another export is writing {out} right now (pid {holder}); wait for it to "
                                  "finish or choose another --out") from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(descriptor).st_ino:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, str(os.getpid()).encode())
            return descriptor
        os.close(descriptor)


def _unlock_destination(out: Path, descriptor: int) -> None:
    try:
        os.unlink(out.parent / f"{_hidden_prefix(out)}lock")
    except FileNotFoundError:
        pass
    os.close(descriptor)


def _remove_leftovers(out: Path) -> None:
    """Remove temporary folders of earlier exports to ``out``: the lock is ours, so whoever made them is gone
    (killed, or the machine lost power) and they are not artifacts."""
    for kind in ("partial", "old"):
        for path in out.parent.glob(f"{glob.escape(_hidden_prefix(out))}{kind}-*"):
            log.warning("removing %s, left by an export that was killed before it finished", path)
            shutil.rmtree(path, ignore_errors=True)


def _bytes_under(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _replace(new: Path, out: Path) -> None:
    os.chmod(new, 0o777 & ~_umask())  # staged private (0o700); an artifact is an ordinary folder
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f"{_hidden_prefix(out)}old-", dir=out.parent))
        os.rename(out, retired / "artifact")
        os.rename(new, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(new, out)


def write_manifest(folder: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` over the files now in ``folder``; returns the manifest."""
    manifest = {"schema_version": SCHEMA_VERSION, **fields, "files": file_entries(folder)}
    write_json(folder / MANIFEST, manifest)
    return manifest


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON, whole or not at all: into a temporary file renamed over ``path``, as reports
    are written into finished artifacts, where an interrupt must not leave half a file."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
