"""The device a tvm artifact is compiled for: ``--tvm-target`` as a short name or TVM's JSON form, checked
against the codegens this TVM wheel carries before anything else runs."""

from __future__ import annotations

import json

from nanoexport.errors import NanoexportError

# CPU triples this target names; anything else in TVM's JSON form ({"kind": "llvm", "mtriple": ...}).
SHORT_NAMES = {
    "aarch64-linux": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
    "aarch64-android": {"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]},
    # x86-64-v3 (AVX2, FMA, F16C; x86 CPUs since 2015): without F16C every fp16 scale is converted in
    # software: the demo's int4 decode call took 73 ms instead of 1.6 ms.
    "x86_64-linux": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"},
}
HOST = "host"


def _host() -> dict:
    """This machine's CPU, its instruction set extensions included (what validation runs on)."""
    from tvm.target import codegen

    return {"kind": "llvm", "mtriple": codegen.llvm_get_system_triple(), "mcpu": codegen.llvm_get_system_cpu()}


def target_dict(text: str) -> dict:
    """``--tvm-target`` as TVM's JSON dict; raises with the accepted forms when it is neither."""
    if text == HOST:
        return _host()
    if text in SHORT_NAMES:
        return dict(SHORT_NAMES[text])
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise NanoexportError(f"--tvm-target {text!r} is neither a short name ({', '.join([HOST, *SHORT_NAMES])}) "
                              "nor TVM's JSON form, e.g. '{\"kind\": \"llvm\", \"mtriple\": \"aarch64-linux-gnu\"}'")
    return value


def parse(text: str):
    """The ``tvm.target.Target`` of ``--tvm-target``, refused in one line when this wheel cannot compile it."""
    import tvm
    from tvm.target import codegen

    spec = target_dict(text)
    try:
        target = tvm.target.Target(spec)
    except Exception as error:  # TVM raises ValueError or its own errors, with multi-line messages
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise NanoexportError(f"TVM cannot parse --tvm-target {text!r} ({reason}); use a short name "
                              f"({', '.join([HOST, *SHORT_NAMES])}) or TVM's JSON form") from None
    if target.kind.name != "llvm":
        raise NanoexportError(f"--tvm-target {text!r} is a {target.kind.name} target; the tvm target compiles for "
                              "CPUs through LLVM only (kind \"llvm\")")
    architectures = [str(name) for name in codegen.llvm_get_targets()]
    triple = str(target.attrs.get("mtriple", "")) or codegen.llvm_get_system_triple()
    architecture = triple.split("-")[0]
    known = architecture in architectures or (architecture.startswith(("armv", "thumbv")) and "arm" in architectures)
    if not known:
        raise NanoexportError(f"--tvm-target {text!r}: this TVM wheel's LLVM cannot generate {architecture} code; it "
                              f"supports {', '.join(architectures)}")
    return target


def is_host(target) -> bool:
    """Whether code for ``target`` runs on this machine (then the artifact is a shared library validation loads)."""
    from tvm.target import codegen

    triple = str(target.attrs.get("mtriple", "")) or codegen.llvm_get_system_triple()
    return triple.split("-")[0] == str(codegen.llvm_get_system_triple()).split("-")[0]
