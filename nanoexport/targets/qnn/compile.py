"""Compiling the qnn graphs for HTP: session options for the QNN provider, the SoC check, EPContext models.

When ``onnxruntime-qnn`` is installed, each graph is compiled by the QNN execution provider into an EPContext
model (``*_ctx.onnx``) and its HTP context binary, for the SoC of ``--soc-model`` / ``--htp-arch``
(recorded in ``qnn_compile.json``; the compile seconds go to ``build.json``); with ``--share-weights``, a
part's prefill and decode go into one binary holding their weights once. A rebuild gives the same bytes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from nanoexport.artifact import write_json
from nanoexport.config import parse_size
from nanoexport.errors import NanoexportError
from nanoexport.targets.qnn.options import QnnOptions

log = logging.getLogger(__name__)

# What the provider's htp_arch option accepts (it ignores other values with a warning, measured on 2.7.0).
HTP_ARCHS = ("68", "69", "73", "75", "79", "81")
COMPILE_REPORT = "qnn_compile.json"


def check_settings(settings: QnnOptions) -> int:
    """Refuse SoC and architecture values QNN would ignore or fail on; returns ``max_part_bytes`` in bytes."""
    if not re.fullmatch(r"[0-9]+", settings.soc_model) or int(settings.soc_model) == 0:
        raise NanoexportError(f"--soc-model {settings.soc_model!r} is not a QNN SoC id; give the SoC's number from "
                              "the QNN SDK's list of Snapdragon devices, e.g. 57 (Snapdragon 8 Gen 3)")
    if settings.htp_arch not in HTP_ARCHS:
        raise NanoexportError(f"--htp-arch {settings.htp_arch!r} is not an HTP architecture QNN knows; choose one "
                              f"of {', '.join(HTP_ARCHS)}")
    limit = parse_size(settings.max_part_bytes, "--max-part-bytes")
    if limit < 1:
        raise NanoexportError(f"--max-part-bytes {settings.max_part_bytes!r} is not a size; write it like 1GB "
                              "or 300MB")
    if importlib.util.find_spec("onnxruntime_qnn") is not None:
        _probe_device(settings)
    return limit


def _probe_device(settings: QnnOptions) -> None:
    """One quantized MatMul on the HTP backend: QNN refuses an unknown SoC id only when it creates the device."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    constants = [numpy_helper.from_array(np.ones((8, 4), np.int8), "w"),
                 numpy_helper.from_array(np.array(0.01, np.float32), "s"),
                 numpy_helper.from_array(np.array(32768, np.uint16), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "s"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["m"]),
             helper.make_node("QuantizeLinear", ["m", "s", "z"], ["mq"]),
             helper.make_node("DequantizeLinear", ["mq", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    options = qnn_session_options(settings)
    options.log_severity_level = 4  # the provider's own lines would break the one-line error below
    try:
        ort.InferenceSession(model.SerializeToString(), options)
    except Exception:
        raise NanoexportError(f"QNN's HTP backend cannot create a device for --soc-model {settings.soc_model} "
                              f"(--htp-arch {settings.htp_arch}); give a SoC id from the QNN SDK's list of "
                              "Snapdragon devices, e.g. 57 (Snapdragon 8 Gen 3)") from None


def qnn_session_options(settings: QnnOptions, extra: dict[str, str] | None = None,
                        provider: dict[str, str] | None = None):
    """Session options that put every node on the QNN provider's HTP backend (for ``settings``' SoC) or fail;
    ``extra``: session configuration entries, ``provider``: more provider options."""
    import onnxruntime as ort
    import onnxruntime_qnn

    _register_qnn(ort, onnxruntime_qnn)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for key, value in (extra or {}).items():
        options.add_session_config_entry(key, value)
    devices = [device for device in ort.get_ep_devices() if device.ep_name == "QNNExecutionProvider"]
    options.add_provider_for_devices(devices, {"backend_path": onnxruntime_qnn.get_qnn_htp_path(),
                                               "soc_model": settings.soc_model, "htp_arch": settings.htp_arch,
                                               **(provider or {})})
    return options


def _register_qnn(ort, onnxruntime_qnn) -> None:
    if not any(device.ep_name == "QNNExecutionProvider" for device in ort.get_ep_devices()):
        ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())


def compile_contexts(folder: Path, graph_files: list[list[str]], settings: QnnOptions,
                     seconds: dict[str, float] | None = None) -> list[str]:
    """EPContext model and HTP context binary per graph file (``graph_files``: per part, its graphs), or per
    part with ``share_weights``: its graphs in one binary holding their weights once. Returns the files
    written; ``seconds`` receives each graph's compile time.

    Each part compiled in a fresh worker process with an environment of its own, so that a rebuild is
    byte-identical whatever ran before in this process (see ``_compile_in_worker`` and ``worker_environment``)."""
    compiled: dict[str, float] = {}
    with _compile_folder() as scratch:
        inputs = {path.relative_to(folder) for path in folder.rglob("*") if path.suffix in (".onnx", ".data")}
        for relative in inputs:
            (scratch / relative).parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(folder / relative, scratch / relative)
        # A worker per part: the HTP builder's memory (several times a graph's weights) goes with its process,
        # so the peak is that of the largest part, not of all of them together.
        for part_files in graph_files:
            compiled.update(_run_worker(scratch, {"settings": dataclasses.asdict(settings),
                                                  "graph_files": [part_files]}))
        written = sorted(path.relative_to(scratch).as_posix() for path in scratch.rglob("*")
                         if path.is_file() and path.relative_to(scratch) not in inputs)
        for relative in written:
            shutil.move(scratch / relative, folder / relative)
    if seconds is not None:
        seconds.update(compiled)
    write_json(folder / COMPILE_REPORT, {"soc_model": settings.soc_model, "htp_arch": settings.htp_arch,
                                         "share_weights": settings.share_weights, "files": written})
    log.info("qnn: compiled for HTP (soc %s, v%s)", settings.soc_model, settings.htp_arch)
    return [*written, COMPILE_REPORT]


def _run_worker(scratch: Path, job: dict) -> dict[str, float]:
    """Run one compile job in a fresh worker process in ``scratch``; returns its seconds per graph."""
    worker = subprocess.run([sys.executable, "-m", WORKER_MODULE], input=json.dumps(job), cwd=scratch,
                            env=worker_environment(), capture_output=True, text=True)
    if worker.returncode != 0:
        lines = worker.stderr.strip().splitlines() or [f"the worker exited with code {worker.returncode}"]
        message = next((line for line in reversed(lines) if line.startswith(WORKER_ERROR)), lines[-1])
        raise NanoexportError(message.removeprefix(WORKER_ERROR))
    return json.loads(worker.stdout.strip().splitlines()[-1])


@contextmanager
def _compile_folder() -> Iterator[Path]:
    """An empty folder at a fixed path, ours alone while the block runs (other exports wait for it)."""
    folder = Path(tempfile.gettempdir()) / f"nanoexport-qnn-compile-{os.getuid()}"
    with open(f"{folder}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(folder, ignore_errors=True)  # a killed compile's files
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def worker_environment() -> dict[str, str]:
    """The compile worker's whole environment, the same whatever this process imported or ran before.

    The HTP builder copies a few bytes of uninitialized memory into a context binary, and what they hold moves
    with the process's environment block, which sits at the top of its stack: any variable, even one nothing
    reads, can change them (measured on onnxruntime-qnn 2.7: importing coremltools sets KMP_DUPLICATE_LIB_OK,
    KMP_INIT_AT_FORK and TF_CPP_MIN_LOG_LEVEL, and three unused variables of the same lengths changed decode's
    6 MB binary just as they did, in 36 bytes; torch sets TORCHINDUCTOR_CACHE_DIR, the shell PWD and so on). So
    the worker inherits nothing but where to find code: this very ``nanoexport`` package first (the worker
    runs in a scratch folder, where ``-m`` would otherwise import whichever copy is installed), then the user's
    ``PYTHONPATH`` and ``LD_LIBRARY_PATH``."""
    package_root = str(Path(__file__).resolve().parents[3])
    # Without repeats, so that a process started with this package already on PYTHONPATH gives the same value.
    entries = dict.fromkeys([package_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    environment = {"PYTHONPATH": os.pathsep.join(entries)}
    if "LD_LIBRARY_PATH" in os.environ:
        environment["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    return environment


def _link_or_copy(source: Path, destination: Path) -> None:
    """A hard link where the file system allows one (the weights can be gigabytes), otherwise a copy; not a
    symbolic link, which the provider refuses for external data."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def _compile_in_worker(graph_files: list[list[str]], settings: QnnOptions) -> dict[str, float]:
    """Compile the graphs in the current folder, by relative paths; returns seconds per graph.

    Why a separate process in a folder at a fixed path: the provider names each graph after a hash of the path
    it was loaded from (our staging folder has a random name), and the HTP builder copies a few bytes of
    uninitialized memory into the binary, which vary with the address layout and with the working folder's
    path (measured on onnxruntime-qnn 2.7: about 32 bytes of a 6 MB binary). Relative paths, one fixed folder,
    a fresh process with a fixed environment and no address randomization make both the same every time."""
    import onnxruntime as ort

    seconds = {}
    sharing = {"enable_htp_weight_sharing": "1"} if settings.share_weights else {}
    for part_files in graph_files:
        for index, file_name in enumerate(part_files):
            started = time.perf_counter()
            entries = {"ep.context_enable": "1", "ep.context_embed_mode": "0",
                       "ep.context_file_path": context_file(file_name)}
            if settings.share_weights:  # the part's last graph closes its shared binary
                entries |= {"ep.share_ep_contexts": "1",
                            "ep.stop_share_ep_contexts": "1" if index == len(part_files) - 1 else "0"}
            try:
                ort.InferenceSession(file_name, qnn_session_options(settings, entries, sharing))
            except Exception as error:  # the provider's message names the node it could not place or build
                raise NanoexportError(f"QNN could not compile {file_name} for HTP: {str(error).splitlines()[0]}") \
                    from None
            seconds[file_name] = round(time.perf_counter() - started, 2)
    return seconds


def _without_address_randomization() -> None:
    """Re-run this process with Linux's ADDR_NO_RANDOMIZE personality (what ``setarch -R`` does), or carry on
    with randomization where the kernel refuses it (then the binaries may differ in a few bytes)."""
    addr_no_randomize = 0x0040000
    libc = ctypes.CDLL(None, use_errno=True)
    current = libc.personality(0xFFFFFFFF)
    if current == -1 or current & addr_no_randomize:
        return
    if libc.personality(current | addr_no_randomize) == -1:
        log.warning("qnn: address randomization stays on; the context binaries may differ between builds")
        return
    os.execv(sys.executable, [sys.executable, "-m", WORKER_MODULE])


WORKER_MODULE = "nanoexport.targets.qnn.compile"  # run with -m, it compiles in a fresh process
WORKER_ERROR = "nanoexport-qnn-worker: "


def _worker_main() -> int:
    _without_address_randomization()
    job = json.loads(sys.stdin.read())
    try:
        seconds = _compile_in_worker(job["graph_files"], QnnOptions(**job["settings"]))
    except NanoexportError as error:
        print(f"{WORKER_ERROR}{error}", file=sys.stderr)
        return 2
    print(json.dumps(seconds))
    return 0


def context_file(file_name: str) -> str:
    """The EPContext model the QNN provider compiles ``file_name`` into."""
    return file_name.replace(".onnx", "_ctx.onnx")


if __name__ == "__main__":
    sys.exit(_worker_main())
