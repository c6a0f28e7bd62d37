"""The artifact folder: model files, tokenizer, and a manifest with a checksum for every file.

Writes are atomic: everything is written into a temporary folder beside the destination, the manifest
last, and the folder is renamed into place only when complete. Nothing in the hashed set depends on
time or on where the artifact was written, so the same inputs give byte-identical artifacts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoexport.errors import NanoexportError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
# Written by validation after the export; outside the hashed set.
# Written about the artifact, not part of it: outside the manifest's hashed set, and free to hold timings.
REPORT_FILES = ("report.json", "report.html", "build.json")
BUILD_LOG = "build.json"


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
        if not manifest_path.is_file():
            raise NanoexportError(f"{folder} is not a nanoexport artifact: {MANIFEST} is missing")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise NanoexportError(f"{manifest_path} is not valid JSON ({error}); re-export the artifact") from None
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise NanoexportError(
                f"{manifest_path} has schema_version {manifest.get('schema_version')!r}; "
                f"this nanoexport reads version {SCHEMA_VERSION}: re-export with this version"
            )
        for entry in manifest.get("files", []):
            inside(folder, entry["path"])
        return cls(folder, manifest)

    @property
    def target(self) -> str:
        return self.manifest["target"]

    def file(self, relative: str) -> Path:
        """The path of one of the artifact's files; refuses paths that escape the folder."""
        return inside(self.path, relative)

    def verify(self) -> list[str]:
        """Files whose size or sha256 differ from the manifest, or that are missing."""
        problems = []
        for entry in self.manifest["files"]:
            path = self.file(entry["path"])
            if not path.is_file():
                problems.append(f"{entry['path']}: missing")
            elif path.stat().st_size != entry["size"] or sha256_of(path) != entry["sha256"]:
                problems.append(f"{entry['path']}: contents differ from the manifest")
        return problems


def inside(folder: Path, relative: str) -> Path:
    """``folder / relative``, refusing absolute paths and paths that escape ``folder``."""
    root = folder.resolve()
    candidate = (root / relative).resolve()
    if Path(relative).is_absolute() or not candidate.is_relative_to(root):
        raise NanoexportError(f"path {relative!r} escapes the artifact folder {folder}; the artifact is corrupt")
    return candidate


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
    """A temporary folder beside ``out``; on success it replaces ``out``, on failure it is removed."""
    check_destination(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as error:
        raise NanoexportError(f"cannot write to {out}: {error.strerror}; choose a writable --out") from None
    try:
        yield temporary
        _replace(temporary, out)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _replace(new: Path, out: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(new, 0o777 & ~umask)  # mkdtemp made it private; an artifact is an ordinary folder
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
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
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
