"""The qnn target's lowering, in order: HTP weights on the canonical graph (``weights``), the prefill and
decode specializations rewritten into the form HTP runs (``rewrites``), quantized weight-MatMul outputs
(``activations``), the files whole or in parts (``parts``), and their HTP context binaries (``compile``)."""

from __future__ import annotations

import importlib.util
import logging

import onnx_ir as ir

from nanoexport.artifact import write_json
from nanoexport.config import parse_size
from nanoexport.passes import GraphPass
from nanoexport.passes.kv_cache import specialize
from nanoexport.targets import Build
from nanoexport.targets.qnn.activations import observe_weight_outputs, prefill_windows, quantize_outputs_pass
from nanoexport.targets.qnn.compile import compile_contexts
from nanoexport.targets.qnn.parts import GRAPHS, PARTS_FILE, WEIGHTS_FILE, plan_parts, write_parts
from nanoexport.targets.qnn.rewrites import htp_graph_passes
from nanoexport.targets.qnn.weights import weights_for_htp

log = logging.getLogger(__name__)


def lowering_passes(build: Build) -> list[GraphPass]:
    """On the canonical graph: the weights in the forms HTP computes right (the shared weights file's)."""
    return [weights_for_htp]


def lower(model: ir.Model, build: Build) -> list[str]:
    """Write the prefill and decode graphs (and, with onnxruntime-qnn, their HTP builds); returns the files."""
    config, folder, settings = build.config, build.folder, build.config.options["qnn"]
    limit = parse_size(settings.max_part_bytes, "--max-part-bytes")  # checked by check_settings
    # The shared weights file holds the HTP form; each reloaded graph keeps pointing into it.
    scratch = folder / "canonical.onnx"
    build.save_onnx(model, scratch, external_data=WEIGHTS_FILE)
    graphs = {}
    for name in GRAPHS:
        graphs[name] = ir.load(scratch)
        specialize(graphs[name], build.cache.prefill_chunk if name == "prefill" else 1)
        build.run_passes(graphs[name], htp_graph_passes(build.cache.capacity), graph=name)
    scratch.unlink()
    ranges = observe_weight_outputs(graphs["prefill"], prefill_windows(build))
    for name in GRAPHS:
        build.run_passes(graphs[name], [quantize_outputs_pass(ranges, config.quant.activations)], graph=name)
    parts = write_parts(graphs, plan_parts(graphs["prefill"], limit, settings.max_part_bytes), folder)
    write_json(folder / PARTS_FILE, {"max_part_bytes": limit, "parts": parts})
    files = [file for part in parts for file in (*part["graphs"].values(), part["weights"])] + [PARTS_FILE]
    if importlib.util.find_spec("onnxruntime_qnn") is None:
        log.warning("qnn: wrote QDQ graphs only; pip install 'nanoexport[qnn]' (onnxruntime-qnn) to compile them "
                    "to HTP context binaries")
        return files
    graph_files = [list(part["graphs"].values()) for part in parts]
    return [*files, *compile_contexts(folder, graph_files, settings, build.seconds)]
