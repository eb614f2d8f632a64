"""DICOMDIR upkeep as the daemon and the CLI do it: dirty folders, delays, atomic rewrites."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.fileset import FileSet

from daemon.catalog import Catalog
from daemon.dicomdir import read_dicomdir_references
from daemon.model import InstanceHeader
from tests.conftest import Daemon, Volume, check_is_clean, dcmdb, wait_for, write_config
from tests.factory import SeriesSpec, write_series

StartDaemon = Callable[[], Daemon]
_DCMDB = [sys.executable, "-m", "daemon.cli"]


def _uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def _listed(volume: Volume, folder: str) -> set[str]:
    path = volume.archive / folder / "DICOMDIR"
    if not path.exists():
        return set()
    return {uid for _file_id, uid in read_dicomdir_references(path)}


def test_a_running_daemon_rewrites_a_folders_dicomdir_within_the_delay(
    volume: Volume, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    volume.config = write_config(
        volume.root, dicomdir={"delay_seconds": 1.0, "max_delay_seconds": 3.0}
    )
    first = write_series(tmp_path / "a", SeriesSpec(referring_physician="Smith^John", slices=3))
    second = write_series(
        tmp_path / "b", SeriesSpec(referring_physician="Smith^John", series_number=2)
    )
    start_daemon()
    for path in first:
        os.rename(path, volume.incoming / f"a_{path.name}")
    wait_for(lambda: len(_listed(volume, "Smith_John")) == 3, what="the first DICOMDIR")
    assert _listed(volume, "Smith_John") == _uids_of(volume)

    arrived = time.monotonic()
    for path in second:
        os.rename(path, volume.incoming / f"b_{path.name}")
    wait_for(lambda: len(_listed(volume, "Smith_John")) == 8, timeout=20, what="the rewrite")
    # The delay (1 s) plus the check interval (0.25 s) plus the work, with room for a slow CI.
    assert time.monotonic() - arrived < 6
    dicomdir = volume.archive / "Smith_John" / "DICOMDIR"
    file_set = FileSet(pydicom.dcmread(dicomdir))
    assert {instance.SOPInstanceUID for instance in file_set} == _uids_of(volume)
    check = dcmdb(volume, "check")
    assert check.returncode == 0, check.stdout


def _uids_of(volume: Volume) -> set[str]:
    return {str(uid) for (uid,) in volume.query("SELECT sop_instance_uid FROM instances")}


def test_dicomdir_command_rewrites_one_folder_or_all_and_check_notices_a_stale_one(
    volume: Volume, tmp_path: Path
) -> None:
    for index, name in enumerate(["Smith^John", "Jones^Ann"]):
        write_series(tmp_path / str(index), SeriesSpec(referring_physician=name, slices=2))
    assert dcmdb(volume, "ingest", str(tmp_path)).returncode == 0
    assert check_is_clean(volume)  # a one-shot ingest leaves valid File-sets behind
    for folder in ("Smith_John", "Jones_Ann"):
        (volume.archive / folder / "DICOMDIR").unlink()
    check = dcmdb(volume, "check")
    assert check.returncode == 1
    assert "folders without a DICOMDIR: 2" in check.stdout

    one = dcmdb(volume, "dicomdir", "--folder", "Jones_Ann")
    assert one.returncode == 0, one.stderr
    assert "Jones_Ann/DICOMDIR: 2 instances" in one.stdout
    assert not (volume.archive / "Smith_John" / "DICOMDIR").exists()
    everything = dcmdb(volume, "dicomdir", "--all")
    assert everything.returncode == 0, everything.stderr
    assert dcmdb(volume, "check").returncode == 0

    listed_before = (volume.archive / "Jones_Ann" / "DICOMDIR").read_bytes()
    more = write_series(tmp_path / "more", SeriesSpec(referring_physician="Jones^Ann"))
    assert dcmdb(volume, "ingest", str(tmp_path / "more")).returncode == 0
    (volume.archive / "Jones_Ann" / "DICOMDIR").write_bytes(listed_before)  # as if behind
    stale = dcmdb(volume, "check", "--json")
    assert stale.returncode == 1
    assert stale.stdout.count("Jones_Ann: 5 instances not listed") == 1
    assert len(more) == 5

    unknown = dcmdb(volume, "dicomdir", "--folder", "Nobody")
    assert unknown.returncode == 1
    assert "no physician folder named 'Nobody'" in unknown.stderr


def test_sigkill_during_a_rewrite_leaves_the_old_dicomdir_whole_and_valid(
    volume: Volume,
) -> None:
    _catalogue_many(volume, "Big_Folder", 30_000)
    assert dcmdb(volume, "dicomdir", "--folder", "Big_Folder").returncode == 0
    dicomdir = volume.archive / "Big_Folder" / "DICOMDIR"
    before = dicomdir.read_bytes()
    _catalogue_many(volume, "Big_Folder", 1_000, start=30_000)  # the next rewrite differs

    killed_mid_write = False
    for _attempt in range(20):
        writer = subprocess.Popen(
            [*_DCMDB, "--config", str(volume.config), "dicomdir", "--folder", "Big_Folder"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while writer.poll() is None and not _temp_files(dicomdir):
            time.sleep(0.0005)  # polling for the temp file, to kill while it is written
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        if writer.returncode == -signal.SIGKILL and _temp_files(dicomdir):
            killed_mid_write = True
            break
        # Too late: the rewrite finished. Put the old one back and try again.
        dicomdir.write_bytes(before)
    assert killed_mid_write, "never caught the writer mid-write in 20 attempts"
    assert dicomdir.read_bytes() == before
    assert len(read_dicomdir_references(dicomdir)) == 30_000
    assert len(pydicom.dcmread(dicomdir).DirectoryRecordSequence) > 30_000  # parses whole
    check = dcmdb(volume, "check", "--json")
    assert ".tmp-DICOMDIR" in check.stdout  # the killed writer's leftover is reported ...
    assert dcmdb(volume, "dicomdir", "--folder", "Big_Folder").returncode == 0
    assert not _temp_files(dicomdir)  # ... and cleared by the next rewrite
    assert len(read_dicomdir_references(dicomdir)) == 31_000


def _temp_files(dicomdir: Path) -> list[str]:
    return [name for name in os.listdir(dicomdir.parent) if name.startswith(".tmp-DICOMDIR")]


def _catalogue_many(volume: Volume, folder: str, count: int, start: int = 0) -> None:
    """Catalogue `count` instances in one folder through the real catalog API, without files:
    the DICOMDIR is written from the catalog alone, so its size is all this test needs."""
    catalog = Catalog(volume.state)
    try:
        with catalog.transaction():
            folder_id, _ = catalog.folder_named(folder, folder.casefold(), 0.0)
            rows = []
            for index in range(start, start + count):
                header = _header(index)
                row_id, _ = catalog.stage_instance(
                    header,
                    folder_id,
                    1000,
                    0.0,
                    f"/nowhere/{index}",
                    True,
                    lambda uid, attempt: f"{abs(hash((uid, attempt))) % 10**8:08d}",
                    lambda _rel: True,
                )
                rows.append(row_id)
            catalog.finish_moves(rows)
            catalog.mark_folders_changed({folder_id}, 1.0)
    finally:
        catalog.close()


def _header(index: int) -> InstanceHeader:
    study = index // 5000
    series = index // 500
    return InstanceHeader(
        sop_instance_uid=f"1.2.826.0.1.3680043.10.1.{index + 1}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        study_instance_uid=f"1.2.826.0.1.3680043.10.2.{study + 1}",
        series_instance_uid=f"1.2.826.0.1.3680043.10.3.{series + 1}",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        specific_character_set="",
        patient_id=f"PID{study}",
        patient_name=f"Patient{study}^Test",
        referring_physician_name="Big^Folder",
        study_date="20260101",
        study_time="120000",
        study_description="Study",
        study_id=str(study),
        accession_number="",
        modality="MR",
        series_number=series % 100 + 1,
        series_description="T1",
        instance_number=index % 500 + 1,
        rows=64,
        columns=64,
        number_of_frames=None,
        data_set_offset=0,
    )
