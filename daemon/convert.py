"""NIfTI for every series: the conversion job, a catch-up over the catalog.

A run converts each series that has been quiet for `convert.settle_minutes` and has no current
NIfTI (see Catalog.series_to_convert), so a run missed while the daemon was down, or cut short
by a kill, is made good by the next one. Each series is converted by `daemon.nifti` in a worker
process of its own session, with an address-space limit (`convert.memory_limit`) and a time
limit (`convert.timeout_seconds`): a crash, hang or out-of-memory is recorded for that series
and the others go on.

On disk, per physician folder::

    NIFTI/<study>/<series>[_<suffix>].nii.gz, .json, .bval, .bvec, .png
    NIFTI/<study>/conversion.txt      what was converted, skipped or failed, and why
    NIFTI/.tmp-convert-<n>/           a conversion in progress (hidden; vetoed by Samba)

Outputs are written in the hidden folder and renamed into place, replacing the previous
outputs of the same series atomically, file by file. The order of a placement (rename the new
files, remove the previous ones the new set lacks, then record them in the catalog) means a
kill at any point leaves the series `pending` with no partial file visible: the next run
converts it again.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import resource
import select
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TypeVar

from daemon.catalog import Catalog, SeriesToConvert, StudyConversion
from daemon.config import ConvertConfig, PathsConfig
from daemon.fsops import TEMP_PREFIX, LockBusyError, exclusive_lock, write_bytes_atomically
from daemon.layout import nifti_name
from daemon.model import format_size
from daemon.nifti import ConversionOutcome, ConversionRequest, convert_series, engine_version

logger = logging.getLogger(__name__)

CONVERT_JOB = "convert"
NIFTI_DIR = "NIFTI"
CONVERSION_REPORT = "conversion.txt"
_LOCK_FILE = "convert.lock"
_WORK_DIR_PREFIX = f"{TEMP_PREFIX}convert-"

Key = TypeVar("Key")


class ConversionBusyError(Exception):
    """Another conversion run (the daemon's or a `dcmdb convert`) holds the lock."""


@dataclass
class ConversionRun:
    """What one run did."""

    started_at: float
    finished_at: float = 0.0
    due: int = 0
    counts: dict[str, int] = field(
        default_factory=lambda: {"converted": 0, "skipped": 0, "failed": 0}
    )
    stopped: bool = False  # stopped before every due series was done: they stay pending
    # Peak resident memory of each worker process, in bytes: what convert.memory_limit and
    # convert.workers must leave room for. (An engine's own peak is not reported: on Linux a
    # child's ru_maxrss includes the worker's pages it shared between fork and exec.)
    worker_peak_rss: list[int] = field(default_factory=list)

    def describe(self) -> str:
        done = ", ".join(f"{state} {number}" for state, number in self.counts.items())
        tail = " (stopped early: the rest stay pending)" if self.stopped else ""
        return f"{self.due} series due: {done}{tail}"

    def describe_memory(self) -> str:
        if not self.worker_peak_rss:
            return ""
        workers = ", ".join(format_size(rss) for rss in self.worker_peak_rss)
        return f"peak memory of the workers: {workers}"


def run_conversions(
    settings: ConvertConfig,
    paths: PathsConfig,
    *,
    now: Callable[[], float] = time.time,
    folder_name: str | None = None,
    series_instance_uid: str | None = None,
    stop: threading.Event | None = None,
) -> ConversionRun:
    """Convert every series that is due (or the one named) and record what each gave.

    Raises ConversionBusyError when another run is in progress.
    """
    stop = stop or threading.Event()
    with _run_lock(paths.state):
        catalog = Catalog(paths.state)
        try:
            return _run(catalog, settings, paths, now, folder_name, series_instance_uid, stop)
        finally:
            catalog.close()


def _run(
    catalog: Catalog,
    settings: ConvertConfig,
    paths: PathsConfig,
    now: Callable[[], float],
    folder_name: str | None,
    series_instance_uid: str | None,
    stop: threading.Event,
) -> ConversionRun:
    run = ConversionRun(started_at=now())
    catalog.record_job_run(CONVERT_JOB, run.started_at, None, "running")
    _remove_abandoned_work_dirs(paths.archive, catalog.folder_names())
    due = catalog.series_to_convert(
        run.started_at,
        settings.settle_minutes * 60.0,
        settings.max_attempts,
        folder_name=folder_name,
        series_instance_uid=series_instance_uid,
    )
    run.due = len(due)
    if due:
        version = engine_version(settings.engine, settings.dcm2niix)
        logger.info(
            "conversion: %d series due, %d at once with %s %s",
            len(due),
            settings.effective_workers,
            settings.engine,
            version,
        )
        jobs = _ConversionJobs(catalog, settings, paths.archive, now)
        touched_studies: dict[int, Path] = {}
        with ConversionPool(
            settings.effective_workers, settings.memory_limit_bytes, settings.timeout_seconds
        ) as pool:
            for series, outcome in pool.run(jobs.requests(due), stop):
                jobs.place(series, outcome)
                run.counts[outcome.state] += 1
                touched_studies[series.study_row_id] = jobs.study_dir(series)
        run.worker_peak_rss = sorted(pool.worker_peak_rss.values(), reverse=True)
        for study_row_id, study_dir in touched_studies.items():
            _write_report(study_dir, catalog.study_conversions(study_row_id), now())
        run.stopped = stop.is_set()
    run.finished_at = now()
    catalog.record_job_run(CONVERT_JOB, run.started_at, run.finished_at, run.describe())
    logger.info("conversion run finished: %s. %s", run.describe(), run.describe_memory())
    return run


@contextmanager
def _run_lock(state_dir: Path) -> Iterator[None]:
    """One conversion run at a time per archive (the daemon's job or `dcmdb convert`)."""
    try:
        with exclusive_lock(state_dir / _LOCK_FILE):
            yield
    except LockBusyError as exc:
        raise ConversionBusyError(
            "another conversion run is in progress (the daemon's scheduled job or a "
            "`dcmdb convert`); wait for it to finish and try again"
        ) from exc


def _remove_abandoned_work_dirs(archive: Path, folder_names: list[str]) -> None:
    """Work folders of a run that was killed: their series are still pending."""
    for folder in folder_names:
        nifti_root = archive / folder / NIFTI_DIR
        if not nifti_root.is_dir():
            continue
        for entry in os.scandir(nifti_root):
            if entry.name.startswith(_WORK_DIR_PREFIX) and entry.is_dir(follow_symlinks=False):
                logger.info("removing %s, left by an interrupted conversion", entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)


class _ConversionJobs:
    """Turns due series into requests (names chosen, work folder made) and places outcomes."""

    def __init__(
        self,
        catalog: Catalog,
        settings: ConvertConfig,
        archive: Path,
        now: Callable[[], float],
    ) -> None:
        self._catalog = catalog
        self._settings = settings
        self._archive = archive
        self._now = now
        self._study_dirs: dict[int, str] = {}
        self._work_dirs: dict[int, Path] = {}
        # requests() runs in the pool's threads, place() in the caller's: one Catalog
        # connection, one user at a time.
        self._catalog_lock = threading.Lock()

    def study_dir(self, series: SeriesToConvert) -> Path:
        name = self._study_dirs[series.study_row_id]
        return self._archive / series.folder_name / NIFTI_DIR / name

    def requests(
        self, due: list[SeriesToConvert]
    ) -> Iterator[tuple[SeriesToConvert, ConversionRequest]]:
        for series in due:
            with self._catalog_lock:
                request = self._request(series)
            if request is not None:
                yield series, request

    def _request(self, series: SeriesToConvert) -> ConversionRequest | None:
        files = self._catalog.series_files(series.series_row_id)
        if not files:
            return None  # its instances are still being moved in: the next run has them
        fields: dict[str, str | int | None] = {**series.study_fields}
        study_dir_name = self._study_dirs.get(series.study_row_id) or self._catalog.nifti_study_dir(
            series,
            lambda attempt: nifti_name(
                self._settings.study_template, fields, fallback="study", attempt=attempt
            ),
        )
        fields.update(series.series_fields)
        stem = study_dir_name and self._catalog.begin_conversion(
            series,
            lambda attempt: nifti_name(
                self._settings.series_template, fields, fallback="series", attempt=attempt
            ),
            self._now(),
        )
        if not study_dir_name or not stem:
            return None  # retention is deleting the study
        self._study_dirs[series.study_row_id] = study_dir_name
        study_dir = self.study_dir(series)
        study_dir.mkdir(parents=True, exist_ok=True)
        work_dir = study_dir.parent / f"{_WORK_DIR_PREFIX}{series.series_row_id}"
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir()
        self._work_dirs[series.series_row_id] = work_dir
        folder = self._archive / series.folder_name
        return ConversionRequest(
            files=tuple(folder / rel_path for rel_path in files),
            output_dir=work_dir,
            stem=stem,
            engine=self._settings.engine,
            dcm2niix=self._settings.dcm2niix,
            preview=self._settings.preview,
        )

    def place(self, series: SeriesToConvert, outcome: ConversionOutcome) -> None:
        """Move the outputs into place, drop the previous ones they replace, record it."""
        with self._catalog_lock:
            self._place(series, outcome)

    def _place(self, series: SeriesToConvert, outcome: ConversionOutcome) -> None:
        work_dir = self._work_dirs.pop(series.series_row_id)
        study_dir = self.study_dir(series)
        prefix = f"{NIFTI_DIR}/{study_dir.name}/"
        outputs = list(series.outputs)
        if outcome.state == "converted":
            outputs = [prefix + name for name in outcome.outputs]
            # Known before they are visible: a kill during the renames leaves no file that
            # the next run would not know to replace or remove.
            self._catalog.record_outputs(series, sorted({*series.outputs, *outputs}))
            try:
                for name in outcome.outputs:
                    os.replace(work_dir / name, study_dir / name)
            except FileNotFoundError:
                # Retention took the study's NIfTI folder to its trash meanwhile.
                logger.info(
                    "series %s in %s: its study was deleted during the conversion",
                    series.series_instance_uid,
                    series.folder_name,
                )
                shutil.rmtree(work_dir, ignore_errors=True)
                return
        elif outcome.state == "skipped":
            outputs = []
        # A failure keeps the previous outputs: older, but the best there is.
        folder = self._archive / series.folder_name
        for stale in set(series.outputs) - set(outputs):
            (folder / stale).unlink(missing_ok=True)
        self._catalog.finish_conversion(
            series,
            outcome.state,
            outcome.reason,
            outcome.engine,
            outcome.engine_version,
            outputs,
            sum(_size(folder / output) for output in outputs),
            self._now(),
        )
        shutil.rmtree(work_dir, ignore_errors=True)
        log = logger.warning if outcome.state == "failed" else logger.info
        log(
            "series %s in %s: %s%s",
            series.series_instance_uid,
            series.folder_name,
            outcome.state,
            f" ({outcome.reason})" if outcome.reason else "",
        )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _write_report(study_dir: Path, conversions: list[StudyConversion], now: float) -> None:
    """conversion.txt: what a researcher opening the folder needs to know, no patient data."""
    stamp = datetime.fromtimestamp(now, UTC).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [f"NIfTI conversion of this study, as of {stamp}", ""]
    for conversion in conversions:
        number = "" if conversion.series_number is None else f"#{conversion.series_number} "
        title = f"{number}{conversion.series_description or conversion.modality}".strip()
        lines.append(f"{conversion.state:<9}  {title}  ({conversion.instances} instances)")
        if conversion.outputs:
            files = ", ".join(output.rsplit("/", 1)[-1] for output in conversion.outputs)
            lines.append(f"           files: {files}")
        if conversion.reason:
            lines.append(f"           why: {conversion.reason}")
    lines += [
        "",
        "pending: not converted yet (still arriving, or waiting for the next scheduled run)",
        "skipped: not a volume (a report, a localizer, too few slices...); its DICOM is kept",
        "failed: the converter could not make a volume; the DICOM is kept, ask your admin",
    ]
    if study_dir.is_dir():  # else retention deleted the study during the run
        write_bytes_atomically(study_dir / CONVERSION_REPORT, ("\n".join(lines) + "\n").encode())


# ---- worker processes --------------------------------------------------------------------


class ConversionPool:
    """Up to `workers` conversions at once, each in a worker process of its own session.

    A worker that hangs past the timeout is killed with its whole process group (the engine is
    its child); one that dies (a crash, the kernel's out-of-memory killer) is replaced. Either
    way the series gets a `failed` outcome that says what happened, and the pool goes on.
    """

    def __init__(self, workers: int, memory_limit_bytes: int, timeout_seconds: float) -> None:
        self._workers = max(1, workers)
        self._memory_limit_bytes = memory_limit_bytes
        self._timeout_seconds = timeout_seconds
        self._processes: list[_WorkerProcess] = []
        self._lock = threading.Lock()
        self.worker_peak_rss: dict[int, int] = {}  # worker pid -> bytes

    def __enter__(self) -> ConversionPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            for process in self._processes:
                process.kill()
            self._processes.clear()

    def run(
        self, jobs: Iterator[tuple[Key, ConversionRequest]], stop: threading.Event
    ) -> Iterator[tuple[Key, ConversionOutcome]]:
        """Outcomes as they finish. Jobs are drawn lazily; after `stop` no new one starts and
        the ones in flight are killed (their series stay pending)."""
        results: queue.Queue[tuple[Key, ConversionOutcome] | None] = queue.Queue()
        jobs_lock = threading.Lock()

        def next_job() -> tuple[Key, ConversionRequest] | None:
            with jobs_lock:  # a generator runs in one thread at a time
                if stop.is_set():
                    return None
                return next(jobs, None)

        def slot() -> None:
            worker: _WorkerProcess | None = None
            try:
                while (job := next_job()) is not None:
                    if worker is None:
                        worker = self._start_worker()
                    key, request = job
                    outcome, healthy = worker.convert(request, self._timeout_seconds, stop)
                    with self._lock:
                        self.worker_peak_rss[worker.pid] = worker.peak_rss
                    if not healthy:
                        self._forget(worker)
                        worker = None
                    results.put((key, outcome))
            finally:
                results.put(None)

        threads = [
            threading.Thread(target=slot, name=f"convert-{index}", daemon=True)
            for index in range(self._workers)
        ]
        for thread in threads:
            thread.start()
        running = len(threads)
        while running:
            item = results.get()
            if item is None:
                running -= 1
            else:
                yield item
        for thread in threads:
            thread.join()

    def _start_worker(self) -> _WorkerProcess:
        worker = _WorkerProcess(self._memory_limit_bytes)
        with self._lock:
            self._processes.append(worker)
        return worker

    def _forget(self, worker: _WorkerProcess) -> None:
        worker.kill()
        with self._lock:
            if worker in self._processes:
                self._processes.remove(worker)


def _worker_context() -> multiprocessing.context.ForkServerContext:
    """Workers are forked by a fork server, a single-threaded process that imported this
    module once: a worker starts in milliseconds instead of importing numpy, nibabel and
    pydicom again (about a second each), and never inherits the daemon's threads, as a plain
    fork would. The fork server ends with the daemon."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


class _WorkerProcess:
    def __init__(self, memory_limit_bytes: int) -> None:
        context = _worker_context()
        self._connection, child_end = context.Pipe()
        self._process: BaseProcess = context.Process(
            target=_worker_main,
            args=(child_end, memory_limit_bytes, os.getpid()),
            name="dcmdb-convert",
            daemon=True,
        )
        self._process.start()
        child_end.close()
        self.pid = self._process.pid or 0
        self.peak_rss = 0

    def convert(
        self, request: ConversionRequest, timeout_seconds: float, stop: threading.Event
    ) -> tuple[ConversionOutcome, bool]:
        """(outcome, whether this worker can take another series)."""
        self._connection.send(request)
        deadline = time.monotonic() + timeout_seconds
        while not self._connection.poll(0.2):
            if stop.is_set():
                self.kill()
                return _failed(request, "stopped: the daemon is shutting down"), False
            if time.monotonic() > deadline:
                self.kill()
                return (
                    _failed(
                        request,
                        f"stopped after {timeout_seconds:g} s (convert.timeout_seconds); raise "
                        "it if series this large are expected, or check the engine",
                    ),
                    False,
                )
        try:
            outcome, self.peak_rss = self._connection.recv()
        except (EOFError, OSError):
            return _failed(request, self._death_reason()), False
        return outcome, True

    def _death_reason(self) -> str:
        self._process.join(timeout=5.0)
        code = self._process.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            if -code == signal.SIGKILL:
                return (
                    "the converter was killed (SIGKILL), most often by the kernel's "
                    "out-of-memory killer (see `journalctl -k`); lower convert.workers or add "
                    "memory"
                )
            return f"the converter crashed ({name}); the engine cannot read this series"
        return f"the converter exited unexpectedly (exit code {code})"

    def kill(self) -> None:
        pid = self._process.pid
        if self._process.is_alive() and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # the worker and the engine it runs
        self._process.join(timeout=5.0)
        self._connection.close()


def _failed(request: ConversionRequest, reason: str) -> ConversionOutcome:
    return ConversionOutcome(
        state="failed", reason=reason, engine=request.engine, engine_version="", outputs=()
    )


def _worker_main(connection: Connection, memory_limit_bytes: int, owner_pid: int) -> None:
    """A conversion worker: its own session (so the pool can kill it with the engine it
    runs), the address-space limit, then one series per request until the pipe closes."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when workers stop
    threading.Thread(
        target=_end_with_owner, args=(owner_pid,), name="owner-watch", daemon=True
    ).start()
    if memory_limit_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    while True:
        try:
            request: ConversionRequest = connection.recv()
        except (EOFError, OSError):
            return
        try:
            outcome = convert_series(request)
        except MemoryError:
            outcome = _failed(
                request,
                "out of memory: the series needs more than convert.memory_limit allows",
            )
        except Exception as exc:  # the boundary of one series: record it, take the next
            outcome = _failed(request, f"internal error: {type(exc).__name__}: {exc}")
        # ru_maxrss is in KiB on Linux.
        connection.send((outcome, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def _end_with_owner(owner_pid: int) -> None:
    """A killed daemon cannot kill its workers: each worker waits for the process that asked
    for it (the daemon or `dcmdb convert`, not the fork server, its parent) to end, and then
    kills its own process group, the engine included, rather than run on unowned."""
    try:
        # A pidfd becomes readable when the process ends, and cannot be confused by a new
        # process that reuses the number.
        owner = os.pidfd_open(owner_pid)
    except ProcessLookupError:
        os.killpg(0, signal.SIGKILL)
        return
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3): look once a second
        while not threading.Event().wait(1.0):
            try:
                os.kill(owner_pid, 0)
            except ProcessLookupError:
                os.killpg(0, signal.SIGKILL)
        return
    select.select([owner], [], [])
    os.killpg(0, signal.SIGKILL)
