"""NIfTI conversion of 20 series of 100 slices of 256x256: the `dcmdb convert` job beside
serial `dcm2niix -z y` over the same archived series in the same run.

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
import threading
import time
from pathlib import Path

import psutil
from daemon.nifti import find_dcm2niix

from tests.factory import SeriesSpec, write_series

FOLDER = "Bench_Convert"


def run(*, series: int, slices: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="dcmdb-bench-convert-"))
    try:
        _run(work, series, slices)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _config(work: Path) -> Path:
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


class _PeakMemory:
    """Peak RSS of each process below `pid`, sampled every 20 ms while it runs."""

    def __init__(self, pid: int) -> None:
        self._root = psutil.Process(pid)
        self.peaks: dict[str, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            try:
                children = self._root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                try:
                    key = f"{child.name()}[{child.pid}]"
                    self.peaks[key] = max(self.peaks.get(key, 0), child.memory_info().rss)
                except psutil.NoSuchProcess:
                    continue

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _bytes(paths: list[Path]) -> int:
    return sum(path.stat().st_size for path in paths)


def _run(work: Path, series_count: int, slices: int) -> None:
    config = _config(work)
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
    _dcmdb(config, "ingest", "--move", str(work / "generated"))
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

    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "--config", str(config), "convert"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    memory = _PeakMemory(process.pid)
    output, errors = process.communicate()
    memory.stop()
    dcmdb_seconds = time.perf_counter() - started
    if process.returncode != 0 or f"converted {series_count}" not in output:
        raise SystemExit(f"dcmdb convert failed:\n{output}\n{errors}")
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
    workers = {name: rss for name, rss in memory.peaks.items() if name.startswith("python")}
    engines = {name: rss for name, rss in memory.peaks.items() if not name.startswith("python")}
    for name, rss in sorted(workers.items()):
        print(f"  peak RSS, worker {name:<24}: {rss / 2**20:7.1f} MiB")
    if engines:
        print(f"  peak RSS, largest engine process      : {max(engines.values()) / 2**20:7.1f} MiB")
