"""A full disk pauses ingest: files wait in incoming/, nothing is lost, half-written or
quarantined, and ingest resumes by itself when space returns.

The acceptance tests run on a real small filesystem: a tmpfs mounted for the test, which needs
root (CI runs the tests as root). The pause logic itself is also tested in-process, with the
free-space reading injected (a fact from outside) and everything else real.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from daemon.catalog import Catalog
from daemon.config import IngestConfig, SortingConfig
from daemon.fsops import TEMP_PREFIX
from daemon.ingest import (
    NO_SPACE,
    Archiver,
    IngestWorker,
    ParallelReader,
    is_out_of_space,
    read_file,
    space_pause_reason,
)
from daemon.model import Hint, Outcome
from tests.conftest import (
    IN_CI,
    Daemon,
    Volume,
    check_is_clean,
    drop_into,
    wait_for,
    write_config,
)
from tests.factory import SeriesSpec, write_series

MiB = 1024 * 1024
GiB = 1024 * MiB
StartDaemon = Callable[[], Daemon]
Mount = Callable[[Path, str], Path]


# ---- helpers ---------------------------------------------------------------------------


@pytest.fixture
def mount_tmpfs() -> Iterator[Mount]:
    """Mount a tmpfs of the given size (e.g. "24m") on an existing empty folder; unmounted at
    teardown. Needs root: skips without it, fails under CI=true (CI runs as root)."""
    mounted: list[Path] = []

    def mount(where: Path, size: str) -> Path:
        problem = ""
        if os.geteuid() != 0:
            problem = "mounting a small tmpfs needs root (CI runs this test as root)"
        elif shutil.which("mount") is None or shutil.which("umount") is None:
            problem = "mount/umount not found"
        if not problem:
            result = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode == 0:
                mounted.append(where)
                return where
            problem = f"cannot mount a tmpfs on {where}: {result.stderr.strip()}"
        if IN_CI:
            pytest.fail(problem)
        pytest.skip(problem)

    yield mount
    for where in reversed(mounted):
        if subprocess.run(["umount", str(where)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)  # busy: detach it now


def _fill(path: Path, size: int) -> None:
    """A file of `size` bytes that really takes the space (written, not sparse)."""
    block = bytes(MiB)
    with open(path, "wb") as out:
        left = size
        while left > 0:
            left -= out.write(block[: min(left, len(block))])


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _temp_instances(archive: Path) -> list[Path]:
    """Instance copies in progress or left behind (the DICOMDIR writer's own temp files, at a
    folder's root, come and go as it retries on a full disk)."""
    return sorted(archive.glob(f"*/DICOM/**/{TEMP_PREFIX}*"))


def _unchanged_for(seconds: float, measure: Callable[[], object]) -> Callable[[], bool]:
    """A wait_for predicate: true once measure() has returned the same value for `seconds`."""
    last: list[object] = [object(), 0.0]

    def unchanged() -> bool:
        value, now = measure(), time.monotonic()
        if value != last[0]:
            last[:] = [value, now]
            return False
        return now - float(last[1]) >= seconds  # type: ignore[arg-type]

    return unchanged


def _archiver(catalog: Catalog, volume: Volume) -> Archiver:
    return Archiver(
        catalog,
        archive=volume.archive,
        quarantine=volume.quarantine,
        incoming=volume.incoming,
        sorting=SortingConfig(),
    )


# ---- the decision, and what counts as "no space" ---------------------------------------


def test_the_pause_reason_names_the_filesystem_the_free_space_and_the_threshold_as_written(
    tmp_path: Path,
) -> None:
    by_size = IngestConfig(min_free="1GiB")
    assert space_pause_reason(tmp_path, GiB, 100 * GiB, by_size) == ""
    reason = space_pause_reason(tmp_path, GiB - 1, 100 * GiB, by_size)
    assert reason == (
        f"archive filesystem {tmp_path} has 1024.0 MiB free, below ingest.min_free = 1GiB"
    )
    by_share = IngestConfig(min_free="5%")
    assert space_pause_reason(tmp_path, 5 * GiB, 100 * GiB, by_share) == ""
    assert space_pause_reason(tmp_path, 4 * GiB, 100 * GiB, by_share).endswith(
        "has 4.0 GiB free, below ingest.min_free = 5% (5.0 GiB)"
    )


def test_enospc_edquot_and_a_full_catalog_count_as_out_of_space_and_other_errors_do_not(
    tmp_path: Path,
) -> None:
    assert is_out_of_space(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert is_out_of_space(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    assert not is_out_of_space(OSError(errno.EACCES, os.strerror(errno.EACCES)))
    assert not is_out_of_space(ValueError("no space"))
    # A real SQLITE_FULL: a database not allowed to grow past its current size.
    db = sqlite3.connect(tmp_path / "full.sqlite")
    try:
        db.execute("CREATE TABLE t (x)")
        db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
        with pytest.raises(sqlite3.OperationalError) as full:
            db.execute("INSERT INTO t VALUES (?)", (bytes(100_000),))
    finally:
        db.close()
    assert is_out_of_space(full.value)
    # Also when it is only the context of the error that reached the boundary (a ROLLBACK
    # that failed after it, say).
    with pytest.raises(sqlite3.OperationalError, match="cannot rollback") as outer:
        _rollback_failing_after(full.value)
    assert is_out_of_space(outer.value)


def _rollback_failing_after(error: Exception) -> None:
    try:
        raise error
    except sqlite3.OperationalError:
        raise sqlite3.OperationalError("cannot rollback - no transaction is active")  # noqa: B904


# ---- the worker, in-process, with the free-space reading injected ----------------------


class _Reading:
    """The archive filesystem's (free, total), as the test says; counts how often it is read."""

    def __init__(self, free: int, total: int) -> None:
        self.free = free
        self.total = total
        self.reads = 0
        self._lock = threading.Lock()

    def __call__(self) -> tuple[int, int]:
        with self._lock:
            self.reads += 1
            return self.free, self.total


@pytest.fixture
def reader() -> Iterator[ParallelReader]:
    reader = ParallelReader(1)
    yield reader
    reader.shutdown()


def _start_worker(
    catalog: Catalog,
    volume: Volume,
    reader: ParallelReader,
    reading: _Reading,
    files: list[Path],
    *,
    no_space_backoff_seconds: float = 30.0,
) -> IngestWorker:
    """A worker with every file already offered, as if it were found by the start-up scan."""
    worker = IngestWorker(
        _archiver(catalog, volume),
        reader,
        IngestConfig(settle_seconds=0.1, incomplete_timeout_seconds=5.0, min_free="1MiB"),
        free_space=reading,
        space_recheck_seconds=0.05,
        no_space_backoff_seconds=no_space_backoff_seconds,
    )
    for path in files:
        worker.offer(str(path), Hint.CLOSED)
    worker.start()
    return worker


def _stop(worker: IngestWorker) -> None:
    worker.stop()
    worker.join(timeout=30)
    assert not worker.is_alive()


def test_the_worker_takes_no_file_below_min_free_and_resumes_by_itself_when_space_returns(
    volume: Volume,
    reader: ParallelReader,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.ingest")
    files = [
        shutil.copyfile(path, volume.incoming / path.name)
        for path in write_series(tmp_path / "series", SeriesSpec(slices=5))
    ]
    reading = _Reading(free=512 * 1024, total=100 * GiB)
    catalog = Catalog(volume.state)
    worker = _start_worker(catalog, volume, reader, reading, files)
    try:
        wait_for(lambda: worker.paused, what="ingest to pause")
        assert "below ingest.min_free = 1MiB" in worker.pause_reason
        # Several more readings while paused: still nothing taken.
        seen = reading.reads
        wait_for(lambda: reading.reads >= seen + 5, what="the worker to re-read free space")
        assert worker.paused
        assert sorted(volume.incoming.iterdir()) == sorted(files)
        assert volume.archived_files() == []
        assert volume.quarantined_files() == []

        reading.free = 2 * GiB  # someone freed space
        wait_for(
            lambda: len(volume.archived_files()) == 5 and not list(volume.incoming.iterdir()),
            what="the waiting files to be archived without a new filesystem event",
        )
        assert not worker.paused
        assert worker.pause_reason == ""
    finally:
        _stop(worker)
        catalog.close()
    assert volume.count("instances") == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"archive filesystem {volume.archive} has 512.0 KiB free, below ingest.min_free = "
        "1MiB: ingest paused; 5 files wait in incoming. Free space, or configure [retention]"
    ]
    resumed = [r.getMessage() for r in caplog.records if "resumed" in r.getMessage()]
    assert resumed == [
        f"ingest resumed (archive filesystem {volume.archive} has 2.0 GiB free); "
        "5 files wait in incoming"
    ]


def test_a_full_catalog_pauses_the_worker_which_retries_after_the_back_off(
    volume: Volume,
    reader: ParallelReader,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The catalog's disk is full (simulated by SQLite's own limit, a real SQLITE_FULL): the
    # archive's reading says nothing about it, so only the back-off ends the pause.
    files = [
        shutil.copyfile(path, volume.incoming / path.name)
        for path in write_series(tmp_path / "series", SeriesSpec(slices=60, rows=8, columns=8))
    ]
    catalog = Catalog(volume.state)
    db = catalog._db  # the test's stand-in for a full disk: no more pages
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
    reading = _Reading(free=100 * GiB, total=200 * GiB)
    worker = _start_worker(catalog, volume, reader, reading, files, no_space_backoff_seconds=0.3)
    try:
        wait_for(lambda: worker.paused, what="ingest to pause on the full catalog")
        assert "catalog" in worker.pause_reason
        assert "database or disk is full" in worker.pause_reason
        assert volume.archived_files() == []
        assert len(list(volume.incoming.iterdir())) == 60

        db.execute("PRAGMA max_page_count = 1073741823")  # space is back
        wait_for(
            lambda: len(volume.archived_files()) == 60 and not list(volume.incoming.iterdir()),
            what="every file to be archived after the back-off",
        )
        assert worker.is_alive()
    finally:
        _stop(worker)
        catalog.close()
    assert volume.count("instances") == 60
    assert volume.count("ingest_journal") == 0
    assert volume.quarantined_files() == []
    assert sum("ingest paused" in r.getMessage() for r in caplog.records) == 1


# ---- on a real small filesystem ----------------------------------------------------------


def test_a_batch_that_runs_out_of_space_is_undone_and_its_files_stay_whole_in_incoming(
    volume: Volume, mount_tmpfs: Mount, tmp_path: Path
) -> None:
    mount_tmpfs(volume.archive, "1m")
    files = [
        shutil.copyfile(path, volume.incoming / path.name)
        for path in write_series(tmp_path / "s", SeriesSpec(slices=12, rows=256, columns=256))
    ]
    contents = {path: path.read_bytes() for path in files}
    catalog = Catalog(volume.state)
    try:
        results = _archiver(catalog, volume).file_batch([read_file(str(p)) for p in files])
        summary = catalog.summary()
        moves_in_flight = catalog.moves_in_flight()
    finally:
        catalog.close()
    outcomes = [result.outcome for result in results]
    archived = outcomes.count(Outcome.ARCHIVED)
    assert 0 < archived < 12  # ~7 of these 130 KB files fit in 1 MiB
    assert outcomes == [Outcome.ARCHIVED] * archived + [Outcome.RETRY] * (12 - archived)
    assert {r.detail for r in results if r.outcome is Outcome.RETRY} == {NO_SPACE}
    waiting = [Path(r.source) for r in results if r.outcome is Outcome.RETRY]
    assert all(path.read_bytes() == contents[path] for path in waiting)
    assert sorted(volume.incoming.iterdir()) == sorted(waiting)
    assert summary.instances == len(volume.archived_files()) == archived
    assert moves_in_flight == 0
    assert _temp_instances(volume.archive) == []
    assert volume.quarantined_files() == []


@pytest.mark.parametrize(
    "min_free",
    [
        pytest.param("4MiB", id="paused-by-min_free"),
        pytest.param("0", id="paused-by-ENOSPC"),  # no margin: only a failed write pauses
    ],
)
def test_a_full_archive_pauses_the_daemon_loses_nothing_and_resumes_when_space_returns(
    volume: Volume, mount_tmpfs: Mount, start_daemon: StartDaemon, tmp_path: Path, min_free: str
) -> None:
    # The archive is a 24 MiB filesystem, 12 MiB taken by other data; incoming/ and the
    # catalog stay on the normal disk, so every move is a copy across filesystems.
    mount_tmpfs(volume.archive, "24m")
    filler = volume.archive / "filler.bin"
    _fill(filler, 12 * MiB)
    volume.config = write_config(volume.root, ingest={"min_free": min_free})
    staged = write_series(tmp_path / "staged", SeriesSpec(slices=120, rows=256, columns=256))
    assert sum(p.stat().st_size for p in staged) > 15 * MiB  # more than fits
    expected = {_uid(p) for p in staged}

    daemon = start_daemon()
    drop_into(volume.incoming, staged)
    wait_for(lambda: "ingest paused" in daemon.log(), what="the daemon to pause ingest")
    wait_for(
        _unchanged_for(1.5, lambda: (len(volume.archived_files()), len(volume.incoming_files()))),
        what="the archive to stop growing",
    )

    archived = [_uid(p) for p in volume.archived_files()]
    waiting = [_uid(p) for p in volume.incoming_files()]
    assert archived
    assert waiting
    assert set(archived) | set(waiting) == expected  # nothing lost ...
    assert len(archived) + len(waiting) == len(expected)  # ... nothing twice
    assert volume.quarantined_files() == []
    assert _temp_instances(volume.archive) == []
    assert volume.count("instances") == len(archived)
    assert volume.count("ingest_journal") == 0
    assert daemon.process.poll() is None
    assert daemon.log().count("ingest paused") == 1
    assert f"archive filesystem {volume.archive}" in daemon.log()

    filler.unlink()
    wait_for(
        lambda: volume.count("instances") == len(expected) and not volume.incoming_files(),
        what="every waiting file to be archived once space returned",
    )
    assert {_uid(p) for p in volume.archived_files()} == expected
    assert volume.quarantined_files() == []
    assert "ingest resumed" in daemon.log()
    assert "ERROR daemon.ingest" not in daemon.log()  # paused, not failed
    wait_for(lambda: check_is_clean(volume), what="dcmdb check to pass (DICOMDIR written)")


def test_a_file_that_cannot_be_quarantined_for_want_of_space_waits_in_incoming(
    volume: Volume, mount_tmpfs: Mount, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    mount_tmpfs(volume.quarantine, "4m")
    filler = volume.quarantine / "filler.bin"
    _fill(filler, shutil.disk_usage(volume.quarantine).free - 64 * 1024)
    daemon = start_daemon()
    junk = volume.incoming / "notes.txt"
    content = b"not DICOM\n" * 100_000  # 1 MB: cannot fit in the 64 KiB left
    junk.write_bytes(content)
    good = write_series(tmp_path / "good", SeriesSpec(slices=3))
    drop_into(volume.incoming, good)

    wait_for(lambda: "cannot quarantine" in daemon.log(), what="the quarantine to run out")
    wait_for(lambda: volume.count("instances") == 3, what="the good files to be archived anyway")
    assert volume.incoming_files() == [junk]
    assert junk.read_bytes() == content
    assert volume.count("quarantine") == 0
    assert daemon.process.poll() is None

    filler.unlink()
    wait_for(lambda: not volume.incoming_files(), what="the junk to be quarantined")
    # The failed attempts left nothing behind: no temp file, and no reason file that would
    # have pushed this one to another name.
    assert sorted(p.name for p in volume.quarantine.iterdir()) == [
        "notes.txt",
        "notes.txt.reason.txt",
    ]
    assert (volume.quarantine / "notes.txt").read_bytes() == content
    assert volume.count("quarantine") == 1
