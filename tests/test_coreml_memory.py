"""The coreml writer streams: writing the package holds about one weight tensor at a time, not the programs'
constants (issue 16), and gives the bytes that coremltools' own convert + save_multifunction give."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ct = pytest.importorskip("coremltools")

# A llama wide enough that its int4 weights (about 30M parameters, 61 MB in bf16) stand out of the writer's own
# working memory; two layers, so it exports in seconds.
WIDE_LLAMA = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)

# Runs in a child process, so that its peak RSS is its own. It reports how far RSS rose above where it stood
# when the coreml writer started (VmHWM is reset there through clear_refs) and the model's bf16 bytes.
MEASURE = """
import json, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM
import nanoexport
from nanoexport.config import ExportConfig
from nanoexport.targets.coreml import package

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

rise = {}
write = package.lower

def measured(model, build):
    start = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    files = write(model, build)
    rise["bytes"] = status("VmHWM") - start
    return files

package.lower = measured
torch.manual_seed(0)
config = AutoConfig.for_model("llama", **json.loads(sys.argv[1]))
model = AutoModelForCausalLM.from_config(config).eval()
settings = ExportConfig(max_context=64, prefill_chunk=16)
settings.quant.weights = "int4"
nanoexport.export(model, target="coreml", out=sys.argv[2], config=settings, progress=False)
parameters = sum(parameter.numel() for parameter in model.parameters())
print(json.dumps({"rise": rise["bytes"], "bf16": 2 * parameters}))
"""


def test_writing_the_package_holds_about_one_tensor_at_a_time(tmp_path):
    """Programs holding their constants (fp16, and int4 at a byte each) twice over, plus the merge's reloads,
    rose 5x the bf16 bytes here; streaming rises by the largest tensor's few working copies."""
    result = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(WIDE_LLAMA), str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # Measured: 0.4x to 0.7x streaming (the scratch ONNX copy and the largest tensors' working copies), 5.1x before.
    assert figures["rise"] < 1.5 * figures["bf16"], figures


def coremltools_package(model, build, path: Path) -> None:
    """The package as coremltools' own tools write it from programs holding their arrays: ``convert`` of each
    function to a package of its own, then ``save_multifunction`` of the two."""
    import onnx_ir as ir
    from coremltools.models.utils import MultiFunctionDescriptor, save_multifunction

    from nanoexport.passes.kv_cache import specialize
    from nanoexport.targets.coreml import package
    from nanoexport.targets.coreml.lowering import lower_graph

    descriptor = MultiFunctionDescriptor()
    with tempfile.TemporaryDirectory() as scratch:
        canonical = Path(scratch) / "canonical.onnx"
        build.save_onnx(model, canonical, external_data="canonical.onnx.data")
        for function, length in zip(package.FUNCTIONS, (build.cache.prefill_chunk, 1)):
            graph = ir.load(canonical)
            specialize(graph, length)
            single = str(Path(scratch) / f"{function}.mlpackage")
            ct.convert(
                lower_graph(graph), convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True,
            ).save(single)
            descriptor.add_function(single, "main", function)
            descriptor.default_function_name = function
        save_multifunction(descriptor, str(path))
    package._make_reproducible(path)


@pytest.mark.parametrize("weights", ["none", "int4", "nf4"])
def test_streamed_package_has_the_bytes_coremltools_writes(weights, tmp_path, monkeypatch):
    """Same programs, same files: the streaming writer changes how the package is written, not what it holds
    (shared and repeated constants stored once, the same blob offsets, the same op names)."""
    import nanoexport
    from nanoexport.config import ExportConfig
    from nanoexport.targets.coreml import package
    from tiny_models import tiny_model

    reference = tmp_path / "reference.mlpackage"
    streamed = package.lower

    def both(model, build):
        coremltools_package(model, build, reference)
        return streamed(model, build)

    monkeypatch.setattr(package, "lower", both)
    config = ExportConfig(max_context=64, prefill_chunk=16)
    config.quant.weights = weights
    artifact = nanoexport.export(tiny_model("qwen2"), target="coreml", out=tmp_path / "out", config=config,
                                 progress=False)
    written = artifact.file(package.PACKAGE)
    files = sorted(path.relative_to(reference) for path in reference.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(written) for path in written.rglob("*") if path.is_file())
    for relative in files:
        assert (written / relative).read_bytes() == (reference / relative).read_bytes(), relative
