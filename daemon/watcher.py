"""Notices files in incoming/: a watchdog observer (hints), a scan at start-up, and a periodic
rescan that catches what the observer missed (inotify drops events when its queue overflows;
network mounts send none). Everything found is only offered to the ingest queue."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyObserver
from watchdog.observers.polling import PollingObserver

from daemon.config import IngestConfig
from daemon.ingest import is_ignored_name
from daemon.model import Hint

logger = logging.getLogger(__name__)

Offer = Callable[[str, Hint], None]


def _is_ignored_path(path: str, root: str) -> bool:
    relative = path[len(root) :].lstrip(os.sep)
    return any(is_ignored_name(part) for part in relative.split(os.sep))


class _EnqueueHandler(FileSystemEventHandler):
    """Runs in watchdog's dispatcher thread: it only enqueues (an exception here would kill
    the observer silently)."""

    def __init__(self, root: str, offer: Offer) -> None:
        self._root = root
        self._offer = offer

    def _put(self, path: str | bytes, hint: Hint) -> None:
        path = os.fsdecode(path)
        if path and not _is_ignored_path(path, self._root):
            self._offer(path, hint)

    def on_closed(self, event: FileClosedEvent) -> None:
        self._put(event.src_path, Hint.CLOSED)

    def on_moved(self, event: FileSystemEvent) -> None:
        # A rename is atomic: a file renamed into place (from a .tmp name or from outside
        # incoming/) is complete.
        if not event.is_directory:
            self._put(event.dest_path, Hint.CLOSED)

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._put(event.src_path, Hint.CHANGED)

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:  # only the polling observer reports these (see filter)
            self._put(event.src_path, Hint.CHANGED)


class IncomingWatcher:
    """Owns the observer and the rescan thread for one incoming folder."""

    def __init__(
        self,
        incoming: Path,
        offer: Offer,
        config: IngestConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._incoming = incoming
        self._offer = offer
        self._config = config
        self._clock = clock
        self._stop = threading.Event()
        self._observer: BaseObserver | None = None
        self._rescanner = threading.Thread(target=self._rescan_loop, name="rescan", daemon=True)
        self.last_scan_found = 0

    def start(self) -> None:
        self._observer = self._make_observer()
        self._observer.start()
        # The observer runs before the first scan, so nothing falls between the two.
        self._rescanner.start()

    def _make_observer(self) -> BaseObserver:
        root = str(self._incoming)
        handler = _EnqueueHandler(root, self._offer)
        observer: BaseObserver
        if self._config.observer == "polling":
            observer = PollingObserver(timeout=self._config.polling_interval_seconds)
            event_filter = [FileCreatedEvent, FileModifiedEvent, FileMovedEvent, DirMovedEvent]
        else:
            # Full events: a file moved in from outside the watched tree arrives as a move,
            # not as a creation, so it needs no settling. No IN_MODIFY: a large file being
            # written would flood the queue, and settling is decided by stat, not by events.
            observer = InotifyObserver(generate_full_events=True)
            event_filter = [FileCreatedEvent, FileClosedEvent, FileMovedEvent, DirMovedEvent]
        observer.schedule(
            handler,
            root,
            recursive=True,
            event_filter=[*event_filter, DirCreatedEvent],
        )
        return observer

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
        if self._rescanner.is_alive():
            self._rescanner.join(timeout=10)

    def is_alive(self) -> bool:
        """The observer, its event emitters and the rescan thread all run. An inotify emitter
        stops for good when the watched folder is removed or unmounted."""
        observer = self._observer
        if observer is None or not observer.is_alive() or not self._rescanner.is_alive():
            return False
        return all(emitter.is_alive() for emitter in observer.emitters)

    def _rescan_loop(self) -> None:
        while not self._stop.is_set():
            try:
                started = time.monotonic()
                found = self.scan_once()
                logger.debug(
                    "scanned %s: %d files in %.2f s",
                    self._incoming,
                    found,
                    time.monotonic() - started,
                )
            except Exception:  # the scan is the failure boundary: try again next time
                logger.exception("scanning %s failed; trying again later", self._incoming)
            self._stop.wait(self._config.rescan_seconds)

    def scan_once(self) -> int:
        """Offer every file in incoming/ and remove subfolders that have been empty for
        empty_folder_grace_seconds. Returns the number of files offered."""
        found = self._scan_folder(str(self._incoming), is_root=True)
        self.last_scan_found = found
        return found

    def _scan_folder(self, folder: str, *, is_root: bool = False) -> int:
        found = 0
        entries = 0
        try:
            with os.scandir(folder) as listing:
                for entry in listing:
                    entries += 1
                    if self._stop.is_set():
                        return found
                    if is_ignored_name(entry.name):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        found += self._scan_folder(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        self._offer(entry.path, Hint.SCANNED)
                        found += 1
        except FileNotFoundError:
            return found
        if entries == 0 and not is_root:
            self._remove_if_long_empty(folder)
        return found

    def _remove_if_long_empty(self, folder: str) -> None:
        try:
            quiet_for = self._clock() - os.stat(folder).st_mtime
            if quiet_for >= self._config.empty_folder_grace_seconds:
                os.rmdir(folder)  # fails if something arrived meanwhile: then it stays
                logger.debug("removed empty folder %s", folder)
        except OSError as exc:  # not empty any more, or gone already: it stays or is gone
            logger.debug("kept folder %s: %s", folder, exc.strerror)
