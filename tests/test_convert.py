"""The conversion job over a real archive: catch-up, naming, replacement, faults, schedule."""

from __future__ import annotations

import json
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import nibabel as nib
import numpy as np
import psutil
import pydicom
import pytest

from daemon.catalog import MIGRATIONS, Catalog
from daemon.config import load_config
from daemon.convert import CONVERT_JOB, NIFTI_DIR, run_conversions
from daemon.schedule import WallClockCronTrigger, run_was_missed
from tests.conftest import Daemon, Volume, check_is_clean, dcmdb, wait_for, write_config
from tests.factory import SeriesSpec, write_series

StartDaemon = Callable[[], Daemon]
_DCMDB = [sys.executable, "-m", "daemon.cli"]
_FAST = {"settle_minutes": 0, "workers": 2, "timeout_seconds": 60}


def _configure(volume: Volume, **convert: object) -> None:
    volume.config = write_config(volume.root, convert={**_FAST, **convert})


def _ingest(volume: Volume, source: Path) -> None:
    result = dcmdb(volume, "ingest", "--move", str(source))
    assert result.returncode == 0, result.stderr


def _load(path: Path) -> nib.Nifti1Image:
    image = nib.load(path)
    assert isinstance(image, nib.Nifti1Image)
    return image


def _study_dirs(volume: Volume, folder: str = "Smith_John") -> list[Path]:
    root = volume.archive / folder / NIFTI_DIR
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def _states(volume: Volume) -> dict[str, str]:
    rows = volume.query(
        "SELECT se.series_description, c.state FROM conversions c "
        "JOIN series se ON se.id = c.series_row_id"
    )
    return {str(description): str(state) for description, state in rows}


def _fake_engine(tmp_path: Path, body: str) -> Path:
    """A dcm2niix stand-in: a real executable that answers -v like dcm2niix and otherwise
    runs `body` (a shell snippet; "$@" are dcm2niix's arguments, the input folder of
    symbolic links last, $REAL the real dcm2niix)."""
    real = subprocess.run(
        [sys.executable, "-c", "import dcm2niix; print(dcm2niix.bin)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    script = tmp_path / "dcm2niix-fault"
    script.write_text(
        "#!/bin/sh\n"
        f'REAL="{real}"\n'
        'case "$1" in -v|--version|-h) exec "$REAL" "$@";; esac\n'
        'for last in "$@"; do :; done\n'
        f"{body}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_every_quiet_series_is_converted_once_with_sidecar_preview_and_report(
    volume: Volume, tmp_path: Path
) -> None:
    _configure(volume)
    study = "1.2.826.0.1.3680043.8.498.1"
    write_series(
        tmp_path / "in" / "t1",
        SeriesSpec(study_instance_uid=study, series_description="T1 MPRAGE", slices=6),
    )
    write_series(
        tmp_path / "in" / "t2",
        SeriesSpec(study_instance_uid=study, series_number=2, series_description="T2", slices=4),
    )
    _ingest(volume, tmp_path / "in")

    result = dcmdb(volume, "convert")
    assert result.returncode == 0, result.stderr
    assert "2 series due: converted 2" in result.stdout

    (study_dir,) = _study_dirs(volume)
    assert study_dir.name == "PID001_20260101_Brain"
    assert _visible(study_dir) == [
        "001_T1 MPRAGE.json",
        "001_T1 MPRAGE.nii.gz",
        "001_T1 MPRAGE.png",
        "002_T2.json",
        "002_T2.nii.gz",
        "002_T2.png",
        "conversion.txt",
    ]
    image = _load(study_dir / "001_T1 MPRAGE.nii.gz")
    assert image.shape == (64, 64, 6)
    sidecar = json.loads((study_dir / "001_T1 MPRAGE.json").read_text())
    assert sidecar["SeriesDescription"] == "T1 MPRAGE"
    assert "PatientName" not in sidecar
    report = (study_dir / "conversion.txt").read_text()
    assert "converted  #1 T1 MPRAGE  (6 instances)" in report
    assert "Doe" not in report  # no patient name
    assert _states(volume) == {"T1 MPRAGE": "converted", "T2": "converted"}

    again = dcmdb(volume, "convert")
    assert again.returncode == 0, again.stderr
    assert "0 series due" in again.stdout  # idempotent: nothing is converted twice
    status = json.loads(dcmdb(volume, "status", "--json").stdout)
    assert status["conversions"]["converted"] == 2
    assert status["conversions"]["pending"] == 0
    assert check_is_clean(volume)


def test_a_series_still_arriving_waits_for_settle_minutes(volume: Volume, tmp_path: Path) -> None:
    _configure(volume, settle_minutes=30)
    write_series(tmp_path / "in", SeriesSpec(slices=4))
    _ingest(volume, tmp_path / "in")
    config = load_config(volume.config)

    early = run_conversions(config.convert, config.paths)
    assert early.due == 0
    later = run_conversions(config.convert, config.paths, now=lambda: time.time() + 31 * 60)
    assert later.due == 1
    assert later.counts["converted"] == 1


def test_a_series_that_grows_is_converted_again_and_its_outputs_replaced(
    volume: Volume, tmp_path: Path
) -> None:
    _configure(volume)
    spec = SeriesSpec(series_instance_uid="1.2.826.0.1.3680043.8.498.2", slices=8)
    files = write_series(tmp_path / "all", spec)
    (tmp_path / "first").mkdir()
    for path in files[:5]:
        path.rename(tmp_path / "first" / path.name)
    _ingest(volume, tmp_path / "first")
    assert dcmdb(volume, "convert").returncode == 0
    (study_dir,) = _study_dirs(volume)
    nifti = study_dir / "001_T1.nii.gz"
    assert _load(nifti).shape[2] == 5
    first_inode = nifti.stat().st_ino

    _ingest(volume, tmp_path / "all")  # the last three slices arrive late
    result = dcmdb(volume, "convert")
    assert "1 series due: converted 1" in result.stdout, result.stdout + result.stderr
    assert _load(nifti).shape[2] == 8
    assert nifti.stat().st_ino != first_inode  # a new file renamed over the old one
    assert _visible(study_dir) == ["001_T1.json", "001_T1.nii.gz", "001_T1.png", "conversion.txt"]


def test_series_with_the_same_name_get_distinct_files(volume: Volume, tmp_path: Path) -> None:
    _configure(volume)
    study = "1.2.826.0.1.3680043.8.498.3"
    for index in range(2):  # two runs of the same protocol, same number and description
        write_series(tmp_path / "in" / str(index), SeriesSpec(study_instance_uid=study, slices=3))
    _ingest(volume, tmp_path / "in")
    assert dcmdb(volume, "convert").returncode == 0
    (study_dir,) = _study_dirs(volume)
    assert [n for n in _visible(study_dir) if n.endswith(".nii.gz")] == [
        "001_T1.nii.gz",
        "001_T1_2.nii.gz",
    ]


def test_skipped_series_are_recorded_with_the_reason(volume: Volume, tmp_path: Path) -> None:
    _configure(volume)
    write_series(tmp_path / "in", SeriesSpec(slices=2, series_description="two slices"))
    _ingest(volume, tmp_path / "in")
    result = dcmdb(volume, "convert")
    assert result.returncode == 0, result.stderr
    assert _states(volume) == {"two slices": "skipped"}
    (study_dir,) = _study_dirs(volume)
    assert _visible(study_dir) == ["conversion.txt"]
    report = (study_dir / "conversion.txt").read_text()
    assert "skipped    #1 two slices  (2 instances)" in report
    assert "3" in report.split("why:", 1)[1]  # the reason names the minimum of 3 slices


def test_a_hanging_and_a_crashing_conversion_are_recorded_and_the_others_go_on(
    volume: Volume, tmp_path: Path
) -> None:
    engine = _fake_engine(
        tmp_path,
        f'if grep -Rqs HANGS "$last"; then echo $$ > "{tmp_path}/hung.pid"; exec sleep 600; fi\n'
        'if grep -Rqs CRASHES "$last"; then kill -SEGV $$; fi\n'
        'exec "$REAL" "$@"',
    )
    _configure(volume, dcm2niix=str(engine), timeout_seconds=5, max_attempts=1)
    study = "1.2.826.0.1.3680043.8.498.4"
    for number, description in enumerate(("HANGS", "CRASHES", "GOOD", "ALSO GOOD"), start=1):
        write_series(
            tmp_path / "in" / description,
            SeriesSpec(
                study_instance_uid=study,
                series_number=number,
                series_description=description,
                slices=3,
            ),
        )
    _ingest(volume, tmp_path / "in")

    started = time.monotonic()
    result = dcmdb(volume, "convert")
    assert result.returncode == 1  # failures make the command fail
    assert time.monotonic() - started < 40
    assert _states(volume) == {
        "HANGS": "failed",
        "CRASHES": "failed",
        "GOOD": "converted",
        "ALSO GOOD": "converted",
    }
    reasons = {
        str(description): str(reason)
        for description, reason in volume.query(
            "SELECT se.series_description, c.reason FROM conversions c "
            "JOIN series se ON se.id = c.series_row_id WHERE c.state = 'failed'"
        )
    }
    assert "convert.timeout_seconds" in str(reasons["HANGS"])
    assert "dcm2niix" in str(reasons["CRASHES"])
    # The hanging engine was killed with its worker: nothing of it is left running.
    hung = int((tmp_path / "hung.pid").read_text())
    if psutil.pid_exists(hung):
        _gone, alive = psutil.wait_procs([psutil.Process(hung)], timeout=10)
        assert not alive
    status = dcmdb(volume, "status")
    assert "2 failed" in status.stdout
    assert "HANGS" in status.stdout

    # max_attempts = 1: the schedule does not try again; naming the series does.
    assert "0 series due" in dcmdb(volume, "convert").stdout
    uid = volume.query("SELECT series_instance_uid FROM series WHERE series_description = 'GOOD'")
    forced = dcmdb(volume, "convert", "--series", str(uid[0][0]))
    assert "1 series due: converted 1" in forced.stdout, forced.stdout + forced.stderr


def test_a_conversion_out_of_memory_is_recorded_and_the_others_go_on(
    volume: Volume, tmp_path: Path
) -> None:
    engine = _fake_engine(
        tmp_path,
        # A converter that grabs memory on one series: the address-space limit stops it.
        'if grep -Rqs HUGE "$last"; then exec "'
        + sys.executable
        + "\" -c 'bytearray(2 * 1024 ** 3)'; fi\n"
        'exec "$REAL" "$@"',
    )
    _configure(volume, dcm2niix=str(engine), memory_limit="1GiB")
    study = "1.2.826.0.1.3680043.8.498.5"
    for number, description in enumerate(("HUGE", "NORMAL"), start=1):
        write_series(
            tmp_path / "in" / description,
            SeriesSpec(
                study_instance_uid=study,
                series_number=number,
                series_description=description,
                slices=3,
            ),
        )
    _ingest(volume, tmp_path / "in")
    result = dcmdb(volume, "convert")
    assert result.returncode == 1
    assert _states(volume) == {"HUGE": "failed", "NORMAL": "converted"}
    (reason,) = volume.query("SELECT reason FROM conversions WHERE state = 'failed'")[0]
    assert "MemoryError" in str(reason)


def test_sigkill_during_a_conversion_leaves_nothing_partial_and_the_next_run_converts(
    volume: Volume, tmp_path: Path
) -> None:
    engine = _fake_engine(tmp_path, f'touch "{tmp_path}/started"\nexec sleep 600')
    _configure(volume, dcm2niix=str(engine))
    write_series(tmp_path / "in", SeriesSpec(slices=5))
    _ingest(volume, tmp_path / "in")

    process = subprocess.Popen(
        [*_DCMDB, "--config", str(volume.config), "convert"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (tmp_path / "started").exists(), what="the engine to start")
        workers = psutil.Process(process.pid).children(recursive=True)
    finally:
        process.kill()
        process.wait()
    # Orphaned workers notice their parent is gone and take their engine down with them.
    _gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive
    assert _states(volume) == {"T1": "pending"}
    nifti_root = volume.archive / "Smith_John" / NIFTI_DIR
    visible = [p for p in nifti_root.rglob("*") if not any(s.startswith(".") for s in p.parts)]
    assert not [p for p in visible if p.name.endswith((".nii", ".nii.gz", ".json"))]

    _configure(volume)  # the real dcm2niix again
    result = dcmdb(volume, "convert")
    assert "1 series due: converted 1" in result.stdout, result.stdout + result.stderr
    assert not [p for p in nifti_root.iterdir() if p.name.startswith(".")]  # work dir cleared
    assert check_is_clean(volume)


def test_one_run_at_a_time_a_second_is_told_to_wait(volume: Volume, tmp_path: Path) -> None:
    engine = _fake_engine(tmp_path, f'touch "{tmp_path}/started"\nexec sleep 600')
    _configure(volume, dcm2niix=str(engine))
    write_series(tmp_path / "in", SeriesSpec(slices=3))
    _ingest(volume, tmp_path / "in")
    first = subprocess.Popen(
        [*_DCMDB, "--config", str(volume.config), "convert"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (tmp_path / "started").exists(), what="the first run")
        second = dcmdb(volume, "convert")
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(30)
    assert second.returncode == 1
    assert "another conversion run is in progress" in second.stderr


# ---- the schedule --------------------------------------------------------------------------


def _fire_times(trigger: WallClockCronTrigger, start: datetime, end: datetime) -> list[datetime]:
    times: list[datetime] = []
    previous = None
    now = start
    while (fire := trigger.get_next_fire_time(previous, now)) is not None and fire < end:
        times.append(fire)
        previous = fire
        now = fire  # what APScheduler passes: the moment it fired
    return times


@pytest.mark.parametrize(
    ("crontab", "day"),
    [
        ("30 2 * * *", datetime(2026, 10, 25)),  # fall back: 02:30 happens twice
        ("30 2 * * *", datetime(2026, 3, 29)),  # spring forward: 02:30 never happens
        ("0 5 * * *", datetime(2026, 10, 25)),
        ("0 5 * * *", datetime(2026, 3, 29)),
    ],
)
def test_a_daily_schedule_fires_once_on_a_dst_change_day_in_berlin(
    crontab: str, day: datetime
) -> None:
    berlin = ZoneInfo("Europe/Berlin")
    trigger = WallClockCronTrigger(crontab, berlin)
    start = (day - timedelta(days=1)).replace(tzinfo=berlin)
    times = _fire_times(trigger, start, start + timedelta(days=3))
    on_the_day = [t for t in times if t.astimezone(berlin).date() == day.date()]
    assert len(on_the_day) == 1, times
    assert len(times) == 3  # once a day, every day


def test_an_hourly_schedule_fires_23_times_on_spring_forward_and_24_on_fall_back() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    trigger = WallClockCronTrigger("0 * * * *", berlin)
    for day, expected in ((datetime(2026, 3, 29), 23), (datetime(2026, 10, 25), 24)):
        start = day.replace(tzinfo=berlin)
        end = (day + timedelta(days=1)).replace(tzinfo=berlin)
        assert len(_fire_times(trigger, start, end)) == expected


def test_a_run_missed_while_down_is_due_at_start_up_and_a_run_done_is_not() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    trigger = WallClockCronTrigger("0 5 * * *", berlin)
    now = datetime(2026, 11, 21, 9, 0, tzinfo=berlin)  # the injected clock: 09:00
    yesterday_run = datetime(2026, 11, 20, 5, 0, 1, tzinfo=berlin)
    todays_run = datetime(2026, 11, 21, 5, 0, 1, tzinfo=berlin)
    assert run_was_missed(trigger, yesterday_run, now)  # down at 05:00 today
    assert not run_was_missed(trigger, todays_run, now)
    assert not run_was_missed(trigger, yesterday_run, datetime(2026, 11, 21, 4, 59, tzinfo=berlin))
    assert run_was_missed(trigger, None, now)  # never ran


def _set_last_run(volume: Volume, started_at: float) -> None:
    catalog = Catalog(volume.state)
    try:
        catalog.record_job_run(CONVERT_JOB, started_at, started_at + 1, "test")
    finally:
        catalog.close()


def test_the_daemon_catches_up_a_missed_run_at_start_up(
    volume: Volume, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    _configure(volume, schedule="0 5 * * *", timezone="Europe/Berlin")
    write_series(tmp_path / "in", SeriesSpec(slices=3))
    _ingest(volume, tmp_path / "in")
    _set_last_run(volume, time.time() - 2 * 86400)  # two days ago: today's 05:00 was missed

    daemon = start_daemon()
    wait_for(lambda: _states(volume) == {"T1": "converted"}, what="the catch-up conversion")
    assert "a missed run starts now" in daemon.log()


def test_the_daemon_waits_for_the_schedule_when_no_run_was_missed(
    volume: Volume, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    _configure(volume, schedule="0 5 * * *", timezone="Europe/Berlin")
    write_series(tmp_path / "in", SeriesSpec(slices=3))
    _ingest(volume, tmp_path / "in")
    _set_last_run(volume, time.time())  # ran just now: the next run is at 05:00

    daemon = start_daemon()
    wait_for(lambda: "conversion scheduled" in daemon.log(), what="the schedule")
    assert "a missed run starts now" not in daemon.log()
    assert _states(volume) == {}


def test_converted_voxels_sit_where_the_dicom_says_in_world_space(
    volume: Volume, tmp_path: Path
) -> None:
    _configure(volume)
    spec = SeriesSpec(slices=4, orientation="oblique", descending=True, pixel_spacing=(0.8, 1.2))
    paths = write_series(tmp_path / "in", spec)
    slices = [pydicom.dcmread(p) for p in paths]
    _ingest(volume, tmp_path / "in")
    assert dcmdb(volume, "convert").returncode == 0
    (study_dir,) = _study_dirs(volume)
    image = _load(study_dir / "001_T1.nii.gz")
    to_voxel = np.linalg.inv(np.asarray(image.affine, dtype=float))
    data = np.asarray(image.dataobj)
    # PS3.3 C.7.6.2.1.1: pixel (r, c) of a slice lies at IPP + c * dx * row_cosine
    # + r * dy * column_cosine (LPS); NIfTI world space is RAS.
    for ds in slices:
        origin = np.array(ds.ImagePositionPatient, dtype=float)
        row_cosine = np.array(ds.ImageOrientationPatient[:3], dtype=float)
        column_cosine = np.array(ds.ImageOrientationPatient[3:], dtype=float)
        dy, dx = (float(v) for v in ds.PixelSpacing)
        pixels = ds.pixel_array
        for r, c in ((0, 0), (0, 63), (63, 0), (17, 42)):
            lps = origin + c * dx * row_cosine + r * dy * column_cosine
            voxel = to_voxel @ np.append(lps * [-1, -1, 1], 1.0)
            index = tuple(int(v) for v in np.round(voxel[:3]))
            assert np.allclose(voxel[:3], index, atol=1e-3)
            assert data[index] == pixels[r, c]


def test_a_catalog_of_the_first_release_is_migrated_with_its_rows_kept(volume: Volume) -> None:
    path = volume.state / "catalog.sqlite"
    db = sqlite3.connect(path)
    db.executescript(f"{MIGRATIONS[0]}; PRAGMA user_version = 1;")
    db.execute(
        "INSERT INTO folders (name, name_key, created_at, file_set_uid)"
        " VALUES ('Smith_John', 'smith_john', 1.0, '2.25.1')"
    )
    db.commit()
    db.close()

    catalog = Catalog(volume.state)
    try:
        assert catalog.folder_names() == ["Smith_John"]
        assert catalog.conversion_summary().counts["pending"] == 0
    finally:
        catalog.close()
    db = sqlite3.connect(path)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    finally:
        db.close()
    assert version == len(MIGRATIONS)
    assert {"conversions", "nifti_studies", "job_runs"} <= tables


def test_a_study_deleted_under_the_conversion_job_is_skipped_not_retried_forever(
    volume: Volume, tmp_path: Path
) -> None:
    _configure(volume)
    write_series(tmp_path / "in", SeriesSpec(slices=3))
    _ingest(volume, tmp_path / "in")
    config = load_config(volume.config)
    catalog = Catalog(volume.state)
    try:
        (series,) = catalog.series_to_convert(time.time(), 0, 3)
        # Retention deletes the study between the job's query and its first write.
        other = Catalog(volume.state)
        try:
            other.delete_study(series.study_row_id, time.time())
        finally:
            other.close()
        assert catalog.nifti_study_dir(series, lambda attempt: f"study{attempt}") is None
        assert catalog.begin_conversion(series, lambda attempt: f"s{attempt}", 0.0) is None
    finally:
        catalog.close()
    run = run_conversions(config.convert, config.paths)
    assert run.due == 0
