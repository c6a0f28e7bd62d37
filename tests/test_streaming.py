"""Export without the weights in memory twice: lazy capture from sharded bf16 safetensors.

The checkpoint's tensors stay on disk until a stage reads them, so an export's peak memory above what the
process holds after its imports is a fraction of the checkpoint, and the artifact is the same as when the
model is exported from memory.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import nanoexport
from nanoexport.capture.checkpoint import load_checkpoint

# 4 layers of a 1024-wide Llama with a 32k vocabulary and an untied head: 116M parameters, 232 MB in bf16.
# Large enough that holding the model once in fp32 (464 MB) stands out above the interpreter's own memory.
WIDE_LLAMA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
MEASURE = textwrap.dedent("""
    import json, sys
    import nanoexport, onnxruntime, torch, transformers  # everything an export imports, before the baseline

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    config = nanoexport.ExportConfig()
    config.quant.weights = "int4"
    baseline = status("VmRSS")
    nanoexport.export(sys.argv[1], out=sys.argv[2], config=config, progress=False)
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
""")


def _save_bf16(config: dict, folder, shard: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **config), dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard)
    return sum(parameter.numel() for parameter in model.parameters())


def test_lazy_export_equals_the_in_memory_export(tmp_path):
    tiny = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    _save_bf16(tiny, tmp_path / "tiny", shard="40KB")
    assert len(list((tmp_path / "tiny").glob("*.safetensors"))) > 1  # sharded, as the hub serves checkpoints
    lazy_checkpoint = load_checkpoint(tmp_path / "tiny", lazy=True)
    assert lazy_checkpoint.lazy and all(_fake(parameter) for parameter in lazy_checkpoint.model.parameters())
    config = nanoexport.ExportConfig()
    config.quant.weights = "int4"
    lazy = nanoexport.export(tmp_path / "tiny", out=tmp_path / "lazy", config=config, progress=False)
    eager = nanoexport.export(load_checkpoint(tmp_path / "tiny"), out=tmp_path / "eager", config=config,
                              progress=False)
    for entry, other in zip(lazy.manifest["files"], eager.manifest["files"], strict=True):
        assert entry == other, entry["path"]


def _fake(parameter) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(parameter, FakeTensor) or isinstance(parameter.data, FakeTensor)


@pytest.mark.parametrize("shard", ["100MB"])
def test_export_holds_far_less_than_the_model_in_fp32(tmp_path, shard):
    parameters = _save_bf16(WIDE_LLAMA, tmp_path / "wide", shard)
    result = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "wide"), str(tmp_path / "out")],
                            capture_output=True, text=True, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    grown = figures["peak"] - figures["baseline"]
    fp32_bytes = 4 * parameters
    # The bound: loading the whole model twice in fp32 (as the eager path did: the model, then the
    # exporter's transposed copies; measured 2.6x here) fails it. Lazy capture measured 1.3x on this model.
    assert grown < 2 * fp32_bytes, \
        f"export grew by {grown / 2**20:.0f} MiB; the model is {fp32_bytes / 2**20:.0f} MiB in fp32"


def test_checkpoint_weights_are_deduplicated_by_their_stored_bytes(tmp_path, monkeypatch):
    """Two checkpoint tensors with the same bytes share one initializer, found from the stored bf16 bytes:
    de-duplication widens no weight to float32."""
    import onnx_ir as ir
    from safetensors.torch import save_file

    from nanoexport.capture.weights import SafetensorsWeights
    from nanoexport.passes import merge_duplicate_initializers
    from nanoexport.passes.initializers import FINGERPRINT

    torch.manual_seed(0)
    first, other = torch.randn(8, 4).to(torch.bfloat16), torch.randn(8, 4).to(torch.bfloat16)
    save_file({"a": first, "b": first.clone()}, tmp_path / "one.safetensors")
    save_file({"c": other, "d": first.clone().to(torch.float16)}, tmp_path / "two.safetensors")
    weights = SafetensorsWeights([tmp_path / "one.safetensors", tmp_path / "two.safetensors"])
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 23})
    for name in "abcd":
        tensor = ir.LazyTensor(lambda name=name: ir.tensor(weights.read(name)), dtype=ir.DataType.FLOAT,
                               shape=ir.Shape(weights.shape(name)), name=name)
        tensor.meta[FINGERPRINT] = lambda name=name: weights.digest(name)
        value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(ir.DataType.FLOAT), const_value=tensor)
        graph.register_initializer(value)
        node = ir.node("Relu", [value])
        graph.append(node)
        graph.outputs.append(node.outputs[0])
    monkeypatch.setattr(SafetensorsWeights, "read", lambda *_: pytest.fail("a weight was widened to dedupe"))
    merge_duplicate_initializers(ir.Model(graph, ir_version=10))
    # b repeats a's bytes; d has a's values but stored as fp16 (other bytes), so it stays, as does c.
    assert sorted(graph.initializers) == ["a", "c", "d"]
    assert [node.inputs[0].name for node in graph] == ["a", "a", "c", "d"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_weight_read_in_pieces_equals_the_stored_tensor_widened(tmp_path, dtype, monkeypatch):
    """Rows read and widened a piece at a time (pieces of a few rows here, so every shape spans several)
    give the tensor safetensors stores, widened to float32 exactly."""
    from safetensors.torch import save_file

    from nanoexport.capture import weights

    monkeypatch.setattr(weights, "READ_PIECE", 64)
    generator = torch.Generator().manual_seed(0)
    shapes = [(), (7,), (3, 5), (2, 3, 4), (0, 4), (4, 0), (50, 9)]
    tensors = {f"t{index}": (torch.randn(shape, generator=generator) * 3).to(dtype) for index, shape in
               enumerate(shapes)}
    save_file(tensors, tmp_path / "model.safetensors")
    stored = weights.SafetensorsWeights([tmp_path / "model.safetensors"])
    for name, tensor in tensors.items():
        read = stored.read(name)
        assert read.dtype == np.float32 and read.shape == tuple(tensor.shape), name
        assert np.array_equal(read, tensor.to(torch.float32).numpy()), name


def test_merged_projections_are_joined_back_one_layer_at_a_time():
    from nanoexport.digests import QuantizedWeight, joined_parts
    from nanoexport.errors import NanoexportError

    def part(first: int) -> QuantizedWeight:
        return QuantizedWeight(np.full((2, 4), first, np.int8), np.ones((2, 1), np.float32), None)

    consumed = []

    def stored():
        for name, weight in [("a.part0", part(0)), ("a.part1", part(1)), ("b.part0", part(2)), ("b.part1", part(3)),
                             ("c", part(4))]:
            consumed.append(name)
            yield name, weight

    joined = joined_parts(stored())
    name, weight = next(joined)
    assert name == "a" and weight.integers[:, 0].tolist() == [0, 0, 1, 1]
    assert consumed == ["a.part0", "a.part1", "b.part0"]  # b's parts were not all read before a was joined
    assert [name for name, _ in joined] == ["b", "c"]
    with pytest.raises(NanoexportError, match="parts of a are not stored together"):
        list(joined_parts(iter([("a.part0", part(0)), ("b", part(1)), ("a.part1", part(2))])))
