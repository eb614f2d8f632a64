"""Wires the archive's parts into the running daemon: catalog, ingest worker, watcher;
signals. (The scheduler for DICOMDIR, conversion and retention joins here.)"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from daemon.catalog import Catalog
from daemon.config import Config, PathsConfig
from daemon.ingest import Archiver, IngestWorker, ParallelReader, effective_workers
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
        yield archiver
    finally:
        catalog.close()


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
            if not worker.is_alive() or not watcher.is_alive():
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
    logger.info("dcmdb stopped")
    return exit_code
