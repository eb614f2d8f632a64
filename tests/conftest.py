"""Shared test helpers: real files, real SQLite, a real daemon process. No mocks."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"

T = TypeVar("T")


def fixtures_path() -> Path:
    """Where the real-scanner fixtures should be ($DCMDB_FIXTURES, else
    ../shared/fixtures/dicom beside the repository), whether or not they are there."""
    configured = os.environ.get("DCMDB_FIXTURES")
    return Path(configured) if configured else REPO.parent / "shared" / "fixtures" / "dicom"


def fixtures_dir() -> Path:
    """The real-scanner fixtures; skips the test when they are absent, fails it under CI."""
    path = fixtures_path()
    if not path.is_dir():
        message = f"real-scanner fixtures not found at {path} (set DCMDB_FIXTURES)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def wait_for(
    predicate: Callable[[], T | None],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll predicate until it returns something truthy; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Volume:
    """A complete dcmdb volume in tmp_path with its config file."""

    root: Path
    config: Path

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def query(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        """Read the catalog the daemon writes (a separate read-only connection)."""
        catalog = self.state / "catalog.sqlite"
        if not catalog.exists():
            return []
        db = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True, timeout=30)
        try:
            return db.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            db.close()

    def count(self, table: str) -> int:
        rows = self.query(f"SELECT count(*) FROM {table}")
        return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]

    def incoming_files(self) -> list[Path]:
        return sorted(p for p in self.incoming.rglob("*") if p.is_file())

    def archived_files(self) -> list[Path]:
        """The instances in the archive (not the DICOMDIRs beside them)."""
        return sorted(p for p in self.archive.glob("*/DICOM/**/*") if p.is_file())

    def quarantined_files(self) -> list[Path]:
        return sorted(
            p
            for p in self.quarantine.rglob("*")
            if p.is_file() and not p.name.endswith(".reason.txt")
        )


def write_config(root: Path, **sections: dict[str, object]) -> Path:
    """A config for tests: short settle and rescan times; sections override keys."""
    settings: dict[str, dict[str, object]] = {
        "paths": {
            "incoming": "incoming",
            "archive": "archive",
            "quarantine": "quarantine",
            "state": "state",
        },
        "ingest": {
            "settle_seconds": 0.5,
            "incomplete_timeout_seconds": 2.0,
            "rescan_seconds": 1.0,
            "empty_folder_grace_seconds": 1.0,
            "parse_workers": 2,
        },
        "dicomdir": {"delay_seconds": 0.5, "max_delay_seconds": 2.0},
    }
    for section, values in sections.items():
        settings.setdefault(section, {}).update(values)
    lines: list[str] = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, dict):
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        for key, value in values.items():
            if isinstance(value, dict):
                lines.append(f"[{section}.{key}]")
                lines.extend(f'"{k}" = {_toml_value(v)}' for k, v in value.items())
        lines.append("")
    path = root / "config.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


@pytest.fixture
def volume(tmp_path: Path) -> Volume:
    root = tmp_path / "volume"
    root.mkdir()
    for name in ("incoming", "archive", "quarantine", "state"):
        (root / name).mkdir()
    return Volume(root, write_config(root))


def check_is_clean(volume: Volume) -> bool:
    """`dcmdb check` exits 0: catalog, disk and every DICOMDIR agree."""
    return dcmdb(volume, "check").returncode == 0


def dcmdb(volume: Volume, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real `dcmdb` command on the volume's config."""
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--config", str(volume.config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Daemon:
    """`dcmdb run` as a child process, stopped by its process id."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self.log_path = volume.root / f"daemon-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "--config", str(volume.config), "run"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as under a terminal or systemd
        )
        wait_for(
            lambda: "dcmdb running" in self.log() or self.process.poll() is not None,
            what="the daemon to start",
        )
        if self.process.poll() is not None:
            pytest.fail(f"the daemon exited at start-up:\n{self.log()}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                pytest.fail(f"the daemon did not stop within {timeout} s:\n{self.log()}")
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a crash. Its reader processes lose their parent
        and exit; any that does not within seconds is killed too, by its id."""
        children = psutil.Process(self.pid).children(recursive=True)
        self.process.kill()
        self.process.wait()
        _gone, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:
            child.kill()
        self._log.close()


@pytest.fixture
def start_daemon(volume: Volume) -> Iterator[Callable[[], Daemon]]:
    """Start `dcmdb run` on the volume (several times if a test restarts it); every daemon
    still running at the end is stopped and must exit 0."""
    started: list[Daemon] = []

    def start() -> Daemon:
        daemon = Daemon(volume)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        print(f"---- {daemon.log_path.name} (shown when the test fails) ----\n{daemon.log()}")
        if daemon.process.poll() is None:
            code = daemon.stop()
            assert code == 0, daemon.log()


def drop_into(incoming: Path, files: list[Path], *, subfolder: str = "") -> list[Path]:
    """Move files into incoming/ by rename, as a scanner writing to a temp name would."""
    target_dir = incoming / subfolder if subfolder else incoming
    target_dir.mkdir(parents=True, exist_ok=True)
    dropped = []
    for index, path in enumerate(files):
        target = target_dir / f"{index:06d}_{path.name}"
        os.rename(path, target)
        dropped.append(target)
    return dropped
