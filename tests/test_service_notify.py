"""`dcmdb run` under systemd's eyes: sd_notify READY/WATCHDOG/STATUS, SIGHUP reload, SIGTERM."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Volume, dcmdb, wait_for, write_config
from tests.factory import SeriesSpec, write_series


class NotifyListener:
    """The systemd side of sd_notify: a datagram socket that keeps every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._socket.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def fields(self, name: str) -> list[tuple[float, str]]:
        """(arrival, value) of every NAME=value field received so far."""
        found = []
        with self._lock:
            for arrived, message in self.messages:
                for line in message.split("\n"):
                    key, _, value = line.partition("=")
                    if key == name:
                        found.append((arrived, value))
        return found

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self._socket.close()


class NotifiedDaemon:
    """`dcmdb run` with NOTIFY_SOCKET and WATCHDOG_USEC, as systemd starts a Type=notify unit."""

    def __init__(self, volume: Volume, listener: NotifyListener, watchdog_usec: int) -> None:
        self.log_path = volume.root / f"daemon-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in finish()
        environment = {
            **os.environ,
            "NOTIFY_SOCKET": str(listener.path),
            "WATCHDOG_USEC": str(watchdog_usec),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "--config", str(volume.config), "run"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def finish(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    notify = NotifyListener(tmp_path / "notify.sock")
    yield notify
    notify.close()


@pytest.fixture
def notified(volume: Volume, listener: NotifyListener) -> Iterator[list[NotifiedDaemon]]:
    started: list[NotifiedDaemon] = []
    yield started
    for daemon in started:
        daemon.finish()
        print(f"---- {daemon.log_path.name} ----\n{daemon.log()}")


def _start(
    volume: Volume, listener: NotifyListener, started: list[NotifiedDaemon]
) -> NotifiedDaemon:
    daemon = NotifiedDaemon(volume, listener, watchdog_usec=1_000_000)
    started.append(daemon)
    return daemon


def test_ready_comes_once_running_and_watchdog_pings_stop_when_the_observer_dies(
    volume: Volume, listener: NotifyListener, notified: list[NotifiedDaemon]
) -> None:
    daemon = _start(volume, listener, notified)
    wait_for(lambda: listener.fields("READY"), what="READY=1")
    assert "dcmdb running" in daemon.log()  # READY only after the observer, worker, scheduler
    assert any("queue 0" in status for _, status in listener.fields("STATUS"))
    wait_for(lambda: len(listener.fields("WATCHDOG")) >= 4, what="periodic WATCHDOG=1")
    pings = [arrived for arrived, _ in listener.fields("WATCHDOG")]
    assert max(b - a for a, b in itertools.pairwise(pings)) < 1.0  # within the interval

    shutil.rmtree(volume.incoming)  # the inotify watch ends with its folder: the observer dies
    died = time.monotonic()
    assert daemon.process.wait(15) == 1  # exits for systemd's Restart=on-failure
    assert not [t for t, _ in listener.fields("WATCHDOG") if t > died + 1.0]
    assert "observer of the incoming folder" in daemon.log()


def test_sigterm_during_a_burst_exits_0_within_10_s_with_nothing_lost(
    volume: Volume, listener: NotifyListener, notified: list[NotifiedDaemon], tmp_path: Path
) -> None:
    daemon = _start(volume, listener, notified)
    wait_for(lambda: listener.fields("READY"), what="READY=1")
    files = write_series(tmp_path / "burst", SeriesSpec(slices=300, rows=32, columns=32))
    for path in files:
        os.rename(path, volume.incoming / path.name)
    wait_for(lambda: volume.count("instances") > 0, what="ingest to start")

    stopped = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(10) == 0
    assert time.monotonic() - stopped < 10
    assert listener.fields("STOPPING")
    archived = len(volume.archived_files())
    waiting = len(volume.incoming_files())
    assert archived + waiting == len(files)  # each file in exactly one place
    assert not [p for p in volume.archive.rglob(".tmp-*")]
    # What was left is filed by the next run.
    restarted = _start(volume, listener, notified)
    wait_for(lambda: len(volume.archived_files()) == len(files), what="the rest to be archived")
    assert restarted.process.poll() is None


def test_sighup_applies_a_changed_schedule_and_keeps_the_old_config_when_broken(
    volume: Volume, listener: NotifyListener, notified: list[NotifiedDaemon], tmp_path: Path
) -> None:
    volume.config = write_config(volume.root, convert={"enabled": False, "settle_minutes": 0})
    write_series(tmp_path / "in", SeriesSpec(slices=3))
    assert dcmdb(volume, "ingest", "--move", str(tmp_path / "in")).returncode == 0
    daemon = _start(volume, listener, notified)
    wait_for(lambda: listener.fields("READY"), what="READY=1")
    assert "conversion scheduled" not in daemon.log()

    # Conversion on, every 5 minutes: never run, so the reload starts a catch-up run now.
    write_config(
        volume.root, convert={"enabled": True, "settle_minutes": 0, "schedule": "*/5 * * * *"}
    )
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: reloaded" in daemon.log(), what="the reload")
    assert "cron['*/5 * * * *'" in daemon.log()
    wait_for(
        lambda: volume.query("SELECT state FROM conversions") == [("converted",)],
        what="the conversion the new schedule started",
    )

    # A broken config is reported and the running one stays.
    volume.config.write_text(volume.config.read_text() + "\n[convert]\nschedule = 'never'\n")
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "still running on the previous configuration" in daemon.log(), what="error")
    assert daemon.process.poll() is None
    readies = len(listener.fields("READY"))
    assert readies >= 3  # start, first reload, the refused reload
    write_series(tmp_path / "more", SeriesSpec(slices=2, series_number=2))
    for path in (tmp_path / "more").iterdir():
        os.rename(path, volume.incoming / path.name)
    wait_for(lambda: volume.count("instances") == 5, what="ingest to go on after the bad reload")


def test_json_logs_of_a_day_in_the_life_hold_no_patient_name_or_id(
    volume: Volume, listener: NotifyListener, notified: list[NotifiedDaemon], tmp_path: Path
) -> None:
    volume.config = write_config(
        volume.root, logging={"format": "json", "level": "debug"}, convert={"settle_minutes": 0}
    )
    spec = SeriesSpec(patient_name="Zyxwvuts^Qponm", patient_id="PATID-98765", slices=3)
    files = write_series(tmp_path / "in", spec)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "not-dicom.dcm").write_bytes(b"plain text, not DICOM")
    daemon = _start(volume, listener, notified)
    wait_for(lambda: listener.fields("READY"), what="READY=1")
    for path in [*files, tmp_path / "bad" / "not-dicom.dcm"]:
        os.rename(path, volume.incoming / path.name)
    wait_for(lambda: volume.count("instances") == 3, what="the series to be archived")
    wait_for(lambda: len(volume.quarantined_files()) == 1, what="the bad file's quarantine")
    assert daemon.finish() == 0
    converted = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--config", str(volume.config), "convert"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert converted.returncode == 0, converted.stderr
    assert volume.query("SELECT state FROM conversions") == [("converted",)]

    for log in (daemon.log(), converted.stderr):
        lines = [line for line in log.splitlines() if line.strip()]
        assert lines
        for line in lines:
            entry = json.loads(line)  # every line is one JSON object
            assert {"time", "level", "logger", "message"} <= entry.keys()
        assert "Zyxwvuts" not in log
        assert "Qponm" not in log
        assert "PATID-98765" not in log
