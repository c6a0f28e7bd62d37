"""The tvm target's lowering: the canonical static-cache graph specialized into its prefill (a chunk of
``--prefill-chunk`` tokens) and decode (one token) graphs, converted into one Relax module, compiled for
``--tvm-target`` and written as the library, the parameters and the signatures."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnx_ir as ir

from nanoexport.passes.kv_cache import specialize
from nanoexport.targets import Build
from nanoexport.targets.tvm import compile as tvm_compile
from nanoexport.targets.tvm import device

GRAPHS = ("prefill", "decode")


def specializations(model: ir.Model, build: Build, scratch: Path) -> dict[str, ir.Model]:
    """The prefill and decode graphs of ``model``, every shape static, their weights read from one file."""
    path = scratch / "canonical.onnx"
    build.save_onnx(model, path, external_data="canonical.onnx.data")
    graphs = {}
    for name in GRAPHS:
        graphs[name] = ir.load(path)
        specialize(graphs[name], build.cache.prefill_chunk if name == "prefill" else 1)
    return graphs


def lower(model: ir.Model, build: Build) -> list[str]:
    """Compile ``model`` for the configured device and write the artifact's model files; returns them."""
    settings = build.config.options["tvm"]
    target = device.parse(settings.tvm_target)
    with tempfile.TemporaryDirectory(dir=build.folder.parent) as scratch:
        graphs = specializations(model, build, Path(scratch))
        module, parameters, signatures = tvm_compile.build_module(graphs)
        started = time.perf_counter()
        executable = tvm_compile.compile_module(module, target, settings.tvm_database)
        build.seconds["tvm compile"] = time.perf_counter() - started
        library = tvm_compile.write_library(executable, build.folder, device.is_host(target))
        params = tvm_compile.write_parameters(parameters, build.folder)  # while the scratch weights exist
    return [library, params, tvm_compile.write_signatures(signatures, target, library, build.folder)]
