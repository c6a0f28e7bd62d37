"""The qnn target: W4A16 QDQ graphs on the demo model, static and within the HTP allowlist, validated on
ONNX Runtime CPU, compiled and run on the HTP emulator when onnxruntime-qnn is installed; split into parts
under --max-part-bytes; compiled for the SoC of --soc-model / --htp-arch."""

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from filelock import FileLock

import nanoexport
from nanoexport.capture.checkpoint import DEMO_MODEL
from nanoexport.config import load_config
from nanoexport.targets.qnn.options import QnnOptions
from nanoexport.errors import NanoexportError
from nanoexport.onnx_file import open_session
from nanoexport.targets.qnn import compile as qnn_compile
from nanoexport.targets.qnn import parts as qnn_parts
from nanoexport.targets.qnn import runtime as qnn_runtime
from nanoexport.targets.qnn import weights as qnn_weights
from nanoexport.validate.decoding import ArtifactDecoder, greedy, prompts_for

HAS_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None
CONFIG = """\
max_context = 128
prefill_chunk = 16

[quant]
calib_samples = 16

[validate]
greedy_tokens = 8
eval_window = 32
eval_windows = 2
"""


# The demo's embedding (tied to lm_head, kept in fp16) is 2.1 MB and a W4A16 layer about 0.37 MB: 2.5 MB parts hold
# the embedding with layer 0, layers 1-3, and the final norm with lm_head alone.
PARTS_CONFIG = CONFIG + """
[qnn]
soc_model = 57
"""


def _export_once(tmp_path_factory, name: str, config: str, *flags: str) -> Path:
    """``nanoexport --target qnn`` on the demo model in its own folder, once for all test workers."""
    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent
    folder = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (folder / "demo-qnn" / "manifest.json").is_file():
            folder.mkdir(exist_ok=True)
            (folder / "nanoexport.toml").write_text(config)
            result = subprocess.run([sys.executable, "-m", "nanoexport.cli", "--target", "qnn", "--out", "demo-qnn",
                                     "--no-validate", *flags], cwd=folder, capture_output=True, text=True)
            assert result.returncode == 0, result.stderr
    return folder / "demo-qnn"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """W4A16 (the default) in one part."""
    return _export_once(tmp_path_factory, "qnn-cli", CONFIG)


@pytest.fixture(scope="module")
def parted(tmp_path_factory) -> Path:
    """The same export split into parts of at most 2.5 MB of weights, for SoC 57 (set in the TOML file)."""
    return _export_once(tmp_path_factory, "qnn-parts", PARTS_CONFIG, "--max-part-bytes", "2.5MB")


def _decoders(*artifacts: Path, backend: str) -> list[ArtifactDecoder]:
    kv_cache = json.loads((artifacts[0] / "manifest.json").read_text())["io"]["kv_cache"]
    return [ArtifactDecoder(qnn_runtime.Runner(nanoexport.Artifact.load(path), backend=backend), kv_cache)
            for path in artifacts]


def test_graphs_are_static_w4a16_and_within_the_allowlist(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["config"]["quant"]["weights"] == "int4" and manifest["config"]["quant"]["activations"] == "a16"
    for name, tokens in (("prefill", 16), ("decode", 1)):
        model = ir.load(exported / qnn_parts.GRAPHS[name])
        assert {node.op_type for node in model.graph} <= qnn_parts.HTP_OPS
        for value in [*model.graph.inputs, *model.graph.outputs]:
            assert value.shape.is_static(), value.name
        shapes = {value.name: list(value.shape) for value in [*model.graph.inputs, *model.graph.outputs]}
        assert shapes["input_ids"] == [1, tokens] and shapes["attention_mask"] == [1, 128]
        assert shapes["past_key_values.0.key"] == [1, 2, 128, 32]
        assert shapes["present.0.key"] == [1, 2, tokens, 32]  # the new rows; the host writes them
        weights = [node for node in model.graph if node.op_type == "DequantizeLinear"
                   and node.attributes.get_int("block_size", 0)]
        assert weights and all(node.inputs[0].dtype == ir.DataType.INT4 for node in weights)


def test_validate_passes_on_onnxruntime_cpu(exported, monkeypatch):
    monkeypatch.setattr(qnn_runtime, "Runner", functools.partial(qnn_runtime.Runner, backend="cpu"))
    monkeypatch.setattr(qnn_runtime, "validation_notes", lambda artifact: [])
    report = nanoexport.validate(exported, write=False)
    assert report.passed, [check for check in report.checks if not check.passed]
    checks = {check.name: check.value for check in report.checks}
    assert checks["top-1 agreement"] >= 0.9 and checks["logits min cosine"] >= 0.99


@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn is not installed")
def test_compiled_for_htp_and_every_node_runs_on_qnn(exported):
    files = json.loads((exported / "manifest.json").read_text())["model_files"]
    for file_name in qnn_parts.GRAPHS.values():
        assert qnn_compile.context_file(file_name) in files
    runner = qnn_runtime.Runner(nanoexport.Artifact.load(exported), backend="htp")  # CPU fallback disabled
    decoder = ArtifactDecoder(runner, json.loads(
        (exported / "manifest.json").read_text())["io"]["kv_cache"])
    logits = decoder.full_logits(list(range(1, 20)))
    assert logits.shape == (19, 4096) and np.isfinite(logits).all()


@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn is not installed")
def test_htp_matches_cpu(exported):
    note = qnn_runtime.validation_notes(nanoexport.Artifact.load(exported))[0]
    assert float(note.split("top-1 agreement ")[1].split()[0]) >= 0.9


@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn is not installed")
def test_w8a8_runs_on_htp_with_per_channel_int8_and_validates(tmp_path_factory):
    """int8 weights go per output channel (HTP refuses block-wise int8 beside uint8 activations); the CPU
    runner keeps the QDQ graph's float ops (ONNX Runtime's uint8 integer fusion fails on it)."""
    folder = _export_once(tmp_path_factory, "qnn-w8a8", CONFIG, "--quant", "int8", "--activations", "a8")
    model = ir.load(folder / qnn_parts.GRAPHS["decode"])
    weights = [node for node in model.graph if node.op_type == "DequantizeLinear" and node.inputs[0].dtype ==
               ir.DataType.INT8]
    assert weights and all(node.inputs[1].shape.rank() == 1 for node in weights)  # one scale per channel
    report = nanoexport.validate(folder, write=False)  # on HTP, no CPU fallback, and HTP vs CPU in the notes
    assert report.passed, [check for check in report.checks if not check.passed]
    assert "every node on QNN" in report.notes[0]


def test_an_op_outside_the_allowlist_is_refused_by_name():
    x = ir.Value(name="x", shape=ir.Shape([1, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    hardmax = ir.node("Hardmax", [x], name="odd")
    graph = ir.Graph([x], hardmax.outputs, nodes=[hardmax], opset_imports={"": 23})
    with pytest.raises(NanoexportError, match="op Hardmax"):
        qnn_parts.check_ops(ir.Model(graph, ir_version=10), "decode")


def test_lpbq_integers_are_held_two_to_a_byte():
    """Held a byte per int4 value until written, the LPBQ integers took twice the model's int4 bytes."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    quant = rng.integers(-8, 8, (256, 64)).astype(ml_dtypes.int4)
    scale = rng.uniform(0.01, 0.02, (8, 64)).astype(np.float16)
    x = ir.Value(name="x", shape=ir.Shape([1, 256]), type=ir.TensorType(ir.DataType.FLOAT))
    quant_value = ir.Value(name="w.quant", shape=ir.Shape([256, 64]), type=ir.TensorType(ir.DataType.INT4),
                           const_value=ir.Tensor(quant, dtype=ir.DataType.INT4))
    scale_value = ir.Value(name="w.scale", shape=ir.Shape([8, 64]), type=ir.TensorType(ir.DataType.FLOAT16),
                           const_value=ir.tensor(scale))
    dequantize = ir.node("DequantizeLinear", [quant_value, scale_value], {"axis": 0, "block_size": 32})
    cast = ir.node("Cast", dequantize.outputs, {"to": ir.DataType.FLOAT})
    matmul = ir.node("MatMul", [x, cast.outputs[0]])
    model = ir.Model(ir.Graph([x], matmul.outputs, nodes=[dequantize, cast, matmul],
                              initializers=[quant_value, scale_value], opset_imports={"": 23}), ir_version=10)
    qnn_weights.weights_for_htp(model)
    stored = model.graph.initializers["w.lpbq_quant"].const_value
    assert isinstance(stored, ir.PackedTensor) and stored.nbytes == 256 * 64 // 2
    expected, _, _ = qnn_weights.lpbq_weights(quant, scale.astype(np.float32), block_size=32)
    np.testing.assert_array_equal(stored.numpy().astype(np.int8), expected.astype(np.int8))


def test_lpbq_weights_take_htp_levels_and_stay_close_to_our_int4():
    """Block scales become levels 1..16 of a per-channel scale (what HTP computes right), and the integers,
    rounded again to them, reproduce the weights nearly as well as our free fp16 block scales do."""
    import ml_dtypes

    from nanoexport.calibration.blocks import WeightFormat, rtn

    weight = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    weight *= np.random.default_rng(1).uniform(0.1, 1.0, (256 // 32, 1, 64)).repeat(32, 0).reshape(256, 64)
    ours = rtn(weight, WeightFormat("int4", block_size=32))
    integers, levels, channel = qnn_weights.lpbq_weights(ours.values.astype(ml_dtypes.int4),
                                                         ours.scales.astype(np.float32), block_size=32)
    assert levels.min() >= 1 and levels.max() == qnn_weights.LPBQ_LEVELS and integers.dtype == ml_dtypes.int4
    np.testing.assert_allclose(channel * qnn_weights.LPBQ_LEVELS, np.abs(ours.scales.astype(np.float32)).max(axis=0))
    lpbq = integers.astype(np.float32) * np.repeat(levels * channel, 32, axis=0)

    def error(approximation):
        return np.linalg.norm(approximation - weight) / np.linalg.norm(weight)

    assert error(lpbq) < 1.25 * error(ours.dequantize())



def test_verification_names_a_broken_htp_rewrite(tiny_checkpoint, tmp_path, monkeypatch):
    """--verify-passes runs the HTP graph rewrites on ONNX Runtime like the canonical passes: the ones that keep
    the logits pass, and one whose mask no longer masks (a broken constant) is stopped by name."""
    from nanoexport.capture.checkpoint import load_checkpoint
    from nanoexport.capture.onnx_export import export_onnx
    from nanoexport.passes import PASSES, run_passes, static_kv_cache_pass
    from nanoexport.passes.kv_cache import specialize
    from nanoexport.targets import Build
    from nanoexport.targets.qnn import rewrites

    model = export_onnx(load_checkpoint(tiny_checkpoint("llama")))
    run_passes(model, [*PASSES, static_kv_cache_pass(32, [None, None], circular=False)])
    specialize(model, 8)
    broken = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    build = Build(nanoexport.ExportConfig(), None, None, tmp_path, verify=True)
    build.run_passes(model, rewrites.htp_graph_passes(32), graph="prefill")
    assert [stat.name for stat in build.stats] == ["prefill: rotary_as_tables", "prefill: decompose_rotary",
                                                   "prefill: cache_as_new_rows", "prefill: attention_as_matmuls"]
    assert all(stat.logits_change <= 1e-4 for stat in build.stats)
    monkeypatch.setattr(rewrites, "MASKED", 0.0)
    with pytest.raises(NanoexportError, match="pass cache_as_new_rows changed the logits"):
        build.run_passes(broken, rewrites.htp_graph_passes(32), graph="prefill")

# --- parts -------------------------------------------------------------------------------------------------


def test_parts_are_listed_in_order_static_and_each_reads_its_own_weights(parted):
    manifest = json.loads((parted / "manifest.json").read_text())
    listing = json.loads((parted / qnn_parts.PARTS_FILE).read_text())
    parts = listing["parts"]
    assert listing["max_part_bytes"] == 2_500_000 and manifest["config"]["qnn"]["max_part_bytes"] == "2.5MB"
    assert [part["layers"] for part in parts] == [[0], [1, 2, 3], []]
    assert manifest["model_files"][:10] == [f"part{index}/{file}" for index in range(3)
                                            for file in ("prefill.onnx", "decode.onnx", "model.onnx.data")] + [
                                               qnn_parts.PARTS_FILE]
    assert not (parted / qnn_parts.WEIGHTS_FILE).exists()
    entering = 0  # the unit the part starts with
    for index, part in enumerate(parts):
        assert (parted / part["weights"]).stat().st_size <= 2_500_000
        for name, tokens in (("prefill", 16), ("decode", 1)):
            model = ir.load(parted / part["graphs"][name])
            assert {node.op_type for node in model.graph} <= qnn_parts.HTP_OPS
            shapes = {value.name: list(value.shape) for value in [*model.graph.inputs, *model.graph.outputs]}
            assert all(isinstance(size, int) for shape in shapes.values() for size in shape), shapes
            first = "input_ids" if index == 0 else f"hidden_states.{entering}"
            last = "logits" if index == len(parts) - 1 else f"hidden_states.{entering + len(part['layers'])}"
            assert model.graph.inputs[0].name == first and model.graph.outputs[0].name == last
            if first.startswith("hidden"):
                assert shapes[first] == [1, tokens, 256]
            caches = {int(name.split(".")[1]) for name in shapes if name.startswith(("past_key_values.", "present."))}
            assert caches == set(part["layers"])
            # Prefill and decode of a part read the part's one weights file, and only it.
            locations = {value.const_value.location for value in model.graph.initializers.values()
                         if isinstance(value.const_value, ir.ExternalTensor)}
            assert locations == {qnn_parts.WEIGHTS_FILE}
            assert part["io"][name]["inputs"][0]["name"] == first
        entering += len(part["layers"])
    # The head's part holds the final norm and lm_head with the tied table, and nothing of a layer.
    head = ir.load(parted / parts[-1]["graphs"]["decode"])
    assert {node.op_type for node in head.graph} >= {"RMSNormalization", "MatMul"}
    assert not any("layers." in name for name in head.graph.initializers)


def test_an_embedding_alone_in_its_part_chains_like_one_graph(exported, tmp_path):
    """The first part may hold only the embedding: its output is the residual stream entering layer 0."""
    import shutil

    import onnxruntime as ort

    folder = tmp_path / "embedding-alone"
    shutil.copytree(exported, folder)
    whole = {name: ir.load(folder / file_name) for name, file_name in qnn_parts.GRAPHS.items()}
    parts = qnn_parts.write_parts(whole, [range(-1, 0), range(0, 5)], folder)
    assert [part["layers"] for part in parts] == [[], [0, 1, 2, 3]]
    assert [value["name"] for value in parts[0]["io"]["decode"]["outputs"]] == ["hidden_states.0"]
    embedding = ir.load(folder / parts[0]["graphs"]["decode"])
    assert "Gather" in {node.op_type for node in embedding.graph}
    assert [value.name for value in embedding.graph.inputs] == ["input_ids"]

    def run(sessions: list[ort.InferenceSession], feeds: dict[str, np.ndarray]) -> np.ndarray:
        values = dict(feeds)
        for session in sessions:
            names = [output.name for output in session.get_outputs()]
            values.update(zip(names, session.run(names, {i.name: values[i.name] for i in session.get_inputs()})))
        return values["logits"]

    options = {"session_config": qnn_runtime.QDQ_AS_FLOAT}
    reference = open_session(exported / qnn_parts.GRAPHS["decode"], exported, **options)
    chained = [open_session(folder / part["graphs"]["decode"], folder, **options) for part in parts]
    feeds = {value.name: np.zeros([int(size) for size in value.shape], value.dtype.numpy())
             for value in ir.load(exported / qnn_parts.GRAPHS["decode"]).graph.inputs}
    feeds |= {"input_ids": np.array([[7]]), "attention_mask": np.ones_like(feeds["attention_mask"])}
    np.testing.assert_array_equal(run(chained, feeds), run([reference], feeds))


def test_chained_parts_give_the_logits_and_tokens_of_one_graph_on_cpu(exported, parted):
    whole, parts = _decoders(exported, parted, backend="cpu")
    for prompt in prompts_for(exported, whole.vocab_size):
        np.testing.assert_allclose(parts.full_logits(prompt), whole.full_logits(prompt), rtol=0, atol=1e-5)
        np.testing.assert_allclose(parts.prefill_then_decode(prompt, len(prompt) - 4),
                                   whole.prefill_then_decode(prompt, len(prompt) - 4), rtol=0, atol=1e-5)
        assert greedy(parts.next_token_stream(prompt), 8) == greedy(whole.next_token_stream(prompt), 8)


def test_validate_chains_the_parts_on_onnxruntime_cpu(parted, monkeypatch):
    monkeypatch.setattr(qnn_runtime, "Runner", functools.partial(qnn_runtime.Runner, backend="cpu"))
    monkeypatch.setattr(qnn_runtime, "validation_notes", lambda artifact: [])
    report = nanoexport.validate(parted, write=False)
    assert report.passed, [check for check in report.checks if not check.passed]


@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn is not installed")
def test_parts_compile_per_part_and_chain_on_htp_like_one_graph(exported, parted):
    files = json.loads((parted / "manifest.json").read_text())["model_files"]
    for part in ("part0", "part1", "part2"):
        for graph in ("prefill", "decode"):
            assert f"{part}/{graph}_ctx.onnx" in files
    compile_seconds = json.loads((parted / "build.json").read_text())["target_seconds"]
    assert sorted(compile_seconds) == sorted(f"{part}/{graph}.onnx" for part in ("part0", "part1", "part2")
                                                       for graph in ("prefill", "decode"))
    # The same QDQ graphs on the same backend: whatever HTP computes, the cut does not change it.
    whole, parts = _decoders(exported, parted, backend="htp")  # CPU fallback disabled
    prompt = list(range(1, 20))
    np.testing.assert_allclose(parts.full_logits(prompt), whole.full_logits(prompt), rtol=0, atol=1e-5)


def test_a_random_weight_checkpoint_splits_into_parts(tmp_path):
    """Untrained norms (all ones) and biases (zeros) are equal in every layer; merged across layers, they put a
    layer on another's weight and no single hidden state crossed the boundary (found on Qwen2.5-1.5B)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    checkpoint = tmp_path / "random-qwen2"
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json", "calibration.txt"):
        shutil.copy(DEMO_MODEL / name, checkpoint / name)
    settings = load_config(None, {"model": str(checkpoint), "target": "qnn", "max_context": 64,
                                  "prefill_chunk": 16, "quant": {"calib_samples": 4},
                                  "qnn": {"max_part_bytes": "1250kB"}})
    artifact = nanoexport.export(config=settings, out=tmp_path / "out", progress=False)
    layers = [part["layers"] for part in qnn_parts.parts_of(artifact)]
    assert len(layers) >= 2 and sum(layers, []) == [0, 1, 2, 3]


def test_part_limits_cut_off_the_embedding_and_head_or_are_refused_in_one_line(exported):
    prefill = ir.load(exported / qnn_parts.GRAPHS["prefill"])
    # Units: -1 the embedding, 0-3 the layers, 4 the final norm and lm_head (reading the tied table too).
    assert qnn_parts.plan_parts(prefill, 3_000_000, "3MB") == [range(-1, 2), range(2, 5)]
    assert qnn_parts.plan_parts(prefill, 2_400_000, "2.4MB") == [range(-1, 0), range(0, 4), range(4, 5)]
    assert qnn_parts.plan_parts(prefill, 10**9, "1GB") == [range(-1, 5)]
    with pytest.raises(NanoexportError, match="less than the embedding") as error:
        qnn_parts.plan_parts(prefill, 100_000, "100kB")
    assert "\n" not in str(error.value) and "100kB" in str(error.value)
    # A final norm under another name: the head stays with the last layer, which then does not fit.
    norm = next(value for name, value in prefill.graph.initializers.items() if name.endswith("model.norm.weight"))
    prefill.graph.initializers.pop(norm.name)
    norm.name = "final_layer_norm.scale"
    prefill.graph.initializers[norm.name] = norm
    with pytest.raises(NanoexportError, match="the last layer with the final norm and lm_head"):
        qnn_parts.plan_parts(prefill, 2_400_000, "2.4MB")


# --- SoC settings ------------------------------------------------------------------------------------------


def test_soc_settings_reach_the_manifest_and_the_compile_report(exported, parted):
    for artifact, soc in ((exported, "60"), (parted, "57")):  # parted: soc_model = 57, a TOML integer
        manifest = json.loads((artifact / "manifest.json").read_text())
        assert manifest["config"]["qnn"]["soc_model"] == soc and manifest["config"]["qnn"]["htp_arch"] == "75"
        if HAS_QNN:
            compile_report = json.loads((artifact / qnn_compile.COMPILE_REPORT).read_text())
            assert (compile_report["soc_model"], compile_report["htp_arch"]) == (soc, "75")
    assert qnn_runtime.settings_of(nanoexport.Artifact.load(parted)).soc_model == "57"  # what the HTP runner passes


@pytest.mark.parametrize("settings, message", [
    (dict(soc_model="SM8650"), "not a QNN SoC id"),
    (dict(soc_model="0"), "not a QNN SoC id"),
    (dict(htp_arch="v75"), "choose one of 68, 69, 73, 75, 79, 81"),
    (dict(htp_arch="77"), "not an HTP architecture"),
    (dict(max_part_bytes="lots"), "--max-part-bytes 'lots' is not a size"),  # config.parse_size's message
    (dict(max_part_bytes="0"), "write it like 1GB"),
])
def test_bad_soc_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(NanoexportError, match=message) as error:
        qnn_compile.check_settings(QnnOptions(**settings))
    assert "\n" not in str(error.value)


@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn is not installed")
def test_a_soc_id_htp_cannot_create_is_refused():
    assert qnn_compile.check_settings(QnnOptions(soc_model="69", htp_arch="79", max_part_bytes="300MB")) == 300_000_000
    with pytest.raises(NanoexportError, match="cannot create a device for --soc-model 80"):
        qnn_compile.check_settings(QnnOptions(soc_model="80"))


def test_cli_refuses_a_bad_htp_arch_with_exit_2(tmp_path):
    (tmp_path / "nanoexport.toml").write_text(CONFIG)
    result = subprocess.run([sys.executable, "-m", "nanoexport.cli", "--target", "qnn", "--out", "out",
                             "--htp-arch", "77", "--no-validate"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--htp-arch '77'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_part_limit_below_the_embedding_table_is_refused_before_any_work(tmp_path):
    """The exact check needs the quantized graph, after calibration (57 minutes on a 1.5B config); the table's
    size is known from config.json (the demo's: 4,096 x 256 in fp16)."""
    (tmp_path / "nanoexport.toml").write_text(CONFIG)
    result = subprocess.run([sys.executable, "-m", "nanoexport.cli", "--target", "qnn", "--out", "out",
                             "--max-part-bytes", "2MB", "--no-validate", "-v"], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: --max-part-bytes 2MB (2,000,000 bytes) is less than the embedding table "
                            "(2,097,152 bytes: 4,096 x 256 in fp16")
    assert "capture" not in result.stderr and not (tmp_path / "out").exists()


def test_a_quantized_embedding_table_is_refused_in_one_line_naming_the_fix(tmp_path):
    """HTP looks tables up in float; quantized (``--keep-float ''``), the lowering crashed on its layout."""
    (tmp_path / "nanoexport.toml").write_text(CONFIG)
    result = subprocess.run([sys.executable, "-m", "nanoexport.cli", "--target", "qnn", "--out", "out",
                             "--keep-float", "", "--no-validate"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: the qnn target looks embedding tables up in float") and "--keep-float" in error
    assert "Traceback" not in result.stderr and sorted(path.name for path in tmp_path.iterdir()) == [
        "nanoexport.toml"]


@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn is not installed")
def test_shared_weights_put_prefill_and_decode_in_one_smaller_binary(exported, tmp_path):
    """--share-weights: both EPContext models of a part point into one binary holding the weights once."""
    import shutil

    folder = tmp_path / "shared"
    folder.mkdir()
    for file_name in (*qnn_parts.GRAPHS.values(), qnn_parts.WEIGHTS_FILE):
        shutil.copy(exported / file_name, folder / file_name)
    settings = QnnOptions(share_weights=True)
    written = qnn_compile.compile_contexts(folder, [list(qnn_parts.GRAPHS.values())], settings)
    binaries = [name for name in written if name.endswith(".bin")]
    assert len(binaries) == 1
    for file_name in qnn_parts.GRAPHS.values():
        context = ir.load(folder / qnn_compile.context_file(file_name))
        (node,) = [node for node in context.graph if node.op_type == "EPContext"]
        assert node.attributes["ep_cache_context"].as_string() == binaries[0]
    separate = sum((exported / name).stat().st_size for name in os.listdir(exported) if name.endswith(".bin"))
    assert (folder / binaries[0]).stat().st_size < 0.6 * separate


def test_bad_settings_are_refused_before_any_work(monkeypatch, tmp_path):
    from nanoexport import pipeline

    monkeypatch.setattr(pipeline, "load_checkpoint", lambda *_: pytest.fail("the checkpoint was loaded"))
    config = nanoexport.ExportConfig()
    config.options["qnn"].htp_arch = "77"
    with pytest.raises(NanoexportError, match="--htp-arch '77'"):
        nanoexport.export(target="qnn", out=tmp_path / "out", config=config, progress=False)


def test_qnn_settings_from_toml_and_flags(tmp_path):
    (tmp_path / "nanoexport.toml").write_text("[qnn]\nsoc_model = 69\nhtp_arch = 79\nmax_part_bytes = 300000000\n")
    config = load_config(tmp_path / "nanoexport.toml", {"qnn": {"max_part_bytes": "300MB"}})
    settings = config.options["qnn"]
    assert (settings.soc_model, settings.htp_arch, settings.max_part_bytes) == ("69", "79", "300MB")
