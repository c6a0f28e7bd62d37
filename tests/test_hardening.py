"""Interrupted, killed, racing and starved exports: one line, the right exit code, nothing left behind."""

import importlib.util
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nanoexport
from nanoexport.artifact import Artifact, scratch, staging
from nanoexport.config import ExportConfig, QuantConfig
from nanoexport.errors import NanoexportError
from nanoexport.targets import TARGETS


def start_export(out: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nanoexport.cli", "--out", str(out), "--no-validate", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the export ended before the moment to interrupt it: {process.stderr.read()}"
        assert time.monotonic() < deadline, "the export never reached the moment to interrupt it"
        time.sleep(0.02)


def new_entries(parent: Path, before: set[str]) -> list[str]:
    return sorted(set(os.listdir(parent)) - before)


def partial_folders(parent: Path, out: Path) -> list[Path]:
    return sorted(parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize("signal_number, moment", [
    (signal.SIGTERM, "capture"),  # the staging folder exists, nothing written into it yet
    (signal.SIGTERM, "writing"),  # the weights file is being written
    (signal.SIGINT, "capture"),
])
def test_an_interrupted_export_leaves_nothing_and_says_so_in_one_line(tmp_path, signal_number, moment):
    parent = tmp_path / "artifacts"
    parent.mkdir()
    out = parent / "demo"
    process = start_export(out, "--quant", "int4")
    if moment == "capture":
        wait_for(lambda: partial_folders(parent, out), process)
    else:
        wait_for(lambda: any(folder.glob("*.data") for folder in partial_folders(parent, out)), process)
    process.send_signal(signal_number)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal_number, err
    assert len(err.strip().splitlines()) == 1, err
    assert signal.Signals(signal_number).name in err
    assert os.listdir(parent) == []


def test_a_folder_left_by_a_killed_export_is_removed_by_the_next_one(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    process = start_export(out, "--model", str(tiny_checkpoint("llama")))
    wait_for(lambda: partial_folders(tmp_path, out), process)
    process.kill()  # SIGKILL: no clean-up runs, as after a power loss
    process.wait()
    leftover = partial_folders(tmp_path, out)
    assert leftover
    with pytest.raises(NanoexportError, match="unfinished folder of an export"):
        Artifact.load(leftover[0])

    rerun = start_export(out, "--model", str(tiny_checkpoint("llama")))
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "left by an export that was killed" in err
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert not Artifact.load(out).verify()


def test_two_exports_racing_for_one_destination(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    first = start_export(out, "--model", str(tiny_checkpoint("llama")))
    wait_for(lambda: partial_folders(tmp_path, out), first)
    second = start_export(out, "--model", str(tiny_checkpoint("gpt2")))
    _, second_err = second.communicate(timeout=300)
    _, first_err = first.communicate(timeout=300)
    assert second.returncode == 2
    assert second_err.strip().splitlines() == [
        f"error: another export is writing {out} right now (pid {first.pid}); wait for it to finish or choose "
        "another --out"]
    assert first.returncode == 0, first_err
    artifact = Artifact.load(out)
    assert artifact.manifest["source"]["family"] == "llama" and not artifact.verify()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_the_lock_is_taken_again_after_a_finished_export(tmp_path):
    out = tmp_path / "out"
    for _ in range(2):
        with staging(out, overwrite=True) as folder:
            (folder / "file").write_text("done")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_is_one_line_naming_the_folder_and_the_bytes(tmp_path):
    out = tmp_path / "out"
    process = subprocess.run(
        [sys.executable, "-m", "nanoexport.cli", "--out", str(out), "--no-validate"],
        capture_output=True, text=True, preexec_fn=_limit_file_size(1 << 20), timeout=300,
    )
    assert process.returncode == 2, process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no space left writing"), process.stderr
    assert str(out) in lines[0] and "bytes written" in lines[0] and "free" in lines[0]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv", [["--help"], ["targets"], ["validate", "--help"], ["build", "--help"],
                                  ["--quant", "int9"]])
def test_the_command_line_answers_without_loading_torch_or_a_runtime(argv):
    probe = (
        "import sys\n"
        "from nanoexport.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        # Ray too: only `build --ray` imports it (see nanoexport/distributed.py).
        "heavy = ('torch', 'onnxruntime', 'onnx', 'onnx_ir', 'transformers', 'openvino', 'coremltools', 'ray')\n"
        "print('loaded:', sorted(name for name in heavy if name in sys.modules), file=sys.stderr)\n"
    )
    process = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert process.stderr.strip().splitlines()[-1] == "loaded: []", process.stderr


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_target_rebuilds_byte_for_byte(tmp_path, tiny_checkpoint, target):
    """Two builds from the same inputs: the same manifest, so the same bytes in every hashed file."""
    if target == "qnn":  # it calibrates activations on text, which needs the demo's tokenizer
        model, settings = None, {"max_context": 64, "prefill_chunk": 16, "quant": QuantConfig(calib_samples=4)}
    else:
        model, settings = tiny_checkpoint("llama"), {}
    manifests = []
    for build in ("first", "second"):
        config = ExportConfig(target=target, **settings)
        artifact = nanoexport.export(model, config=config, out=tmp_path / build, progress=False)
        manifests.append((artifact.path / "manifest.json").read_bytes())
        assert not artifact.verify()
    assert manifests[0] == manifests[1]
    if target == "qnn" and TARGETS["qnn"].installed and importlib.util.find_spec("onnxruntime_qnn"):
        assert b"_ctx_qnn.bin" in manifests[0]  # the HTP context binaries are among the files compared


def test_a_scratch_folder_left_by_a_killed_run_is_removed_by_the_next_and_none_is_shared(tmp_path):
    """build --ray saves its quantized graphs in a scratch folder under the output root: one a SIGKILLed
    build left behind is removed by the next, and a second run on the same root while one holds it is told."""
    out = tmp_path / "shared-graphs"
    stale = tmp_path / ".shared-graphs.partial-dead"
    (stale / "0").mkdir(parents=True)
    with scratch(out) as folder:
        assert folder.is_dir() and not stale.exists()
        with pytest.raises(NanoexportError, match="another export is writing"):
            with scratch(out):
                pass
    assert list(tmp_path.iterdir()) == []
