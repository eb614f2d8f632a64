"""The `dcmdb` command as a user runs it: a subprocess, real files, real catalog."""

from __future__ import annotations

import json
import os
from pathlib import Path

from daemon.config import EX_CONFIG
from tests.conftest import Volume, dcmdb
from tests.factory import SeriesSpec, write_series


def _ingest_series(volume: Volume, tmp_path: Path, **spec: object) -> list[Path]:
    files = write_series(tmp_path / "series", SeriesSpec(**spec))  # type: ignore[arg-type]
    result = dcmdb(volume, "ingest", "--move", str(tmp_path / "series"))
    assert result.returncode == 0, result.stderr
    return files


def test_a_config_with_three_mistakes_reports_all_three_with_key_paths_and_exits_78(
    volume: Volume,
) -> None:
    volume.config.write_text(
        '[paths]\nincoming = "incoming"\narchive = "archive"\nquarantine = "quarantine"\n'
        'state = "state"\n'
        '[ingest]\nsettle_seconds = "ten"\nobserver = "fanotify"\n'
        '[sorting]\nfolder_templat = "{family}"\n'
    )
    for command in ("run", "status", "check-config"):
        result = dcmdb(volume, command)
        assert result.returncode == EX_CONFIG
        assert "ingest.settle_seconds" in result.stderr
        assert "ingest.observer" in result.stderr
        assert "sorting.folder_templat" in result.stderr
        assert "folder_template" in result.stderr  # the suggestion
    assert not (volume.state / "catalog.sqlite").exists()  # nothing started


def test_check_config_prints_the_effective_config_with_absolute_paths(volume: Volume) -> None:
    result = dcmdb(volume, "check-config")
    assert result.returncode == 0, result.stderr
    assert f'incoming = "{volume.incoming}"' in result.stdout
    assert "settle_seconds = 0.5" in result.stdout


def test_ingest_copies_by_default_and_moves_with_move(volume: Volume, tmp_path: Path) -> None:
    copied = write_series(tmp_path / "copied", SeriesSpec(slices=3))
    result = dcmdb(volume, "ingest", str(tmp_path / "copied"))
    assert result.returncode == 0, result.stderr
    assert "3 files: 3 archived, 0 duplicates dropped, 0 quarantined" in result.stdout
    assert all(p.exists() for p in copied)

    again = dcmdb(volume, "ingest", "--move", str(tmp_path / "copied"))
    assert "3 files: 0 archived, 3 duplicates dropped" in again.stdout
    assert not any(p.exists() for p in copied)
    assert "3/3 files" in again.stderr  # the progress line


def test_status_json_reports_counts_disk_and_folders(volume: Volume, tmp_path: Path) -> None:
    _ingest_series(volume, tmp_path, referring_physician="Smith^John", slices=4)
    (volume.incoming / "waiting.dcm").write_bytes(b"x")
    (volume.incoming / ".hidden").write_bytes(b"x")
    result = dcmdb(volume, "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["instances"] == 4
    assert status["studies"] == 1
    assert status["series"] == 1
    assert status["quarantined"] == 0
    assert status["duplicates"] == 0
    assert status["incoming_pending"] == 1
    assert status["disk"]["free_bytes"] > 0
    folder = status["folders"]["Smith_John"]
    assert folder["instances"] == 4
    archived = sorted((volume.archive / "Smith_John" / "DICOM").rglob("*"))
    assert folder["bytes"] == sum(p.stat().st_size for p in archived if p.is_file())
    text = dcmdb(volume, "status")
    assert "Smith_John" in text.stdout
    assert "4 in 1 series" in text.stdout


def test_check_finds_missing_files_orphans_size_changes_and_temp_files(
    volume: Volume, tmp_path: Path
) -> None:
    _ingest_series(volume, tmp_path, slices=4)
    clean = dcmdb(volume, "check", "--json")
    assert clean.returncode == 0, clean.stdout
    assert json.loads(clean.stdout)["checked_files"] == 4

    first, second, third, _fourth = sorted(
        p for p in (volume.archive / "Smith_John" / "DICOM").rglob("*") if p.is_file()
    )
    first.unlink()
    with open(second, "ab") as out:
        out.write(b"\0\0")
    os.link(third, third.with_name("STRAY"))
    (third.parent / ".tmp-X-123").write_bytes(b"half")

    result = dcmdb(volume, "check", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    relative = lambda p: p.relative_to(volume.archive).as_posix()  # noqa: E731
    assert report["missing"] == [relative(first)]
    assert report["size_mismatch"] == [relative(second)]
    assert report["orphans"] == [relative(third.with_name("STRAY"))]
    assert report["temp_files"] == [relative(third.parent / ".tmp-X-123")]
    assert report["ok"] is False
    text = dcmdb(volume, "check")
    assert text.returncode == 1
    assert "NOT OK" in text.stdout
