"""Load a decoder checkpoint (local Hugging Face folder, hub id, or a module in memory) for export.

Weights come from safetensors. A pickle checkpoint (``pytorch_model.bin``) is only read through
``torch.load(weights_only=True)``, which refuses anything beyond plain tensors. A folder with neither, where
Optimum wrote its ONNX decoder (``model.onnx``) beside the config, is a weightless checkpoint: the ONNX file
holds the weights, and validation's reference runs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoexport.artifact import sha256_of
from nanoexport.capture.optimum import onnx_weight_files, optimum_onnx_file
from nanoexport.capture.weights import EMBEDDING_KEYS, SafetensorsWeights, check_shapes, meta_model
from nanoexport.errors import NanoexportError, first_line
from nanoexport.passes.initializers import layer_of

log = logging.getLogger(__name__)

# model_type in config.json -> the family name users know.
SUPPORTED_FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "phi3": "Phi-3",
    "gemma2": "Gemma 2",
    "gpt2": "GPT-2",
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DEMO_MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo"


@dataclass
class Checkpoint:
    """A model in fp32 eval mode, with where it came from and its tokenizer files.

    Read from safetensors, ``model`` has the architecture without the data (fake parameters) and ``weights``
    reads each tensor from the files when asked. Weightless (an Optimum folder without safetensors), ``model``
    is the same architecture without data and ``onnx_weights`` the ONNX decoder holding the weights. Otherwise
    ``model`` holds the weights and both are None.
    """

    name: str
    source: str
    model: torch.nn.Module
    weights_digest: str | Future[str]  # a checkpoint's files are hashed in the background while capture runs
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)
    weights: SafetensorsWeights | None = None
    onnx_weights: Path | None = None

    @property
    def lazy(self) -> bool:
        """Whether ``model`` has no data (fake parameters): it can be traced, not run."""
        return self.weights is not None or self.onnx_weights is not None

    @property
    def weights_sha256(self) -> str:
        """The SHA-256 over the weight files' digests (safetensors, or a weightless checkpoint's ONNX file and
        its external data; a model in memory: its tensors), waited for on first use."""
        if isinstance(self.weights_digest, Future):
            self.weights_digest = self.weights_digest.result()
        return self.weights_digest

    def __getstate__(self) -> dict:
        # A pickled checkpoint (a Ray task's) carries the digest, not the thread computing it.
        return {**self.__dict__, "weights_digest": self.weights_sha256}

    @property
    def config(self):
        return self.model.config

    @property
    def family(self) -> str:
        return self.config.model_type


def check_architecture(model_type: object) -> None:
    if not isinstance(model_type, str) or model_type not in SUPPORTED_FAMILIES:
        supported = ", ".join(sorted(SUPPORTED_FAMILIES))
        raise NanoexportError(f"unsupported architecture {model_type!r}; supported model_type values: {supported}")


def load_checkpoint(source: str | Path | torch.nn.Module, lazy: bool = False) -> Checkpoint:
    """Load ``source`` (folder, hub id or ``transformers`` model) as an fp32 model ready for export.

    ``lazy``: safetensors weights stay on disk until a stage reads them (see ``Checkpoint``), which is what
    export wants; without it the model holds its weights and can run, which a reference model must. A
    weightless checkpoint (an Optimum ONNX folder without safetensors) never holds them: its reference is the
    ONNX file.
    """
    if isinstance(source, torch.nn.Module):
        return _from_module(source)
    folder = _resolve_folder(str(source))
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise NanoexportError(f"{folder} is not a Hugging Face checkpoint: config.json is missing")
    try:
        settings = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # bad JSON or UTF-8, deep nesting
        reason = first_line(error)
        raise NanoexportError(f"{config_path} is not valid JSON ({reason}); fix or re-download the checkpoint") \
            from None
    model_type = settings.get("model_type") if isinstance(settings, dict) else None
    check_architecture(model_type)
    weight_files = _weight_files(folder)
    weights, onnx_weights = None, None
    if weight_files[0].suffix == ".onnx":
        onnx_weights = weight_files[0]
        hf_config = _load_config(folder)
        _skeleton(hf_config, folder)  # a config transformers cannot build from, refused in one line
        model = meta_model(hf_config)  # its sizes are checked against the ONNX file's when capture reads it
    elif weight_files[0].suffix == ".safetensors":
        weights = SafetensorsWeights(weight_files)
        hf_config = _load_config(folder)
        check_config_sizes(hf_config, weights, folder)
        check_shapes(_skeleton(hf_config, folder), weights, folder)
        if lazy:
            model = meta_model(hf_config)
        else:
            check_memory(weights, folder)
            model = _load_model(folder, use_safetensors=True)
            weights = None
    else:
        model = _load_model(folder, use_safetensors=False)
    tokenizer_files = {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}
    check_tokenizer(tokenizer_files, model.config, folder)
    if not tokenizer_files:
        log.warning("%s has no tokenizer files; the artifact will have no tokenizer", folder)
    return Checkpoint(
        name=folder.name,
        source=str(source),
        model=model,
        # hashlib lets go of the GIL while it hashes: 1.5 s of the 0.5B export's load step overlaps capture.
        weights_digest=_in_background(lambda: _hash_files(onnx_weight_files(onnx_weights) if onnx_weights
                                                          else weight_files)),
        tokenizer_files=tokenizer_files,
        weights=weights,
        onnx_weights=onnx_weights,
    )


def _resolve_folder(source: str) -> Path:
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder.resolve()
    if folder.exists():
        raise NanoexportError(f"model path {source} is a file; pass the checkpoint folder that holds config.json")
    if not HUB_ID.match(source) or source.startswith((".", "/", "~")):
        raise NanoexportError(f"model folder {source} does not exist; pass a checkpoint folder or a hub id")
    return _download(source)


def _download(hub_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            hub_id,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
        )
    except Exception as error:  # the hub client raises many types; all mean "could not get it"
        raise NanoexportError(
            f"could not download {hub_id} from the Hugging Face hub ({type(error).__name__}); "
            "check the id and the network, or pass a local checkpoint folder"
        ) from None
    return Path(path)


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files, else the pickle files, else the Optimum ONNX decoder (one file) in ``folder``."""
    safetensors = sorted(folder.glob("*.safetensors"))  # their headers are checked by SafetensorsWeights
    if safetensors:
        return safetensors
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        log.warning("%s holds pickle weights; reading them with torch.load(weights_only=True)", folder)
        return pickles
    onnx_file = optimum_onnx_file(folder)
    if onnx_file is not None:
        return [onnx_file]
    raise NanoexportError(f"no weights in {folder}: expected *.safetensors files, or the model.onnx that "
                          "`optimum-cli export onnx --task text-generation-with-past` writes")


def check_config_sizes(hf_config, weights: SafetensorsWeights, folder: Path) -> None:
    """The sizes that set how much the model allocates (vocabulary, hidden size, layers) agree with the
    weights' headers; checked before any model is built, so an absurd config.json costs nothing."""
    fix = "the config and the weights belong to different models; fix config.json or re-download the checkpoint"
    embedding = next((name for name in weights.entries if name.endswith(EMBEDDING_KEYS)), None)
    if embedding is None:
        raise NanoexportError(f"the checkpoint in {folder} has no token embedding ({' or '.join(EMBEDDING_KEYS)}); "
                              "it is not a decoder language model this tool reads")
    claimed = (hf_config.vocab_size, hf_config.hidden_size)
    if weights.shape(embedding) != claimed:
        raise NanoexportError(f"config.json in {folder} says vocab_size {claimed[0]:,} and hidden_size {claimed[1]:,}, "
                              f"but the embedding {embedding} is {list(weights.shape(embedding))}; {fix}")
    layers = {layer_of(name) for name in weights.entries} - {None}
    if len(layers) != hf_config.num_hidden_layers:
        raise NanoexportError(f"config.json in {folder} says num_hidden_layers {hf_config.num_hidden_layers:,}, but "
                              f"the weights hold {len(layers)} layers; {fix}")


def check_tokenizer(files: dict[str, bytes], hf_config, folder: Path) -> None:
    """Tokenizer files that would break the artifact's runtime are refused before they are copied into it:
    JSON that does not parse, a ``tokenizer.json`` the ``tokenizers`` library cannot load or run, more
    tokens than the model has embedding rows, and special tokens (ids in config.json, strings in
    tokenizer_config.json) outside the vocabulary."""
    fix = "fix or re-download the tokenizer files"
    parsed = {}
    for name, data in files.items():
        if name.endswith(".json"):
            try:
                parsed[name] = json.loads(data)
            except (ValueError, RecursionError) as error:
                reason = first_line(error)
                raise NanoexportError(f"{name} in {folder} is not valid JSON ({reason}); {fix}") from None
    if "tokenizer.json" not in files:
        return  # the special tokens below are checked against tokenizer.json's vocabulary
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        tokenizer.encode("Hello, world! 123")
    except Exception as error:  # the library raises Exception itself for any problem it finds
        reason = first_line(error)[:200]
        raise NanoexportError(f"tokenizer.json in {folder} cannot be loaded by the tokenizers library ({reason}); "
                              f"{fix}") from None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > hf_config.vocab_size:
        raise NanoexportError(f"tokenizer.json in {folder} has {size:,} tokens but the model has "
                              f"{hf_config.vocab_size:,} embedding rows; the tokenizer belongs to another model: {fix}")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(hf_config, key, None)
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and not (isinstance(token_id, int) and 0 <= token_id < size):
                raise NanoexportError(f"config.json in {folder} has {key} {token_id!r}, outside the tokenizer's "
                                      f"{size:,} tokens; fix config.json")
    settings = parsed.get("tokenizer_config.json", {})
    if isinstance(settings, dict):
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token = settings.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and _token_id(tokenizer, token) is None:
                raise NanoexportError(f"tokenizer_config.json in {folder} names {key} {token[:80]!r}, which "
                                      f"tokenizer.json does not hold; {fix}")


def _token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` in ``tokenizer``, None when absent or not encodable text (a lone surrogate)."""
    try:
        return tokenizer.token_to_id(token)
    except UnicodeEncodeError:
        return None


def _skeleton(hf_config, folder: Path) -> torch.nn.Module:
    """The model of ``hf_config`` on the meta device: every parameter's shape and nothing allocated, whatever
    sizes the config claims (``meta_model`` keeps real buffers, and its modules allocate before they are
    moved)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    except Exception as error:  # a config transformers cannot build a model from, met with any exception type
        reason = first_line(error)[:200]
        raise NanoexportError(f"cannot build a {hf_config.model_type} model from config.json in {folder} "
                              f"({reason}); fix config.json or re-download the checkpoint") from None


def check_memory(weights: SafetensorsWeights, folder: Path) -> None:
    """Refuse, before loading, an fp32 model larger than the memory available now."""
    needed = 4 * sum(math.prod(shape) for _, _, shape in weights.entries.values())
    check_reference_memory(needed, f"the checkpoint in {folder}", "fp32 reference model")


def check_reference_memory(needed: int, what: str, role: str) -> None:
    """Refuse, before loading, a reference model (``what``, serving as ``role``) that needs ``needed`` bytes,
    more than the memory available now."""
    available = _available_memory()
    if available is not None and needed > available:
        raise NanoexportError(f"{what} needs {needed / 2**30:.1f} GiB as the {role}, but {available / 2**30:.1f} "
                              "GiB of memory are available; validate on a machine with more memory, or export with "
                              "--no-validate")


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _load_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as error:  # transformers checks the fields with many exception types
        raise NanoexportError(f"could not read the config of the checkpoint in {folder}: "
                              f"{first_line(error)[:300]}; fix config.json or re-download the checkpoint") from None


def _load_model(folder: Path, use_safetensors: bool) -> torch.nn.Module:
    import pickle

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own progress display covers loading
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, use_safetensors=use_safetensors, weights_only=True
        )
    except pickle.UnpicklingError as error:
        raise NanoexportError(
            f"refusing to unpickle the weights in {folder}: they hold objects beyond plain tensors "
            f"({str(error).splitlines()[0][:120]}); convert the checkpoint to safetensors"
        ) from None
    except (OSError, ValueError, RuntimeError) as error:
        raise NanoexportError(f"could not load the checkpoint in {folder}: {first_line(error)}") from None
    return model.eval()


def _in_background(work: Callable[[], str]) -> Future[str]:
    """``work`` run on a daemon thread: an interrupted export exits at once, not after the hashing."""
    future: Future[str] = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as error:  # handed to whoever asks for the result
            future.set_exception(error)

    threading.Thread(target=run, name="nanoexport-hash", daemon=True).start()
    return future


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + sha256_of(path).encode() + b"\n")
    return digest.hexdigest()


def module_name(model: torch.nn.Module) -> str:
    """A short name for a model in memory: the last part of the path it was loaded from, or its class."""
    return Path(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__).name


def _from_module(model: torch.nn.Module) -> Checkpoint:
    config = getattr(model, "config", None)
    if config is None:
        raise NanoexportError(
            f"{type(model).__name__} has no .config; pass a transformers causal-LM model or a checkpoint folder"
        )
    check_architecture(getattr(config, "model_type", None))
    model = model.float().eval()
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + b"\0" + tensor.detach().contiguous().numpy().tobytes())
    return Checkpoint(
        name=module_name(model),
        source="",
        model=model,
        weights_digest=digest.hexdigest(),
    )
