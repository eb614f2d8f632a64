"""The daemon as a lab runs it: `dcmdb run` in a child process, files arriving in incoming/."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from tests.conftest import (
    Daemon,
    Volume,
    check_is_clean,
    dcmdb,
    drop_into,
    fixtures_dir,
    wait_for,
    write_config,
)
from tests.factory import SeriesSpec, write_series, write_studies

StartDaemon = Callable[[], Daemon]


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _catalogued(volume: Volume, expected: int) -> Callable[[], bool]:
    return lambda: volume.count("instances") == expected and not volume.incoming_files()


def test_a_generated_set_dropped_while_running_ends_up_sorted_and_catalogued(
    volume: Volume, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    staged = write_studies(
        tmp_path / "staged",
        physicians=["Smith^John", "Jones^Ann", ""],
        studies_per_physician=2,
        series_per_study=2,
        slices_per_series=3,
    )
    physician_of = {
        _sop_uid(p): str(pydicom.dcmread(p).get("ReferringPhysicianName", "")) for p in staged
    }
    start_daemon()
    # Half arrive by rename (a scanner writing to a temp name), half by a plain copy into a
    # nested folder that did not exist (a person copying a CD).
    drop_into(volume.incoming, staged[: len(staged) // 2])
    for path in staged[len(staged) // 2 :]:
        target = volume.incoming / "cd" / path.relative_to(tmp_path / "staged")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)

    wait_for(_catalogued(volume, len(staged)), what="every file to be catalogued")

    expected_folder = {"Smith^John": "Smith_John", "Jones^Ann": "Jones_Ann", "": "unknown"}
    archived = volume.archived_files()
    assert len(archived) == len(staged)
    for path in archived:
        relative = path.relative_to(volume.archive)
        folder, dicom, *components = relative.parts
        assert dicom == "DICOM"
        assert len(components) == 4
        uid = _sop_uid(path)
        assert folder == expected_folder[physician_of[uid]]
        rows = volume.query(
            "SELECT f.name, i.rel_path FROM instances i JOIN folders f ON f.id = i.folder_id "
            "WHERE i.sop_instance_uid = ?",
            uid,
        )
        assert rows == [(folder, relative.relative_to(folder).as_posix())]
    assert volume.count("studies") == 6
    assert volume.count("series") == 12
    wait_for(lambda: check_is_clean(volume), what="dcmdb check to pass (DICOMDIRs written)")


def _patient_incomplete_timeout(volume: Volume) -> None:
    """Pauses of the slow writers below are 3x settle_seconds; the incomplete timeout must be
    well above them, so that a slow CI machine does not turn a pause into a quarantine."""
    volume.config = write_config(volume.root, ingest={"incomplete_timeout_seconds": 8.0})


def test_a_file_written_in_chunks_with_pauses_is_taken_only_when_complete(
    volume: Volume, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    _patient_incomplete_timeout(volume)
    (source,) = write_series(tmp_path, SeriesSpec(slices=1, rows=128, columns=128))
    data = source.read_bytes()
    start_daemon()
    target = volume.incoming / "slow.dcm"
    pause = 1.5  # three times settle_seconds: the file looks settled between chunks
    with open(target, "wb") as out:
        for start in range(0, len(data), len(data) // 3):
            out.write(data[start : start + len(data) // 3])
            out.flush()
            os.fsync(out.fileno())
            time.sleep(pause)  # the slow writer's pause: the input of this test, not a wait
            assert volume.count("instances") == 0 or out.tell() == len(data)
            assert not volume.quarantined_files()
    wait_for(_catalogued(volume, 1), what="the completed file to be catalogued")
    assert not volume.quarantined_files()
    assert [_sop_uid(p) for p in volume.archived_files()] == [_sop_uid(source)]


def test_a_file_appended_to_by_a_writer_that_reopens_it_is_taken_once_when_complete(
    volume: Volume, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    _patient_incomplete_timeout(volume)
    (source,) = write_series(tmp_path, SeriesSpec(slices=1, rows=128, columns=128))
    data = source.read_bytes()
    start_daemon()
    target = volume.incoming / "appended.dcm"
    third = len(data) // 3
    for start in range(0, len(data), third):
        with open(target, "ab") as out:  # each close is a close-write event of a partial file
            out.write(data[start : start + third])
        time.sleep(0.6)  # the writer's pause between chunks, longer than settle_seconds
        if start + third < len(data):  # still partial: must not have been taken
            assert volume.count("instances") == 0
            assert not volume.quarantined_files()
    wait_for(_catalogued(volume, 1), what="the completed file to be catalogued")
    assert not volume.quarantined_files()
    assert len(volume.archived_files()) == 1


def test_a_file_renamed_in_from_a_temporary_name_is_taken_and_hidden_files_are_left_alone(
    volume: Volume, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    visible, renamed, hidden_source = write_series(tmp_path, SeriesSpec(slices=3))
    temporary = volume.incoming / "upload.dcm.part"
    hidden = volume.incoming / ".in-progress"
    shutil.copyfile(visible, volume.incoming / "visible.dcm")
    shutil.copyfile(renamed, temporary)
    shutil.copyfile(hidden_source, hidden)
    start_daemon()
    # The start-up scan saw all three; only the visible one is input.
    wait_for(lambda: volume.count("instances") == 1, what="the visible file to be catalogued")
    assert temporary.exists()
    assert hidden.exists()
    os.rename(temporary, volume.incoming / "upload.dcm")
    wait_for(_catalogued_besides(volume, 2, hidden), what="the renamed file to be catalogued")
    assert {_sop_uid(p) for p in volume.archived_files()} == {
        _sop_uid(visible),
        _sop_uid(renamed),
    }
    assert hidden.read_bytes() == hidden_source.read_bytes()
    assert not volume.quarantined_files()


def _catalogued_besides(volume: Volume, expected: int, left: Path) -> Callable[[], bool]:
    return lambda: volume.count("instances") == expected and volume.incoming_files() == [left]


def test_emptied_incoming_subfolders_are_removed_after_the_grace_period(
    volume: Volume, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    files = write_series(tmp_path / "series", SeriesSpec(slices=3))
    start_daemon()
    nested = volume.incoming / "export" / "2026" / "study1"
    nested.mkdir(parents=True)
    for path in files:
        shutil.copyfile(path, nested / path.name)
    wait_for(_catalogued(volume, 3), what="the nested files to be catalogued")
    wait_for(
        lambda: not (volume.incoming / "export").exists(),
        timeout=30,
        what="the emptied folders to be removed",
    )
    assert volume.incoming.is_dir()


def test_bad_files_are_quarantined_with_reasons_and_never_catalogued(
    volume: Volume, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    fixtures = fixtures_dir()
    (good,) = write_series(tmp_path, SeriesSpec(slices=1))
    data = good.read_bytes()
    bad = {
        "MR_truncated.dcm": (fixtures / "pydicom_edge_cases/In/MR_truncated.dcm").read_bytes(),
        "cut_short.dcm": data[: len(data) - 100],
        "empty.dcm": b"",
        "random.bin": random.Random(7).randbytes(5000),
        "notes.txt": b"scanner export notes\n" * 20,
        "volume.nii": _minimal_nifti(),
    }
    start_daemon()
    for name, content in bad.items():
        (volume.incoming / name).write_bytes(content)
    wait_for(
        lambda: len(volume.quarantined_files()) == len(bad) and not volume.incoming_files(),
        what="every bad file to be quarantined",
    )
    assert volume.count("instances") == 0
    assert volume.count("quarantine") == len(bad)
    for name in bad:
        reason = (volume.quarantine / f"{name}.reason.txt").read_text()
        assert "reason: " in reason
        assert (volume.quarantine / name).read_bytes() == bad[name]
    assert "incomplete" in (volume.quarantine / "MR_truncated.dcm.reason.txt").read_text()
    assert "incomplete" in (volume.quarantine / "cut_short.dcm.reason.txt").read_text()
    assert "NIfTI" in (volume.quarantine / "volume.nii.reason.txt").read_text()


def _minimal_nifti() -> bytes:
    header = bytearray(352)
    header[0:4] = (348).to_bytes(4, "little")
    header[344:348] = b"n+1\x00"
    return bytes(header) + bytes(64)


def test_sigkill_during_a_large_ingest_then_restart_archives_every_file_exactly_once(
    volume: Volume, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    staged = write_studies(
        tmp_path / "staged",
        physicians=["Smith^John", "Jones^Ann", "Curie^Marie", ""],
        studies_per_physician=5,
        series_per_study=4,
        slices_per_series=25,
    )
    assert len(staged) == 2000
    expected_uids = {_sop_uid(p) for p in staged}
    daemon = start_daemon()
    drop_into(volume.incoming, staged)
    wait_for(lambda: volume.count("instances") >= 300, what="ingest to be under way")
    daemon.kill()
    assert volume.count("instances") < 2000, "too late: the kill should land mid-ingest"

    start_daemon()
    wait_for(_catalogued(volume, 2000), timeout=120, what="all 2000 files after the restart")
    archived = volume.archived_files()
    assert len(archived) == 2000
    assert {_sop_uid(p) for p in archived} == expected_uids
    assert volume.count("ingest_journal") == 0
    assert not volume.quarantined_files()
    wait_for(lambda: check_is_clean(volume), what="dcmdb check to pass (DICOMDIRs written)")


def test_sigterm_during_a_burst_finishes_the_files_in_hand_and_exits_0_within_seconds(
    volume: Volume, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    staged = write_studies(
        tmp_path / "staged",
        physicians=["Smith^John"],
        studies_per_physician=2,
        series_per_study=5,
        slices_per_series=50,
    )
    daemon = start_daemon()
    drop_into(volume.incoming, staged)
    wait_for(lambda: volume.count("instances") >= 50, what="ingest to be under way")
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    assert volume.count("ingest_journal") == 0
    left = len(volume.incoming_files())
    assert volume.count("instances") + left == len(staged)
    report = json.loads(dcmdb(volume, "check", "--json").stdout)
    # Nothing lost or half-written; the DICOMDIR may lag: the next start-up rewrites it.
    assert report["missing"] == report["orphans"] == report["temp_files"] == []
    assert report["size_mismatch"] == report["dicomdir_dangling"] == []
    assert "SIGTERM received" in daemon.log()


def test_ctrl_c_to_the_whole_process_group_stops_the_daemon_cleanly(
    volume: Volume, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    files = write_series(tmp_path, SeriesSpec(slices=3))
    daemon = start_daemon()
    drop_into(volume.incoming, files)
    wait_for(_catalogued(volume, 3), what="the files to be catalogued")
    os.killpg(daemon.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    assert daemon.process.wait(30) == 0
    assert "Traceback" not in daemon.log()  # the reader processes leave stopping to the daemon
    assert "dcmdb stopped" in daemon.log()


@pytest.mark.parametrize("observer", ["polling"])
def test_the_polling_observer_for_network_mounts_also_ingests(
    volume: Volume, tmp_path: Path, observer: str
) -> None:
    volume.config = write_config(
        volume.root, ingest={"observer": observer, "polling_interval_seconds": 0.2}
    )
    files = write_series(tmp_path, SeriesSpec(slices=4))
    daemon = Daemon(volume)
    try:
        for path in files:
            shutil.copyfile(path, volume.incoming / path.name)
        wait_for(_catalogued(volume, 4), what="the files to be catalogued by polling")
    finally:
        assert daemon.stop() == 0
