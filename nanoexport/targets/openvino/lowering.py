"""The openvino target's lowering: the ONNX-side passes the pipeline runs (``onnx_rules``), then ``lower``,
which reads the graph with OpenVINO's ONNX frontend, edits it on the OpenVINO side (``ov_passes``) and
writes the artifact's files (``files``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx_ir as ir
import openvino as ov

from nanoexport.errors import NanoexportError
from nanoexport.passes import GraphPass
from nanoexport.passes.fusion import unmerge_projections
from nanoexport.targets import Build
from nanoexport.targets.openvino import files, ov_passes
from nanoexport.targets.openvino.onnx_rules import batch_from_input_ids, output_major_weights, static_heads


def lowering_passes(build: Build) -> list[GraphPass]:
    """The ONNX-side edits that give OpenVINO's frontend and the CPU plugin the graph they handle best."""
    return [static_heads, batch_from_input_ids, unmerge_projections, output_major_weights]


def lower(model: ir.Model, build: Build) -> list[str]:
    """Write ``model`` as a stateful OpenVINO IR plus the tokenizer IRs and configs into the build folder;
    returns the files."""
    with tempfile.TemporaryDirectory() as scratch:
        ov_model = _read(model, Path(scratch), build)
        ov_passes.make_stateful(ov_model)
        ov_passes.broadcast_kv_heads(ov_model)
        ov_passes.additive_attention_mask(ov_model)
        ov_passes.drop_nan_guards(ov_model)
        ov_passes.compress_nf4(ov_model)
        ov_passes.compress_embedding_tables(ov_model)
        ov_passes.set_runtime_options(ov_model, build.config.quant)
        ov_passes.name_deterministically(ov_model)
        model_files = files.write_model(ov_model, build.folder)  # while the frontend's weights file exists
    return [*model_files, *files.write_tokenizers(build.folder), *files.write_configs(build.folder, build.checkpoint)]


def _read(model: ir.Model, scratch: Path, build: Build) -> ov.Model:
    """``model`` through OpenVINO's ONNX frontend (``Core.read_model``, which keeps our fp16 and NF4 weights)."""
    onnx_path = scratch / "canonical.onnx"
    build.save_onnx(model, onnx_path, external_data="canonical.onnx.data")
    try:
        return ov.Core().read_model(onnx_path)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1]
        raise NanoexportError(f"OpenVINO cannot read the graph ({reason}); report the model") from None
