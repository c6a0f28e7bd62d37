"""Checkpoints the benchmarks run on: the bundled demo model and a random-weight Qwen2.5-0.5B-config model."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# Qwen2.5-0.5B's published config; random weights, since the hub is not reachable.
QWEN25_05B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643,
)
BUILD = """
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
settings = dict({settings!r})
config = AutoConfig.for_model(settings.pop("model_type"), **settings)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config).save_pretrained(sys.argv[1], safe_serialization=True)
"""
MODELS = ("demo", "qwen2.5-0.5b")
RESULTS = Path(__file__).resolve().parent / "results"


def checkpoint(name: str, scratch: Path) -> Path:
    """The folder of benchmark model ``name``; the Qwen model is built (in its own process) under ``scratch``."""
    if name == "demo":
        from nanoexport.capture.checkpoint import DEMO_MODEL

        return DEMO_MODEL
    folder = scratch / name
    if not folder.exists():
        subprocess.run([sys.executable, "-c", BUILD.format(settings=QWEN25_05B), str(folder)], check=True)
    return folder


def write_results(path: Path, settings: dict, rows: list[dict]) -> None:
    """The run as JSON: the machine, the benchmark's settings and one row per model."""
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine, **settings, "results": rows}, indent=2) + "\n")
    print(f"wrote {path}")
