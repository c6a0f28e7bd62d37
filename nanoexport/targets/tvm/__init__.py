"""The ``tvm`` target: the canonical graph compiled by Apache TVM into one library with ``prefill`` and
``decode`` functions over one set of weights and a static KV cache.

The artifact holds ``model.so`` (for this machine; ``model.tar``, TVM's archive of object files, for another
device named by ``--tvm-target``), ``params.safetensors`` (the weights as both functions take them: packed
INT4 as its canonical bytes) and ``signatures.json`` (each function's inputs and outputs, the parameter
order, the device). ``relax.VirtualMachine(tvm.runtime.load_module("model.so"), tvm.cpu())`` runs it:
``vm["prefill"](*inputs, *params)`` on a chunk of ``--prefill-chunk`` tokens, ``vm["decode"]`` on one.

Inputs: ``input_ids``, ``attention_mask`` ``[1, max_context]``, ``cache_position`` ``[1]``, ``position_ids``,
``past_key_values.{i}.key/value`` ``[1, kv_heads, max_context, head_dim]``; outputs ``logits`` and the
written caches ``present.{i}.key/value``.

The package: ``relax_graph`` converts a static graph into a Relax function (``model_ops``: attention with
grouped KV heads, rotary embedding, the cache write, norms and activations; ``kernels``: our tensor-expression
kernels, the matmul that dequantizes packed weights in its loop); ``compile`` builds the module, compiles it
and writes the files; ``device`` reads ``--tvm-target``; ``lowering`` runs the steps; ``runtime`` is the
validation runner; ``options`` the ``[tvm]`` settings.
"""

from __future__ import annotations

from nanoexport.errors import NanoexportError
from nanoexport.targets import Target
from nanoexport.targets.tvm.options import TvmOptions


def _check(config) -> None:
    """Refuse, before any work, settings this target cannot build."""
    if config.quant.activations != "none":
        raise NanoexportError("the tvm target quantizes weights only; drop --activations")
    from pathlib import Path

    from nanoexport.targets.tvm import device

    settings = config.options["tvm"]
    device.parse(settings.tvm_target)
    if settings.tvm_database and not Path(settings.tvm_database).is_dir():
        raise NanoexportError(f"--tvm-database {settings.tvm_database} is not a folder; give a meta-schedule "
                              "database folder (database_workload.json, database_tuning_record.json)")


def _lowering():
    # Imported when used, so that listing targets and building the command line import no runtime.
    from nanoexport.targets.tvm import lowering

    return lowering


def _stored():
    from nanoexport.targets.tvm import stored

    return stored


def _runtime():
    # Imported when used, so that listing targets and building the command line import no runtime.
    from nanoexport.targets.tvm import runtime

    return runtime


TARGET = Target(
    name="tvm",
    runtime="tvm",
    install="pip install 'nanoexport[tvm]'",
    kv_cache_forms=("static", "sliding"),
    split_prefill_decode=True,
    check=_check,
    lower=lambda model, build: _lowering().lower(model, build),
    runner=lambda artifact: _runtime().Runner(artifact),
    options=TvmOptions,
    stored_weights=lambda folder: _stored().stored_weights(folder),
)
