"""Retention: the pure plan, and pruning a real archive (a small tmpfs when root), with crashes,
held files and studies that change under the plan."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.fileset import FileSet

from daemon.catalog import Catalog, PrunableStudy
from daemon.config import RetentionConfig
from daemon.dicomdir import read_dicomdir_references
from daemon.fsops import exclusive_lock
from daemon.retention import (
    LOCK_FILE,
    PRUNED_LOG,
    PRUNED_NOTE,
    TRASH_DIR,
    DiskFigures,
    PrunePlan,
    apply_prune,
    plan_prune,
)
from tests.conftest import (
    IN_CI,
    Daemon,
    Volume,
    check_is_clean,
    dcmdb,
    wait_for,
    write_config,
)
from tests.factory import SeriesSpec, write_series

StartDaemon = Callable[[], Daemon]

DAY = 86400.0
GIB = 1024**3
MIB = 1024**2
NOW = 1_800_000_000.0  # 2027-01-15: an injected clock for the pure tests
UID_ROOT = "1.2.826.0.1.3680043.8.498.77"


# ---- the pure plan -----------------------------------------------------------------------


def _study(
    row_id: int,
    *,
    age_days: float,
    size: int = GIB,
    folder: str = "Smith_John",
    study_date: str = "20200101",
    protected: bool = False,
    waiting_series: int = 0,
) -> PrunableStudy:
    return PrunableStudy(
        study_row_id=row_id,
        study_instance_uid=f"{UID_ROOT}.{row_id}",
        folder_name=folder,
        study_date=study_date,
        study_description=f"Study {row_id}",
        received_at=NOW - age_days * DAY,
        bytes=size,
        protected=protected,
        waiting_series=waiting_series,
    )


def _policy(**settings: Any) -> RetentionConfig:
    values: dict[str, Any] = {"low_free": "10%", "target_free": "20%", "min_age_days": 30}
    values.update(settings)
    return RetentionConfig(**values)


def _disk(free: int, *, total: int = 100 * GIB, archive: int = 50 * GIB) -> DiskFigures:
    return DiskFigures(total_bytes=total, free_bytes=free, archive_bytes=archive)


def _planned(plan: PrunePlan) -> list[int]:
    return [decision.study.study_row_id for decision in plan.deletions]


def _kept(plan: PrunePlan) -> dict[int, str]:
    return {decision.study.study_row_id: decision.reason for decision in plan.kept}


def test_nothing_is_planned_while_free_space_is_at_or_above_low_free() -> None:
    studies = [_study(row_id, age_days=400 - row_id) for row_id in range(1, 6)]
    policy = _policy()
    for free in (10 * GIB, 10 * GIB + 1, 60 * GIB):
        plan = plan_prune(studies, _disk(free), policy, NOW)
        assert plan.trigger == ""
        assert plan.needed_bytes == 0
        assert plan.deletions == ()
        assert plan.kept == ()
        assert plan.shortfall_bytes == 0
    just_below = plan_prune(studies, _disk(10 * GIB - 1), policy, NOW)
    assert "low_free" in just_below.trigger
    assert just_below.needed_bytes == 10 * GIB + 1


def test_the_oldest_studies_go_first_until_target_free_is_reached_by_catalog_bytes() -> None:
    # Received 100, 90, ... 10 days ago, each 4 GiB; given in no particular order.
    studies = [_study(row_id, age_days=110 - 10 * row_id, size=4 * GIB) for row_id in range(1, 11)]
    random.Random(7).shuffle(studies)
    plan = plan_prune(studies, _disk(5 * GIB), _policy(min_age_days=0), NOW)

    assert plan.low_free_bytes == 10 * GIB
    assert plan.target_free_bytes == 20 * GIB
    assert plan.needed_bytes == 15 * GIB
    # Three studies free 12 GiB, not enough; the fourth reaches the target: nothing more,
    # whatever the free space reads (the plan never re-reads it).
    assert _planned(plan) == [1, 2, 3, 4]
    assert plan.freed_bytes == 16 * GIB
    assert plan.shortfall_bytes == 0
    assert not plan.limited
    assert plan.kept == ()
    assert all("oldest" in decision.reason for decision in plan.deletions)


def test_a_study_that_alone_covers_the_need_is_the_only_one_planned() -> None:
    studies = [
        _study(1, age_days=300, size=30 * GIB),
        _study(2, age_days=200, size=GIB),
    ]
    plan = plan_prune(studies, _disk(9 * GIB), _policy(), NOW)
    assert _planned(plan) == [1]
    assert plan.freed_bytes == 30 * GIB


def test_thresholds_may_be_a_percentage_or_a_size_and_may_mix() -> None:
    studies = [_study(row_id, age_days=400 - row_id, size=100 * MIB) for row_id in range(1, 40)]
    total = 10 * GIB

    sizes = plan_prune(
        studies,
        _disk(150 * MIB, total=total),
        _policy(low_free="200MiB", target_free="1GiB"),
        NOW,
    )
    assert (sizes.low_free_bytes, sizes.target_free_bytes) == (200 * MIB, GIB)
    assert sizes.needed_bytes == GIB - 150 * MIB
    assert len(sizes.deletions) == 9  # 874 MiB needed: nine studies of 100 MiB

    percent = plan_prune(
        studies,
        _disk(150 * MIB, total=total),
        _policy(low_free="2.5%", target_free="12.5%"),
        NOW,
    )
    assert percent.low_free_bytes == 256 * MIB  # 2.5 % of 10 GiB
    assert percent.target_free_bytes == 1280 * MIB
    assert percent.needed_bytes == 1130 * MIB
    assert len(percent.deletions) == 12

    mixed = plan_prune(
        studies,
        _disk(150 * MIB, total=total),
        _policy(low_free="2%", target_free="500MiB"),
        NOW,
    )
    assert mixed.target_free_bytes == 500 * MIB
    assert len(mixed.deletions) == 4  # 350 MiB needed


def test_a_percentage_threshold_is_rounded_up_to_whole_bytes() -> None:
    studies = [_study(1, age_days=400, size=10)]
    policy = _policy(low_free="10.1%", target_free="10.1%")
    at_threshold = plan_prune(studies, _disk(101, total=1000, archive=10), policy, NOW)
    assert at_threshold.low_free_bytes == 101
    assert at_threshold.trigger == ""
    below = plan_prune(studies, _disk(100, total=1000, archive=10), policy, NOW)
    assert below.needed_bytes == 1
    assert _planned(below) == [1]


def test_max_archive_size_alone_triggers_a_prune_while_free_space_is_plentiful() -> None:
    studies = [_study(row_id, age_days=400 - row_id, size=3 * GIB) for row_id in range(1, 21)]
    plan = plan_prune(
        studies,
        _disk(80 * GIB, archive=60 * GIB),
        _policy(max_archive_size="50GiB"),
        NOW,
    )
    assert "max_archive_size" in plan.trigger
    assert "low_free" not in plan.trigger
    assert plan.needed_bytes == 10 * GIB
    assert _planned(plan) == [1, 2, 3, 4]
    # Below the limit: nothing.
    within = plan_prune(
        studies, _disk(80 * GIB, archive=50 * GIB), _policy(max_archive_size="50GiB"), NOW
    )
    assert within.trigger == ""
    assert within.deletions == ()


def test_when_free_space_and_archive_size_both_trigger_the_larger_need_is_met() -> None:
    studies = [_study(row_id, age_days=400 - row_id, size=GIB) for row_id in range(1, 41)]
    plan = plan_prune(
        studies,
        _disk(5 * GIB, archive=60 * GIB),  # 15 GiB short of target_free, 8 GiB over the limit
        _policy(max_archive_size="52GiB"),
        NOW,
    )
    assert "low_free" in plan.trigger
    assert "max_archive_size" in plan.trigger
    assert plan.needed_bytes == 15 * GIB
    assert len(plan.deletions) == 15


def test_protected_young_and_unconverted_studies_are_kept_each_with_its_reason() -> None:
    studies = [
        _study(1, age_days=500, folder="Smith_John"),  # folder protected, another case
        _study(2, age_days=400, folder="Jones_Mary", protected=True),
        _study(3, age_days=300, folder="Jones_Mary", waiting_series=2),
        _study(4, age_days=200, folder="Jones_Mary"),
        _study(5, age_days=10, folder="Jones_Mary"),  # within min_age_days
        _study(6, age_days=5, folder="Jones_Mary"),
    ]
    policy = _policy(protect=("SMITH_john",), min_age_days=30)
    plan = plan_prune(studies, _disk(0), policy, NOW)

    assert _planned(plan) == [4]
    kept = _kept(plan)
    assert sorted(kept) == [1, 2, 3, 5, 6]
    assert "Smith_John" in kept[1]
    assert "retention.protect" in kept[1]
    assert "dcmdb protect" in kept[2]
    assert "2 series" in kept[3]
    assert "keep_unconverted" in kept[3]
    assert "10.0 days" in kept[5]
    assert "min_age_days = 30" in kept[5]
    assert "min_age_days" in kept[6]
    # Nothing more may go: the rest of the need is a shortfall.
    assert plan.shortfall_bytes == plan.needed_bytes - GIB
    assert not plan.limited

    unconverted_too = plan_prune(studies, _disk(0), replace(policy, keep_unconverted=False), NOW)
    assert _planned(unconverted_too) == [3, 4]


def test_a_study_exactly_min_age_days_old_may_be_pruned() -> None:
    studies = [_study(1, age_days=30), _study(2, age_days=30 - 1 / 86400)]
    plan = plan_prune(studies, _disk(0), _policy(min_age_days=30), NOW)
    assert _planned(plan) == [1]
    assert list(_kept(plan)) == [2]


def test_order_study_date_prunes_the_earliest_study_date_first() -> None:
    undated_received = NOW - 60 * DAY
    undated_day = datetime.fromtimestamp(undated_received).strftime("%Y%m%d")
    studies = [
        _study(1, age_days=300, study_date="20260101"),  # received first, scanned last
        _study(2, age_days=100, study_date="20150101"),  # received late, scanned long ago
        _study(3, age_days=200, study_date="20200101"),
        _study(4, age_days=60, study_date=""),  # undated: sorts by the day it was received
        _study(5, age_days=250, study_date="20200101"),  # same date as 3, received earlier
    ]
    assert undated_day > "20260101"
    policy = _policy(min_age_days=0)
    by_received = plan_prune(studies, _disk(0), policy, NOW)
    assert _planned(by_received) == [1, 5, 3, 2, 4]
    by_date = plan_prune(studies, _disk(0), replace(policy, order="study_date"), NOW)
    assert _planned(by_date) == [2, 5, 3, 1, 4]


def test_max_studies_per_run_limits_the_plan_and_is_not_a_shortfall() -> None:
    studies = [_study(row_id, age_days=400 - row_id) for row_id in range(1, 21)]
    plan = plan_prune(studies, _disk(2 * GIB), _policy(max_studies_per_run=3), NOW)
    assert plan.needed_bytes == 18 * GIB
    assert _planned(plan) == [1, 2, 3]
    assert plan.limited
    assert plan.shortfall_bytes == 0
    assert plan.as_dict()["limited"] is True

    # The limit reached by the very study that meets the target: not limited.
    bigger = [replace(study, bytes=5 * GIB) for study in studies]
    exact = plan_prune(bigger, _disk(7 * GIB), _policy(max_studies_per_run=3), NOW)
    assert exact.needed_bytes == 13 * GIB
    assert _planned(exact) == [1, 2, 3]
    assert not exact.limited
    assert exact.shortfall_bytes == 0


def test_a_shortfall_is_reported_when_nothing_more_may_be_pruned() -> None:
    studies = [
        _study(1, age_days=400, size=2 * GIB),
        _study(2, age_days=300, size=5 * GIB, protected=True),
        _study(3, age_days=200, size=GIB),
        _study(4, age_days=3, size=9 * GIB),
    ]
    plan = plan_prune(studies, _disk(5 * GIB), _policy(), NOW)
    assert _planned(plan) == [1, 3]
    assert plan.freed_bytes == 3 * GIB
    assert plan.shortfall_bytes == 12 * GIB
    assert sorted(_kept(plan)) == [2, 4]
    report = plan.as_dict()
    assert report["shortfall_bytes"] == 12 * GIB
    assert [item["study_row_id"] for item in report["kept"]] == [2, 4]
    assert json.loads(json.dumps(report)) == report


def test_the_same_input_gives_the_same_plan_whatever_its_order() -> None:
    rng = random.Random(3)
    studies = [
        _study(
            row_id,
            age_days=rng.choice([40, 50, 60, 70]),  # many ties: broken by row id
            size=rng.randrange(MIB, GIB),
            folder=rng.choice(["Smith_John", "Jones_Mary", "unknown"]),
            protected=rng.random() < 0.1,
            waiting_series=int(rng.random() < 0.1),
        )
        for row_id in range(1, 301)
    ]
    policy = _policy(protect=("unknown",))
    plans = []
    for seed in range(4):
        shuffled = list(studies)
        random.Random(seed).shuffle(shuffled)
        plans.append(plan_prune(shuffled, _disk(GIB), policy, NOW))
    assert all(plan == plans[0] for plan in plans)
    assert all(plan.as_dict() == plans[0].as_dict() for plan in plans)
    assert plans[0].deletions  # the comparison is not of empty plans
    ages = [(d.study.received_at, d.study.study_row_id) for d in plans[0].deletions]
    assert ages == sorted(ages)


def test_planning_ten_thousand_studies_walks_them_all_when_it_must() -> None:
    rng = random.Random(11)
    studies = [
        _study(
            row_id,
            age_days=rng.uniform(0, 1000),
            size=rng.randrange(10 * MIB, 2 * GIB),
            folder=f"Folder_{row_id % 25}",
            protected=rng.random() < 0.02,
            waiting_series=int(rng.random() < 0.05),
        )
        for row_id in range(1, 10_001)
    ]
    total = 1024**5
    plan = plan_prune(
        studies,
        _disk(GIB, total=total, archive=total // 2),
        _policy(target_free="90%", protect=("Folder_3",), max_studies_per_run=100_000),
        NOW,
    )
    assert len(plan.deletions) + len(plan.kept) == len(studies)
    assert plan.shortfall_bytes > 0


def test_a_target_below_low_free_on_this_filesystem_still_frees_up_to_low_free() -> None:
    studies = [_study(row_id, age_days=400 - row_id) for row_id in range(1, 11)]
    # 10 % of 100 GiB is 10 GiB; target_free 5 GiB is less (config compares same kinds only).
    plan = plan_prune(studies, _disk(8 * GIB), _policy(low_free="10%", target_free="5GiB"), NOW)
    assert plan.trigger
    assert plan.freed_bytes + plan.shortfall_bytes >= 2 * GIB


# ---- a real archive: helpers ------------------------------------------------------------


def _skip_or_fail(message: str) -> None:
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def small_volume(volume: Volume) -> Iterator[Volume]:
    """The volume with its archive on a 48 MiB tmpfs of its own (state/ and incoming/ stay on
    disk), so that free space is real and small. Needs root (CI runs as root)."""
    if os.geteuid() != 0:
        _skip_or_fail("mounting a 48 MiB tmpfs as the archive needs root (CI runs as root)")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        _skip_or_fail("mount/umount not found (util-linux)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m,mode=0755", "tmpfs", str(volume.archive)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        _skip_or_fail(f"cannot mount a tmpfs at {volume.archive}: {mounted.stderr.strip()}")
    try:
        yield volume
    finally:
        if subprocess.run(["umount", str(volume.archive)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(volume.archive)], check=False)


def _write_study(
    directory: Path,
    number: int,
    physician: str,
    *,
    series: int = 2,
    slices: int = 10,
    size: int = 256,
    first_series: int = 1,
) -> str:
    """A study of `series` series of `slices` slices of size x size pixels (256: 128 KiB a
    slice), its own patient; returns its StudyInstanceUID."""
    uid = f"{UID_ROOT}.{number}"
    for series_number in range(first_series, first_series + series):
        write_series(
            directory / f"study{number}" / f"series{series_number}",
            SeriesSpec(
                patient_name=f"Patient{number}^Test",
                patient_id=f"PID{number:03d}",
                referring_physician=physician,
                study_instance_uid=uid,
                series_instance_uid=f"{uid}.{series_number}",
                study_description=f"Study {number}",
                series_description=f"S{series_number}",
                series_number=series_number,
                study_date=f"2024{1 + number % 12:02d}15",
                slices=slices,
                rows=size,
                columns=size,
            ),
        )
    return uid


def _ingest(volume: Volume, source: Path) -> None:
    result = dcmdb(volume, "ingest", "--move", str(source))
    assert result.returncode == 0, result.stderr


def _set_received(volume: Volume, uid: str, received_at: float) -> None:
    """Make a study arrive at `received_at` (an outside fact: when dcmdb received it)."""
    db = sqlite3.connect(volume.state / "catalog.sqlite", timeout=30)
    try:
        with db:
            cursor = db.execute(
                "UPDATE studies SET first_received_at = ?, last_received_at = ?"
                " WHERE study_instance_uid = ?",
                (received_at, received_at, uid),
            )
        assert cursor.rowcount == 1, uid
    finally:
        db.close()


def _catalogued_studies(volume: Volume) -> set[str]:
    return {str(uid) for (uid,) in volume.query("SELECT study_instance_uid FROM studies")}


def _study_paths(volume: Volume, uid: str) -> tuple[Path, Path | None]:
    """(the study's DICOM folder, its NIfTI folder or None) in the archive."""
    ((folder, patient_dir, study_dir, nifti_dir),) = volume.query(
        "SELECT f.name, p.dir_name, st.dir_name, ns.dir_name FROM studies st"
        " JOIN folders f ON f.id = st.folder_id JOIN patients p ON p.id = st.patient_row_id"
        " LEFT JOIN nifti_studies ns ON ns.study_row_id = st.id"
        " WHERE st.study_instance_uid = ?",
        uid,
    )
    dicom = volume.archive / str(folder) / "DICOM" / str(patient_dir) / str(study_dir)
    nifti = volume.archive / str(folder) / "NIFTI" / str(nifti_dir) if nifti_dir else None
    return dicom, nifti


def _catalog_bytes(volume: Volume) -> dict[str, int]:
    """StudyInstanceUID -> what pruning the study frees, as the catalog counts it."""
    catalog = Catalog(volume.state)
    try:
        return {study.study_instance_uid: study.bytes for study in catalog.prunable_studies()}
    finally:
        catalog.close()


def _free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _fill_until_free(volume: Volume, free_bytes: int) -> Path:
    """Write a filler file into the archive's filesystem until about `free_bytes` are free
    (never more)."""
    filler = volume.archive / ".filler"
    block = 4096
    to_write = -(-(_free_bytes(volume.archive) - free_bytes) // block) * block
    assert to_write > 0, "the archive is already fuller than the test wants"
    chunk = b"\xa5" * MIB
    with open(filler, "wb") as out:
        while to_write > 0:
            written = out.write(chunk[: min(to_write, len(chunk))])
            to_write -= written
        out.flush()
        os.fsync(out.fileno())
    return filler


def _prune_json(volume: Volume, *args: str) -> dict[str, Any]:
    result = dcmdb(volume, "prune", "--json", *args)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _planned_uids(report: dict[str, Any]) -> list[str]:
    return [item["study_instance_uid"] for item in report["deletions"]]


def _dicomdir_uids(volume: Volume, folder: str) -> set[str]:
    return {uid for _file_id, uid in read_dicomdir_references(volume.archive / folder / "DICOMDIR")}


def _catalogued_instances(volume: Volume, folder: str) -> set[str]:
    rows = volume.query(
        "SELECT i.sop_instance_uid FROM instances i JOIN folders f ON f.id = i.folder_id"
        " WHERE f.name = ?",
        folder,
    )
    return {str(uid) for (uid,) in rows}


def _pruned_log(volume: Volume) -> list[dict[str, Any]]:
    path = volume.state / PRUNED_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


_ORPHANS = {
    "patients": "SELECT count(*) FROM patients p WHERE NOT EXISTS"
    " (SELECT 1 FROM studies st WHERE st.patient_row_id = p.id)",
    "series": "SELECT count(*) FROM series se WHERE NOT EXISTS"
    " (SELECT 1 FROM studies st WHERE st.id = se.study_row_id)",
    "instances": "SELECT count(*) FROM instances i WHERE NOT EXISTS"
    " (SELECT 1 FROM series se WHERE se.id = i.series_row_id)",
    "conversions": "SELECT count(*) FROM conversions c WHERE NOT EXISTS"
    " (SELECT 1 FROM studies st WHERE st.id = c.study_row_id)",
    "nifti_studies": "SELECT count(*) FROM nifti_studies ns WHERE NOT EXISTS"
    " (SELECT 1 FROM studies st WHERE st.id = ns.study_row_id)",
    "studies being deleted": "SELECT count(*) FROM studies WHERE deleting_since IS NOT NULL",
}


def _orphan_rows(volume: Volume) -> dict[str, object]:
    """Rows a deleted study left behind, by table (empty when there are none)."""
    counts = {table: volume.query(sql)[0][0] for table, sql in _ORPHANS.items()}
    return {table: count for table, count in counts.items() if count}


def _trash_is_empty(volume: Volume) -> bool:
    trash = volume.archive / TRASH_DIR
    return not trash.exists() or not any(trash.iterdir())


# ---- acceptance: a full archive on a small filesystem -----------------------------------


def test_a_full_small_archive_is_pruned_of_exactly_the_planned_oldest_studies(
    small_volume: Volume, tmp_path: Path
) -> None:
    volume = small_volume
    volume.config = write_config(
        volume.root,
        ingest={"min_free": "1MiB"},
        convert={"settle_minutes": 0, "workers": 2, "timeout_seconds": 120},
        retention={
            "low_free": "30%",
            "target_free": "40%",
            "min_age_days": 5,
            "protect": ["KEEP_forever"],  # the folder Keep_Forever, as an admin might type it
        },
    )
    # Oldest first: (physician, age in days). Study 0's folder is protected, study 1 is
    # protected by `dcmdb protect`, study 3 gets a series that is never converted, study 7 is
    # too young; 2, 4 and 5 are to go, 6 is the next in line but not needed.
    layout = [
        ("Keep^Forever", 100),
        ("Smith^John", 90),
        ("Smith^John", 80),
        ("Jones^Mary", 70),
        ("Jones^Mary", 60),
        ("Smith^John", 50),
        ("Jones^Mary", 40),
        ("Smith^John", 1),
    ]
    source = tmp_path / "studies"
    uids = [_write_study(source, number, physician) for number, (physician, _) in enumerate(layout)]
    _ingest(volume, source)
    converted = dcmdb(volume, "convert")
    assert converted.returncode == 0, converted.stdout + converted.stderr
    _write_study(tmp_path / "late", 3, "Jones^Mary", series=1, slices=2, first_series=9)
    _ingest(volume, tmp_path / "late")
    now = time.time()
    for uid, (_, age_days) in zip(uids, layout, strict=True):
        _set_received(volume, uid, now - age_days * DAY)
    protected = dcmdb(volume, "protect", uids[1])
    assert protected.returncode == 0, protected.stderr
    assert uids[1] in protected.stdout

    paths = {uid: _study_paths(volume, uid) for uid in uids}
    assert all(nifti is not None for _, nifti in paths.values())
    sizes = _catalog_bytes(volume)
    total = shutil.disk_usage(volume.archive).total
    low_free, target_free = -(-total * 30 // 100), -(-total * 40 // 100)
    # Leave the archive short of target_free by studies 2 and 4 and half of 5.
    needed = sizes[uids[2]] + sizes[uids[4]] + sizes[uids[5]] // 2
    filler = _fill_until_free(volume, target_free - needed)
    free_before = _free_bytes(volume.archive)
    assert free_before < low_free, "the studies are too small for the thresholds"

    planned = _prune_json(volume, "--dry-run")
    assert planned["dry_run"] is True
    assert planned["deleted"] == []
    assert "low_free" in planned["trigger"]
    assert _planned_uids(planned) == [uids[2], uids[4], uids[5]]
    kept = {item["study_instance_uid"]: item["reason"] for item in planned["kept"]}
    assert set(kept) == {uids[0], uids[1], uids[3]}
    assert "retention.protect" in kept[uids[0]]
    assert "dcmdb protect" in kept[uids[1]]
    assert "keep_unconverted" in kept[uids[3]]
    assert planned["shortfall_bytes"] == 0
    assert _catalogued_studies(volume) == set(uids)  # a dry run deletes nothing
    assert _free_bytes(volume.archive) == free_before

    pruned = _prune_json(volume)
    assert pruned["deleted"] == _planned_uids(planned)
    assert _planned_uids(pruned) == _planned_uids(planned)
    assert pruned["changed_since_planned"] == []
    deleted = set(pruned["deleted"])

    assert _catalogued_studies(volume) == set(uids) - deleted
    for uid in uids:
        dicom, nifti = paths[uid]
        assert nifti is not None
        assert dicom.exists() == (uid not in deleted), uid
        assert nifti.exists() == (uid not in deleted), uid
        assert dicom.parent.exists() == (uid not in deleted), "an emptied patient folder goes"
    assert _trash_is_empty(volume)
    assert _orphan_rows(volume) == {}

    assert check_is_clean(volume), dcmdb(volume, "check").stdout
    for folder in ("Keep_Forever", "Smith_John", "Jones_Mary"):
        dicomdir = volume.archive / folder / "DICOMDIR"
        assert _dicomdir_uids(volume, folder) == _catalogued_instances(volume, folder), folder
        file_set = FileSet(pydicom.dcmread(dicomdir))
        listed_studies = {str(uid) for uid in file_set.find_values("StudyInstanceUID")}
        assert not listed_studies & deleted, folder

    log = _pruned_log(volume)
    assert [entry["study_instance_uid"] for entry in log] == pruned["deleted"]
    for entry in log:
        uid = entry["study_instance_uid"]
        assert set(entry) >= {"time", "folder", "study_instance_uid", "study_date", "bytes"}
        assert entry["bytes"] == sizes[uid]
        assert entry["folder"] == ("Jones_Mary" if uid == uids[4] else "Smith_John")
        assert entry["study_date"] == f"2024{1 + uids.index(uid) % 12:02d}15"
        assert "low_free" in entry["reason"]
        datetime.fromisoformat(entry["time"])
    smith_note = (volume.archive / "Smith_John" / PRUNED_NOTE).read_text(encoding="utf-8")
    jones_note = (volume.archive / "Jones_Mary" / PRUNED_NOTE).read_text(encoding="utf-8")
    assert uids[2] in smith_note
    assert uids[5] in smith_note
    assert uids[4] not in smith_note
    assert uids[4] in jones_note
    assert len(jones_note.splitlines()) == 1
    assert not (volume.archive / "Keep_Forever" / PRUNED_NOTE).exists()

    assert _free_bytes(volume.archive) >= target_free
    # Space is now fine: another prune plans nothing.
    again = _prune_json(volume)
    assert again["trigger"] == ""
    assert again["deleted"] == []
    filler.unlink()


def test_a_file_held_open_frees_nothing_and_the_prune_still_deletes_only_the_plan(
    small_volume: Volume, tmp_path: Path
) -> None:
    volume = small_volume
    volume.config = write_config(
        volume.root,
        ingest={"min_free": "1MiB"},
        retention={
            "low_free": "30%",
            "target_free": "40%",
            "min_age_days": 1,
            "keep_unconverted": False,
        },
    )
    source = tmp_path / "studies"
    uids = [_write_study(source, number, "Smith^John") for number in range(5)]
    _ingest(volume, source)
    now = time.time()
    for number, uid in enumerate(uids):
        _set_received(volume, uid, now - (100 - 10 * number) * DAY)
    sizes = _catalog_bytes(volume)
    total = shutil.disk_usage(volume.archive).total
    low_free, target_free = -(-total * 30 // 100), -(-total * 40 // 100)
    needed = sizes[uids[0]] + sizes[uids[1]] + sizes[uids[2]] // 2
    _fill_until_free(volume, target_free - needed)
    assert _free_bytes(volume.archive) < low_free

    planned = _planned_uids(_prune_json(volume, "--dry-run"))
    assert planned == uids[:3]
    # Another process (a researcher's viewer over SMB, a backup) holds every file of the
    # oldest planned study open: unlinking them frees nothing until it lets go.
    dicom, _ = _study_paths(volume, uids[0])
    held = sorted(str(path) for path in dicom.rglob("*") if path.is_file())
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "files = [open(path, 'rb') for path in sys.argv[1:]]\n"
            "print('holding', flush=True)\n"
            "sys.stdin.read()\n",
            *held,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "holding"
        pruned = _prune_json(volume)
        assert pruned["deleted"] == planned
        assert _catalogued_studies(volume) == set(uids[3:])
        assert not dicom.exists()
        # The held files' space is still in use: below target, and still no more deleted.
        assert _free_bytes(volume.archive) < target_free
        assert len(_pruned_log(volume)) == 3
        assert check_is_clean(volume), dcmdb(volume, "check").stdout
    finally:
        holder.kill()
        holder.wait()
    # Let go: the space comes back, without another prune.
    wait_for(
        lambda: _free_bytes(volume.archive) >= target_free,
        timeout=10,
        what="the held files' space to be freed",
    )
    assert _catalogued_studies(volume) == set(uids[3:])


# ---- crashes in the middle of a prune ---------------------------------------------------

_KILL_DURING_PRUNE = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from daemon.catalog import Catalog
    from daemon import retention

    state, archive, uid, point = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    catalog = Catalog(state)
    (study,) = [s for s in catalog.prunable_studies() if s.study_instance_uid == uid]
    # What apply_prune does for one study, step by step, up to `point`; then a crash.
    deletion = catalog.mark_study_deleting(study.study_row_id, study.received_at, time.time())
    assert deletion is not None
    if point != "marked":
        retention._record(deletion, archive, state, "test: killed mid-prune")
    if point in ("dicom renamed", "nifti renamed"):
        trash = archive / retention.TRASH_DIR / str(deletion.study_row_id)
        trash.mkdir(parents=True)
        os.replace(archive / deletion.dicom_dir, trash / "DICOM")
        if point == "nifti renamed":
            os.replace(archive / deletion.nifti_dir, trash / "NIFTI")
            # ... and the rmtree of the trash was under way.
            next(path for path in (trash / "DICOM").rglob("*") if path.is_file()).unlink()
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _kill_mid_prune(volume: Volume, uid: str, point: str) -> None:
    arguments = [str(volume.state), str(volume.archive), uid, point]
    child = subprocess.run(
        [sys.executable, "-c", _KILL_DURING_PRUNE, *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr


def _two_converted_studies(volume: Volume, tmp_path: Path, **retention: object) -> list[str]:
    volume.config = write_config(
        volume.root,
        convert={"settle_minutes": 0, "workers": 2, "timeout_seconds": 120},
        retention={"low_free": "1%", "target_free": "2%", "min_age_days": 0, **retention},
    )
    source = tmp_path / "studies"
    uids = [_write_study(source, number, "Smith^John", size=64, slices=4) for number in (1, 2)]
    _ingest(volume, source)
    converted = dcmdb(volume, "convert")
    assert converted.returncode == 0, converted.stdout + converted.stderr
    return uids


def _assert_deletion_finished(volume: Volume, other: str, dicom: Path, nifti: Path) -> None:
    assert _catalogued_studies(volume) == {other}
    assert not dicom.exists()
    assert not dicom.parent.exists()  # its patient had no other study
    assert not nifti.exists()
    assert _trash_is_empty(volume)
    assert _orphan_rows(volume) == {}
    assert _dicomdir_uids(volume, "Smith_John") == _catalogued_instances(volume, "Smith_John")
    assert check_is_clean(volume), dcmdb(volume, "check").stdout


@pytest.mark.parametrize("point", ["dicom renamed", "nifti renamed"])
def test_a_prune_killed_mid_study_is_finished_when_the_daemon_starts(
    volume: Volume, start_daemon: StartDaemon, tmp_path: Path, point: str
) -> None:
    first, second = _two_converted_studies(volume, tmp_path)
    dicom, nifti = _study_paths(volume, first)
    assert nifti is not None
    _kill_mid_prune(volume, first, point)
    assert not dicom.exists()  # gone from the share at once, though not deleted yet
    assert _catalogued_studies(volume) == {first, second}
    assert not check_is_clean(volume)

    daemon = start_daemon()
    wait_for(
        lambda: _catalogued_studies(volume) == {second}, what="the interrupted deletion to finish"
    )
    wait_for(lambda: check_is_clean(volume), what="the DICOMDIR rewrite")
    assert daemon.stop() == 0
    assert "interrupted by a crash" in daemon.log()
    _assert_deletion_finished(volume, second, dicom, nifti)
    log = _pruned_log(volume)
    assert [entry["study_instance_uid"] for entry in log] == [first]


def test_a_prune_killed_mid_study_is_finished_by_the_next_ingest(
    volume: Volume, tmp_path: Path
) -> None:
    first, second = _two_converted_studies(volume, tmp_path)
    dicom, nifti = _study_paths(volume, first)
    assert nifti is not None
    _kill_mid_prune(volume, first, "nifti renamed")

    empty = tmp_path / "nothing"
    empty.mkdir()
    _ingest(volume, empty)
    _assert_deletion_finished(volume, second, dicom, nifti)


def test_a_prune_killed_just_after_marking_the_study_is_finished_at_start_up(
    volume: Volume, tmp_path: Path
) -> None:
    first, second = _two_converted_studies(volume, tmp_path)
    dicom, nifti = _study_paths(volume, first)
    assert nifti is not None
    _kill_mid_prune(volume, first, "marked")
    assert dicom.exists()
    # A marked study is no candidate any more, and new instances of it wait.
    assert set(_catalog_bytes(volume)) == {second}

    empty = tmp_path / "nothing"
    empty.mkdir()
    _ingest(volume, empty)
    _assert_deletion_finished(volume, second, dicom, nifti)


def test_a_study_deleted_after_a_crash_is_still_recorded_in_the_pruned_log(
    volume: Volume, tmp_path: Path
) -> None:
    first, _second = _two_converted_studies(volume, tmp_path)
    _kill_mid_prune(volume, first, "marked")
    empty = tmp_path / "nothing"
    empty.mkdir()
    _ingest(volume, empty)
    assert first not in _catalogued_studies(volume)
    assert [entry["study_instance_uid"] for entry in _pruned_log(volume)] == [first]
    assert first in (volume.archive / "Smith_John" / PRUNED_NOTE).read_text(encoding="utf-8")


def test_protecting_a_study_whose_deletion_is_committed_is_refused(
    volume: Volume, tmp_path: Path
) -> None:
    first, _second = _two_converted_studies(volume, tmp_path)
    _kill_mid_prune(volume, first, "marked")
    result = dcmdb(volume, "protect", first)
    assert result.returncode == 1, result.stdout
    assert "deleted" in result.stderr


def test_a_study_whose_deletion_is_committed_is_not_converted(
    volume: Volume, tmp_path: Path
) -> None:
    volume.config = write_config(
        volume.root,
        convert={"settle_minutes": 0, "workers": 2, "timeout_seconds": 120},
        retention={"low_free": "1%", "target_free": "2%", "min_age_days": 0},
    )
    uid = _write_study(tmp_path / "studies", 1, "Smith^John", size=64, slices=4)
    _ingest(volume, tmp_path / "studies")
    _kill_mid_prune(volume, uid, "marked")
    converted = dcmdb(volume, "convert")
    assert converted.returncode == 0, converted.stderr
    assert volume.count("conversions") == 0, converted.stdout
    assert not (volume.archive / "Smith_John" / "NIFTI").exists()


def test_dcmdb_prune_finishing_an_interrupted_deletion_leaves_a_valid_dicomdir(
    volume: Volume, tmp_path: Path
) -> None:
    first, second = _two_converted_studies(volume, tmp_path)
    _kill_mid_prune(volume, first, "dicom renamed")
    report = _prune_json(volume)  # space is fine: it plans nothing itself
    assert report["trigger"] == ""
    assert _catalogued_studies(volume) == {second}
    assert check_is_clean(volume), dcmdb(volume, "check").stdout


def test_a_deletion_in_progress_is_left_to_the_prune_that_holds_the_lock(
    volume: Volume, tmp_path: Path
) -> None:
    first, second = _two_converted_studies(volume, tmp_path)
    catalog = Catalog(volume.state)
    try:
        (study,) = [s for s in catalog.prunable_studies() if s.study_instance_uid == first]
        # A running prune: holds the lock, has marked the study and is about to move it.
        with exclusive_lock(volume.state / LOCK_FILE):
            deletion = catalog.mark_study_deleting(study.study_row_id, study.received_at, NOW)
            assert deletion is not None
            empty = tmp_path / "nothing"
            empty.mkdir()
            _ingest(volume, empty)
            assert _catalogued_studies(volume) == {first, second}
            assert (volume.archive / deletion.dicom_dir).is_dir()
    finally:
        catalog.close()


# ---- studies that change after they were planned ----------------------------------------


def test_a_study_that_receives_an_instance_after_planning_is_not_deleted(
    volume: Volume, tmp_path: Path
) -> None:
    source = tmp_path / "studies"
    uids = [_write_study(source, number, "Smith^John", size=64, slices=3) for number in range(4)]
    _ingest(volume, source)
    now = time.time()
    for number, uid in enumerate(uids):
        _set_received(volume, uid, now - (100 - number) * DAY)
    policy = RetentionConfig(
        low_free="10%", target_free="20%", min_age_days=30, keep_unconverted=False
    )
    catalog = Catalog(volume.state)
    try:
        studies = catalog.prunable_studies()
        disk = DiskFigures(total_bytes=100 * GIB, free_bytes=GIB, archive_bytes=GIB)
        plan = plan_prune(studies, disk, policy, time.time())
        assert [d.study.study_instance_uid for d in plan.deletions] == uids

        # After planning: study 1 gets a new series, study 2 is protected.
        _write_study(tmp_path / "late", 1, "Smith^John", series=1, slices=1, first_series=5)
        _ingest(volume, tmp_path / "late")
        assert dcmdb(volume, "protect", uids[2]).returncode == 0

        result = apply_prune(
            plan, catalog, volume.archive, volume.state, dry_run=False, now=time.time
        )
    finally:
        catalog.close()
    assert [deletion.study_instance_uid for deletion in result.deleted] == [uids[0], uids[3]]
    assert result.skipped == [uids[1], uids[2]]
    assert _catalogued_studies(volume) == {uids[1], uids[2]}
    assert volume.query(
        "SELECT count(*) FROM instances i JOIN series se ON se.id = i.series_row_id"
        " JOIN studies st ON st.id = se.study_row_id WHERE st.study_instance_uid = ?",
        uids[1],
    ) == [(7,)]
    assert [entry["study_instance_uid"] for entry in _pruned_log(volume)] == [uids[0], uids[3]]
    rewritten = dcmdb(volume, "dicomdir", "--all")
    assert rewritten.returncode == 0, rewritten.stderr
    assert check_is_clean(volume), dcmdb(volume, "check").stdout


def test_a_dry_run_plans_but_deletes_and_records_nothing(volume: Volume, tmp_path: Path) -> None:
    source = tmp_path / "studies"
    uids = [_write_study(source, number, "Smith^John", size=64, slices=2) for number in range(3)]
    _ingest(volume, source)
    catalog = Catalog(volume.state)
    try:
        plan = plan_prune(
            catalog.prunable_studies(),
            DiskFigures(total_bytes=100 * GIB, free_bytes=0, archive_bytes=GIB),
            RetentionConfig(
                low_free="10%", target_free="20%", min_age_days=0, keep_unconverted=False
            ),
            time.time() + 1,
        )
        assert len(plan.deletions) == 3
        result = apply_prune(
            plan, catalog, volume.archive, volume.state, dry_run=True, now=time.time
        )
    finally:
        catalog.close()
    assert result.deleted == []
    assert result.skipped == []
    assert _catalogued_studies(volume) == set(uids)
    assert not (volume.state / PRUNED_LOG).exists()
    assert not (volume.archive / "Smith_John" / PRUNED_NOTE).exists()
    assert check_is_clean(volume)


# ---- the commands ------------------------------------------------------------------------


def test_protect_and_unprotect_of_an_unknown_study_exit_1_naming_it(volume: Volume) -> None:
    for command in ("protect", "unprotect"):
        result = dcmdb(volume, command, "1.2.3.4.5")
        assert result.returncode == 1, result.stdout
        assert "no study 1.2.3.4.5 in the catalog" in result.stderr
        assert "Traceback" not in result.stderr


def test_protect_then_unprotect_lets_retention_prune_the_study_again(
    volume: Volume, tmp_path: Path
) -> None:
    uid = _write_study(tmp_path / "studies", 1, "Smith^John", size=64, slices=2)
    _ingest(volume, tmp_path / "studies")
    assert dcmdb(volume, "protect", uid).returncode == 0
    assert volume.query("SELECT protected FROM studies") == [(1,)]
    result = dcmdb(volume, "unprotect", uid)
    assert result.returncode == 0, result.stderr
    assert "no longer protected" in result.stdout
    assert volume.query("SELECT protected FROM studies") == [(0,)]


def test_prune_with_retention_off_exits_1_saying_how_to_turn_it_on(volume: Volume) -> None:
    result = dcmdb(volume, "prune", "--dry-run")
    assert result.returncode == 1, result.stdout
    assert "retention is off" in result.stderr
    assert "retention.low_free" in result.stderr
    assert "retention.target_free" in result.stderr
    assert str(volume.config) in result.stderr


def test_prune_when_space_is_fine_says_so_and_deletes_nothing(
    volume: Volume, tmp_path: Path
) -> None:
    volume.config = write_config(volume.root, retention={"low_free": "1%", "target_free": "2%"})
    uid = _write_study(tmp_path / "studies", 1, "Smith^John", size=64, slices=2)
    _ingest(volume, tmp_path / "studies")
    result = dcmdb(volume, "prune")
    assert result.returncode == 0, result.stderr
    assert "nothing to prune" in result.stdout
    assert _catalogued_studies(volume) == {uid}


def test_the_daemon_prunes_an_archive_over_max_archive_size_and_status_says_so(
    volume: Volume, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    source = tmp_path / "studies"
    uids = [_write_study(source, number, "Smith^John", size=64, slices=5) for number in range(3)]
    _ingest(volume, source)
    now = time.time()
    for number, uid in enumerate(uids):
        _set_received(volume, uid, now - (30 - number) * DAY)
    sizes = _catalog_bytes(volume)
    # Room for the two newest studies only.
    limit = sizes[uids[1]] + sizes[uids[2]] + 100
    volume.config = write_config(
        volume.root,
        convert={"enabled": False},
        retention={
            "low_free": "1%",
            "target_free": "2%",
            "max_archive_size": str(limit),
            "min_age_days": 7,
            "keep_unconverted": False,
        },
    )
    start_daemon()
    wait_for(lambda: _catalogued_studies(volume) == set(uids[1:]), what="the daemon's prune")
    wait_for(lambda: volume.query("SELECT result FROM job_runs WHERE name = 'retention'"))
    wait_for(lambda: check_is_clean(volume), what="the DICOMDIR rewrite after the prune")
    status = dcmdb(volume, "status")
    assert status.returncode == 0, status.stderr
    (line,) = [line for line in status.stdout.splitlines() if line.startswith("retention")]
    assert "max_archive_size" in line
    assert "deleted 1 studies" in line
    assert [entry["study_instance_uid"] for entry in _pruned_log(volume)] == [uids[0]]


def test_status_shows_space_ok_after_a_daemon_check(
    volume: Volume, start_daemon: StartDaemon
) -> None:
    volume.config = write_config(
        volume.root,
        convert={"enabled": False},
        retention={"low_free": "1%", "target_free": "2%"},
    )
    before = dcmdb(volume, "status")
    assert "retention   off, or not run yet" in before.stdout
    start_daemon()
    wait_for(lambda: volume.query("SELECT finished_at FROM job_runs WHERE name = 'retention'"))
    status = dcmdb(volume, "status")
    (line,) = [line for line in status.stdout.splitlines() if line.startswith("retention")]
    assert "space OK" in line
    assert "free" in line


def test_the_bytes_a_study_frees_are_its_files_on_disk_after_ingest_duplicates_and_conversion(
    volume: Volume, tmp_path: Path
) -> None:
    volume.config = write_config(volume.root, convert={"settle_minutes": 0})
    study = "1.2.826.0.1.3680043.8.498.901"
    first = write_series(tmp_path / "a", SeriesSpec(study_instance_uid=study, slices=4))
    write_series(tmp_path / "b", SeriesSpec(study_instance_uid=study, series_number=2, slices=3))
    shutil.copy(first[0], tmp_path / "b" / "duplicate.dcm")  # dropped, counts nothing
    assert dcmdb(volume, "ingest", str(tmp_path / "a"), str(tmp_path / "b")).returncode == 0
    assert dcmdb(volume, "convert").returncode == 0

    catalog = Catalog(volume.state)
    try:
        (prunable,) = catalog.prunable_studies()
    finally:
        catalog.close()
    folder = volume.archive / prunable.folder_name
    on_disk = sum(p.stat().st_size for p in (folder / "DICOM").rglob("*") if p.is_file())
    on_disk += sum(
        p.stat().st_size
        for p in (folder / "NIFTI").rglob("*")
        if p.is_file() and p.name != "conversion.txt"
    )
    assert prunable.bytes == on_disk


def test_a_study_with_an_instance_still_being_moved_in_is_not_marked_for_deletion(
    volume: Volume, tmp_path: Path
) -> None:
    write_series(tmp_path / "in", SeriesSpec(slices=3))
    assert dcmdb(volume, "ingest", str(tmp_path / "in")).returncode == 0
    catalog = Catalog(volume.state)
    try:
        (study,) = catalog.prunable_studies()
        db = sqlite3.connect(volume.state / "catalog.sqlite")
        try:  # as ingest leaves it between committing a row and finishing the move
            (instance_row_id,) = db.execute("SELECT min(id) FROM instances").fetchone()
            db.execute(
                "INSERT INTO ingest_journal (instance_row_id, source_path, keep_source)"
                " VALUES (?, '/incoming/x.dcm', 0)",
                (instance_row_id,),
            )
            db.commit()
        finally:
            db.close()
        assert catalog.mark_study_deleting(study.study_row_id, study.received_at, 0.0) is None
        catalog.finish_moves([instance_row_id])
        assert catalog.mark_study_deleting(study.study_row_id, study.received_at, 0.0)
    finally:
        catalog.close()
