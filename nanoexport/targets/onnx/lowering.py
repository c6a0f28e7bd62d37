"""The onnx target's lowering: the passes that bring the canonical graph to ONNX Runtime's kernels, and the
writer of the artifact's model files (and, for the growing cache, onnxruntime-genai's files beside them)."""

from __future__ import annotations

import onnx_ir as ir

from nanoexport.passes import GraphPass
from nanoexport.passes.fusion import unmerge_projections
from nanoexport.passes.kv_cache import specialize
from nanoexport.targets import Build
from nanoexport.targets.onnx import DECODE_FILE, MODEL_FILE, PREFILL_FILE, WEIGHTS_FILE
from nanoexport.targets.onnx.genai import write_genai_files
from nanoexport.targets.onnx.gqa import group_query_attention_pass
from nanoexport.targets.onnx.kernels import ort_kernels_pass


def lowering_passes(build: Build) -> list[GraphPass]:
    """The canonical graph -> ONNX Runtime's kernels. Split graphs get their kernels per specialized graph
    (in ``lower``): ONNX shape inference, which specializing runs, does not know the vendor ops."""
    if build.cache.split_prefill_decode:
        return [unmerge_projections]  # ONNX Runtime runs a Split as copies
    passes = []
    if build.cache.form == "dynamic":
        padded_batches = build.config.options["onnx"].padded_batches
        passes.append(group_query_attention_pass(build.checkpoint.config, build.cache.windows, padded_batches))
    # After GroupQueryAttention, which reads query, key and value packed.
    return [*passes, unmerge_projections, ort_kernels_pass(build.config.quant.dynamic_int8)]


def lower(model: ir.Model, build: Build) -> list[str]:
    """Write ``model`` into the build folder for ONNX Runtime; returns the model files written."""
    if build.cache.split_prefill_decode:
        return _write_prefill_and_decode(model, build)
    genai_files = write_genai_files(model, build.folder, build.checkpoint) if build.cache.form == "dynamic" else []
    build.save_onnx(model, build.folder / MODEL_FILE, external_data=WEIGHTS_FILE)
    return [MODEL_FILE, WEIGHTS_FILE, *genai_files]


def _write_prefill_and_decode(model: ir.Model, build: Build) -> list[str]:
    """``model`` specialized to a prefill chunk and to one token, each with its kernels, over one weights file."""
    folder = build.folder
    # Reloaded copies are cheap (weights stay on disk) and their initializers keep pointing into the one
    # weights file, which each specialized graph then references rather than copies.
    build.save_onnx(model, folder / MODEL_FILE, external_data=WEIGHTS_FILE)
    kernels = ort_kernels_pass(build.config.quant.dynamic_int8)
    for name, file_name, sequence_length in (("prefill", PREFILL_FILE, build.cache.prefill_chunk),
                                             ("decode", DECODE_FILE, 1)):
        graph = ir.load(folder / MODEL_FILE)
        specialize(graph, sequence_length)  # before the vendor ops, which ONNX shape inference does not know
        build.run_passes(graph, [kernels], graph=name)
        ir.save(graph, folder / file_name)
    (folder / MODEL_FILE).unlink()
    return [PREFILL_FILE, DECODE_FILE, WEIGHTS_FILE]
