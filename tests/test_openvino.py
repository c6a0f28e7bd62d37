"""The openvino target: the CLI on the demo model, validation, our int4 weights in the IR, openvino-genai."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from filelock import FileLock

ov = pytest.importorskip("openvino")
ops = pytest.importorskip("openvino.opset13")
openvino_genai = pytest.importorskip("openvino_genai")

import nanoexport  # noqa: E402
from nanoexport.capture.checkpoint import DEMO_MODEL, load_checkpoint  # noqa: E402
from nanoexport.config import ExportConfig, QuantConfig  # noqa: E402
from nanoexport.errors import NanoexportError  # noqa: E402
from nanoexport.passes.fusion import unmerge_projections  # noqa: E402
from nanoexport.targets.openvino import files, lowering, onnx_rules, ov_passes, runtime  # noqa: E402
from nanoexport.validate.decoding import PROMPTS, TorchReference, greedy  # noqa: E402

# Shorter generation and perplexity runs than the defaults; the fp32 thresholds stay the defaults.
CONFIG = """\
[validate]
greedy_tokens = 16
eval_window = 128
eval_windows = 4
"""
GREEDY_TOKENS = 24
NEAR_TIE = 0.02  # logit margin under which fp16 rounding may pick the other token (measured partings: 0.001, 0.004)
MERGED_LINEARS = 16  # 4 layers x (merged q/k/v, o, merged gate/up, down) in the canonical graph
QUANTIZED_LINEARS = 28  # 4 layers x (q, k, v, o, gate, up, down) in the IR; the tied lm_head stays float


def nanoexport_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanoexport.cli", *args], cwd=cwd, capture_output=True, text=True,
                          check=False, env={**os.environ, "COLUMNS": "200"})


def shared_folder(tmp_path_factory, name: str) -> tuple[Path, FileLock]:
    """A folder of this session that every xdist worker sees, and the lock under which the first one fills it."""
    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent  # the session's folder, above each worker's own
    return shared / name, FileLock(str(shared / f"{name}.lock"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """``nanoexport --target openvino`` on the demo model (fp32), once for all test workers."""
    folder, lock = shared_folder(tmp_path_factory, "openvino-cli")
    with lock:
        if not (folder / "demo-openvino" / "manifest.json").is_file():
            folder.mkdir(exist_ok=True)
            (folder / "nanoexport.toml").write_text(CONFIG)
            result = nanoexport_cli("--target", "openvino", "--out", "demo-openvino", "--no-validate", cwd=folder)
            assert result.returncode == 0, result.stderr
    return folder / "demo-openvino"


@pytest.fixture(scope="module")
def int4(tmp_path_factory) -> tuple[Path, Path]:
    """The demo model exported with int4 weights, and the canonical graph its target passes received."""
    folder, lock = shared_folder(tmp_path_factory, "openvino-int4")
    canonical = folder / "canonical.onnx"
    with lock:
        if not (folder / "demo-int4" / "manifest.json").is_file():
            folder.mkdir(exist_ok=True)
            lowering_passes = lowering.lowering_passes

            def keep_canonical_first(build):
                def keep_canonical(model):
                    ir.save(model, canonical, external_data="canonical.onnx.data")

                return [keep_canonical, *lowering_passes(build)]

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(lowering, "lowering_passes", keep_canonical_first)
                nanoexport.export(target="openvino", out=folder / "demo-int4", progress=False,
                                  config=ExportConfig(quant=QuantConfig(weights="int4", block_size=32)))
    return folder / "demo-int4", canonical


def constants(model, element_type) -> list:
    return [node for node in model.get_ordered_ops()
            if node.get_type_name() == "Constant" and node.get_element_type() == element_type]


def scale_constants(model) -> list:
    """The f16 constants that scale an i4 one (its decompression Multiply's other operand, through the
    frontend's Unsqueeze/Reshape/Convert): the block scales, not the fp16 weights of a layer kept unquantized."""
    passing = ("Convert", "Reshape", "Unsqueeze", "Subtract")

    def source(output):
        node = output.get_node()
        return source(node.input_value(0)) if node.get_type_name() in passing else node

    scales = []
    for weight in constants(model, ov.Type.i4):
        frontier = [weight]
        while frontier:
            node = frontier.pop()
            for target in (t.get_node() for output in node.outputs() for t in output.get_target_inputs()):
                if target.get_type_name() in passing:
                    frontier.append(target)
                elif target.get_type_name() == "Multiply":
                    scales += [other for other in map(source, target.input_values())
                               if other.get_type_name() == "Constant" and other.get_element_type() == ov.Type.f16]
    return scales


def runtime_layers(artifact: Path, properties: dict) -> list:
    compiled = ov.Core().compile_model(artifact / files.MODEL_FILE, "CPU", properties)
    return compiled.get_runtime_model().get_ordered_ops()


def layer_type(node) -> str:
    return node.get_rt_info()["layerType"].astype(str)


def test_validate_passes_at_fp32_thresholds(exported):
    result = nanoexport_cli("validate", str(exported), cwd=exported.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = {check["name"]: check for check in json.loads((exported / "report.json").read_text())["checks"]}
    assert checks["logits max-abs error"]["threshold"] == 1e-4
    assert checks["logits max-abs error"]["value"] < 5e-5  # measured 1.3e-5 with the f32 validation properties
    assert checks["KV consistency max-abs"]["value"] < 5e-5  # states set from the past, then read back
    assert checks["greedy agreement"]["value"] == 1.0
    assert {"top-1 agreement", "perplexity increase"} <= set(checks)


def test_model_is_stateful_with_genai_inputs_and_files(exported):
    model = ov.Core().read_model(exported / files.MODEL_FILE)
    assert [value.get_any_name() for value in model.inputs] == [
        "input_ids", "attention_mask", "position_ids", "beam_idx"]
    assert [value.get_any_name() for value in model.outputs] == ["logits"]
    kinds = Counter(node.get_type_name() for node in model.get_ordered_ops())
    assert kinds["ReadValue"] == kinds["Assign"] == 8  # a key and a value state per layer
    manifest = json.loads((exported / "manifest.json").read_text())
    assert {files.MODEL_FILE, files.WEIGHTS_FILE, files.TOKENIZER_FILE, files.DETOKENIZER_FILE,
            "generation_config.json", "config.json"} <= set(manifest["model_files"])
    assert manifest["io"]["kv_cache"]["form"] == "stateful"


def test_cpu_fuses_the_cache_into_its_attention_kernel(exported):
    """KV heads repeated by Broadcast, not Tile: the CPU plugin appends to the cache in place, one kernel a layer."""
    layers = Counter(layer_type(node) for node in runtime_layers(exported, runtime.VALIDATION_PROPERTIES))
    assert layers["ScaledDotProductAttention"] == 4


@pytest.mark.parametrize("backend", ["PA", "SDPA"])
def test_genai_generates_pytorchs_greedy_tokens(exported, backend):
    """Both of genai's CPU pipelines: PagedAttention (its default, continuous batching) and the stateful one."""
    pipe = openvino_genai.LLMPipeline(str(exported), "CPU", ATTENTION_BACKEND=backend, **runtime.VALIDATION_PROPERTIES)
    tokenizer = pipe.get_tokenizer()
    reference = TorchReference(load_checkpoint(DEMO_MODEL).model)
    hf_tokenizer = _hf_tokenizer(exported)
    config = openvino_genai.GenerationConfig(max_new_tokens=GREEDY_TOKENS, do_sample=False, ignore_eos=True)
    for prompt in PROMPTS:
        inputs = tokenizer.encode(prompt)
        ids = inputs.input_ids.data[0].tolist()
        assert ids == hf_tokenizer.encode(prompt)
        tokens = list(pipe.generate(inputs, config).tokens[0])
        assert tokens == greedy(reference.next_token_stream(ids), GREEDY_TOKENS)
        assert tokenizer.decode(tokens) == hf_tokenizer.decode(tokens)


def test_paged_attention_conversion_leaves_no_cache_inputs(exported):
    """genai's PagedAttention conversion removes the states and beam_idx; nothing may still read them."""
    from openvino._offline_transformations import paged_attention_transformation

    model = ov.Core().read_model(exported / files.MODEL_FILE)
    paged_attention_transformation(model)
    names = {value.get_any_name() for value in model.inputs}
    assert {"input_ids", "position_ids", "past_lens", "key_cache.0", "value_cache.3"} <= names
    assert not names & {"beam_idx", "attention_mask"}
    kinds = Counter(node.get_type_name() for node in model.get_ordered_ops())
    assert kinds["PagedAttentionExtension"] == 4 and not kinds["ScaledDotProductAttention"] and not kinds["ReadValue"]


def test_paged_attention_graph_runs_a_kernel_per_projection(exported):
    """genai's default CPU graph as optimum-intel's IR compiles: a FullyConnected per projection with the gate's
    Swish fused in, and no Split copying merged outputs per token."""
    from openvino._offline_transformations import paged_attention_transformation

    model = ov.Core().read_model(exported / files.MODEL_FILE)
    paged_attention_transformation(model)
    compiled = ov.Core().compile_model(model, "CPU", runtime.VALIDATION_PROPERTIES)
    layers = compiled.get_runtime_model().get_ordered_ops()
    kinds = Counter(layer_type(node) for node in layers)
    assert kinds["FullyConnected"] == QUANTIZED_LINEARS + 1 and not kinds["Split"]  # + the output head
    fused = [node for node in layers if layer_type(node) == "FullyConnected"
             and "Swish" in node.get_rt_info()["originalLayersNames"].astype(str)]
    assert len(fused) == 4
    assert not kinds["IsNaN"] and not kinds["Select"]  # no NaN guard after attention (see drop_nan_guards)


def test_left_padded_batch_is_exact_without_the_nan_guard(exported):
    """A padded row's padding attends to no key at all; with the mask clamped finite it stays a number, and the
    real rows match PyTorch, prompt and one decode step."""
    import torch

    from nanoexport.artifact import Artifact

    artifact = Artifact.load(exported)
    kv = artifact.manifest["io"]["kv_cache"]
    generator = np.random.default_rng(3)
    ids = generator.integers(3, kv["vocab_size"], (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, :4] = 0
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    empty = np.zeros((2, kv["kv_heads"], 0, kv["head_dim"]), np.float32)
    runner = runtime.Runner(artifact)
    prefill = runner.forward({"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                              **{f"past_key_values.{layer}.{part}": empty for layer in range(kv["num_layers"])
                                 for part in ("key", "value")}})
    step = generator.integers(3, kv["vocab_size"], (2, 1))
    feeds = {"input_ids": step, "attention_mask": np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1),
             "position_ids": positions[:, -1:] + 1,
             **{name.replace("present.", "past_key_values."): value for name, value in prefill.items()
                if name.startswith("present.")}}
    decoded = runner.forward(feeds)["logits"]
    assert np.isfinite(prefill["logits"]).all() and np.isfinite(decoded).all()
    with torch.no_grad():
        theirs = load_checkpoint(DEMO_MODEL).model(
            input_ids=torch.tensor(np.concatenate([ids, step], axis=1)),
            attention_mask=torch.tensor(feeds["attention_mask"]),
            position_ids=torch.tensor(np.concatenate([positions, feeds["position_ids"]], axis=1))).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(prefill["logits"][real] - theirs[:, :-1][real]).max() <= 1e-4
    assert np.abs(decoded[:, -1] - theirs[:, -1]).max() <= 1e-4


def test_float_model_asks_for_an_f16_kv_cache_and_int4_for_the_default(exported, int4):
    float_model = ov.Core().read_model(exported / files.MODEL_FILE)
    assert float_model.get_rt_info(["runtime_options", "KV_CACHE_PRECISION"]).astype(str) == "f16"
    assert not ov.Core().read_model(int4[0] / files.MODEL_FILE).has_rt_info(["runtime_options", "KV_CACHE_PRECISION"])


@pytest.mark.parametrize("dynamic_int8, group_size", [(True, 32), (False, 0)])
def test_dynamic_int8_is_the_cpu_activation_quantization_of_quantized_weights(dynamic_int8, group_size):
    """On (the default): the CPU plugin's own int8 activation groups, as optimum-intel's IRs run; off: float."""
    parameter = ops.parameter([1, 4], np.float32)
    model = ov.Model([ops.relu(parameter)], [parameter])
    ov_passes.set_runtime_options(model, QuantConfig(weights="int4", dynamic_int8=dynamic_int8))
    assert model.has_rt_info(["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"]) != dynamic_int8
    compiled = ov.Core().compile_model(model, "CPU")
    assert int(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")) == group_size


def test_boolean_attention_mask_becomes_additive_with_the_same_results():
    """Attention-23's boolean mask -> 0 / -inf: the CPU kernel is faster with it, and computes the same."""
    rng = np.random.default_rng(0)
    query, key, value = (ops.parameter([1, 2, 5, 8], np.float32) for _ in range(3))
    mask = ops.parameter([1, 1, 5, 5], ov.Type.boolean)
    attention = ops.scaled_dot_product_attention(query, key, value, mask, causal=False)
    model = ov.Model([attention], [query, key, value, mask])
    feeds = [rng.standard_normal((1, 2, 5, 8)).astype(np.float32) for _ in range(3)]
    feeds.append(np.tril(np.ones((1, 1, 5, 5), bool)))
    properties = {"INFERENCE_PRECISION_HINT": "f32"}
    expected = ov.Core().compile_model(model, "CPU", properties)(feeds)[0]
    assert ov_passes.additive_attention_mask(model) == 1
    assert attention.input_value(3).get_element_type() == ov.Type.f32
    np.testing.assert_array_equal(ov.Core().compile_model(model, "CPU", properties)(feeds)[0], expected)


def test_genai_npu_pipeline_runs_the_artifact_at_static_shapes(exported):
    """openvino-genai's NPU pipeline turns the stateful IR into static prefill and decode graphs (NPUW), here
    run on the CPU. Its KV cache is fp16, so its greedy path may leave PyTorch's only at a near-tie."""
    # NPUW's V-cache transpose fails on the CPU for IRs with static head counts, optimum-intel's as ours
    # ("Model references undeclared parameters"), so this CPU stand-in for an NPU runs without it.
    pipe = openvino_genai.LLMPipeline(str(exported), "NPU", NPUW_DEVICES="CPU", MAX_PROMPT_LEN=32,
                                      MIN_RESPONSE_LEN=GREEDY_TOKENS, NPUW_LLM_OPTIMIZE_V_TENSORS="NO")
    tokenizer = pipe.get_tokenizer()
    reference = TorchReference(load_checkpoint(DEMO_MODEL).model)
    config = openvino_genai.GenerationConfig(max_new_tokens=GREEDY_TOKENS, do_sample=False, ignore_eos=True)
    for prompt in PROMPTS:
        inputs = tokenizer.encode(prompt)
        ids = inputs.input_ids.data[0].tolist()
        tokens = list(pipe.generate(inputs, config).tokens[0])
        expected = greedy(reference.next_token_stream(ids), GREEDY_TOKENS)
        parted = next((i for i, (ours, theirs) in enumerate(zip(tokens, expected)) if ours != theirs), None)
        if parted is not None:
            top2 = np.sort(reference.logits(ids + expected[:parted])[-1])[-2:]
            assert top2[1] - top2[0] < NEAR_TIE, f"parted at token {parted} with a margin of {top2[1] - top2[0]}"


def _hf_tokenizer(artifact: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(artifact / "tokenizer")


def test_int4_weights_are_our_integers_and_scales(int4):
    """The IR holds the canonical graph's DequantizeLinear integers and fp16 scales byte for byte, output-major
    (``[N, K]``, the canonical graph's ``[K, N]`` transposed), the merged projections' cut into each part's
    columns."""
    artifact, canonical = int4
    lowered = ir.load(canonical)
    assert sum(node.op_type == "DequantizeLinear" for node in lowered.graph) == MERGED_LINEARS
    assert unmerge_projections(lowered) == 8
    dequantize = [node for node in lowered.graph if node.op_type == "DequantizeLinear"]
    assert len(dequantize) == QUANTIZED_LINEARS

    def output_major(value: ir.Value) -> bytes:
        return ir.tensor(np.ascontiguousarray(value.const_value.numpy().T)).tobytes()

    ours = {kind: Counter(output_major(node.inputs[index]) for node in dequantize)
            for kind, index in (("values", 0), ("scales", 1))}
    model = ov.Core().read_model(artifact / files.MODEL_FILE)
    theirs = {kind: Counter(node.get_data().tobytes() for node in constants(model, element_type))
              for kind, element_type in (("values", ov.Type.i4),)}
    theirs["scales"] = Counter(node.get_data().tobytes() for node in scale_constants(model))
    assert theirs == ours


def stored_weight(matmul: ir.Node) -> tuple[ir.Value | None, bool]:
    """The constant a MatMul's weights come from, through Transpose, Cast and DequantizeLinear, and whether a
    Transpose was on the way."""
    value, transposed = matmul.inputs[1], False
    while value.const_value is None and value.producer() is not None:
        node = value.producer()
        if node.op_type not in ("Transpose", "Cast", "DequantizeLinear"):
            return None, False
        transposed |= node.op_type == "Transpose"
        value = node.inputs[0]
    return value, transposed


def test_weights_are_stored_output_major_with_the_same_logits(int4, tiny_checkpoint):
    """Every linear's weights, float or blocked int4, stored ``[N, K]`` and transposed back in the graph
    (the CPU plugin's own layout, which it would otherwise copy the weights into); the logits unchanged."""
    from nanoexport.capture.onnx_export import export_onnx
    from nanoexport.passes import PASSES, run_passes

    float_graph = export_onnx(load_checkpoint(tiny_checkpoint("qwen2")))
    run_passes(float_graph, PASSES)
    unmerge_projections(float_graph)
    _, canonical = int4
    int4_graph = ir.load(canonical)
    unmerge_projections(int4_graph)
    for graph, quantized in ((float_graph, 0), (int4_graph, QUANTIZED_LINEARS)):
        weighted = [node for node in graph.graph if node.op_type == "MatMul" and stored_weight(node)[0] is not None]
        input_major = sum(not stored_weight(node)[1] for node in weighted)
        assert input_major >= 2 * 7  # q, k, v, o, gate, up, down per layer; a tied head is [N, K] already

        stats = run_passes(graph, [onnx_rules.output_major_weights], verify=True)
        assert stats[0].logits_change <= 1e-5
        after = [node for node in graph.graph if node.op_type == "MatMul" and stored_weight(node)[0] is not None]
        assert len(after) == len(weighted)
        for node in after:
            weight, transposed = stored_weight(node)
            assert transposed and weight.shape[1] == node.inputs[0].shape[-1], node.name  # [N, K]
        assert sum(node.op_type == "DequantizeLinear" for node in graph.graph) == quantized


def test_int4_weights_take_4_5_bits_in_the_bin(int4):
    """32 int4 values and one fp16 scale per block; the .bin holds nothing else of size but the kept layers'
    fp16 weights and the float norms."""
    artifact, _ = int4
    model = ov.Core().read_model(artifact / files.MODEL_FILE)
    quantized = constants(model, ov.Type.i4)
    scales = scale_constants(model)
    weights = sum(int(np.prod(node.get_output_shape(0))) for node in quantized)
    quantized_bytes = sum(node.get_byte_size() for node in [*quantized, *scales])
    assert quantized_bytes * 8 / weights == 4.5
    kept = [node for node in constants(model, ov.Type.f16) if all(node is not scale for scale in scales)]
    assert [list(node.get_output_shape(0)) for node in kept] == [[4096, 256]]  # the tied embedding / lm_head
    float_bytes = sum(node.get_byte_size() for node in [*kept, *constants(model, ov.Type.f32)])
    assert float_bytes < 2.2e6  # the head in fp16 (2 MiB) and the norms: none expanded to fp32
    assert (artifact / files.WEIGHTS_FILE).stat().st_size < quantized_bytes + float_bytes + 64 * 1024


def test_int4_runs_as_compressed_matmuls_and_matches_onnx_runtime(int4):
    """The CPU plugin multiplies by the int4 weights directly, and computes what ONNX Runtime computes from them."""
    artifact, canonical = int4
    weights = Counter(str(node.input_value(1).get_element_type())
                      for node in runtime_layers(artifact, runtime.VALIDATION_PROPERTIES)
                      if layer_type(node) == "FullyConnected")
    assert weights[str(ov.Type.i4)] == QUANTIZED_LINEARS
    import onnxruntime as ort

    tokens = np.random.default_rng(0).integers(0, 4096, (1, 12))
    feeds = {"input_ids": tokens, "attention_mask": np.ones_like(tokens), "position_ids": np.arange(12)[None]}
    feeds |= {f"past_key_values.{layer}.{kind}": np.zeros((1, 2, 0, 32), np.float32)
              for layer in range(4) for kind in ("key", "value")}
    expected = ort.InferenceSession(canonical, providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    runner = runtime.Runner(nanoexport.Artifact.load(artifact))
    assert np.abs(runner.forward(feeds)["logits"] - expected).max() < 2e-3  # measured 7e-4: fp16 scale rounding


def test_fixed_size_caches_are_refused_before_any_work(tmp_path):
    with pytest.raises(NanoexportError, match="choose --kv-cache from stateful"):
        nanoexport.export(target="openvino", out=tmp_path / "static", config=ExportConfig(kv_cache="static"),
                          progress=False)


@pytest.mark.parametrize("head,asymmetric", [("int4", False), ("int8", False), ("int4", True), ("int8", True)])
def test_a_quantized_embedding_table_stays_compressed_in_the_cpu_plugin(head, asymmetric, tmp_path):
    """A quantized tied embedding is looked up by the CPU plugin's compressed Gather straight from its integers
    (the frontend's blocked form had it expanded to fp32 when compiling: 544 MB on Qwen2.5-0.5B), with its zero
    points too when asymmetric, and the head multiplies by the same integers; the stored integers are still
    the canonical ones and validation passes."""
    config = ExportConfig(target="openvino")
    config.quant.weights, config.quant.overrides = "int4", {"lm_head": head}
    config.quant.asymmetric = asymmetric
    artifact = nanoexport.export(out=tmp_path / head, config=config, progress=False)
    ops = runtime_layers(artifact.path, {})
    integers = ov.Type.i4 if head == "int4" else ov.Type.i8
    lookup = next(node for node in ops
                  if layer_type(node) == "Gather" and node.get_output_partial_shape(0).rank.get_length() == 3)
    assert lookup.input_value(0).get_element_type() == integers
    weights = Counter(node.input_value(1).get_element_type() for node in ops if layer_type(node) == "FullyConnected")
    assert weights[integers] == (QUANTIZED_LINEARS + 1 if head == "int4" else 1)
    digests = artifact.manifest["weight_digests"]
    assert "model.lm_head.weight" in digests["stored"]["layers"] and digests["stored"]["equals_canonical"]
    assert nanoexport.validate(artifact, write=False).passed
