"""Checkpoints the benchmarks run on: the bundled demo model and random-weight models of published configs.

The hub is not reachable, so the larger models are built from their published configs with random weights
(in a process of their own) and saved as the hub serves them: bf16 safetensors in shards of at most 2 GB.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

# Qwen2.5-0.5B's published config; random weights, since the hub is not reachable.
QWEN25_05B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643,
)
QWEN25_15B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643,
)
PHI3_MINI = dict(  # microsoft/Phi-3-mini-4k-instruct: 3.8B parameters
    model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
)
# The 0.5B model stays fp32 in one file, as earlier figures were measured on it; the larger ones are bf16 in
# 2 GB shards. Weights are drawn in bf16 directly, so building the 3.8B model needs 7.6 GB, not 15.
BUILD = """
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
settings = dict({settings!r})
dtype = getattr(torch, settings.pop("dtype", "float32"))
config = AutoConfig.for_model(settings.pop("model_type"), **settings)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=dtype)
model.save_pretrained(sys.argv[1], safe_serialization=True, max_shard_size="2GB")
"""
CONFIGS = {
    "qwen2.5-0.5b": QWEN25_05B,
    "qwen2.5-1.5b": dict(QWEN25_15B, dtype="bfloat16"),
    "phi3-mini": dict(PHI3_MINI, dtype="bfloat16"),
}
MODELS = ("demo", *CONFIGS)
DEMO_FILES = ("tokenizer.json", "tokenizer_config.json", "calibration.txt")
RESULTS = Path(__file__).resolve().parent / "results"


def checkpoint(name: str, scratch: Path) -> Path:
    """The folder of benchmark model ``name``; the larger ones are built (in a process of their own) under
    ``scratch``, with the demo's tokenizer and calibration text beside them (its token ids are valid in any
    of these vocabularies), so data-aware quantizers and QDQ targets have calibration data. The config's
    special token ids become the demo's, which its tokenizer holds (an export refuses ids outside it)."""
    from nanoexport.capture.checkpoint import DEMO_MODEL

    if name == "demo":
        return DEMO_MODEL
    folder = scratch / name
    if not folder.exists():
        subprocess.run([sys.executable, "-c", BUILD.format(settings=CONFIGS[name]), str(folder)], check=True)
    for file_name in DEMO_FILES:
        if not (folder / file_name).exists():
            shutil.copyfile(DEMO_MODEL / file_name, folder / file_name)
    demo_config = json.loads((DEMO_MODEL / "config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    special = {key: demo_config.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if any(config.get(key) != value for key, value in special.items()):
        (folder / "config.json").write_text(json.dumps({**config, **special}, indent=2) + "\n")
    return folder


def write_results(path: Path, settings: dict, rows: list[dict]) -> None:
    """The run as JSON: the machine, the benchmark's settings and one row per model."""
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine, **settings, "results": rows}, indent=2) + "\n")
    print(f"wrote {path}")
