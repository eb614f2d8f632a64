"""Ingest throughput, memory and latency of a running daemon, beside a minimal baseline.

Baseline: the least any ingest must do per file, in one process: pydicom
dcmread(stop_before_pixels=True) + mkdir + os.rename, over an identical copy of the files.
dcmdb: the same files written into incoming/ of a running `dcmdb run`; from the first file
to the last catalog row.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pydicom

from tests.factory import SeriesSpec, write_series, write_studies

PHYSICIANS = ["Smith^John", "Jones^Ann", "Curie^Marie", "Müller^Jürgen", "", "House^Gregory"]


def run(*, instances: int, trickle: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="dcmdb-bench-"))
    try:
        _run(work, instances, trickle)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(work: Path, instances: int, trickle: int) -> None:
    slices = 50
    series_per_study = 4
    studies_per_physician = max(1, instances // (len(PHYSICIANS) * series_per_study * slices))
    print(f"generating {instances} instances (64x64) ...", flush=True)
    generated = write_studies(
        work / "generated",
        physicians=PHYSICIANS,
        studies_per_physician=studies_per_physician,
        series_per_study=series_per_study,
        slices_per_series=slices,
    )[:instances]
    count = len(generated)
    print(f"ingest of {count} instances dropped into incoming/ of a running daemon")
    print("  (each dcmdb run beside a baseline run just before it, over an identical copy)")
    for drop in ("write", "rename"):
        baseline_files = _copy_flat(generated, work / f"baseline-{drop}")
        daemon_files = _copy_flat(generated, work / f"stage-{drop}")
        baseline_rate = count / _baseline(baseline_files, work / f"baseline-out-{drop}")
        volume = _volume(work / f"volume-{drop}")
        daemon = _start(volume)
        try:
            seconds, dropped, peak_rss = _drop_and_wait(volume, daemon, daemon_files, drop)
            latencies = (
                _trickle(volume, work / "trickle", trickle, count) if drop == "write" else []
            )
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
        rate = count / seconds
        how = {
            "write": "files written into incoming/ (as a receiver or a copy does)",
            "rename": "files renamed into incoming/ from elsewhere on the volume",
        }[drop]
        print(f"  {how}; dropping took {dropped:.1f} s")
        print(f"    baseline (dcmread + mkdir + rename)  {baseline_rate:8.0f} instances/s")
        print(f"    dcmdb                                {rate:8.0f} instances/s")
        print(
            f"    ratio dcmdb / baseline               {rate / baseline_rate:8.2f}  (target >= 0.8)"
        )
        main_rss, readers_rss = peak_rss
        print(
            f"    peak RSS: daemon {main_rss / 2**20:.0f} MiB + {len(readers_rss)} child "
            f"processes {sum(readers_rss) / 2**20:.0f} MiB = "
            f"{(main_rss + sum(readers_rss)) / 2**20:.0f} MiB  (target < 200 MB)"
        )
        if latencies:
            ordered = sorted(latencies)
            p95 = ordered[int(0.95 * (len(ordered) - 1))]
            print(
                f"    latency close -> catalog row, {len(ordered)} files at 50/s: "
                f"p50 {statistics.median(ordered) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
                f"max {ordered[-1] * 1000:.0f} ms  (target p95 < 1 s)"
            )


def _copy_flat(files: list[Path], target: Path) -> list[Path]:
    target.mkdir(parents=True)
    copies = []
    for index, path in enumerate(files):
        copy = target / f"{index:07d}.dcm"
        shutil.copyfile(path, copy)
        copies.append(copy)
    return copies


def _baseline(files: list[Path], out: Path) -> float:
    started = time.perf_counter()
    for path in files:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        folder = out / str(dataset.StudyInstanceUID) / str(dataset.SeriesInstanceUID)
        folder.mkdir(parents=True, exist_ok=True)
        os.rename(path, folder / str(dataset.SOPInstanceUID))
    return time.perf_counter() - started


def _volume(root: Path) -> Path:
    for name in ("incoming", "archive", "quarantine", "state"):
        (root / name).mkdir(parents=True)
    config = root / "config.toml"
    config.write_text(
        '[paths]\nincoming = "incoming"\narchive = "archive"\nquarantine = "quarantine"\n'
        'state = "state"\n'
        f"[ingest]\nparse_workers = {os.environ.get('BENCH_PARSE_WORKERS', 0)}\n"
    )
    return root


def _start(volume: Path) -> subprocess.Popen[bytes]:
    log = open(volume / "daemon.log", "wb")  # noqa: SIM115 - lives as long as the daemon
    daemon = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "--config", str(volume / "config.toml"), "run"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while b"dcmdb running" not in (volume / "daemon.log").read_bytes():
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise SystemExit((volume / "daemon.log").read_text())
        time.sleep(0.05)
    return daemon


def _count(volume: Path) -> int:
    db = sqlite3.connect(f"file:{volume / 'state' / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM instances").fetchone()[0])
    finally:
        db.close()


def _drop_and_wait(
    volume: Path, daemon: subprocess.Popen[bytes], files: list[Path], drop: str
) -> tuple[float, float, tuple[int, list[int]]]:
    incoming = volume / "incoming"
    # Warm the reader processes (spawned on first use) so that start-up is not measured.
    (warm,) = write_series(volume / "warm", SeriesSpec(slices=1))
    os.rename(warm, incoming / "warm.dcm")
    while _count(volume) < 1:
        time.sleep(0.01)
    expected = len(files) + 1
    started = time.perf_counter()
    if drop == "rename":
        # As a sender that writes elsewhere on the volume and renames into incoming/.
        for path in files:
            os.rename(path, incoming / path.name)
    else:
        # As a scanner, a DICOM receiver or a person copying files: each file created, written
        # and closed in incoming/ (contents read beforehand, outside the clock).
        contents = [path.read_bytes() for path in files]
        started = time.perf_counter()
        for path, data in zip(files, contents, strict=True):
            with open(incoming / path.name, "wb") as out:
                out.write(data)
    dropped = time.perf_counter() - started
    while _count(volume) < expected:
        if daemon.poll() is not None:
            raise SystemExit((volume / "daemon.log").read_text())
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    return elapsed, dropped, _peak_rss(daemon.pid)


def _peak_rss(pid: int) -> tuple[int, list[int]]:
    """VmHWM (peak resident set) of the daemon and of each of its reader processes."""

    def hwm(process_id: int) -> int:
        for line in Path(f"/proc/{process_id}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    children = psutil.Process(pid).children(recursive=True)
    return hwm(pid), [hwm(child.pid) for child in children]


def _trickle(volume: Path, work: Path, count: int, offset: int) -> list[float]:
    """Write files into incoming/ at 50 per second; latency from each close to its row."""
    if count <= 0:
        return []
    sources = write_studies(
        work,
        physicians=["Trickle^Test"],
        studies_per_physician=1,
        series_per_study=max(1, count // 50),
        slices_per_series=50,
    )[:count]
    closed_at: dict[str, float] = {}
    incoming = volume / "incoming"
    start = time.monotonic()
    for index, path in enumerate(sources):
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        target_time = start + index / 50.0
        delay = target_time - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the pace of a scanner sending 50 files/s
        data = path.read_bytes()
        with open(incoming / f"trickle-{index:05d}.dcm", "wb") as out:
            out.write(data)
        closed_at[uid] = time.time()
    expected = offset + 1 + len(sources)
    deadline = time.monotonic() + 60
    while _count(volume) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    db = sqlite3.connect(f"file:{volume / 'state' / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        rows = dict(
            db.execute(
                "SELECT sop_instance_uid, received_at FROM instances ORDER BY id DESC LIMIT ?",
                (len(sources),),
            ).fetchall()
        )
    finally:
        db.close()
    return [rows[uid] - closed for uid, closed in closed_at.items() if uid in rows]
