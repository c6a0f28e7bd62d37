"""The files of an openvino artifact: the model IR, openvino-genai's tokenizer and detokenizer IRs, and the
model's ``config.json`` and ``generation_config.json``. Each writer returns the files it wrote."""

from __future__ import annotations

import logging
from pathlib import Path

import openvino as ov

from nanoexport.capture.checkpoint import Checkpoint
from nanoexport.targets.openvino.ov_passes import name_deterministically

log = logging.getLogger(__name__)

MODEL_FILE = "openvino_model.xml"
WEIGHTS_FILE = "openvino_model.bin"
TOKENIZER_FILE = "openvino_tokenizer.xml"
DETOKENIZER_FILE = "openvino_detokenizer.xml"


def write_model(model: ov.Model, folder: Path) -> list[str]:
    """``openvino_model.xml`` and ``.bin``, the weights as the model holds them."""
    # Our float weights stay fp32 and our quantized ones as they are: no conversion on the way out.
    ov.save_model(model, folder / MODEL_FILE, compress_to_fp16=False)
    return [MODEL_FILE, WEIGHTS_FILE]


def write_tokenizers(folder: Path) -> list[str]:
    """openvino-genai's tokenizer and detokenizer IRs, converted from the artifact's Hugging Face tokenizer."""
    tokenizer_folder = folder / "tokenizer"
    if not tokenizer_folder.is_dir():
        log.warning("openvino: no tokenizer, so openvino-genai needs one passed in to run the artifact")
        return []
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    tokenizer, detokenizer = convert_tokenizer(AutoTokenizer.from_pretrained(tokenizer_folder),
                                               with_detokenizer=True)
    files = []
    for model, file_name in ((tokenizer, TOKENIZER_FILE), (detokenizer, DETOKENIZER_FILE)):
        name_deterministically(model)
        ov.save_model(model, folder / file_name)
        files += [file_name, file_name.replace(".xml", ".bin")]
    return files


def write_configs(folder: Path, checkpoint: Checkpoint) -> list[str]:
    """``generation_config.json`` (genai's end-of-sequence and search defaults) and the model's ``config.json``."""
    checkpoint.model.generation_config.to_json_file(folder / "generation_config.json", use_diff=True)
    checkpoint.config.to_json_file(folder / "config.json", use_diff=True)
    return ["config.json", "generation_config.json"]
