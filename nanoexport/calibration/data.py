"""Calibration data: text from a file, a JSONL file, a folder of text files or a saved ``datasets`` dataset,
tokenized with the model's tokenizer into windows of fixed length sampled with a seed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from nanoexport.errors import NanoexportError
from nanoexport.tokenizer import Tokenizer

TEXT_FIELDS = ("text", "content")


def read_texts(path: str | Path) -> list[str]:
    """The texts at ``path``; refuses a missing path and data without any text."""
    path = Path(path)
    if not path.exists():
        raise NanoexportError(f"calibration data {path} does not exist; pass a text/JSONL file or folder to --calib")
    if path.is_dir():
        texts = _dataset_texts(path) if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() \
            else [text for child in sorted(path.rglob("*")) if child.is_file() for text in _file_texts(child)]
    else:
        texts = _file_texts(path)
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise NanoexportError(f"calibration data {path} holds no text; give it a non-empty text or JSONL file")
    return texts


def _file_texts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return [_text_field(json.loads(line), path, number)
                for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if path.suffix in (".txt", ".md", ""):
        return [path.read_text(encoding="utf-8")]
    return []


def _text_field(record: dict, path: Path, line_number: int) -> str:
    for name in TEXT_FIELDS:
        if isinstance(record.get(name), str):
            return record[name]
    raise NanoexportError(
        f"{path} line {line_number} has no text field ({' or '.join(TEXT_FIELDS)}); each JSONL record needs one"
    )


def _dataset_texts(path: Path) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise NanoexportError(
            f"{path} is a saved Hugging Face dataset; install `datasets` to read it (pip install datasets)"
        ) from None
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    column = next((name for name in TEXT_FIELDS if name in dataset.column_names), None)
    if column is None:
        raise NanoexportError(f"dataset {path} has no text column ({' or '.join(TEXT_FIELDS)})")
    return list(dataset[column])


def load_tokenizer(tokenizer_files: dict[str, bytes]) -> Tokenizer:
    """The tokenizer of a checkpoint's tokenizer files."""
    if not tokenizer_files:
        raise NanoexportError("calibration needs the model's tokenizer, and the checkpoint has none; add "
                              "tokenizer.json to the checkpoint folder or quantize with --algo rtn")
    with tempfile.TemporaryDirectory() as folder:
        for name, data in tokenizer_files.items():
            (Path(folder) / name).write_bytes(data)
        return Tokenizer(Path(folder), f"the checkpoint's tokenizer ({', '.join(sorted(tokenizer_files))})",
                         "fix or re-download the checkpoint's tokenizer files")


def calibration_windows(path: str | Path, tokenizer, samples: int, length: int, seed: int) -> np.ndarray:
    """``[samples, length]`` token ids: windows at seeded random offsets of the tokenized, joined texts."""
    if samples < 1 or length < 2:
        raise NanoexportError(f"calibration needs at least 1 sample of 2 tokens, not {samples} of {length}")
    # verbose=False: the text is meant to be longer than one model input, it is cut into windows below.
    ids = np.array(tokenizer.encode("\n\n".join(read_texts(path))), np.int64)
    if len(ids) < length:
        raise NanoexportError(
            f"calibration data {path} has {len(ids)} tokens, fewer than one window of {length}; "
            "give more text or a smaller calib_window"
        )
    starts = np.random.default_rng(seed).integers(0, len(ids) - length + 1, samples)
    return np.stack([ids[start : start + length] for start in starts])
