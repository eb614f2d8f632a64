"""What the archive holds and whether disk and catalog agree (`dcmdb status`, `dcmdb check`)."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.catalog import Catalog, JobRun
from daemon.config import IngestConfig, PathsConfig
from daemon.convert import CONVERT_JOB
from daemon.dicomdir import DICOMDIR, DicomdirReadError, read_dicomdir_references
from daemon.fsops import TEMP_PREFIX
from daemon.ingest import is_ignored_name, space_pause_reason
from daemon.network import RETRIEVE_JOB
from daemon.retention import RETENTION_JOB


@dataclass
class CheckReport:
    """Disk against catalog. Paths are relative to the archive root, '/'-separated."""

    missing: list[str] = field(default_factory=list)  # catalogued, not on disk
    size_mismatch: list[str] = field(default_factory=list)  # on disk with another size
    orphans: list[str] = field(default_factory=list)  # under <folder>/DICOM/, not catalogued
    temp_files: list[str] = field(default_factory=list)  # .tmp-* left by a killed writer
    dicomdir_missing: list[str] = field(default_factory=list)  # folders with instances
    dicomdir_stale: list[str] = field(
        default_factory=list
    )  # lists other instances than the catalog
    dicomdir_dangling: list[str] = field(default_factory=list)  # entries whose file is not there
    moves_in_flight: int = 0  # journal rows: the daemon is running, or start it to resolve them
    checked_files: int = 0

    @property
    def ok(self) -> bool:
        return not (
            self.missing
            or self.size_mismatch
            or self.orphans
            or self.temp_files
            or self.dicomdir_missing
            or self.dicomdir_stale
            or self.dicomdir_dangling
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def check_archive(catalog: Catalog, archive: Path) -> CheckReport:
    report = CheckReport(moves_in_flight=catalog.moves_in_flight())
    expected = {f"{folder}/{rel_path}": size for folder, rel_path, size in catalog.archived_files()}
    report.checked_files = len(expected)
    for path, size in _walk_files(archive):
        relative = path[len(str(archive)) + 1 :].replace(os.sep, "/")
        name = relative.rsplit("/", 1)[-1]
        if name.startswith(TEMP_PREFIX):
            report.temp_files.append(relative)
            continue
        wanted = expected.pop(relative, None)
        if wanted is None:
            parts = relative.split("/")
            if len(parts) > 2 and parts[1] == "DICOM":
                report.orphans.append(relative)
        elif wanted != size:
            report.size_mismatch.append(relative)
    report.missing = sorted(expected)
    for found in (report.size_mismatch, report.orphans, report.temp_files):
        found.sort()
    _check_dicomdirs(catalog, archive, report)
    return report


def _check_dicomdirs(catalog: Catalog, archive: Path, report: CheckReport) -> None:
    """Each folder's DICOMDIR must list exactly the folder's instances, all present."""
    for folder, instances in catalog.folder_instances().items():
        path = archive / folder / DICOMDIR
        if not path.exists():
            if instances:
                report.dicomdir_missing.append(folder)
            continue
        try:
            references = dict(read_dicomdir_references(path))
        except DicomdirReadError as exc:
            report.dicomdir_stale.append(f"{folder}: unreadable ({exc})")
            continue
        if references != instances:
            listed, catalogued = set(references.items()), set(instances.items())
            report.dicomdir_stale.append(
                f"{folder}: {len(catalogued - listed)} instances not listed, "
                f"{len(listed - catalogued)} listed that the catalog does not hold there"
            )
        report.dicomdir_dangling += [
            f"{folder}/{file_id}"
            for file_id in sorted(references)
            if not (archive / folder / file_id).is_file()
        ]


def _walk_files(root: Path) -> list[tuple[str, int]]:
    files: list[tuple[str, int]] = []
    folders = [str(root)]
    while folders:
        with os.scandir(folders.pop()) as listing:
            for entry in listing:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    files.append((entry.path, entry.stat(follow_symlinks=False).st_size))
    return files


def count_incoming(incoming: Path) -> int:
    """Files waiting in incoming/ (hidden and temporary names are not input)."""
    count = 0
    folders = [str(incoming)]
    while folders:
        try:
            with os.scandir(folders.pop()) as listing:
                for entry in listing:
                    if is_ignored_name(entry.name):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        count += 1
        except FileNotFoundError:
            continue
    return count


def status_report(catalog: Catalog, paths: PathsConfig, ingest: IngestConfig) -> dict[str, Any]:
    summary = catalog.summary()
    conversions = catalog.conversion_summary()
    last_run = catalog.last_job_run(CONVERT_JOB)
    disk = shutil.disk_usage(paths.archive)
    return {
        "instances": summary.instances,
        "studies": summary.studies,
        "series": summary.series,
        "patients": summary.patients,
        "bytes": summary.bytes,
        "quarantined": summary.quarantined,
        "duplicates": summary.duplicates,
        "incoming_pending": count_incoming(paths.incoming),
        # The daemon pauses ingest by the same rule; this reads the disk, not the daemon.
        "ingest_paused_reason": space_pause_reason(paths.archive, disk.free, disk.total, ingest),
        "moves_in_flight": summary.moves_in_flight,
        "disk": {
            "path": str(paths.archive),
            "total_bytes": disk.total,
            "used_bytes": disk.used,
            "free_bytes": disk.free,
            "free_percent": round(100.0 * disk.free / disk.total, 1) if disk.total else 0.0,
        },
        "retention": _job_run_text(catalog.last_job_run(RETENTION_JOB)),
        "retrieve": {
            "last_run": _job_run_text(catalog.last_job_run(RETRIEVE_JOB)),
            "failed_studies": [
                {
                    "study_instance_uid": failure.study_instance_uid,
                    "error": failure.last_error,
                    "at": _local_time(failure.failed_at),
                    "attempts": failure.attempts,
                }
                for failure in catalog.retrieve_failures()
            ],
        },
        "conversions": {
            **conversions.counts,
            "last_run": _job_run_text(last_run),
            "latest_failures": [
                {
                    "folder": failure.folder_name,
                    "series": failure.stem,
                    "series_instance_uid": failure.series_instance_uid,
                    "reason": failure.reason,
                    "at": _local_time(failure.finished_at),
                }
                for failure in conversions.latest_failures
            ],
        },
        "folders": {
            folder.name: {
                "instances": folder.instances,
                "studies": folder.studies,
                "series": folder.series,
                "bytes": folder.bytes,
            }
            for folder in summary.folders
        },
    }


def _local_time(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _job_run_text(run: JobRun | None) -> str:
    """ "2026-11-21T05:00:02+01:00: 12 series due: converted 11, ..." or ""."""
    if run is None:
        return ""
    if run.finished_at is None:
        return f"{_local_time(run.started_at)}: {run.result or 'running'}"
    return f"{_local_time(run.finished_at)}: {run.result}"
