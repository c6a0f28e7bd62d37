"""Perplexity on evaluation text: the same windows, scored the same way, for an artifact and its reference.

The text is tokenized once and cut into back-to-back windows of ``window`` tokens; each window is scored
from scratch (no context carried over), every token but the first predicted from the ones before it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from nanoexport.errors import NanoexportError
from nanoexport.tokenizer import Tokenizer


def text_windows(text_file: str | Path, tokenizer_folder: str | Path, window: int, max_windows: int) -> list[list[int]]:
    """Token windows of ``text_file``; ``max_windows`` 0 keeps them all."""
    path = Path(text_file)
    if not path.is_file():
        raise NanoexportError(f"evaluation text {path} does not exist; pass a text file to --eval")
    if window < 2:
        raise NanoexportError(f"the evaluation window must be at least 2 tokens, not {window}")
    tokenizer = Tokenizer.of_artifact(Path(tokenizer_folder))
    ids = tokenizer.encode(path.read_text(encoding="utf-8"))
    count = len(ids) // window
    if count == 0:
        raise NanoexportError(
            f"evaluation text {path} has {len(ids)} tokens, fewer than one window of {window}; use a longer text"
        )
    if max_windows:
        count = min(count, max_windows)
    return [ids[i * window : (i + 1) * window] for i in range(count)]


def negative_log_likelihood(logits: np.ndarray, tokens: list[int]) -> float:
    """Summed NLL of ``tokens[1:]`` under ``logits[:-1]`` (float64, log-sum-exp stabilized)."""
    scores = logits[:-1].astype(np.float64)
    top = scores.max(-1, keepdims=True)
    log_norm = np.log(np.exp(scores - top).sum(-1)) + top[:, 0]
    targets = np.asarray(tokens[1:])
    return float((log_norm - scores[np.arange(len(targets)), targets]).sum())


def perplexity(logits_of: Callable[[list[int]], np.ndarray], windows: list[list[int]]) -> float:
    """exp(mean NLL) over every predicted token of ``windows``; ``logits_of`` maps tokens to ``[len, vocab]``."""
    total = sum(negative_log_likelihood(logits_of(tokens), tokens) for tokens in windows)
    predicted = sum(len(tokens) - 1 for tokens in windows)
    return float(np.exp(total / predicted))
