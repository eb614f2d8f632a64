"""One file: settle -> validate -> sort -> dedup -> move -> catalog.

The ingest worker is the single writer of the catalog. Headers are read in worker processes
(pydicom is pure Python, and both cores are worth having); everything that touches the catalog
or moves a file happens in the worker thread, in batches:

1. one transaction inserts the instance rows and a journal row per move;
2. the files are moved into place (no-replace link + unlink, or copy + fsync + link);
3. one transaction clears the journal rows (or undoes the rows of files that did not move).

A crash anywhere leaves journal rows that `Archiver.recover` resolves at start-up, so every
file ends up archived exactly once or is still in incoming/ to be taken again.

A full disk is not a file's fault: when the archive's filesystem has less free space than
ingest.min_free, or a write or the catalog fails with "no space", the worker pauses. The files
wait in incoming/ (a batch that ran out of space is undone like any failed move, and never
quarantined), and ingest resumes by itself once the space is back.
"""

from __future__ import annotations

import heapq
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import sqlite3  # only to recognise "database or disk is full" (SQLITE_FULL) from the catalog
import stat
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from daemon import fsops
from daemon.catalog import ArchivedInstance, Catalog, StudyBeingDeletedError
from daemon.config import IngestConfig, SortingConfig, SpaceThreshold
from daemon.dicomfile import (
    IncompleteFileError,
    NotAcceptedError,
    data_set_offset,
    read_instance,
)
from daemon.layout import (
    alias_lookup,
    file_id_component,
    folder_key,
    physician_folder_name,
)
from daemon.model import (
    FileIdentity,
    Hint,
    IngestResult,
    InstanceHeader,
    Outcome,
    format_size,
    person_name_key,
)

logger = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".part", ".tmp")
SAME_UID_IN_BATCH = "another file with the same SOP Instance UID is in this batch"
# Outcome.RETRY detail of a file that did not fit: it stays in incoming/ until space returns.
NO_SPACE = "no space left on the filesystem"
STUDY_BEING_DELETED = "its study is being deleted by retention; tried again once it is gone"


def is_ignored_name(name: str) -> bool:
    """Hidden and temporary names are somebody's work in progress, never input."""
    return name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES)


# ---- free space ------------------------------------------------------------------------

FreeSpace = Callable[[], tuple[int, int]]  # () -> (free bytes, total bytes) of a filesystem


def free_space_of(path: Path) -> FreeSpace:
    """The reading of path's filesystem: bytes free to an unprivileged writer, and its size."""

    def reading() -> tuple[int, int]:
        usage = shutil.disk_usage(path)
        return usage.free, usage.total

    return reading


def space_pause_reason(archive: Path, free: int, total: int, config: IngestConfig) -> str:
    """Why ingest pauses with this reading of the archive's filesystem, or "" if it need not.
    `dcmdb status` can call this with its own reading to say what the daemon decides."""
    threshold: SpaceThreshold = config.min_free_threshold
    minimum = threshold.bytes_of(total)
    if free >= minimum:
        return ""
    return (
        f"archive filesystem {archive} has {format_size(free)} free, below ingest.min_free = "
        f"{_threshold_text(config.min_free, threshold, minimum)}"
    )


def is_out_of_space(error: BaseException) -> bool:
    """Whether error, or one it was raised from or while handling, says a filesystem is full:
    ENOSPC or EDQUOT from a write, SQLITE_FULL ("database or disk is full") from the catalog."""
    return out_of_space_cause(error) is not None


def out_of_space_cause(error: BaseException) -> BaseException | None:
    """The "no space" error in error's chain, if any. SQLite rolls a transaction back by itself
    on SQLITE_FULL, so the error that reaches a boundary may be the failed ROLLBACK after it."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in fsops.NO_SPACE_ERRNOS:
            return current
        if isinstance(current, sqlite3.Error):
            code = getattr(current, "sqlite_errorcode", None)
            if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
                return current
        current = current.__cause__ or current.__context__
    return None


def _threshold_text(written: str, threshold: SpaceThreshold, minimum: int) -> str:
    """ "4GiB" as written, or "5% (2.5 GiB)": a percentage with what it is on this filesystem."""
    written = written.strip()
    return f"{written} ({format_size(minimum)})" if threshold.kind == "percent" else written


# ---- reading (runs in worker processes) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileRead:
    """What reading one candidate file gave."""

    path: str
    header: InstanceHeader | None = None
    identity: FileIdentity | None = None
    rejection: str = ""  # why it cannot be taken
    incomplete: bool = False  # the rejection may go away: the file may still be written
    vanished: bool = False


def read_file(path: str) -> FileRead:
    try:
        header, identity = read_instance(Path(path))
    except IncompleteFileError as exc:
        return FileRead(path, rejection=exc.reason, incomplete=True)
    except NotAcceptedError as exc:
        return FileRead(path, rejection=exc.reason)
    except FileNotFoundError:
        return FileRead(path, vanished=True)
    except OSError as exc:
        # Permission denied and the like may be fixed by the writer (chmod after close):
        # treated as incomplete, so it is quarantined only if it stays that way.
        return FileRead(path, rejection=f"cannot read the file: {exc.strerror}", incomplete=True)
    return FileRead(path, header, identity)


def read_files(paths: list[str]) -> list[FileRead]:
    return [read_file(path) for path in paths]


class ParallelReader:
    """Reads headers in worker processes. `spawn`, not fork: the daemon has threads. Create it
    in the main thread (it sets signal dispositions while the processes start)."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn")
        )
        # The executor spawns a process only when no worker is idle, and counts idle workers
        # loosely: under a steady stream it would keep running on one. Start them all now,
        # with Ctrl-C and SIGTERM ignored: an ignored signal stays ignored across exec, and
        # Python then installs no handler, so a signal to the whole process group (a terminal,
        # systemd) is left to the daemon, which finishes the batch in hand with the readers'
        # help and then shuts them down.
        previous = {
            signum: signal.signal(signum, signal.SIG_IGN)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            started = [self._pool.submit(os.getpid) for _ in range(self.workers)]
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        for future in started:
            future.result()

    def submit(self, paths: list[str]) -> Future[list[FileRead]]:
        return self._pool.submit(read_files, paths)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def effective_workers(configured: int) -> int:
    """Reader processes for ingest.parse_workers: 0 means one per core but one, which is left
    to the daemon's own process (events, catalog, moves); always at least one."""
    return configured or max(1, (os.cpu_count() or 1) - 1)


# ---- filing (the single writer) --------------------------------------------------------


@dataclass(slots=True)
class _Staged:
    read: FileRead
    header: InstanceHeader
    identity: FileIdentity
    instance_row_id: int
    folder_id: int
    rel_path: str  # below the archive root, '/'-separated


class Archiver:
    """Files read instances into the archive and the catalog; quarantines what it cannot."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        archive: Path,
        quarantine: Path,
        incoming: Path | None,
        sorting: SortingConfig,
        keep_source: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._catalog = catalog
        self._archive = archive
        self._quarantine = quarantine
        self._incoming = incoming
        self._sorting = sorting
        self._aliases = alias_lookup(sorting.aliases)
        self._keep_source = keep_source
        self._clock = clock
        self._archive_root = os.fspath(archive)
        self._known_dirs: set[str] = set()
        # (moved, not moved) instance rows of a batch whose closing transaction failed (the
        # catalog's disk was full): settled before the next batch stages anything.
        self._unsettled: tuple[list[int], list[int]] | None = None
        self._quarantine_full_reported = False
        # The error of the last move that ran out of space (ENOSPC or EDQUOT), for the message.
        self.last_no_space_error: OSError | None = None

    @property
    def archive(self) -> Path:
        return self._archive

    @property
    def catalog_path(self) -> Path:
        return self._catalog.path

    # -- start-up --

    def recover(self) -> int:
        """Finish or undo the moves a crash interrupted; returns how many there were."""
        moves = self._catalog.pending_moves()
        finished: list[int] = []
        undone: list[int] = []
        for move in moves:
            target = self._archive / move.folder_name / move.rel_path
            source = Path(move.source_path)
            fsops.remove_temp_files_for(target)
            if not target.exists():
                # Never reached its place: the source is still where it was and is taken again.
                undone.append(move.instance_row_id)
                continue
            if not move.keep_source and source.exists() and _same_file_or_bytes(source, target):
                source.unlink()  # crashed between link and unlink
            finished.append(move.instance_row_id)
        if moves:
            with self._catalog.transaction():
                self._catalog.finish_moves(finished)
                self._catalog.undo_staged(undone)
            logger.info(
                "recovered %d interrupted moves: %d completed, %d undone (sources ingested again)",
                len(moves),
                len(finished),
                len(undone),
            )
        return len(moves)

    # -- one batch --

    def file_batch(self, reads: list[FileRead]) -> list[IngestResult]:
        """Archive, drop or quarantine each read instance. All reads must carry a header.

        Files that did not fit (ENOSPC/EDQUOT) come back as Outcome.RETRY with detail NO_SPACE,
        their rows undone; the catalog's own "disk is full" raises (see is_out_of_space) with
        nothing left half-done that the next call does not settle first."""
        self.settle_unfinished()
        results: list[IngestResult] = []
        staged: list[_Staged] = []
        duplicates: list[FileRead] = []
        conflicts: list[tuple[FileRead, str]] = []
        uids_in_batch: set[str] = set()
        folders_of_studies: dict[str, tuple[int, str]] = {}
        now = self._clock()
        with self._catalog.transaction():
            for read in reads:
                header, identity = _require_header(read)
                if header.sop_instance_uid in uids_in_batch:
                    # Two copies in one batch: compare with the first once it is in place.
                    results.append(IngestResult(read.path, Outcome.RETRY, SAME_UID_IN_BATCH))
                    continue
                uids_in_batch.add(header.sop_instance_uid)
                existing = self._catalog.find_instance(header.sop_instance_uid)
                if existing is not None:
                    conflict = self._compare_with_archived(read, header, existing)
                    if conflict:
                        conflicts.append((read, conflict))
                    else:
                        duplicates.append(read)
                        self._catalog.add_to_counter("duplicates")
                    continue
                folder = folders_of_studies.get(header.study_instance_uid)
                if folder is None:
                    folder = folders_of_studies[header.study_instance_uid] = self._folder_for(
                        header, now
                    )
                folder_id, folder_name = folder
                try:
                    row_id, rel_path = self._catalog.stage_instance(
                        header,
                        folder_id,
                        identity.size,
                        now,
                        read.path,
                        self._keep_source,
                        file_id_component,
                        _nothing_on_disk_below(f"{self._archive_root}/{folder_name}/"),
                    )
                except StudyBeingDeletedError:
                    # Retention is deleting this study right now: once it is gone, the
                    # instance starts a new study.
                    results.append(IngestResult(read.path, Outcome.RETRY, STUDY_BEING_DELETED))
                    continue
                staged.append(
                    _Staged(read, header, identity, row_id, folder_id, f"{folder_name}/{rel_path}")
                )
            self._catalog.mark_folders_changed({s.folder_id for s in staged}, now)

        moved, failed = self._move_staged(staged, results)
        if moved or failed:
            self._unsettled = (moved, failed)
            self.settle_unfinished()
        for read in duplicates:
            results.append(self._drop_duplicate(read))
        for read, reason in conflicts:
            results.append(self.quarantine(read.path, reason))
        return results

    def settle_unfinished(self) -> None:
        """Close the journal of the last batch if its closing transaction failed: the files
        that moved are archived, the rows of those that did not are undone (their files are in
        incoming/, and would otherwise look archived but missing when taken again)."""
        if self._unsettled is None:
            return
        moved, failed = self._unsettled
        with self._catalog.transaction():
            self._catalog.finish_moves(moved)
            self._catalog.undo_staged(failed)
        self._unsettled = None

    def _folder_for(self, header: InstanceHeader, now: float) -> tuple[int, str]:
        placement = self._catalog.study_placement(header.study_instance_uid)
        if placement is not None:
            # A study never spans two folders: its first instance decided.
            return placement.folder_id, placement.folder_name
        name = self._aliases.get(person_name_key(header.referring_physician_name))
        if name is None:
            name = physician_folder_name(
                header.referring_physician_name,
                template=self._sorting.folder_template,
                unknown_folder=self._sorting.unknown_folder,
                max_length=self._sorting.max_folder_length,
            )
        return self._catalog.folder_named(name, folder_key(name), now)

    def _move_staged(
        self, staged: list[_Staged], results: list[IngestResult]
    ) -> tuple[list[int], list[int]]:
        moved: list[int] = []
        failed: list[int] = []
        out_of_space = False
        for item in staged:
            source = item.read.path
            target = f"{self._archive_root}/{item.rel_path}"
            if out_of_space:
                # The rest would fail the same way, or squeeze into what little is left.
                failed.append(item.instance_row_id)
                results.append(IngestResult(source, Outcome.RETRY, NO_SPACE))
                continue
            try:
                if _identity_now(source) != item.identity:
                    failed.append(item.instance_row_id)
                    results.append(IngestResult(source, Outcome.RETRY, "changed"))
                    continue
                self._place(source, target)
            except FileNotFoundError:
                failed.append(item.instance_row_id)
                logger.warning("%s vanished before it could be archived", source)
                results.append(IngestResult(source, Outcome.RETRY, "vanished"))
                continue
            except OSError as exc:
                if not is_out_of_space(exc):
                    failed.append(item.instance_row_id)
                    self._log_move_failure(source, target, item)
                    results.append(IngestResult(source, Outcome.RETRY, "move failed"))
                    continue
                # Not the file's fault: it and the rest of the batch wait in incoming/ (the
                # copy's temp file is gone: copy_no_replace removes it whatever happens).
                out_of_space = True
                self.last_no_space_error = exc
                failed.append(item.instance_row_id)
                logger.debug("no space to write %s: %s", target, exc.strerror)
                results.append(IngestResult(source, Outcome.RETRY, NO_SPACE))
                continue
            except Exception:
                failed.append(item.instance_row_id)
                self._log_move_failure(source, target, item)
                results.append(IngestResult(source, Outcome.RETRY, "move failed"))
                continue
            moved.append(item.instance_row_id)
            results.append(IngestResult(source, Outcome.ARCHIVED, item.rel_path))
        return moved, failed

    @staticmethod
    def _log_move_failure(source: str, target: str, item: _Staged) -> None:
        logger.exception(
            "could not move %s to %s (SOP Instance UID %s); it stays in incoming and is tried "
            "again",
            source,
            target,
            item.header.sop_instance_uid,
        )

    def _place(self, source: str, target: str) -> None:
        parent = os.path.dirname(target)
        if parent not in self._known_dirs:
            os.makedirs(parent, exist_ok=True)
            self._known_dirs.add(parent)
        try:
            self._transfer(source, target)
        except FileNotFoundError:
            if not os.path.exists(source):
                raise
            # The folder went away under us (pruned): make it again.
            os.makedirs(parent, exist_ok=True)
            self._transfer(source, target)

    def _transfer(self, source: fsops.StrPath, target: fsops.StrPath) -> None:
        if self._keep_source:
            fsops.copy_no_replace(source, target)
        else:
            fsops.move_no_replace(source, target)

    def _compare_with_archived(
        self, read: FileRead, header: InstanceHeader, existing: ArchivedInstance
    ) -> str:
        """ "" when read holds the same data set as the archived instance, else why not."""
        archived = self._archive / existing.folder_name / existing.rel_path
        where = f"{existing.folder_name}/{existing.rel_path}"
        try:
            offset = data_set_offset(archived)
            same = _same_bytes_from(Path(read.path), header.data_set_offset, archived, offset)
        except FileNotFoundError:
            return (
                f"conflict: SOP Instance UID {header.sop_instance_uid} is in the catalog at "
                f"{where}, but that file is missing: run `dcmdb check`, then ingest this file "
                "again"
            )
        if same:
            return ""
        return (
            f"conflict: SOP Instance UID {header.sop_instance_uid} is already archived at {where} "
            "with different content; the archived copy was kept. Compare the two (e.g. with "
            "dcmdump) and, if this one is right, remove the archived one and ingest this file "
            "again"
        )

    def _drop_duplicate(self, read: FileRead) -> IngestResult:
        if not self._keep_source:
            Path(read.path).unlink(missing_ok=True)
        logger.debug("dropped %s: identical to the archived instance", read.path)
        return IngestResult(read.path, Outcome.DUPLICATE, "identical to the archived instance")

    # -- quarantine --

    def quarantine(self, path: str, reason: str) -> IngestResult:
        """Move path to quarantine/ with a .reason.txt beside it and record it."""
        source = Path(path)
        now = self._clock()
        relative = Path(source.name)
        if self._incoming is not None and source.is_relative_to(self._incoming):
            relative = source.relative_to(self._incoming)
        target = self._quarantine / relative
        written: Path | None = None  # the reason file this call wrote
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            for suffix in range(1, 100_000):
                reason_file = target.with_name(target.name + ".reason.txt")
                if not os.path.lexists(target) and not os.path.lexists(reason_file):
                    fsops.write_bytes_atomically(
                        reason_file, _reason_text(path, reason, now).encode()
                    )
                    written = reason_file
                    try:
                        self._transfer(source, target)
                        break
                    except FileExistsError:  # someone else took the name meanwhile
                        reason_file.unlink(missing_ok=True)
                        written = None
                    except FileNotFoundError:
                        reason_file.unlink(missing_ok=True)
                        return IngestResult(path, Outcome.RETRY, "vanished")
                target = self._quarantine / relative.with_name(f"{relative.name}.{suffix}")
        except OSError as exc:
            if not is_out_of_space(exc):
                raise
            # The file stays in incoming/, whole; the next scan offers it again.
            if written is not None:
                written.unlink(missing_ok=True)
            self._report_quarantine_full(path, exc)
            return IngestResult(path, Outcome.RETRY, NO_SPACE)
        with self._catalog.transaction():
            self._catalog.record_quarantine(path, str(target), reason, now)
        self._quarantine_full_reported = False
        logger.warning("quarantined %s as %s: %s", path, target, reason)
        return IngestResult(path, Outcome.QUARANTINED, reason)

    def _report_quarantine_full(self, path: str, error: OSError) -> None:
        # One warning until a quarantine succeeds again, not one per file and attempt.
        log = logger.debug if self._quarantine_full_reported else logger.warning
        self._quarantine_full_reported = True
        log(
            "cannot quarantine %s: %s in %s; it stays in incoming and is tried again after the "
            "next scan. Free space there",
            path,
            error.strerror,
            self._quarantine,
        )


def _require_header(read: FileRead) -> tuple[InstanceHeader, FileIdentity]:
    if read.header is None or read.identity is None:
        raise ValueError(f"{read.path} has no header to archive")
    return read.header, read.identity


def _nothing_on_disk_below(root: str) -> Callable[[str], bool]:
    """A File ID is free only if no file is there either: a stray file left by a crash or a
    person is never overwritten (`dcmdb check` reports it). root ends with '/'."""

    def is_free(rel_path: str) -> bool:
        return not os.path.lexists(root + rel_path)

    return is_free


def _identity_now(path: str) -> FileIdentity:
    st = os.stat(path)
    return FileIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _same_bytes_from(first: Path, first_offset: int, second: Path, second_offset: int) -> bool:
    """Whether the two files hold the same bytes from the given offsets to their ends: the same
    data set, whatever File Meta each was written with (PS3.10 7.1)."""
    if first.stat().st_size - first_offset != second.stat().st_size - second_offset:
        return False
    with open(first, "rb") as a, open(second, "rb") as b:
        a.seek(first_offset)
        b.seek(second_offset)
        while True:
            chunk_a = a.read(1 << 20)
            if chunk_a != b.read(1 << 20):
                return False
            if not chunk_a:
                return True


def _same_file_or_bytes(first: Path, second: Path) -> bool:
    return os.path.samefile(first, second) or _same_bytes_from(first, 0, second, 0)


def _reason_text(path: str, reason: str, now: float) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    return (
        f"file: {path}\n"
        f"quarantined: {when}\n"
        f"reason: {reason}\n"
        "\n"
        "dcmdb did not archive this file. Fix what the reason says and put the file back in the\n"
        "incoming folder (or run `dcmdb ingest FILE`), or delete it together with this note.\n"
    )


# ---- settling: when is a file ready to be read? ----------------------------------------

Signature = tuple[int, int, int]  # (size, mtime_ns, inode)


@dataclass(slots=True)
class _Tracked:
    closed: bool = False  # close-write or move-in seen since the last read
    signature: Signature | None = None
    stable_since: float = 0.0
    reading: bool = False
    due: float = 0.0
    incomplete_reason: str = ""
    read_signature: Signature | None = None


@dataclass(slots=True)
class SettleDecisions:
    to_read: list[str] = field(default_factory=list)
    to_quarantine: list[tuple[str, str]] = field(default_factory=list)


def file_signature(path: str) -> Signature | None:
    """(size, mtime, inode) of a regular file, or None if it is gone or not a regular file."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class SettleTracker:
    """Decides when each file in incoming/ is ready to be read, and when a file that stays
    incomplete is given up on. Times are monotonic seconds; the stat function is injected."""

    def __init__(
        self,
        settle_seconds: float,
        incomplete_timeout_seconds: float,
        signature: Callable[[str], Signature | None] = file_signature,
    ) -> None:
        self._settle = settle_seconds
        self._incomplete_timeout = incomplete_timeout_seconds
        self._recheck = max(0.2, min(settle_seconds, 5.0))
        self._signature = signature
        self._files: dict[str, _Tracked] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._files)

    def _schedule(self, path: str, entry: _Tracked, when: float) -> None:
        entry.due = when
        heapq.heappush(self._heap, (when, path))

    def note(self, path: str, hint: Hint, now: float) -> None:
        entry = self._files.get(path)
        if entry is None:
            entry = self._files[path] = _Tracked()
        elif hint is Hint.SCANNED:
            return  # a rescan tells nothing new about a file we already follow
        if hint is Hint.CLOSED:
            entry.closed = True
        if not entry.reading and (entry.due > now or entry.due == 0.0):
            self._schedule(path, entry, now)

    def forget(self, path: str) -> None:
        self._files.pop(path, None)

    def retry(self, path: str, now: float, delay: float = 0.0) -> None:
        entry = self._files.get(path)
        if entry is None:
            return
        entry.reading = False
        entry.closed = True
        self._schedule(path, entry, now + delay)

    def seconds_until_due(self, now: float) -> float | None:
        while self._heap:
            when, path = self._heap[0]
            entry = self._files.get(path)
            if entry is None or entry.reading or entry.due != when:
                heapq.heappop(self._heap)  # stale
                continue
            return max(0.0, when - now)
        return None

    def poll(self, now: float) -> SettleDecisions:
        decisions = SettleDecisions()
        while self._heap and self._heap[0][0] <= now:
            when, path = heapq.heappop(self._heap)
            entry = self._files.get(path)
            if entry is None or entry.reading or entry.due != when:
                continue
            self._decide(path, entry, now, decisions)
        return decisions

    def _decide(self, path: str, entry: _Tracked, now: float, decisions: SettleDecisions) -> None:
        signature = self._signature(path)
        if signature is None:
            self.forget(path)
            return
        if signature != entry.signature:
            entry.signature = signature
            entry.stable_since = now
        if entry.incomplete_reason and signature == entry.read_signature and not entry.closed:
            # Read before and found incomplete, and nothing happened since.
            if now - entry.stable_since >= self._incomplete_timeout:
                self.forget(path)
                decisions.to_quarantine.append((path, entry.incomplete_reason))
            else:
                deadline = entry.stable_since + self._incomplete_timeout
                self._schedule(path, entry, min(deadline, now + self._recheck))
            return
        if entry.closed or now - entry.stable_since >= self._settle:
            entry.reading = True
            entry.closed = False
            entry.read_signature = signature
            decisions.to_read.append(path)
        else:
            self._schedule(path, entry, entry.stable_since + self._settle)

    def read_done(self, read: FileRead, now: float) -> str | None:
        """Record what a read found; returns a reason when the file is to be quarantined now."""
        entry = self._files.get(read.path)
        if entry is None:
            return None
        entry.reading = False
        if read.vanished:
            self.forget(read.path)
        elif read.incomplete:
            entry.incomplete_reason = read.rejection
            self._schedule(read.path, entry, now if entry.closed else now + self._recheck)
        elif read.rejection:
            self.forget(read.path)
            return read.rejection
        return None


# ---- the worker thread -----------------------------------------------------------------

# Advice in the pause warning, by what ran out of space.
_ARCHIVE_ADVICE = "Free space, or configure [retention]"
_CATALOG_ADVICE = "Free space on the filesystem of paths.state"
# Failed writes in a row back off from no_space_backoff_seconds, doubling up to this.
_MAX_NO_SPACE_BACKOFF_SECONDS = 300.0


@dataclass(slots=True)
class _NoSpace:
    """A write ran out of space although the reading allowed it (a quota, a batch larger than
    min_free, the catalog's own disk): the reading alone resumes ingest only once it has risen
    by what did not fit; otherwise ingest tries again after the back-off."""

    free_needed: int | None  # None: only the back-off (what filled up is not the archive)
    retry_at: float  # monotonic
    backoff: float


class IngestWorker(threading.Thread):
    """Takes paths from the queue (fed by the watcher), settles them, reads them in worker
    processes, and files them through the Archiver in batches.

    Before each batch it reads the archive's free space (`free_space`, injectable: a fact from
    outside); below ingest.min_free, or after a write or the catalog ran out of space, it
    pauses: it takes no file (they wait in incoming/), re-reads every `space_recheck_seconds`
    and resumes by itself. `paused` and `pause_reason` tell the rest of the daemon."""

    def __init__(
        self,
        archiver: Archiver,
        reader: ParallelReader,
        config: IngestConfig,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        free_space: FreeSpace | None = None,
        space_recheck_seconds: float = 5.0,
        no_space_backoff_seconds: float = 30.0,
    ) -> None:
        super().__init__(name="ingest-worker", daemon=True)
        self._archiver = archiver
        self._reader = reader
        self._config = config
        self._batch_size = config.batch_size
        self._tracker = SettleTracker(config.settle_seconds, config.incomplete_timeout_seconds)
        self._monotonic = monotonic
        self._queue: queue.SimpleQueue[tuple[str, Hint] | Future[list[FileRead]] | None] = (
            queue.SimpleQueue()
        )
        self._stopping = threading.Event()
        self._waiting_reads: list[str] = []
        self._in_flight = 0
        self._max_in_flight = reader.workers * 2
        self.counts: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        self._free_space = free_space or free_space_of(archiver.archive)
        self._space_recheck = space_recheck_seconds
        self._no_space_backoff = no_space_backoff_seconds
        self._paused = False
        self._pause_reason = ""
        self._pause_announced = False  # the warning is logged; the info line on resume is owed
        self._next_space_check = 0.0
        self._no_space: _NoSpace | None = None

    # Called from other threads: only enqueue, or read a flag.
    def offer(self, path: str, hint: Hint) -> None:
        self._queue.put((path, hint))

    def stop(self) -> None:
        self._stopping.set()
        self._queue.put(None)

    @property
    def pending(self) -> int:
        return len(self._tracker)

    @property
    def paused(self) -> bool:
        """Whether ingest waits for space: files stay in incoming/ until it returns."""
        return self._paused

    @property
    def pause_reason(self) -> str:
        """Why ingest is paused (the warning's first part), or "" while it runs."""
        return self._pause_reason

    def run(self) -> None:
        logger.info("ingest worker started (%d reader processes)", self._reader.workers)
        while True:
            stopping = self._stopping.is_set()
            if stopping and self._in_flight == 0:
                break
            self._take_from_queue(self._wait_time(stopping))
            if not self._stopping.is_set() and self._may_take_files():
                self._poll_tracker()
                self._submit_reads()
        logger.info(
            "ingest worker stopped: %s",
            ", ".join(f"{o.value}={n}" for o, n in self.counts.items()),
        )

    def _wait_time(self, stopping: bool) -> float:
        if stopping:
            return 0.5
        if self._paused:  # only the next reading of the free space is due
            return min(max(0.0, self._next_space_check - self._monotonic()), 1.0)
        if self._waiting_reads and self._in_flight < self._max_in_flight:
            return 0.0
        due = self._tracker.seconds_until_due(self._monotonic())
        return 1.0 if due is None else min(due, 1.0)

    def _take_from_queue(self, timeout: float) -> None:
        items: list[tuple[str, Hint] | Future[list[FileRead]] | None] = []
        try:
            items.append(self._queue.get(timeout=timeout) if timeout else self._queue.get_nowait())
            while len(items) < 10_000:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        now = self._monotonic()
        reads: list[FileRead] = []
        for item in items:
            if item is None:
                continue
            if isinstance(item, Future):
                self._in_flight -= 1
                reads.extend(self._result_of(item))
            else:
                self._tracker.note(item[0], item[1], now)
        if reads:
            self._handle_reads(reads)

    def _result_of(self, future: Future[list[FileRead]]) -> list[FileRead]:
        try:
            return future.result()
        except Exception:  # a reader process died: its files are looked at again later
            logger.exception("a header reader process failed; its files are retried")
            return []

    def _poll_tracker(self) -> None:
        now = self._monotonic()
        decisions = self._tracker.poll(now)
        for path, reason in decisions.to_quarantine:
            self._quarantine(path, f"incomplete: {reason}")
        self._waiting_reads.extend(decisions.to_read)

    def _submit_reads(self) -> None:
        while self._waiting_reads and self._in_flight < self._max_in_flight:
            # Small chunks when little is waiting (latency), large ones for a backlog.
            size = max(1, min(64, len(self._waiting_reads) // self._reader.workers))
            chunk, self._waiting_reads = (
                self._waiting_reads[:size],
                self._waiting_reads[size:],
            )
            future = self._reader.submit(chunk)
            self._in_flight += 1
            future.add_done_callback(self._queue.put)

    def _handle_reads(self, reads: list[FileRead]) -> None:
        now = self._monotonic()
        good: list[FileRead] = []
        for read in reads:
            if read.header is not None:
                good.append(read)
                continue
            reason = self._tracker.read_done(read, now)
            if reason is not None:
                self._quarantine(read.path, reason)
        for start in range(0, len(good), self._batch_size):
            self._file_batch(good[start : start + self._batch_size])

    def _file_batch(self, batch: list[FileRead]) -> None:
        now = self._monotonic()
        if not self._space_allows(now):
            self._hold(batch, now)
            return
        try:
            results = self._archiver.file_batch(batch)
        except Exception as exc:  # the batch is the failure boundary: its files stay put
            cause = out_of_space_cause(exc)
            if cause is not None:
                self._hold(batch, now)
                self._pause_for_no_space(
                    None,
                    f"the catalog {self._archiver.catalog_path} cannot be written ({cause})",
                    _CATALOG_ADVICE,
                )
                return
            logger.exception(
                "filing a batch of %d files failed; they stay in incoming and are retried in 30 s",
                len(batch),
            )
            for read in batch:
                self._tracker.retry(read.path, now, delay=30.0)
            return
        sizes = {read.path: read.identity.size for read in batch if read.identity is not None}
        unplaced = 0
        archived = False
        for result in results:
            self._count(result)
            if result.outcome is Outcome.RETRY:
                # Taken again without waiting for an event (after a pause: once it ends).
                self._tracker.retry(result.source, now, delay=0.5)
                if result.detail == NO_SPACE:
                    unplaced += sizes.get(result.source, 0)
            else:
                self._tracker.forget(result.source)
                archived = archived or result.outcome is Outcome.ARCHIVED
        if unplaced:
            self._pause_for_no_space(unplaced, "", _ARCHIVE_ADVICE, progressed=archived)
        elif archived and self._no_space is not None:
            self._no_space = None  # a batch fitted: the space is back
            self._announce_resume()

    def _hold(self, batch: list[FileRead], now: float) -> None:
        """Leave the batch's files in incoming/, to be read again once ingest takes files."""
        for read in batch:
            self._tracker.retry(read.path, now)

    def _quarantine(self, path: str, reason: str) -> None:
        try:
            result = self._archiver.quarantine(path, reason)
        except Exception:  # one file's boundary: it stays in incoming/ for the next scan
            logger.exception(
                "could not quarantine %s (%s); it stays in incoming and is tried again after "
                "the next scan",
                path,
                reason,
            )
            return
        self._count(result)

    def _count(self, result: IngestResult) -> None:
        self.counts[result.outcome] += 1
        if result.outcome is Outcome.ARCHIVED:
            logger.debug("archived %s as %s", result.source, result.detail)

    # -- pausing for space --

    def _may_take_files(self) -> bool:
        return not self._paused or self._space_allows(self._monotonic())

    def _read_free_space(self) -> tuple[int, int] | None:
        try:
            return self._free_space()
        except OSError as exc:
            # Unknown is not full: the moves themselves say what is wrong with the archive.
            logger.debug("cannot read the free space of %s: %s", self._archiver.archive, exc)
            return None

    def _space_allows(self, now: float) -> bool:
        """Whether files may be taken now. Reads the archive's free space (while paused, only
        every space_recheck_seconds) and pauses or resumes ingest as it says."""
        if self._paused and now < self._next_space_check:
            return False
        self._next_space_check = now + self._space_recheck
        reading = self._read_free_space()
        if reading is not None:
            free, total = reading
            reason = space_pause_reason(self._archiver.archive, free, total, self._config)
            if reason:
                self._pause(reason, _ARCHIVE_ADVICE)
                return False
        no_space = self._no_space
        if no_space is not None:
            needed = no_space.free_needed
            if reading is not None and needed is not None and reading[0] >= needed:
                self._no_space = None  # what did not fit fits now
            elif now < no_space.retry_at:
                return False
        if self._paused:
            self._paused = False
            self._pause_reason = ""
            if self._no_space is None:
                self._announce_resume(reading)
            else:  # announced once a batch fits: it may run out of space again at once
                logger.debug("trying again after %.0f s of no space", self._no_space.backoff)
        return True

    def _pause(self, reason: str, advice: str) -> None:
        self._pause_reason = reason
        self._paused = True
        if self._pause_announced:
            logger.debug("ingest still paused: %s", reason)
            return
        self._pause_announced = True
        logger.warning(
            "%s: ingest paused; %d files wait in incoming. %s", reason, self.pending, advice
        )

    def _pause_for_no_space(
        self, unplaced: int | None, reason: str, advice: str, *, progressed: bool = False
    ) -> None:
        """A write failed for want of space: pause, whatever the reading says, until it has
        risen by `unplaced` bytes (None: never mind the reading) or the back-off passed."""
        now = self._monotonic()
        previous = self._no_space
        backoff = self._no_space_backoff
        if previous is not None and not progressed:  # failed again at once: wait longer
            backoff = min(previous.backoff * 2, _MAX_NO_SPACE_BACKOFF_SECONDS)
        reading = self._read_free_space()
        free_needed = None
        if unplaced is not None and reading is not None:
            free_needed = reading[0] + unplaced
        self._no_space = _NoSpace(free_needed, now + backoff, backoff)
        self._next_space_check = now + self._space_recheck
        if not reason:
            archive = self._archiver.archive
            if reading is not None:
                reason = space_pause_reason(archive, reading[0], reading[1], self._config)
            if not reason:
                # The reading allowed the batch: say what the write said (a quota, say).
                error = self._archiver.last_no_space_error
                what = error.strerror if error is not None else "no space"
                free = "?" if reading is None else format_size(reading[0])
                reason = (
                    f"archive filesystem {archive} ran out of space: {what} ({free} free, "
                    f"ingest.min_free = {self._config.min_free}; {format_size(unplaced or 0)} did "
                    "not fit)"
                )
        self._pause(reason, advice)

    def _announce_resume(self, reading: tuple[int, int] | None = None) -> None:
        if not self._pause_announced:
            return
        self._pause_announced = False
        reading = reading or self._read_free_space()
        free = "?" if reading is None else format_size(reading[0])
        logger.info(
            "ingest resumed (archive filesystem %s has %s free); %d files wait in incoming",
            self._archiver.archive,
            free,
            self.pending,
        )


def ingest_paths(
    archiver: Archiver,
    reader: ParallelReader,
    paths: Iterable[str],
    *,
    batch_size: int,
    progress: Callable[[IngestResult], None],
) -> dict[Outcome, int]:
    """One-shot import of the given files through the same reading and filing code as the
    daemon. Files are taken as they are: an incomplete one is quarantined at once. Once the
    archive is out of space, the remaining instances are not tried: each is reported as
    Outcome.RETRY with detail NO_SPACE, and left where it is."""
    counts: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
    chunks: list[Future[list[FileRead]]] = []
    chunk: list[str] = []
    out_of_space = False

    def file_all(reads: list[FileRead]) -> None:
        nonlocal out_of_space
        while reads:
            if out_of_space:
                for read in reads:
                    counts[Outcome.RETRY] += 1
                    progress(IngestResult(read.path, Outcome.RETRY, NO_SPACE))
                return
            by_path = {read.path: read for read in reads}
            reads = []
            for result in archiver.file_batch(list(by_path.values())):
                if result.outcome is Outcome.RETRY and result.detail == SAME_UID_IN_BATCH:
                    reads.append(by_path[result.source])  # filed after its twin, in a new batch
                    continue
                if result.outcome is Outcome.RETRY and result.detail == NO_SPACE:
                    out_of_space = True
                counts[result.outcome] += 1
                progress(result)

    def finish(future: Future[list[FileRead]]) -> None:
        good: list[FileRead] = []
        for read in future.result():
            if read.header is not None:
                good.append(read)
                continue
            if read.vanished:
                result = IngestResult(read.path, Outcome.RETRY, "vanished")
            else:
                prefix = "incomplete: " if read.incomplete else ""
                result = archiver.quarantine(read.path, prefix + read.rejection)
            counts[result.outcome] += 1
            progress(result)
        file_all(good)

    for path in paths:
        chunk.append(path)
        if len(chunk) >= batch_size:
            chunks.append(reader.submit(chunk))
            chunk = []
            if len(chunks) > reader.workers * 2:
                finish(chunks.pop(0))
    if chunk:
        chunks.append(reader.submit(chunk))
    for future in chunks:
        finish(future)
    return counts
