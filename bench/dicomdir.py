"""DICOMDIR of a 100,000-instance folder: dcmdb's rewrite from the catalog beside dcmtk's
`dcmmkdir +r` over the same files in the same run, then a rewrite after 1,000 new arrivals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.factory import write_studies

FOLDER = "Bench_Folder"


def run(*, instances: int) -> None:
    if shutil.which("dcmmkdir") is None:
        raise SystemExit("dcmmkdir not found: apt-get install dcmtk")
    work = Path(tempfile.mkdtemp(prefix="dcmdb-bench-dicomdir-"))
    try:
        _run(work, instances)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _dcmdb(config: Path, *args: str) -> tuple[float, str, int]:
    """Run a dcmdb command: (seconds, its output, its own peak RSS in bytes)."""
    started = time.perf_counter()
    log = config.parent / "commands.log"
    with open(log, "a") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "--config", str(config), *args],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"dcmdb {' '.join(args)} failed:\n{log.read_text()}")
    return time.perf_counter() - started, output, usage.ru_maxrss * 1024


def _run(work: Path, instances: int) -> None:
    series_per_study, slices = 10, 50
    studies = max(1, instances // (series_per_study * slices))
    print(f"generating and ingesting {studies * series_per_study * slices} small instances ...")
    write_studies(
        work / "generated",
        physicians=["Bench^Folder"],
        studies_per_physician=studies,
        series_per_study=series_per_study,
        slices_per_series=slices,
        rows=8,
        columns=8,
    )
    volume = work / "volume"
    config = volume / "config.toml"
    volume.mkdir()
    config.write_text(
        '[paths]\nincoming = "incoming"\narchive = "archive"\nquarantine = "quarantine"\n'
        'state = "state"\n'
    )
    _dcmdb(config, "ingest", "--move", str(work / "generated"))
    folder = volume / "archive" / FOLDER

    dcmdb_seconds, output, dcmdb_rss = _dcmdb(config, "dicomdir", "--folder", FOLDER)
    started = time.perf_counter()
    subprocess.run(
        ["dcmmkdir", "+r", "+I", "-q", "+D", str(work / "DICOMDIR.dcmtk"), "DICOM"],
        cwd=folder,
        check=True,
    )
    dcmmkdir_seconds = time.perf_counter() - started
    count = output.split(": ", 1)[1].split(" ", 1)[0]

    print(f"DICOMDIR of one folder of {count} instances (process start included in both)")
    print(f"  dcmmkdir +r over the files           {dcmmkdir_seconds:8.2f} s")
    print(f"  dcmdb dicomdir, from the catalog     {dcmdb_seconds:8.2f} s")
    print(
        f"  speed-up                             {dcmmkdir_seconds / dcmdb_seconds:8.1f} x"
        "  (target >= 10)"
    )

    write_studies(
        work / "more",
        physicians=["Bench^Folder"],
        studies_per_physician=2,
        series_per_study=10,
        slices_per_series=50,
        rows=8,
        columns=8,
    )
    _dcmdb(config, "ingest", "--move", str(work / "more"))  # writes the DICOMDIR itself too
    command_seconds, output, _ = _dcmdb(config, "dicomdir", "--folder", FOLDER)
    # "<folder>/DICOMDIR: N instances, written in S s": the rewrite itself, as the daemon
    # does it (the command's time adds the interpreter's start-up).
    rewrite_seconds = float(output.rsplit("written in ", 1)[1].split(" ", 1)[0])
    print(
        f"  rewrite after 1,000 new instances    {rewrite_seconds:8.2f} s  (target < 2 s;"
        f" the whole command {command_seconds:.2f} s)"
    )
    print(f"  peak RSS of dcmdb dicomdir           {dcmdb_rss / 2**20:8.0f} MiB")
