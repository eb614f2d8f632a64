"""The ``[metrics]`` endpoint: the archive's figures for Prometheus, at
``http://<metrics.address>:<metrics.port>/metrics``.

Each scrape reads the figures afresh, from four sources, each its own failure boundary (a
source that cannot be read leaves its metrics out and sets ``dcmdb_scrape_source_up`` to 0 for
it; the rest is still served):

- ``catalog``: a connection of its own per scrape (the catalog is the source of truth; the
  queries are the ones ``dcmdb status`` runs);
- ``pruned_log``: ``state/pruned.jsonl``, one line per pruned study, read only as far as it
  grew since the last scrape;
- ``disk``: the archive filesystem's size and free space;
- ``live``: what only the running daemon knows (:class:`LiveFigures`, from the ingest worker).

No metric and no label carries a patient's name or ID, nor a folder (physician) name: labels
are job names, conversion states and source names only.

The metrics live on a private :class:`~prometheus_client.CollectorRegistry`, never the global
one, and the HTTP server binds only to the configured address and stops with :meth:`stop`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.catalog import (
    CATALOG_FILE,
    ArchiveTotals,
    Catalog,
    CatalogError,
    ConversionSummary,
    JobRun,
)
from daemon.config import MetricsConfig
from daemon.convert import CONVERT_JOB
from daemon.retention import PRUNED_LOG, RETENTION_JOB

logger = logging.getLogger(__name__)

# The scheduled jobs whose last success is exported, by their name in the catalog's job_runs.
JOBS: tuple[str, ...] = (CONVERT_JOB, RETENTION_JOB)
SOURCES: tuple[str, ...] = ("catalog", "pruned_log", "disk", "live")
# Conversion states as the catalog counts them (a series never tried is pending).
CONVERSION_STATES: tuple[str, ...] = ("converted", "skipped", "failed", "pending")
# A client that sends nothing for this long loses its connection (and its server thread).
_REQUEST_TIMEOUT_SECONDS = 30.0
_STOP_TIMEOUT_SECONDS = 10.0
_PRUNED_LOG_CHUNK = 1 << 20


class MetricsServerError(Exception):
    """The endpoint cannot listen as configured; the message names the key to change."""


@dataclass(frozen=True)
class LiveFigures:
    """What only the running daemon knows, read at each scrape (from the ingest worker)."""

    queue_depth: int  # files seen in incoming/ and not yet taken
    ingest_paused: bool  # waiting for free space (ingest.min_free)
    ingested_since_start: int  # files archived by this process
    quarantined_since_start: int
    duplicates_since_start: int


@dataclass(frozen=True)
class PrunedTotals:
    studies: int
    bytes: int


class PrunedLog:
    """Totals of ``state/pruned.jsonl`` (one JSON line per pruned study, with its ``bytes``),
    read incrementally: each call reads only what was appended since the previous one.

    A line still being written (no newline yet) waits for the next call. A file that shrank
    or was replaced (rotated by the admin) is read again from its start: the totals then drop,
    which Prometheus takes as a counter reset. Not thread-safe: one caller at a time.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file read
        self._offset = 0  # bytes read and counted: always just after a newline
        self._studies = 0
        self._bytes = 0

    def totals(self) -> PrunedTotals:
        """The totals as the file stands now. Raises OSError if it exists but cannot be read."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            self._restart(None)  # nothing pruned yet (or the log was removed)
            return PrunedTotals(0, 0)
        identity = (status.st_dev, status.st_ino)
        if identity != self._identity or status.st_size < self._offset:
            self._restart(identity)
        if status.st_size > self._offset:
            self._read_from_offset()
        return PrunedTotals(self._studies, self._bytes)

    def _restart(self, identity: tuple[int, int] | None) -> None:
        self._identity = identity
        self._offset = 0
        self._studies = 0
        self._bytes = 0

    def _read_from_offset(self) -> None:
        malformed = 0
        with open(self.path, "rb") as log:
            log.seek(self._offset)
            pending = b""
            while chunk := log.read(_PRUNED_LOG_CHUNK):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()  # after the last newline: incomplete, or b""
                for line in lines:
                    self._offset += len(line) + 1
                    if line.strip():
                        malformed += not self._count(line)
        if malformed:
            logger.warning(
                "%s: %d lines without a valid bytes figure; their studies are counted, "
                "their bytes are not",
                self.path,
                malformed,
            )

    def _count(self, line: bytes) -> bool:
        """Count the line's study and its bytes; False if the bytes could not be read."""
        self._studies += 1
        try:
            entry = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            return False
        size = entry.get("bytes") if isinstance(entry, dict) else None
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            return False
        self._bytes += size
        return True


@dataclass(frozen=True)
class _CatalogFigures:
    totals: ArchiveTotals
    conversions: ConversionSummary
    job_runs: dict[str, JobRun | None]


class ArchiveCollector(Collector):
    """The dcmdb metrics, collected afresh at each scrape (see the module docstring).

    Scrapes are served one at a time: the pruned log's position and the jobs' last successes
    are kept between them.
    """

    def __init__(self, state_dir: Path, archive: Path, live: Callable[[], LiveFigures]) -> None:
        self._state_dir = state_dir
        self._archive = archive
        self._live = live
        self._pruned_log = PrunedLog(state_dir / PRUNED_LOG)
        # job -> latest finished_at seen: a job's row says "running" (no finished_at) while a
        # run is under way, and its last success must not vanish from the graphs meanwhile.
        self._last_success: dict[str, float] = {}
        self._failing: set[str] = set()  # sources whose failure is logged already
        self._lock = threading.Lock()

    def collect(self) -> list[Metric]:
        with self._lock:  # read whole under the lock, not released between two metrics
            return list(self._collect())

    def _collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("dcmdb_up", "1 while the dcmdb daemon serves its metrics.")
        up.add_metric([], 1)
        yield up
        source_up = GaugeMetricFamily(
            "dcmdb_scrape_source_up",
            "1 if this scrape could read the source (catalog, pruned_log, disk, live); its "
            "metrics are missing otherwise (see the daemon's log).",
            labels=["source"],
        )
        figures = self._read("catalog", self._catalog_figures)
        if figures is not None:
            yield from self._catalog_metrics(figures)
        pruned = self._read("pruned_log", self._pruned_log.totals)
        if pruned is not None:
            yield _counter(
                "dcmdb_pruned_studies",
                "Studies deleted by retention, as listed in state/pruned.jsonl.",
                pruned.studies,
            )
            yield _counter(
                "dcmdb_pruned_bytes",
                "Bytes (DICOM and NIfTI) of the studies deleted by retention, as listed in "
                "state/pruned.jsonl.",
                pruned.bytes,
            )
        disk = self._read("disk", lambda: shutil.disk_usage(self._archive))
        if disk is not None:
            yield _gauge(
                "dcmdb_disk_free_bytes",
                "Free space on the archive's filesystem (as `df` shows it to the dcmdb user).",
                disk.free,
            )
            yield _gauge("dcmdb_disk_total_bytes", "Size of the archive's filesystem.", disk.total)
        live = self._read("live", self._live)
        if live is not None:
            yield from _live_metrics(live)
        for source, figure in (
            ("catalog", figures),
            ("pruned_log", pruned),
            ("disk", disk),
            ("live", live),
        ):
            source_up.add_metric([source], 0 if figure is None else 1)
        yield source_up

    def _read(self, source: str, read: Callable[[], Any]) -> Any:
        """read(), or None if it fails: a source is one failure boundary, logged once per
        episode, not at every scrape."""
        try:
            value = read()
        except (OSError, sqlite3.Error, CatalogError) as exc:  # a fact of the machine: no trace
            if source not in self._failing:
                self._failing.add(source)
                logger.warning(
                    "metrics: cannot read the %s (%s); its metrics are left out", source, exc
                )
            return None
        except Exception:  # the source's boundary: the other sources are still served
            if source not in self._failing:
                self._failing.add(source)
                logger.exception("metrics: cannot read the %s; its metrics are left out", source)
            return None
        if source in self._failing:
            self._failing.discard(source)
            logger.info("metrics: the %s can be read again", source)
        return value

    def _catalog_figures(self) -> _CatalogFigures:
        if not (self._state_dir / CATALOG_FILE).exists():
            # Catalog() would create an empty one: a reader must not.
            raise FileNotFoundError(f"no catalog at {self._state_dir / CATALOG_FILE}")
        catalog = Catalog(self._state_dir)
        try:
            return _CatalogFigures(
                totals=catalog.archive_totals(),
                conversions=catalog.conversion_summary(latest=0),
                job_runs={job: catalog.last_job_run(job) for job in JOBS},
            )
        finally:
            catalog.close()

    def _catalog_metrics(self, figures: _CatalogFigures) -> Iterator[Metric]:
        summary = figures.totals
        yield _gauge("dcmdb_instances", "DICOM instances in the archive.", summary.instances)
        yield _gauge("dcmdb_studies", "Studies in the archive.", summary.studies)
        yield _gauge("dcmdb_series", "Series in the archive.", summary.series)
        yield _gauge(
            "dcmdb_archive_bytes",
            "Bytes of the archive's DICOM and NIfTI files, as the catalog counts them (what "
            "retention.max_archive_size is compared with).",
            summary.bytes,
        )
        yield _counter(
            "dcmdb_quarantined",
            "Files quarantined since the catalog was created.",
            summary.quarantined,
        )
        yield _counter(
            "dcmdb_duplicates",
            "Files dropped as duplicates of an archived instance since the catalog was created.",
            summary.duplicates,
        )
        conversions = GaugeMetricFamily(
            "dcmdb_conversions",
            "Series by NIfTI conversion state (pending: never converted, or due again).",
            labels=["state"],
        )
        for state in CONVERSION_STATES:
            conversions.add_metric([state], figures.conversions.counts.get(state, 0))
        yield conversions
        yield _gauge(
            "dcmdb_dicomdir_dirty_folders",
            "Physician folders whose DICOMDIR does not show the catalog yet (rewritten once "
            "quiet for dicomdir.delay_seconds).",
            summary.dicomdir_dirty_folders,
        )
        last_success = GaugeMetricFamily(
            "dcmdb_job_last_success_timestamp_seconds",
            "When the scheduled job last finished a run (Unix time); absent until it has.",
            labels=["job"],
        )
        for job, run in figures.job_runs.items():
            if run is not None and run.finished_at is not None:
                self._last_success[job] = max(self._last_success.get(job, 0.0), run.finished_at)
            if job in self._last_success:
                last_success.add_metric([job], self._last_success[job])
        yield last_success


def _live_metrics(live: LiveFigures) -> Iterator[Metric]:
    yield _counter(
        "dcmdb_ingested",
        "Files archived by this daemon process since it started.",
        live.ingested_since_start,
    )
    yield _gauge(
        "dcmdb_ingest_queue_depth",
        "Files in incoming/ that ingest has seen and not taken yet.",
        live.queue_depth,
    )
    yield _gauge(
        "dcmdb_ingest_paused",
        "1 while ingest waits for free space (ingest.min_free); files wait in incoming/.",
        int(live.ingest_paused),
    )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    # Exposed as <name>_total.
    return CounterMetricFamily(name, documentation, value=value)


class _RequestHandler(WSGIRequestHandler):
    timeout = _REQUEST_TIMEOUT_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        # Every scrape would otherwise be a line on stderr.
        logger.debug("metrics request from %s: " + format, self.address_string(), *args)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    # A thread per request, none waited for at close: one slow client does not hold up a
    # scrape, nor the daemon's stop.
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up mid-response: not worth a traceback on stderr.
        logger.debug("metrics request from %s failed", client_address, exc_info=True)


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """The endpoint: ``start()`` listens on ``settings.address``:``settings.port`` (and does
    nothing when ``settings.enabled`` is false), ``stop()`` closes the port and waits for the
    server thread; ``start()`` after ``stop()`` listens again. Both are idempotent."""

    def __init__(
        self,
        settings: MetricsConfig,
        state_dir: Path,
        archive: Path,
        live: Callable[[], LiveFigures],
    ) -> None:
        self.settings = settings
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ArchiveCollector(state_dir, archive, live))
        # process_*: memory, CPU, open files and start time of the daemon's main process (from
        # Linux /proc; not its reader or conversion processes).
        ProcessCollector(registry=self.registry)
        self._server: _ThreadingServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Where the metrics are served (as configured; the bound port once started)."""
        host = self.settings.address
        if ":" in host:
            host = f"[{host}]"
        port = self._server.server_address[1] if self._server else self.settings.port
        return f"http://{host}:{port}/metrics"

    @property
    def serving(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen and serve in a background thread; raises MetricsServerError if the address
        cannot be bound (in use, not an address of this server, a port below 1024 without
        the privilege)."""
        if not self.settings.enabled or self._server is not None:
            return
        server_class = _ThreadingServer6 if ":" in self.settings.address else _ThreadingServer
        started = time.monotonic()
        try:
            server = make_server(
                self.settings.address,
                self.settings.port,
                make_wsgi_app(self.registry),
                server_class=server_class,
                handler_class=_RequestHandler,
            )
        except OSError as exc:
            raise MetricsServerError(
                f"metrics: cannot listen on {self.settings.address} port {self.settings.port}: "
                f"{exc.strerror or exc}. Choose a free port (metrics.port), an address of this "
                "server (metrics.address), or set metrics.enabled = false"
            ) from exc
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="metrics-server",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        logger.info(
            "metrics served at %s (started in %.0f ms)",
            self.url,
            1000 * (time.monotonic() - started),
        )

    def stop(self) -> None:
        """Stop serving and free the port; a scrape in progress finishes on its own."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()  # returns once serve_forever has returned
        server.server_close()
        thread.join(_STOP_TIMEOUT_SECONDS)
        self._server = self._thread = None
        logger.info("metrics server stopped")
