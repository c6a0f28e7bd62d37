"""A model's tokenizer, read from Hugging Face tokenizer files (a checkpoint's, or an artifact's ``tokenizer/``).

``transformers`` and the ``tokenizers`` library meet a damaged file with a dozen exception types, some of them
only when text is encoded (a normalizer or pre-tokenizer they could build but not run). ``Tokenizer`` turns
every one of them, while reading and while encoding, into one line naming the files and the fix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from nanoexport.errors import NanoexportError


class Tokenizer:
    """Text to token ids with the tokenizer files in ``folder``; ``what`` names them in an error ("the
    artifact's tokenizer"), ``fix`` says what to do about a damaged one."""

    def __init__(self, folder: Path, what: str, fix: str):
        from transformers import AutoTokenizer

        self.what, self.fix = what, fix
        with self._failures("read"):
            self._tokenizer = AutoTokenizer.from_pretrained(str(folder))

    @classmethod
    def of_artifact(cls, tokenizer_folder: Path) -> Tokenizer:
        """The tokenizer an artifact carries in ``tokenizer_folder``."""
        return cls(tokenizer_folder, f"the artifact's tokenizer in {tokenizer_folder}",
                   "the artifact is damaged: re-export it")

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``, without special tokens; any length (longer texts are cut by the caller)."""
        with self._failures("encode text with"):
            return self._tokenizer.encode(text, add_special_tokens=False, verbose=False)

    @contextlib.contextmanager
    def _failures(self, action: str) -> Iterator[None]:
        try:
            yield
        except Exception as error:  # many types, one cause: tokenizer files the libraries cannot use
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            raise NanoexportError(f"cannot {action} {self.what} ({type(error).__name__}{': ' if reason else ''}"
                                  f"{reason}); {self.fix}") from None
