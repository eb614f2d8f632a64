"""NIfTI conversion of 20 series of 100 slices of 256x256: the conversion job (`dcmdb convert`,
run in this process as the daemon runs it) beside serial `dcm2niix -z y` over the same
archived series in the same run.

Targets (issue 4): wall time at most 0.6 x, bytes of volumes and sidecars at most 1.05 x.
The series are MR-like phantoms with noise (tests/factory.py texture "phantom"): gzip costs
what it costs on scanner data, which a regular test pattern would hide.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from daemon.config import load_config
from daemon.convert import run_conversions
from daemon.nifti import find_dcm2niix
from tests.factory import SeriesSpec, write_series

FOLDER = "Bench_Convert"


def run(*, series: int, slices: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="dcmdb-bench-convert-"))
    try:
        _run(work, series, slices)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_config(work: Path) -> Path:
    config = work / "config.toml"
    config.write_text(
        "[paths]\n"
        'incoming = "incoming"\narchive = "archive"\nquarantine = "quarantine"\nstate = "state"\n'
        "[convert]\nsettle_minutes = 0\n"
    )
    return config


def _dcmdb(config: Path, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--config", str(config), *args],
        check=True,
        capture_output=True,
    )


def _bytes(paths: list[Path]) -> int:
    return sum(path.stat().st_size for path in paths)


def _run(work: Path, series_count: int, slices: int) -> None:
    config_path = _write_config(work)
    print(f"generating {series_count} series of {slices} slices of 256x256 ...")
    for number in range(1, series_count + 1):
        write_series(
            work / "generated" / f"{number:02d}",
            SeriesSpec(
                referring_physician="Bench^Convert",
                study_instance_uid="1.2.826.0.1.3680043.8.498.77",
                series_number=number,
                series_description=f"EPI run {number}",
                slices=slices,
                rows=256,
                columns=256,
                texture="phantom",
            ),
        )
    _dcmdb(config_path, "ingest", "--move", str(work / "generated"))
    series_dirs = sorted(
        {path.parent for path in (work / "archive").glob(f"{FOLDER}/DICOM/*/*/*/*")}
    )
    if len(series_dirs) != series_count:
        raise SystemExit(f"expected {series_count} series folders, found {len(series_dirs)}")

    dcm2niix = find_dcm2niix()
    baseline_out = work / "baseline"
    baseline_out.mkdir()
    started = time.perf_counter()
    for index, series_dir in enumerate(series_dirs):
        subprocess.run(
            [
                str(dcm2niix),
                "-z",
                "y",
                "-b",
                "y",
                "-f",
                f"s{index:02d}",
                "-o",
                str(baseline_out),
                str(series_dir),
            ],
            check=True,
            capture_output=True,
        )
    baseline_seconds = time.perf_counter() - started
    baseline_files = list(baseline_out.iterdir())

    # The job as the daemon runs it: in a process that has imported dcmdb already; worker
    # start-up is part of the job and is timed.
    config = load_config(config_path)
    started = time.perf_counter()
    run = run_conversions(config.convert, config.paths)
    dcmdb_seconds = time.perf_counter() - started
    if run.counts["converted"] != series_count:
        raise SystemExit(f"the conversion job did not convert every series: {run.describe()}")
    nifti_root = work / "archive" / FOLDER / "NIFTI"
    outputs = [p for p in nifti_root.rglob("*") if p.is_file()]
    volumes = [p for p in outputs if p.name.endswith((".nii.gz", ".json"))]
    previews = [p for p in outputs if p.name.endswith(".png")]

    print(
        f"\nNIfTI conversion: {series_count} series x {slices} slices of 256x256, "
        f"{os.cpu_count()} cores"
    )
    print(f"  serial dcm2niix -z y : {baseline_seconds:7.2f} s   (baseline)")
    ratio = dcmdb_seconds / baseline_seconds
    print(
        f"  dcmdb convert        : {dcmdb_seconds:7.2f} s   ratio {ratio:.2f} x   (target <= 0.60)"
    )
    baseline_bytes = _bytes(baseline_files)
    volume_bytes = _bytes(volumes)
    print(f"  bytes, dcm2niix .nii.gz + .json : {baseline_bytes:>12,}   (baseline)")
    print(
        f"  bytes, dcmdb .nii.gz + .json    : {volume_bytes:>12,}   ratio "
        f"{volume_bytes / baseline_bytes:.3f} x   (target <= 1.05)"
    )
    print(f"  bytes, dcmdb .png previews      : {_bytes(previews):>12,}")
    for index, rss in enumerate(run.worker_peak_rss):
        print(f"  peak RSS, worker {index + 1}             : {rss / 2**20:7.1f} MiB")
