"""Wires the archive's parts into the running daemon: catalog, ingest worker, watcher, and the
scheduler (APScheduler 3) whose jobs are idempotent catch-ups over the catalog; signals."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler

from daemon.catalog import Catalog
from daemon.config import Config, ConvertConfig, DicomdirConfig, PathsConfig, RetentionConfig
from daemon.convert import CONVERT_JOB, ConversionBusyError, run_conversions
from daemon.dicomdir import rewrite_due_folders
from daemon.ingest import (
    Archiver,
    IngestWorker,
    ParallelReader,
    effective_workers,
    is_out_of_space,
)
from daemon.retention import (
    RETENTION_JOB,
    PruneBusyError,
    describe_outcome,
    effective_policy,
    finish_interrupted_prunes,
    prune_now,
)
from daemon.schedule import WallClockCronTrigger, run_was_missed
from daemon.watcher import IncomingWatcher

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """The daemon cannot start; the message says what to fix."""


def prepare_paths(paths: PathsConfig) -> None:
    for key in ("incoming", "archive", "quarantine", "state"):
        path: Path = getattr(paths, key)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceError(
                f"paths.{key}: cannot create {path}: {exc.strerror}. Create it and give the "
                f"dcmdb user write access, or point paths.{key} elsewhere in the config"
            ) from exc


@contextmanager
def open_archiver(config: Config, *, keep_source: bool = False) -> Iterator[Archiver]:
    """An Archiver on a freshly opened catalog, with interrupted moves finished."""
    prepare_paths(config.paths)
    catalog = Catalog(config.paths.state)
    try:
        archiver = Archiver(
            catalog,
            archive=config.paths.archive,
            quarantine=config.paths.quarantine,
            incoming=config.paths.incoming,
            sorting=config.sorting,
            keep_source=keep_source,
        )
        archiver.recover()
        finish_interrupted_prunes(catalog, config.paths.archive, time.time())
        yield archiver
    finally:
        catalog.close()


def start_scheduler(config: Config, stop: threading.Event) -> BackgroundScheduler:
    """The scheduled jobs. Each is a catch-up over the catalog, so a run missed while the
    daemon was down costs nothing: the first run, at start-up, does the work."""
    scheduler = BackgroundScheduler(
        timezone=UTC,
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
    )
    scheduler.add_job(
        _dicomdir_job,
        "interval",
        seconds=_dicomdir_check_interval(config.dicomdir),
        args=[config, _FirstRun(), _NoSpaceNotice()],
        id="dicomdir",
        name="rewrite DICOMDIRs of changed folders",
        next_run_time=datetime.now(UTC),
    )
    if config.convert.enabled:
        trigger = WallClockCronTrigger(config.convert.schedule, config.convert.tzinfo)
        missed = conversion_run_missed(config, trigger, datetime.now(UTC))
        scheduler.add_job(
            _convert_job,
            trigger,
            args=[config.convert, config.paths, stop],
            id=CONVERT_JOB,
            name="convert series to NIfTI",
            # A run the schedule wanted while the daemon was down happens now.
            **({"next_run_time": datetime.now(UTC)} if missed else {}),
        )
        logger.info(
            "conversion scheduled %s%s",
            trigger,
            ": a missed run starts now" if missed else "",
        )
    if config.retention.enabled:
        scheduler.add_job(
            _retention_job,
            "interval",
            minutes=config.retention.check_every_minutes,
            args=[effective_policy(config.retention, config.convert.enabled), config.paths],
            id=RETENTION_JOB,
            name="prune the oldest studies when space is low",
            next_run_time=datetime.now(UTC),
        )
    scheduler.start()
    return scheduler


def _retention_job(settings: RetentionConfig, paths: PathsConfig) -> None:
    catalog = Catalog(paths.state)  # one connection per job run: jobs run in threads
    started = time.time()
    try:
        plan, result = prune_now(
            catalog, settings, paths.archive, paths.state, dry_run=False, now=time.time
        )
        catalog.record_job_run(RETENTION_JOB, started, time.time(), describe_outcome(plan, result))
    except PruneBusyError as exc:
        logger.info("retention check skipped: %s", exc)
    except Exception:  # the job's boundary: log it, the next check tries again
        logger.exception("the retention check failed; the next check tries again")
    finally:
        catalog.close()


def conversion_run_missed(config: Config, trigger: WallClockCronTrigger, now: datetime) -> bool:
    """Whether the conversion schedule fired since the last run started (or never ran)."""
    catalog = Catalog(config.paths.state)
    try:
        last = catalog.last_job_run(CONVERT_JOB)
    finally:
        catalog.close()
    started = None if last is None else datetime.fromtimestamp(last.started_at, UTC)
    return run_was_missed(trigger, started, now)


def _convert_job(settings: ConvertConfig, paths: PathsConfig, stop: threading.Event) -> None:
    try:
        run_conversions(settings, paths, stop=stop)
    except ConversionBusyError as exc:
        logger.warning("scheduled conversion skipped: %s", exc)
    except Exception:  # the job's boundary: log it, the next run tries again
        logger.exception("the conversion run failed; the next scheduled run retries")


def _dicomdir_check_interval(settings: DicomdirConfig) -> float:
    # Often enough to keep within the delay, rarely enough to cost nothing: the check is one
    # indexed query.
    return max(0.2, min(settings.delay_seconds / 4, 5.0))


class _FirstRun:
    """True once: at start-up, folders left dirty by the last run are rewritten at once (the
    stream that made them dirty has stopped with the daemon)."""

    def __init__(self) -> None:
        self._first = True

    def __call__(self) -> bool:
        first, self._first = self._first, False
        return first


def _dicomdir_job(config: Config, first_run: _FirstRun, no_space: _NoSpaceNotice) -> None:
    catalog = Catalog(config.paths.state)  # one connection per job run: jobs run in threads
    try:
        rewrite_due_folders(
            catalog,
            config.paths.archive,
            config.dicomdir,
            now=time.time(),
            ignore_delay=first_run(),
        )
        no_space.clear()
    except OSError as exc:
        if not is_out_of_space(exc):
            raise
        # The folders stay dirty and are rewritten once there is room; say so once, not at
        # every check.
        no_space.warn("DICOMDIR rewrites wait: no space left on the archive filesystem")
    finally:
        catalog.close()


class _NoSpaceNotice:
    """One warning per episode of a full disk, from a job that runs every few seconds."""

    def __init__(self) -> None:
        self._warned = False

    def warn(self, message: str) -> None:
        if not self._warned:
            logger.warning("%s", message)
            self._warned = True

    def clear(self) -> None:
        self._warned = False


@dataclass
class _StopRequest:
    event: threading.Event
    signal_name: str = ""


def run_daemon(config: Config) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    stop = _StopRequest(threading.Event())

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.signal_name = signal.Signals(signum).name
        stop.event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    with open_archiver(config) as archiver:
        reader = ParallelReader(effective_workers(config.ingest.parse_workers))
        worker = IngestWorker(archiver, reader, config.ingest)
        watcher = IncomingWatcher(config.paths.incoming, worker.offer, config.ingest)
        worker.start()
        watcher.start()
        scheduler = start_scheduler(config, stop.event)
        logger.info(
            "dcmdb running: incoming %s (%s), archive %s, config %s",
            config.paths.incoming,
            config.ingest.observer,
            config.paths.archive,
            config.source,
        )
        exit_code = 0
        last_report = time.monotonic()
        while not stop.event.wait(1.0):
            if not worker.is_alive() or not watcher.is_alive() or not scheduler.running:
                logger.error("a daemon thread died; exiting so that systemd restarts dcmdb")
                exit_code = 1
                break
            if time.monotonic() - last_report >= 60.0:
                last_report = time.monotonic()
                logger.info(
                    "ingest: %d files pending; so far %s",
                    worker.pending,
                    ", ".join(f"{o.value}={n}" for o, n in worker.counts.items()),
                )
        if stop.signal_name:
            logger.info("%s received: finishing the files in hand", stop.signal_name)
        watcher.stop()
        worker.stop()
        worker.join(timeout=60.0)
        reader.shutdown()
        scheduler.shutdown(wait=True)
    logger.info("dcmdb stopped")
    return exit_code
