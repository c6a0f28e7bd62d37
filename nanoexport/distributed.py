"""``nanoexport build --ray``: each target's lowering, and each quantization's comparison, as a Ray task.
Imported only when asked for.

The driver (the process that runs ``build``) captures, runs the passes and quantizes, as without Ray. It saves
each quantized canonical graph once, with its external data, into a scratch folder under the output root, and
puts the rest of what a lowering needs (the checkpoint's description, the pass statistics, the quantization
record) in Ray's object store. For each target it makes the staging folder beside the destination and holds
its lock, as ``export`` does; a task on any Ray node loads the graph, lowers it into that folder and returns;
the driver then moves the folder into place, or removes it when the task failed. So every Ray node must see
the output root at the same path: one machine, or a file system the cluster shares.

A reloaded graph is lowered to the same bytes as the one in memory: its naming counters, which the ONNX file
does not keep, travel beside it (see ``pipeline.naming_counters``).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx_ir as ir

from nanoexport.artifact import Artifact, scratch, staging
from nanoexport.build import BuildResult, LoweringJob, failure_reason, target_activations
from nanoexport.capture.checkpoint import Checkpoint
from nanoexport.capture.weights import meta_model
from nanoexport.config import CompareConfig, ValidationConfig
from nanoexport.digests import CanonicalWeights
from nanoexport.errors import NanoexportError, first_line
from nanoexport.interrupts import HANDLED, Interrupted
from nanoexport.passes import PassStats
from nanoexport.pipeline import Canonical, TargetPlan, lower_into, naming_counters
from nanoexport.progress import Steps

log = logging.getLogger(__name__)

GRAPH_FILE = "model.onnx"
# The scratch folder under the output root: hidden, locked while in use, removed by the next build when a
# killed one left it (``artifact.scratch``).
SHARED_GRAPHS = "shared-graphs"
WAIT_SECONDS = 1.0  # between checks for finished tasks: how soon an interrupt is seen while waiting


class TaskFailed(Exception):
    """A target's Ray task failed: its staging folder is removed, as an exception inside ``staging`` does."""


@dataclass
class SharedCanonical:
    """A quantized canonical graph as a Ray task receives it: the graph as an ONNX file with external data
    where every node can read it, and the rest of ``Canonical``. A lazy checkpoint's model (fake tensors,
    which do not pickle) travels as its config and is rebuilt without data."""

    graph_file: str
    counters: tuple[int, int]
    checkpoint: Checkpoint
    model_config: Any
    pass_stats: list[PassStats]
    quantization: dict[str, Any] | None
    quantize_seconds: float | None

    @classmethod
    def save(cls, canonical: Canonical, folder: Path) -> SharedCanonical:
        """Write ``canonical``'s graph into ``folder`` and describe the rest."""
        folder.mkdir(parents=True)
        ir.save(canonical.graph, folder / GRAPH_FILE, external_data=f"{GRAPH_FILE}.data")
        checkpoint, model_config = canonical.checkpoint, None
        if checkpoint.lazy:
            model_config = checkpoint.config
            checkpoint = dataclasses.replace(checkpoint, model=None)
        return cls(str(folder / GRAPH_FILE), naming_counters(canonical.graph), checkpoint, model_config,
                   canonical.pass_stats, canonical.quantization, canonical.quantize_seconds)

    def load(self) -> Canonical:
        """The ``Canonical`` this describes, its graph read from the file (weights mapped, not read)."""
        graph = ir.load(self.graph_file)
        naming_counters(graph, self.counters)
        checkpoint = self.checkpoint
        if self.model_config is not None:
            checkpoint = dataclasses.replace(checkpoint, model=meta_model(self.model_config))
        return Canonical(checkpoint, graph, self.pass_stats, self.quantization, self.quantize_seconds,
                         CanonicalWeights(graph))


def lower_shared(shared: SharedCanonical, plan: TargetPlan, folder: str, log_level: int) -> str | None:
    """A Ray task: lower ``shared`` for ``plan``'s target into the staging ``folder``. Returns None when done,
    else the one-line reason it failed (formatted here, where the traceback is). ``log_level``: the driver's,
    so that -v shows the task's steps and tracebacks (Ray forwards them then, see ``connect``)."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(message)s")
    staged = Path(folder)
    try:
        if not staged.is_dir():
            raise NanoexportError(f"this Ray node does not see the staging folder {staged}; put --out on a file "
                                  "system every Ray node mounts at the same path")
        canonical = shared.load()
        with Steps(False) as steps:
            quantization = target_activations(canonical.graph, plan, canonical, steps)
            lower_into(staged, canonical, canonical.graph, plan, quantization, steps)
        return None
    except Exception as error:
        return failure_reason(error, plan.config.target)


def connect(address: str) -> tuple[ModuleType, bool]:
    """Ray, initialized at ``address`` ("local" starts an instance on this machine, "auto" joins the one
    ``ray start`` runs here, or a cluster's address); whether this call started it. A Ray the caller already
    initialized in this process is used as it is."""
    try:
        import ray
    except ImportError:
        raise NanoexportError("--ray needs Ray, which is not installed: pip install 'nanoexport[ray]'") from None
    if ray.is_initialized():
        return ray, False
    in_main_thread = threading.current_thread() is threading.main_thread()
    handlers = {number: signal.getsignal(number) for number in HANDLED} if in_main_thread else {}
    try:
        ray.init(address=address, logging_level=logging.WARNING, include_dashboard=False,
                 log_to_driver=log.isEnabledFor(logging.INFO))  # the tasks' own logs only with -v
    except Exception as error:  # Ray raises ConnectionError, ValueError, RuntimeError... for an unreachable address
        raise NanoexportError(f"cannot start or reach Ray at --ray {address} ({first_line(error)[:200]}); pass "
                              "--ray local, or the address of a running cluster (ray start --head)") from None
    finally:
        for number, handler in handlers.items():  # ray.init sets its own SIGTERM handler; ours cleans up
            signal.signal(number, handler)
    return ray, True


@contextmanager
def session(address: str) -> Iterator[None]:
    """Ray connected for a whole command, so that a build's lowerings and then its comparisons share one start;
    shut down at the end when started here (``connect`` then finds it initialized)."""
    ray, started = connect(address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def compare_task(artifacts: list[Artifact], validation: ValidationConfig, thresholds: CompareConfig,
                 report_path: Path, log_level: int) -> dict[str, Any] | str:
    """A Ray task: ``compare`` the ``artifacts``; the report, or the one-line reason they could not be compared."""
    from nanoexport.validate.compare import compare

    logging.basicConfig(level=log_level, format="%(levelname)s %(message)s")
    try:
        return compare(artifacts, validation=validation, thresholds=thresholds, report_path=report_path)
    except NanoexportError as error:
        return str(error)


def compare_groups(groups: dict[Path, list[Artifact]], validation: ValidationConfig,
                   thresholds: CompareConfig) -> dict[Path, dict[str, Any]]:
    """Each group's ``compare`` as a Ray task of its own, all at once, its report written to
    ``<group>/report.json``; the reports by group. Ray must be connected (``session``)."""
    import ray

    task = ray.remote(num_cpus=1, max_calls=1)(compare_task)  # a fresh process each, as the lowerings have
    pending = {task.remote(artifacts, validation, thresholds, folder / "report.json", log.getEffectiveLevel()): folder
               for folder, artifacts in groups.items()}
    reports: dict[Path, dict[str, Any]] = {}
    try:
        while pending:
            with interrupts_as_raised():
                done, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_SECONDS)
            for reference in done:
                folder = pending.pop(reference)
                try:
                    with interrupts_as_raised():
                        report = ray.get(reference)
                except ray.exceptions.RayError as error:  # the worker died, was killed, ran out of memory
                    report = f"the comparison of {folder} failed on Ray: {type(error).__name__}: " \
                             f"{first_line(error)[:300]}"
                if isinstance(report, str):
                    raise NanoexportError(report)
                reports[folder] = report
    finally:
        for reference in pending:  # stopped early: the other comparisons are not wanted any more
            ray.cancel(reference, force=True)
    return {folder: reports[folder] for folder in groups}


@contextmanager
def interrupts_as_raised() -> Iterator[None]:
    """Ray's waiting calls run Python's signal handlers inside its core worker and wrap what they raise in a
    SystemError; an ``Interrupted`` is raised as itself, so that the build cleans up and exits 130 or 143."""
    try:
        yield
    except SystemError as error:
        if isinstance(error.__cause__, Interrupted):
            raise error.__cause__ from None
        raise


class RayLowering:
    """Lowers each job as a Ray task; ``finish`` waits for them and moves each finished folder into place.
    Leaving the block by an exception (an interrupt) cancels the tasks and removes their staging folders."""

    def __init__(self, address: str, root: Path, overwrite: bool):
        self.address = address
        self.result = BuildResult(root)
        self.overwrite = overwrite
        self._ray: ModuleType | None = None
        self._started = False
        self._task: Any = None
        self._scratch: Path | None = None  # where the quantized graphs are saved for the tasks
        self._cleanup = ExitStack()  # holds the scratch folder (and its lock) until the build ends
        self._shared: tuple[weakref.ref[Canonical], Any] | None = None  # the last Canonical shared, its object
        self._saved = 0  # graphs saved into the scratch folder
        self._order: list[str] = []  # the jobs' names as they came, the order of the result
        # Each running task -> its job's name and destination, and the staging it writes into (not the job:
        # that would keep every quantized graph in memory to the end).
        self._pending: dict[Any, tuple[str, Path, AbstractContextManager[Path]]] = {}

    def __enter__(self) -> RayLowering:
        self._ray, self._started = connect(self.address)
        # A fresh worker process per task (max_calls=1): what a backend leaves in its process can change what
        # the next one writes (qnn's context binary did after a coreml lowering, until its compile worker got
        # an environment of its own), and a reused worker would make the bytes depend on which tasks Ray
        # scheduled together. Each target is then written as ``nanoexport export --target X`` writes it.
        self._task = self._ray.remote(num_cpus=1, max_calls=1)(lower_shared)
        return self

    def lower(self, job: LoweringJob, steps: Steps) -> None:
        """Stage ``job``'s destination and start its task."""
        self._order.append(job.name)
        shared = self._share(job.canonical, steps)
        stage = staging(job.destination, self.overwrite)
        try:
            folder = stage.__enter__()
        except Exception as error:
            self.result.failed(job.name, failure_reason(error, job.name))
            return
        task = self._task.remote(shared, job.plan, str(folder), log.getEffectiveLevel())
        self._pending[task] = (job.name, job.destination, stage)

    def finish(self, steps: Steps) -> BuildResult:
        """Wait for every task; move each finished artifact into place, record each failure."""
        with steps.step(f"ray: {len(self._pending)} targets lowering as tasks") as detail:
            while self._pending:
                with interrupts_as_raised():
                    done, _ = self._ray.wait(list(self._pending), num_returns=1, timeout=WAIT_SECONDS)
                for reference in done:
                    self._collect(reference)
                    detail(f"{len(self._pending)} left")
        # In the order the jobs came, as without Ray, not the order the tasks finished in.
        self.result.artifacts = {name: self.result.artifacts[name] for name in self._order
                                 if name in self.result.artifacts}
        return self.result

    def _collect(self, reference: Any) -> None:
        """Move a finished task's folder into place, or remove it and record why the task failed."""
        name, destination, stage = self._pending.pop(reference)
        try:
            with interrupts_as_raised():
                reason = self._ray.get(reference)
        except self._ray.exceptions.RayError as error:  # the worker died, was killed, ran out of memory
            reason = f"its Ray task failed: {type(error).__name__}: {first_line(error)[:300]}"
        try:
            if reason is not None:
                stage.__exit__(TaskFailed, TaskFailed(reason), None)
                self.result.failed(name, reason)
                return
            stage.__exit__(None, None, None)
            self.result.artifacts[name] = Artifact.load(destination)
            log.info("%s: written by its Ray task", name)
        except Exception as error:  # moving it into place failed: a full disk, the folder filled meanwhile
            self.result.failed(name, failure_reason(error, name))

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        try:
            for reference, (_name, _destination, stage) in self._pending.items():
                self._ray.cancel(reference, force=True)
                stage.__exit__(kind or TaskFailed, error or TaskFailed("the build stopped"), traceback)
            self._pending.clear()
        finally:
            self._cleanup.close()
            if self._started:
                self._ray.shutdown()

    def _share(self, canonical: Canonical, steps: Steps) -> Any:
        """``canonical`` saved for the tasks, once: a quantization's targets come one after the other, and the
        first saves it. Held weakly, so that the driver drops each quantized graph once it is saved."""
        if self._shared is None or self._shared[0]() is not canonical:
            if self._scratch is None:
                self._scratch = self._cleanup.enter_context(scratch(self.result.out / SHARED_GRAPHS))
            with steps.step("ray: save the quantized canonical graph for the tasks"):
                shared = SharedCanonical.save(canonical, self._scratch / str(self._saved))
            self._saved += 1
            self._shared = (weakref.ref(canonical), self._ray.put(shared))
        return self._shared[1]
