"""DICOM networking against real peers: a real Orthanc (started per test on 127.0.0.1 with its
own configuration), dcmtk's storescu/echoscu, and the real daemon."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, StoragePresentationContexts

from daemon.config import ListenerConfig
from daemon.fsops import TEMP_PREFIX
from daemon.network import Listener, write_into_incoming
from tests.conftest import (
    IN_CI,
    Daemon,
    Volume,
    dcmdb,
    fixtures_dir,
    wait_for,
    write_config,
)
from tests.factory import SeriesSpec, write_series

TODAY = date.today().strftime("%Y%m%d")
StartDaemon = Callable[[], Daemon]


def _require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian: apt-get install {_PACKAGE.get(name, name)})"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


_PACKAGE = {"Orthanc": "orthanc", "storescu": "dcmtk", "echoscu": "dcmtk"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---- Orthanc ---------------------------------------------------------------------------------


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def rest(self, method: str, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read()
        return json.loads(text) if text else None

    def upload(self, files: list[Path]) -> set[str]:
        """POST /instances; the Orthanc IDs of the studies."""
        return {self.rest("POST", "/instances", path.read_bytes())["ParentStudy"] for path in files}

    def study_id(self, study_instance_uid: str) -> str:
        found = self.rest(
            "POST",
            "/tools/lookup",
            study_instance_uid.encode(),
        )
        return str(next(item["ID"] for item in found if item["Type"] == "Study"))

    def instance_count(self) -> int:
        return int(self.rest("GET", "/statistics")["CountInstances"])


@pytest.fixture
def listener_port() -> int:
    return free_port()


@pytest.fixture
def orthanc(tmp_path: Path, listener_port: int) -> Iterator[Orthanc]:
    """A real Orthanc on 127.0.0.1 that knows our listener as modality "dcmdb"; stopped by
    its pid in every case."""
    binary = _require_tool("Orthanc")
    root = tmp_path / "orthanc"
    root.mkdir()
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "dcmdb-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomModalities": {"dcmdb": ["DCMDB", "127.0.0.1", listener_port]},
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "Plugins": [],
        "StorageCompression": False,
    }
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    log_path = root / "orthanc.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Orthanc(http_port, dicom_port, process, log_path)

    def answers() -> bool:
        if process.poll() is not None:
            pytest.fail(f"Orthanc exited at start-up:\n{log_path.read_text(errors='replace')}")
        try:
            server.rest("GET", "/system")
        except OSError:
            return False
        return True

    try:
        wait_for(answers, what="Orthanc's REST API")
        yield server
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()


def _study_files(tmp_path: Path) -> tuple[list[Path], dict[str, int]]:
    """Two generated studies dated today (two physicians) and one real scanner file (MR_small,
    its StudyDate and physician rewritten in a copy); returns the files and instances by
    physician folder."""
    smith = write_series(
        tmp_path / "gen" / "smith",
        SeriesSpec(referring_physician="Smith^John", study_date=TODAY, slices=4),
    )
    jones = write_series(
        tmp_path / "gen" / "jones",
        SeriesSpec(
            referring_physician="Jones^Ann", study_date=TODAY, slices=3, patient_id="PID002"
        ),
    )
    real = fixtures_dir() / "pydicom_edge_cases" / "In" / "MR_small.dcm"
    dataset = pydicom.dcmread(real)
    dataset.StudyDate = TODAY
    dataset.ReferringPhysicianName = "Brown^Bob"
    copy = tmp_path / "gen" / "MR_small.dcm"
    dataset.save_as(copy)
    return [*smith, *jones, copy], {"Smith_John": 4, "Jones_Ann": 3, "Brown_Bob": 1}


def _network_config(
    volume: Volume, orthanc: Orthanc, listener_port: int, *, method: str, **extra: Any
) -> None:
    sections: dict[str, dict[str, object]] = {
        "convert": {"enabled": False},
        "listener": {
            "enabled": method == "move",
            "ae_title": "DCMDB",
            "address": "127.0.0.1",
            "port": listener_port,
            "allowed_ae_titles": ["ORTHANC", "SCANNER"],
        },
        "retrieve": {
            "enabled": True,
            "pacs_host": "127.0.0.1",
            "pacs_port": orthanc.dicom_port,
            "pacs_ae_title": "ORTHANC",
            "ae_title": "DCMDB",
            "method": method,
            "timeout_seconds": 30,
        },
    }
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    volume.config = write_config(volume.root, **sections)


def _instances_by_folder(volume: Volume) -> dict[str, int]:
    rows = volume.query(
        "SELECT f.name, count(i.id) FROM instances i JOIN series se ON se.id = i.series_row_id"
        " JOIN studies st ON st.id = se.study_row_id JOIN folders f ON f.id = st.folder_id"
        " GROUP BY f.name"
    )
    return {str(name): int(count) for name, count in rows}  # type: ignore[call-overload]


# ---- the listener, in-process ---------------------------------------------------------------


def _listener(incoming: Path, **settings: Any) -> Listener:
    values: dict[str, Any] = {
        "enabled": True,
        "ae_title": "DCMDB",
        "address": "127.0.0.1",
        "port": 0,  # any free port: only a test may ask for that
        "allowed_ae_titles": ("SCANNER",),
    }
    values.update(settings)
    listener = Listener(ListenerConfig(**values), incoming)
    listener.start()
    return listener


def _send(port: int, files: list[Path], calling: str) -> list[int] | None:
    """C-STORE the files from AE `calling`; the statuses, or None when the association was not
    made."""
    ae = AE(ae_title=calling)
    ae.requested_contexts = StoragePresentationContexts[:127]
    assoc = ae.associate("127.0.0.1", port, ae_title="DCMDB")
    if not assoc.is_established:
        return None
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(path)).Status) for path in files]
    finally:
        assoc.release()


def test_write_into_incoming_leaves_only_the_final_name(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()

    path = write_into_incoming(incoming, b"DICM-bytes", "1.2.3.4")

    assert path.parent == incoming
    assert path.name.startswith("1.2.3.4.")
    assert path.suffix == ".dcm"
    assert [p.name for p in incoming.iterdir()] == [path.name]
    assert path.read_bytes() == b"DICM-bytes"
    # A UID that is not one (a hostile sender) never becomes part of a path.
    odd = write_into_incoming(incoming, b"x", "../../etc/passwd")
    assert odd.parent == incoming
    assert odd.name.startswith("instance.")


def test_listener_stores_each_instance_into_incoming_under_its_final_name_only(
    tmp_path: Path,
) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    files = write_series(tmp_path / "gen", SeriesSpec(slices=3))
    listener = _listener(incoming)
    try:
        statuses = _send(listener.port, files, "SCANNER")
    finally:
        listener.stop()

    assert statuses == [0x0000] * 3
    names = sorted(p.name for p in incoming.iterdir())
    assert len(names) == 3
    assert not [name for name in names if name.startswith(TEMP_PREFIX)]
    received = {pydicom.dcmread(incoming / name).SOPInstanceUID for name in names}
    assert received == {pydicom.dcmread(path).SOPInstanceUID for path in files}
    assert listener.stored == 3


def test_listener_rejects_an_unknown_calling_ae_title_and_writes_nothing(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    files = write_series(tmp_path / "gen", SeriesSpec(slices=1))
    listener = _listener(incoming)
    try:
        assert _send(listener.port, files, "INTRUDER") is None
    finally:
        listener.stop()

    assert list(incoming.iterdir()) == []


def test_listener_closes_connections_from_addresses_not_allowed(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    files = write_series(tmp_path / "gen", SeriesSpec(slices=1))
    listener = _listener(incoming, allowed_addresses=("10.0.0.0/8",))
    try:
        assert _send(listener.port, files, "SCANNER") is None
    finally:
        listener.stop()

    assert list(incoming.iterdir()) == []


def test_listener_answers_out_of_resources_when_incoming_cannot_be_written(
    tmp_path: Path,
) -> None:
    incoming = tmp_path / "incoming"  # never created: every write fails
    files = write_series(tmp_path / "gen", SeriesSpec(slices=1))
    listener = _listener(incoming)
    try:
        statuses = _send(listener.port, files, "SCANNER")
    finally:
        listener.stop()

    assert statuses == [0xA700]
    assert listener.failed == 1


def test_a_port_in_use_stops_the_daemon_at_start_up_with_a_clear_message(
    volume: Volume,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        volume.config = write_config(
            volume.root,
            listener={
                "enabled": True,
                "address": "127.0.0.1",
                "port": port,
                "allowed_ae_titles": ["SCANNER"],
            },
        )
        result = dcmdb(volume, "run", timeout=60)

    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "listener.port" in result.stderr


# ---- dcmtk and the daemon ----------------------------------------------------------------------


def test_storescu_pushes_to_the_listener_and_an_unknown_ae_title_is_rejected(
    volume: Volume, start_daemon: StartDaemon, tmp_path: Path, listener_port: int
) -> None:
    storescu = _require_tool("storescu")
    echoscu = _require_tool("echoscu")
    volume.config = write_config(
        volume.root,
        convert={"enabled": False},
        listener={
            "enabled": True,
            "address": "127.0.0.1",
            "port": listener_port,
            "allowed_ae_titles": ["SCANNER"],
        },
    )
    files = write_series(tmp_path / "gen", SeriesSpec(referring_physician="Smith^John", slices=3))
    start_daemon()

    echo = subprocess.run(
        [echoscu, "-aet", "SCANNER", "-aec", "DCMDB", "127.0.0.1", str(listener_port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert echo.returncode == 0, echo.stderr

    pushed = subprocess.run(
        [storescu, "-aet", "SCANNER", "-aec", "DCMDB", "127.0.0.1", str(listener_port)]
        + [str(path) for path in files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert pushed.returncode == 0, pushed.stderr
    wait_for(lambda: _instances_by_folder(volume) == {"Smith_John": 3}, what="the archive")

    other = write_series(tmp_path / "other", SeriesSpec(slices=1))
    refused = subprocess.run(
        [storescu, "-aet", "NOBODY", "-aec", "DCMDB", "127.0.0.1", str(listener_port)]
        + [str(path) for path in other],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0
    assert "reject" in (refused.stdout + refused.stderr).lower()
    assert volume.incoming_files() == []
    assert _instances_by_folder(volume) == {"Smith_John": 3}


# ---- Orthanc ---------------------------------------------------------------------------------


def test_retrieve_by_move_files_studies_by_physician_and_a_second_run_transfers_nothing(
    volume: Volume,
    start_daemon: StartDaemon,
    orthanc: Orthanc,
    listener_port: int,
    tmp_path: Path,
) -> None:
    files, expected = _study_files(tmp_path)
    orthanc.upload(files)
    _network_config(volume, orthanc, listener_port, method="move")

    daemon = start_daemon()  # the retrieve job never ran: start-up catches it up

    wait_for(lambda: _instances_by_folder(volume) == expected, what="the retrieved studies")
    assert len(volume.archived_files()) == 8
    wait_for(
        lambda: volume.query("SELECT result FROM job_runs WHERE name = 'retrieve'"),
        what="the retrieve job's record",
    )
    assert "3 retrieved" in str(volume.query("SELECT result FROM job_runs")), daemon.log()

    again = dcmdb(volume, "retrieve")  # the daemon's listener holds the port: it receives

    assert again.returncode == 0, again.stderr
    assert "3 already complete, 0 retrieved (0 instances), 0 failed" in again.stdout
    assert volume.incoming_files() == []
    assert _instances_by_folder(volume) == expected


def test_retrieve_by_get_needs_no_listener(
    volume: Volume, orthanc: Orthanc, listener_port: int, tmp_path: Path
) -> None:
    files, expected = _study_files(tmp_path)
    orthanc.upload(files)
    _network_config(volume, orthanc, listener_port, method="get")

    first = dcmdb(volume, "retrieve")

    assert first.returncode == 0, first.stderr
    assert "3 retrieved (8 instances), 0 failed" in first.stdout
    assert len(volume.incoming_files()) == 8
    ingested = dcmdb(volume, "ingest", "--move", str(volume.incoming))
    assert ingested.returncode == 0, ingested.stderr
    assert _instances_by_folder(volume) == expected

    second = dcmdb(volume, "retrieve")

    assert "3 already complete, 0 retrieved" in second.stdout
    assert volume.incoming_files() == []


def test_retrieve_by_move_without_a_daemon_uses_a_temporary_listener(
    volume: Volume, orthanc: Orthanc, listener_port: int, tmp_path: Path
) -> None:
    files, _expected = _study_files(tmp_path)
    orthanc.upload(files)
    _network_config(volume, orthanc, listener_port, method="move")

    result = dcmdb(volume, "retrieve", "--date", TODAY)

    assert result.returncode == 0, result.stderr
    assert "3 retrieved (8 instances)" in result.stdout
    assert len(volume.incoming_files()) == 8
    assert not [p for p in volume.incoming.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_a_study_the_pacs_cannot_send_is_reported_and_retried(
    volume: Volume, orthanc: Orthanc, listener_port: int, tmp_path: Path
) -> None:
    files, _expected = _study_files(tmp_path)
    orthanc.upload(files)
    # Our listener's AE title is one Orthanc does not know: every C-MOVE fails.
    _network_config(volume, orthanc, listener_port, method="move", listener={"ae_title": "OTHER"})

    result = dcmdb(volume, "retrieve")

    assert result.returncode == 1
    assert "3 failed" in result.stdout
    status = dcmdb(volume, "status")
    assert "3 studies failed to retrieve" in status.stdout
    assert volume.count("retrieve_failures") == 3


def test_orthanc_pushes_a_study_to_the_listener_and_it_is_archived(
    volume: Volume,
    start_daemon: StartDaemon,
    orthanc: Orthanc,
    listener_port: int,
    tmp_path: Path,
) -> None:
    files = write_series(tmp_path / "gen", SeriesSpec(referring_physician="Smith^John", slices=4))
    (study,) = orthanc.upload(files)
    _network_config(volume, orthanc, listener_port, method="move", retrieve={"enabled": False})
    start_daemon()

    orthanc.rest("POST", "/modalities/dcmdb/store", study.encode())

    wait_for(lambda: _instances_by_folder(volume) == {"Smith_John": 4}, what="the pushed study")


def test_dcmdb_echo_reaches_orthanc_and_names_what_to_fix_when_it_cannot(
    volume: Volume, orthanc: Orthanc, listener_port: int
) -> None:
    _network_config(volume, orthanc, listener_port, method="get")

    ok = dcmdb(volume, "echo")

    assert ok.returncode == 0, ok.stderr
    assert f"AE ORTHANC at 127.0.0.1:{orthanc.dicom_port}" in ok.stdout
    assert "OK" in ok.stdout

    closed = free_port()
    _network_config(volume, orthanc, listener_port, method="get", retrieve={"pacs_port": closed})
    failed = dcmdb(volume, "echo")

    assert failed.returncode == 1
    assert f"127.0.0.1:{closed}" in failed.stderr
    assert "AE ORTHANC" in failed.stderr
    assert "retrieve.pacs_port" in failed.stderr


def test_require_pacs_copy_keeps_a_study_the_pacs_no_longer_holds(
    volume: Volume, orthanc: Orthanc, listener_port: int, tmp_path: Path
) -> None:
    kept = write_series(
        tmp_path / "a", SeriesSpec(referring_physician="Smith^John", slices=3, patient_id="A")
    )
    pruned = write_series(
        tmp_path / "b", SeriesSpec(referring_physician="Smith^John", slices=3, patient_id="B")
    )
    kept_uid = str(pydicom.dcmread(kept[0]).StudyInstanceUID)
    pruned_uid = str(pydicom.dcmread(pruned[0]).StudyInstanceUID)
    (kept_id,) = orthanc.upload(kept)
    orthanc.upload(pruned)
    orthanc.rest("DELETE", f"/studies/{kept_id}")
    _network_config(
        volume,
        orthanc,
        listener_port,
        method="get",
        retrieve={"enabled": False},
        ingest={"min_free": "1MiB"},
        retention={
            "low_free": "1%",
            "target_free": "2%",
            "max_archive_size": "1KB",  # both studies are over it: both are planned
            "min_age_days": 0,
            "keep_unconverted": False,
            "require_pacs_copy": True,
        },
    )
    ingested = dcmdb(volume, "ingest", str(tmp_path / "a"), str(tmp_path / "b"))
    assert ingested.returncode == 0, ingested.stderr

    result = dcmdb(volume, "--log-level", "warning", "prune", "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["deleted"] == [pruned_uid]
    (kept_report,) = report["kept_by_check"]
    assert kept_report["study_instance_uid"] == kept_uid
    assert "does not hold the study" in kept_report["reason"]
    assert "PACS (AE ORTHANC" in kept_report["reason"]
    studies = {str(row[0]) for row in volume.query("SELECT study_instance_uid FROM studies")}
    assert studies == {kept_uid}
