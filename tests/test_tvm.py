"""The tvm target: the CLI on the demo model, validation on the Relax VM, int4 weights kept packed bit for bit,
the lowerings against ONNX Runtime, a cross-compiled AArch64 archive, and the refusals."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from filelock import FileLock

tvm = pytest.importorskip("tvm")

import nanoexport  # noqa: E402
from nanoexport.config import ExportConfig, QuantConfig  # noqa: E402
from nanoexport.errors import NanoexportError  # noqa: E402
from nanoexport.interface import call_feeds  # noqa: E402
from nanoexport.targets.tvm import compile as tvm_compile  # noqa: E402
from nanoexport.targets.tvm import kernels, lowering, runtime  # noqa: E402

DEVICE = "host"  # this machine's CPU, which runs validation
CAPACITY, CHUNK = 64, 16
CONFIG = """\
[validate]
greedy_tokens = 8
eval_window = 32
eval_windows = 2
"""
ELF_AARCH64 = 183  # e_machine of an AArch64 ELF object


def nanoexport_cli(*args: str, cwd: Path, hide_tvm: bool = False) -> subprocess.CompletedProcess:
    prelude = "import sys; sys.modules['tvm'] = None; " if hide_tvm else "import sys; "  # find_spec sees no tvm
    code = prelude + "from nanoexport.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, check=False,
                          env={**os.environ, "COLUMNS": "200", "PYTHONPATH": str(Path(__file__).parents[1])})


def shared_folder(tmp_path_factory, name: str) -> tuple[Path, FileLock]:
    """A folder of this session that every xdist worker sees, and the lock under which the first one fills it."""
    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent
    return shared / name, FileLock(str(shared / f"{name}.lock"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """``nanoexport --target tvm`` on the demo model (fp32), once for all test workers."""
    folder, lock = shared_folder(tmp_path_factory, "tvm-cli")
    with lock:
        if not (folder / "demo-tvm" / "manifest.json").is_file():
            folder.mkdir(exist_ok=True)
            (folder / "nanoexport.toml").write_text(CONFIG)
            result = nanoexport_cli("--target", "tvm", "--tvm-target", DEVICE, "--max-context", str(CAPACITY),
                                    "--prefill-chunk", str(CHUNK), "--out", "demo-tvm", "--no-validate", cwd=folder)
            assert result.returncode == 0, result.stderr
    return folder / "demo-tvm"


@pytest.fixture(scope="module")
def int4(tmp_path_factory) -> tuple[Path, Path]:
    """The demo model exported with int4 weights, and the canonical graph the target received."""
    folder, lock = shared_folder(tmp_path_factory, "tvm-int4")
    canonical = folder / "canonical.onnx"
    with lock:
        if not (folder / "demo-int4" / "manifest.json").is_file():
            folder.mkdir(exist_ok=True)
            specializations = lowering.specializations

            def keep_canonical(model, build, scratch):
                ir.save(model, canonical, external_data="canonical.onnx.data")
                return specializations(model, build, scratch)

            config = ExportConfig(quant=QuantConfig(weights="int4", block_size=32), max_context=CAPACITY,
                                  prefill_chunk=CHUNK)
            config.options["tvm"].tvm_target = DEVICE
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(lowering, "specializations", keep_canonical)
                nanoexport.export(target="tvm", out=folder / "demo-int4", progress=False, config=config)
    return folder / "demo-int4", canonical


def test_validate_passes_at_fp32_thresholds(exported):
    result = nanoexport_cli("validate", str(exported), cwd=exported.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = {check["name"]: check for check in json.loads((exported / "report.json").read_text())["checks"]}
    assert checks["logits max-abs error"]["threshold"] == 1e-4
    assert checks["logits max-abs error"]["value"] < 5e-5  # measured 1.6e-5 (host target, 2048 slots)
    assert checks["KV consistency max-abs"]["value"] < 5e-5
    assert checks["greedy agreement"]["value"] == 1.0


def test_one_library_two_functions_one_weight_set(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["model_files"] == [tvm_compile.LIBRARY, tvm_compile.PARAMS, tvm_compile.SIGNATURES]
    signatures = json.loads((exported / tvm_compile.SIGNATURES).read_text())
    shapes = {name: {value["name"]: value["shape"] for value in function["inputs"]}
              for name, function in signatures["functions"].items()}
    assert shapes["prefill"]["input_ids"] == [1, CHUNK] and shapes["decode"]["input_ids"] == [1, 1]
    assert shapes["decode"]["past_key_values.0.key"] == [1, 2, CAPACITY, 32]  # KV heads, not query heads
    executable = tvm.runtime.load_module(str(exported / tvm_compile.LIBRARY))
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    for name in ("prefill", "decode"):  # each function takes its inputs, then every parameter, in one order
        assert vm[name] is not None
    from safetensors.numpy import load_file

    assert sorted(load_file(str(exported / tvm_compile.PARAMS))) == signatures["params"]


def test_int4_weights_stay_packed_bit_for_bit(int4):
    from safetensors.numpy import load_file

    artifact, canonical = int4
    params = load_file(str(artifact / tvm_compile.PARAMS))
    graph = ir.load(canonical).graph
    dequantized = [node for node in graph if node.op_type == "DequantizeLinear"]
    assert len(dequantized) == 16  # 4 layers x (qkv, o, gate/up, down)
    for node in dequantized:
        packed, scale = node.inputs[0], node.inputs[1]
        assert packed.dtype == ir.DataType.INT4
        assert params[packed.name].dtype == np.uint8
        assert params[packed.name].tobytes() == packed.const_value.tobytes()
        assert params[scale.name].dtype == np.float16
        assert np.array_equal(params[scale.name], scale.const_value.numpy())
    # No float copy of a quantized weight: what is float in the params is what the canonical graph keeps float.
    float_elements = sum(array.size for array in params.values() if array.dtype == np.float32)
    float_weights = sum(value.const_value.size for value in graph.initializers.values()
                        if value.dtype == ir.DataType.FLOAT and value.const_value.size > 64)
    assert float_elements == float_weights
    # Read back through the target's stored_weights, the manifest's digests say the same.
    digests = json.loads((artifact / "manifest.json").read_text())["weight_digests"]
    assert digests["stored"]["equals_canonical"] is True


def test_params_file_is_what_save_file_writes(int4, tmp_path):
    """The streamed params are byte for byte what ``save_file`` wrote from the arrays before (which the test above
    checks against the canonical graph), so artifacts and their digests are unchanged."""
    from safetensors.numpy import load_file, save_file

    artifact, _ = int4
    save_file(load_file(str(artifact / tvm_compile.PARAMS)), str(tmp_path / "saved.safetensors"))
    assert (artifact / tvm_compile.PARAMS).read_bytes() == (tmp_path / "saved.safetensors").read_bytes()


def test_parameters_are_written_holding_one_at_a_time(tmp_path):
    """Parameters read lazily (computed when read, or packed 4-bit in an external data file as the scratch
    canonical graph holds them) are written one at a time: the traced peak stays within a few of them, where the
    dict of arrays handed to ``save_file`` held them all (and each 4-bit one unpacked besides: 33 MB here)."""
    import tracemalloc

    from safetensors.numpy import save_file

    count, rows, columns = 8, 256, 1024  # each parameter 1 MB: fp32 [256, 1024], int4 [256, 8192]
    size = rows * columns * 4
    random = np.random.default_rng(0)
    (tmp_path / "weights.data").write_bytes(random.integers(0, 256, count * size, dtype=np.uint8).tobytes())
    parameters = {}
    for index in range(count):
        packed = ir.ExternalTensor("weights.data", offset=index * size, length=size, dtype=ir.DataType.INT4,
                                   shape=ir.Shape([rows, 8 * columns]), name=f"w{index}.quant", base_dir=tmp_path)
        computed = ir.LazyTensor(lambda index=index: ir.tensor(np.full((rows, columns), index, np.float32)),
                                 dtype=ir.DataType.FLOAT, shape=ir.Shape([rows, columns]))
        for name, tensor in ((f"w{index}.quant", packed), (f"n{index}.weight", computed)):
            parameters[name] = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype),
                                        const_value=tensor)
    (tmp_path / "out").mkdir()
    tracemalloc.start()
    try:
        tvm_compile.write_parameters(parameters, tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * size, peak
    save_file({name: np.ascontiguousarray(tvm_compile.parameter_array(value.const_value))
               for name, value in parameters.items()}, str(tmp_path / "saved.safetensors"))
    assert (tmp_path / "out" / tvm_compile.PARAMS).read_bytes() == (tmp_path / "saved.safetensors").read_bytes()


def test_int4_matches_the_canonical_graph_on_onnxruntime(int4):
    """Dequantized inside the matmul, the int4 artifact computes what ONNX Runtime computes on the canonical
    graph, up to the fp16 rounding of each weight that DequantizeLinear does and our kernel does not (as
    MatMulNBits does not): measured 1.3e-3 (decode) to 4.9e-3 (prefill) on the demo's logits. A wrong nibble order
    or block index moves logits by whole units."""
    artifact, canonical = int4
    runner = runtime.Runner(nanoexport.Artifact.load(artifact))
    session = ort.InferenceSession(str(canonical))
    rng = np.random.default_rng(0)
    kv = {f"past_key_values.{i}.{kind}": rng.standard_normal((1, 2, CAPACITY, 32)).astype(np.float32)
          for i in range(4) for kind in ("key", "value")}
    for tokens, past in ((list(range(3, 3 + CHUNK)), 5), ([42], 30)):
        feeds = {**call_feeds(tokens, past, len(tokens), CAPACITY), **kv}
        ours = runner.forward(feeds)
        names = [output.name for output in session.get_outputs()]
        theirs = dict(zip(names, session.run(names, feeds)))
        for name in names:
            assert np.abs(ours[name] - theirs[name]).max() < (2e-2 if name == "logits" else 1e-3), name


@pytest.mark.parametrize("family, form", [("gemma2", "sliding"), ("gpt2", "static")])
def test_families_match_onnxruntime(family, form, tmp_path):
    """Softcapped attention, tanh Gelu, a circular cache (gemma2), Gemm and LayerNormalization (gpt2), against
    ONNX Runtime on the same canonical graph, calls wrapping round a sliding cache included."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_model

    from nanoexport.capture.checkpoint import load_checkpoint
    from nanoexport.capture.onnx_export import export_onnx
    from nanoexport.passes import run_passes, select_passes, static_kv_cache_pass
    from nanoexport.passes.kv_cache import specialize
    from nanoexport.targets.tvm import device

    checkpoint = load_checkpoint(tiny_model(family))
    graph = export_onnx(checkpoint)
    run_passes(graph, select_passes(None, None))
    windows = [getattr(checkpoint.config, "sliding_window", None)] * checkpoint.config.num_hidden_layers
    run_passes(graph, [static_kv_cache_pass(32, windows, form == "sliding")])
    path = tmp_path / "canonical.onnx"
    ir.save(graph, path, external_data="canonical.onnx.data")
    graphs = {}
    for name, length in (("prefill", 8), ("decode", 1)):
        graphs[name] = ir.load(path)
        specialize(graphs[name], length)
    module, parameters, signatures = tvm_compile.build_module(graphs)
    vm = tvm.relax.VirtualMachine(tvm_compile.compile_module(module, device.parse(DEVICE)), tvm.cpu())
    params = [tvm.runtime.tensor(np.ascontiguousarray(tvm_compile.parameter_array(parameters[name].const_value)))
              for name in signatures["params"]]
    session = ort.InferenceSession(str(path))
    rng = np.random.default_rng(0)
    kv = {value.name: rng.standard_normal([int(d) for d in value.shape]).astype(np.float32)
          for value in graphs["decode"].graph.inputs if value.name.startswith("past_key_values.")}
    calls = [(list(range(3, 11)), 5), ([42], 20)] + ([(list(range(3, 11)), 28)] if form == "sliding" else [])
    for tokens, past in calls:
        feeds = {**call_feeds(tokens, past, len(tokens), 32), **kv}
        function = signatures["functions"]["decode" if len(tokens) == 1 else "prefill"]
        ours = vm["decode" if len(tokens) == 1 else "prefill"](
            *[tvm.runtime.tensor(feeds[value["name"]]) for value in function["inputs"]], *params)
        theirs = session.run([value["name"] for value in function["outputs"]], feeds)
        for i, expected in enumerate(theirs):
            assert np.abs(ours[i].numpy() - expected).max() < 1e-4, function["outputs"][i]["name"]


def test_unlowered_operator_is_refused_by_name():
    x = ir.Value(name="x", shape=ir.Shape([1, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.Node("", "Hardmax", [x], num_outputs=1, name="odd")
    node.outputs[0].name, node.outputs[0].shape = "y", ir.Shape([1, 4])
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 23}), ir_version=10)
    with pytest.raises(NanoexportError, match="no lowering for the ai.onnx operator Hardmax \\(node odd\\)"):
        tvm_compile.build_module({"decode": model})


@pytest.mark.parametrize("circular", [False, True])
def test_cache_write_kernel_matches_tensor_scatter(circular):
    """Our cache write against ONNX's reference TensorScatter, wrapping round the slots when circular."""
    from onnx.reference.ops.op_tensor_scatter import TensorScatter

    rng = np.random.default_rng(1)
    past = rng.standard_normal((1, 2, 8, 4)).astype(np.float32)
    update = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    position = np.array([6 if circular else 4], np.int64)  # circular: rows 6, 7, then slot 0
    bb = tvm.relax.BlockBuilder()
    args = [tvm.relax.Var(name, tvm.relax.TensorType(list(a.shape), str(a.dtype)))
            for name, a in (("past", past), ("update", update), ("position", position))]
    with bb.function("write", args):
        result = bb.emit_te(kernels.bind(kernels.cache_write, circular=circular), *args)
        bb.emit_func_output(result)
    vm = tvm.relax.VirtualMachine(tvm.compile(bb.get(), tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    ours = vm["write"](*[tvm.runtime.tensor(a) for a in (past, update, position)]).numpy()
    expected = TensorScatter.eval(past, update, position, axis=2, mode="circular" if circular else "linear")
    assert np.array_equal(ours, expected)


def test_cross_target_compiles_to_an_aarch64_archive(tmp_path):
    """A tiny checkpoint compiled for AArch64 Linux: TVM's archive of AArch64 objects, which validation refuses."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint("llama", tmp_path / "tiny")
    (tmp_path / "nanoexport.toml").write_text(CONFIG)
    result = nanoexport_cli("--model", str(checkpoint), "--target", "tvm", "--tvm-target", "aarch64-linux",
                            "--max-context", "32", "--prefill-chunk", "8", "--out", "arm", "--no-validate",
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    signatures = json.loads((tmp_path / "arm" / tvm_compile.SIGNATURES).read_text())
    assert signatures["library"] == tvm_compile.ARCHIVE and signatures["target"]["mtriple"] == "aarch64-linux-gnu"
    with tarfile.open(tmp_path / "arm" / tvm_compile.ARCHIVE) as archive:
        objects = [member for member in archive.getmembers() if member.name.endswith(".o")]
        assert objects and all(member.mtime == 0 for member in archive.getmembers())
        for member in objects:
            header = archive.extractfile(member).read(20)
            assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == ELF_AARCH64
    result = nanoexport_cli("validate", "arm", cwd=tmp_path)
    assert result.returncode == 2 and "compiled for another device" in result.stderr


@pytest.mark.parametrize("tvm_target", ['{"kind": "nope"}', "llvm -mcpu=cortex-a72", '{"kind": "cuda"}',
                                        '{"kind": "llvm", "mtriple": "z80-unknown-none"}'])
def test_bad_tvm_target_is_one_line_before_capture(tmp_path, tvm_target):
    result = nanoexport_cli("--target", "tvm", "--tvm-target", tvm_target, "--out", "never", cwd=tmp_path)
    assert result.returncode == 2
    message = [line for line in result.stderr.splitlines() if "tvm-target" in line]
    assert len(message) == 1 and tvm_target in message[0]
    assert not (tmp_path / "never").exists() and "capture" not in result.stdout


def test_missing_schedule_database_is_refused_before_capture(tmp_path):
    result = nanoexport_cli("--target", "tvm", "--tvm-database", "no-such-db", "--out", "never", cwd=tmp_path)
    assert result.returncode == 2 and "--tvm-database no-such-db is not a folder" in result.stderr
    assert not (tmp_path / "never").exists()


def test_missing_tvm_is_listed_and_explained(tmp_path):
    listed = nanoexport_cli("targets", cwd=tmp_path, hide_tvm=True)
    row = next(line for line in listed.stdout.splitlines() if line.strip("│ ").startswith("tvm"))
    assert "no: pip install 'nanoexport[tvm]'" in row
    asked = nanoexport_cli("--target", "tvm", "--out", "never", cwd=tmp_path, hide_tvm=True)
    assert asked.returncode == 2 and "pip install 'nanoexport[tvm]'" in asked.stderr
