"""Wires the archive's parts into the running daemon: catalog, ingest worker, watcher, and the
scheduler (APScheduler 3) whose jobs are idempotent catch-ups over the catalog; signals."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler

from daemon.catalog import Catalog, CatalogError, JobRun
from daemon.config import (
    Config,
    ConfigError,
    ConvertConfig,
    DicomdirConfig,
    PathsConfig,
    RetentionConfig,
    RetrieveConfig,
    load_config,
)
from daemon.convert import CONVERT_JOB, ConversionBusyError, run_conversions
from daemon.dicomdir import rewrite_due_folders
from daemon.ingest import (
    Archiver,
    IngestWorker,
    ParallelReader,
    effective_workers,
    is_out_of_space,
)
from daemon.metrics import LiveFigures, MetricsServer, MetricsServerError
from daemon.model import Outcome
from daemon.network import (
    RETRIEVE_JOB,
    Listener,
    ListenerError,
    PacsError,
    RetrieveRun,
    lookback_range,
    pacs_copy_check,
    run_retrieve,
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
        try:
            finish_interrupted_prunes(
                catalog, config.paths.archive, config.paths.state, time.time()
            )
        except Exception:  # the archive must run; the next retention check tries again
            logger.exception(
                "could not finish a deletion interrupted by a crash; the next retention check "
                "tries again (see `dcmdb prune --dry-run`)"
            )
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
    schedule_jobs(scheduler, config, stop)
    scheduler.start()
    return scheduler


def schedule_jobs(
    scheduler: BackgroundScheduler, config: Config, stop: threading.Event, *, starting: bool = True
) -> None:
    """(Re)define every job from `config`; a run in progress finishes under the old one."""
    scheduler.remove_all_jobs()
    scheduler.add_job(
        _dicomdir_job,
        "interval",
        seconds=_dicomdir_check_interval(config.dicomdir),
        # At start-up, folders left dirty are rewritten at once; at a reload the delays hold.
        args=[config, _FirstRun(starting), _NoSpaceNotice()],
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
    if config.retrieve.enabled:
        trigger = WallClockCronTrigger(config.retrieve.schedule, config.retrieve.tzinfo)
        missed = job_run_missed(config, RETRIEVE_JOB, trigger, datetime.now(UTC))
        scheduler.add_job(
            _retrieve_job,
            trigger,
            args=[config, stop],
            id=RETRIEVE_JOB,
            name="retrieve recent studies from the PACS",
            # A run the schedule wanted while the daemon was down happens now.
            **({"next_run_time": datetime.now(UTC)} if missed else {}),
        )
        logger.info(
            "retrieve from the PACS scheduled %s%s",
            trigger,
            ": a missed run starts now" if missed else "",
        )
    if config.retention.enabled:
        scheduler.add_job(
            _retention_job,
            "interval",
            minutes=config.retention.check_every_minutes,
            args=[
                effective_policy(config.retention, config.convert.enabled),
                config.paths,
                config.retrieve,
            ],
            id=RETENTION_JOB,
            name="prune the oldest studies when space is low",
            next_run_time=datetime.now(UTC),
        )


def _retention_job(settings: RetentionConfig, paths: PathsConfig, pacs: RetrieveConfig) -> None:
    catalog = Catalog(paths.state)  # one connection per job run: jobs run in threads
    started = time.time()
    try:
        plan, result = prune_now(
            catalog,
            settings,
            paths.archive,
            paths.state,
            dry_run=False,
            now=time.time,
            verify=pacs_copy_check(pacs, catalog) if settings.require_pacs_copy else None,
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
    return job_run_missed(config, CONVERT_JOB, trigger, now)


def job_run_missed(config: Config, job: str, trigger: WallClockCronTrigger, now: datetime) -> bool:
    """Whether a cron job's schedule fired since its last run started (or it never ran)."""
    catalog = Catalog(config.paths.state)
    try:
        last = catalog.last_job_run(job)
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


def retrieve_now(
    config: Config, *, date_range: str | None = None, stop: threading.Event | None = None
) -> RetrieveRun:
    """One retrieve run (the scheduled job, and `dcmdb retrieve`), recorded as a job run.
    With method "move" the PACS sends to listener.ae_title: the daemon's listener, or, when
    none runs here, a temporary one for the length of the run. Raises PacsError when the
    PACS cannot be queried, ServiceError when no listener can receive."""
    if date_range is None:
        today = datetime.now(config.retrieve.tzinfo).date()
        date_range = lookback_range(today, config.retrieve.lookback_days)
    catalog = Catalog(config.paths.state)  # one connection per job run: jobs run in threads
    started = time.time()
    try:
        with _move_destination(config):
            run = run_retrieve(
                config.retrieve,
                config.listener.ae_title,
                config.paths.incoming,
                catalog,
                date_range=date_range,
                stop=stop,
            )
        catalog.record_job_run(RETRIEVE_JOB, run.started_at, run.finished_at, run.describe())
    except (PacsError, ServiceError) as exc:
        catalog.record_job_run(RETRIEVE_JOB, started, time.time(), f"FAILED: {exc}")
        raise
    finally:
        catalog.close()
    return run


@contextmanager
def _move_destination(config: Config) -> Iterator[None]:
    """For a C-MOVE, a listener that receives: a temporary one when the port is free, else
    (the daemon runs) the one that holds the port."""
    if config.retrieve.method != "move":
        yield
        return
    listener = Listener(config.listener, config.paths.incoming)
    try:
        listener.start()
    except ListenerError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
            logger.info(
                "retrieve: listener.port %d is in use (the daemon's listener): the PACS sends "
                "there",
                config.listener.port,
            )
            yield
            return
        raise ServiceError(str(exc)) from exc
    try:
        yield
    finally:
        listener.stop()


def _retrieve_job(config: Config, stop: threading.Event) -> None:
    try:
        retrieve_now(config, stop=stop)
    except (PacsError, ServiceError) as exc:
        logger.error("the retrieve run failed: %s; the next scheduled run retries", exc)
    except Exception:  # the job's boundary: log it, the next run tries again
        logger.exception("the retrieve run failed; the next scheduled run retries")


def _dicomdir_check_interval(settings: DicomdirConfig) -> float:
    # Often enough to keep within the delay, rarely enough to cost nothing: the check is one
    # indexed query.
    return max(0.2, min(settings.delay_seconds / 4, 5.0))


class _FirstRun:
    """True once: at start-up, folders left dirty by the last run are rewritten at once (the
    stream that made them dirty has stopped with the daemon)."""

    def __init__(self, first: bool = True) -> None:
        self._first = first

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


class SystemdNotifier:
    """sd_notify(3) over $NOTIFY_SOCKET; does nothing when systemd did not ask for it."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        watchdog = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        # sd_watchdog_enabled(3): ping at half the interval at least.
        self.watchdog_interval = int(usec) / 2e6 if watchdog else 0.0

    def send(self, *fields: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:  # systemd gone or restarting: nothing to tell
            logger.debug("sd_notify to %s failed: %s", self._address, exc)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()


@dataclass
class _Signals:
    stop: threading.Event
    reload: threading.Event
    stop_name: str = ""


def run_daemon(config: Config, environ: Mapping[str, str] = os.environ) -> int:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the config. Returns the exit code."""
    signals = _Signals(threading.Event(), threading.Event())

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        signals.stop_name = signal.Signals(signum).name
        signals.stop.set()

    def on_hangup(_signum: int, _frame: FrameType | None) -> None:
        signals.reload.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hangup)
    notifier = SystemdNotifier(environ)

    with open_archiver(config) as archiver:
        reader = ParallelReader(effective_workers(config.ingest.parse_workers))
        worker = IngestWorker(archiver, reader, config.ingest)
        watcher = IncomingWatcher(config.paths.incoming, worker.offer, config.ingest)
        metrics = MetricsServer(
            config.metrics,
            config.paths.state,
            config.paths.archive,
            live=lambda: LiveFigures(
                queue_depth=worker.pending,
                ingest_paused=worker.paused,
                ingested_since_start=worker.counts[Outcome.ARCHIVED],
                quarantined_since_start=worker.counts[Outcome.QUARANTINED],
                duplicates_since_start=worker.counts[Outcome.DUPLICATE],
            ),
        )
        worker.start()
        listener = Listener(config.listener, config.paths.incoming)
        if config.listener.enabled:
            try:
                listener.start()
            except ListenerError as exc:
                worker.stop()
                worker.join(timeout=60.0)
                reader.shutdown()
                raise ServiceError(str(exc)) from exc
        watcher.start()
        try:
            metrics.start()
        except MetricsServerError as exc:
            # Metrics are optional: a taken port must not stop the archive (a restart loop
            # would stop ingest); Prometheus shows the target down.
            logger.error("%s; running without metrics", exc)
        scheduler = start_scheduler(config, signals.stop)
        logger.info(
            "dcmdb running: incoming %s (%s), archive %s, config %s",
            config.paths.incoming,
            config.ingest.observer,
            config.paths.archive,
            config.source,
        )
        # READY only now: the observer, the ingest worker and the scheduler all run.
        notifier.send("READY=1", f"MAINPID={os.getpid()}", _status_line(config, worker))
        exit_code = 0
        last_report = last_ping = time.monotonic()
        tick = min(1.0, notifier.watchdog_interval or 1.0)
        while not signals.stop.wait(tick):
            dead = _dead_parts(worker, watcher, scheduler) or (
                "the DICOM listener" if config.listener.enabled and not listener.is_alive() else ""
            )
            if dead:
                # No more WATCHDOG=1: systemd would restart a hung daemon; a dead part is
                # certain, so exit at once and let Restart=on-failure do it.
                logger.error("%s stopped; exiting so that systemd restarts dcmdb", dead)
                exit_code = 1
                break
            now = time.monotonic()
            if notifier.watchdog_interval and now - last_ping >= notifier.watchdog_interval / 2:
                last_ping = now
                notifier.send("WATCHDOG=1")
            if signals.reload.is_set():
                signals.reload.clear()
                config = _reload(config, scheduler, signals.stop, notifier)
            if now - last_report >= 60.0:
                last_report = now
                notifier.send(_status_line(config, worker))  # errors are caught there
                logger.info(
                    "ingest: %d files pending; so far %s%s",
                    worker.pending,
                    ", ".join(f"{o.value}={n}" for o, n in worker.counts.items()),
                    f"; PAUSED: {worker.pause_reason}" if worker.paused else "",
                )
        notifier.send("STOPPING=1")
        if signals.stop_name:
            logger.info("%s received: finishing the files in hand", signals.stop_name)
        listener.stop()  # first: nothing new arrives while the worker finishes
        watcher.stop()
        worker.stop()
        worker.join(timeout=60.0)
        reader.shutdown()
        scheduler.shutdown(wait=True)
        metrics.stop()
    notifier.close()
    logger.info("dcmdb stopped")
    return exit_code


def _dead_parts(
    worker: IngestWorker, watcher: IncomingWatcher, scheduler: BackgroundScheduler
) -> str:
    if not watcher.is_alive():
        return "the observer of the incoming folder (was the folder removed?)"
    if not worker.is_alive():
        return "the ingest worker"
    if not scheduler.running:
        return "the scheduler"
    return ""


def _status_line(config: Config, worker: IngestWorker) -> str:
    """STATUS= for `systemctl status`: the queue and the latest job results. The job results
    are extra: a catalog that cannot be read now leaves them out, it does not stop the loop."""
    jobs: dict[str, JobRun | None] = {}
    try:
        catalog = Catalog(config.paths.state)
        try:
            jobs = {
                name: catalog.last_job_run(name)
                for name in (CONVERT_JOB, RETENTION_JOB, RETRIEVE_JOB)
            }
        finally:
            catalog.close()
    except (CatalogError, sqlite3.Error) as exc:
        logger.warning("status line without job results: %s", exc)
    parts = [f"queue {worker.pending}"]
    if worker.paused:
        parts.append("INGEST PAUSED (disk full)")
    for name, run in jobs.items():
        if run is not None:
            parts.append(f"{name}: {run.result}")
    return "STATUS=" + "; ".join(parts)


def _reload(
    config: Config, scheduler: BackgroundScheduler, stop: threading.Event, notifier: SystemdNotifier
) -> Config:
    """SIGHUP: the new config if it is valid (jobs and log level follow it at once; paths
    and ingest settings at the next restart), else the running one, unchanged."""
    notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        new = load_config(config.source)
    except ConfigError as exc:
        logger.error(
            "SIGHUP: %s is not valid; still running on the previous configuration:\n%s",
            config.source,
            exc,
        )
        notifier.send("READY=1", "STATUS=config reload failed: running on the previous one")
        return config
    restart_only = ("paths", "ingest", "sorting", "metrics", "listener")
    needs_restart = [name for name in restart_only if getattr(new, name) != getattr(config, name)]
    # What runs on until a restart keeps running as it is: the jobs must use the same
    # folders, catalog and listener as ingest does.
    new = dataclasses.replace(new, **{name: getattr(config, name) for name in restart_only})
    schedule_jobs(scheduler, new, stop, starting=False)
    logging.getLogger().setLevel(new.logging.level.upper())
    if needs_restart:
        logger.warning(
            "SIGHUP: changes in [%s] take effect at the next restart (systemctl restart dcmdb)",
            "], [".join(needs_restart),
        )
    logger.info("SIGHUP: reloaded %s", config.source)
    notifier.send("READY=1")
    return new
