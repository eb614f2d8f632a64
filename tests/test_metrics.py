"""Tests for daemon.metrics: a real MetricsServer on a loopback port, over a catalog filled by
the real `dcmdb ingest`, scraped over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.catalog import Catalog
from daemon.config import MetricsConfig
from daemon.metrics import LiveFigures, MetricsServer, MetricsServerError, PrunedLog
from tests.conftest import Daemon, Volume, dcmdb, drop_into, wait_for, write_config
from tests.factory import SeriesSpec, write_series

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

IDLE = LiveFigures(
    queue_depth=0,
    ingest_paused=False,
    ingested_since_start=0,
    quarantined_since_start=0,
    duplicates_since_start=0,
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(url: str) -> Samples:
    """Every sample at url, by (sample name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def assert_port_is_free(port: int) -> None:
    """Another server can listen on the port. (With SO_REUSEADDR, as every server sets it: the
    connections of the last scrapes may linger in TIME_WAIT, which only a listener blocks.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()


def try_scrape(url: str) -> Samples | None:
    try:
        return scrape(url)
    except (urllib.error.URLError, ConnectionError):
        return None


def ingest_series(volume: Volume, source: Path, spec: SeriesSpec) -> list[Path]:
    files = write_series(source, spec)
    result = dcmdb(volume, "ingest", str(source))
    assert result.returncode == 0, result.stderr
    return files


def pruned_line(study_instance_uid: str, size: int) -> str:
    return json.dumps(
        {
            "time": "2026-01-01T05:00:00+01:00",
            "folder": "Smith_John",
            "study_instance_uid": study_instance_uid,
            "study_date": "20200101",
            "study_description": "Brain",
            "bytes": size,
            "reason": "free space is below retention.low_free",
        }
    )


@pytest.fixture
def serve(volume: Volume) -> Iterator[Callable[..., MetricsServer]]:
    """Start a MetricsServer on the volume, on a free loopback port; stopped at the end."""
    servers: list[MetricsServer] = []

    def start(live: Callable[[], LiveFigures] = lambda: IDLE, **settings: object) -> MetricsServer:
        config = MetricsConfig(**{"enabled": True, "port": free_port(), **settings})  # type: ignore[arg-type]
        server = MetricsServer(config, volume.state, volume.archive, live)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_metrics_match_the_catalog_after_a_real_ingest(
    volume: Volume, tmp_path: Path, serve: Callable[..., MetricsServer]
) -> None:
    batch = tmp_path / "batch"
    files = write_series(batch / "a", SeriesSpec(slices=3))
    files += write_series(batch / "b", SeriesSpec(slices=4, referring_physician="Jones^Ann"))
    files += write_series(batch / "c", SeriesSpec(slices=2))
    assert dcmdb(volume, "ingest", str(batch)).returncode == 0
    assert dcmdb(volume, "ingest", str(batch / "a")).returncode == 0  # 3 duplicates
    live = LiveFigures(
        queue_depth=5,
        ingest_paused=True,
        ingested_since_start=11,
        quarantined_since_start=1,
        duplicates_since_start=2,
    )
    server = serve(live=lambda: live)

    samples = scrape(server.url)

    assert value(samples, "dcmdb_up") == 1
    assert value(samples, "dcmdb_instances") == len(files) == volume.count("instances")
    assert value(samples, "dcmdb_studies") == 3 == volume.count("studies")
    assert value(samples, "dcmdb_series") == 3 == volume.count("series")
    archived_bytes = sum(path.stat().st_size for path in volume.archived_files())
    assert value(samples, "dcmdb_archive_bytes") == archived_bytes
    assert value(samples, "dcmdb_duplicates_total") == 3
    assert value(samples, "dcmdb_quarantined_total") == 0
    assert value(samples, "dcmdb_conversions", state="pending") == 3
    for state in ("converted", "skipped", "failed"):
        assert value(samples, "dcmdb_conversions", state=state) == 0
    # Every folder got its DICOMDIR at ingest: none is behind.
    assert value(samples, "dcmdb_dicomdir_dirty_folders") == 0
    assert value(samples, "dcmdb_ingested_total") == 11
    assert value(samples, "dcmdb_ingest_queue_depth") == 5
    assert value(samples, "dcmdb_ingest_paused") == 1
    disk = shutil.disk_usage(volume.archive)
    assert value(samples, "dcmdb_disk_total_bytes") == disk.total
    assert 0 < value(samples, "dcmdb_disk_free_bytes") <= disk.total
    assert value(samples, "dcmdb_pruned_studies_total") == 0
    assert value(samples, "dcmdb_pruned_bytes_total") == 0
    for source in ("catalog", "pruned_log", "disk", "live"):
        assert value(samples, "dcmdb_scrape_source_up", source=source) == 1
    assert ("dcmdb_job_last_success_timestamp_seconds", (("job", "convert"),)) not in samples
    assert value(samples, "process_resident_memory_bytes") > 0


def test_no_label_carries_a_patient_or_a_physician_name(
    volume: Volume, tmp_path: Path, serve: Callable[..., MetricsServer]
) -> None:
    ingest_series(
        volume,
        tmp_path / "a",
        SeriesSpec(patient_name="Secret^Person", patient_id="PID-SECRET-7"),
    )
    server = serve()

    with urllib.request.urlopen(server.url, timeout=10) as response:
        text = response.read().decode("utf-8")

    for private in ("Secret", "PID-SECRET-7", "Smith", "Person"):
        assert private not in text
    labels = {
        name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        for name in sample.labels
    }
    assert labels == {"source", "state"}  # "job" too, once a job has run


def test_conversions_and_the_convert_jobs_last_success_follow_a_real_conversion_run(
    volume: Volume, tmp_path: Path, serve: Callable[..., MetricsServer]
) -> None:
    write_config(volume.root, convert={"settle_minutes": 0})
    ingest_series(volume, tmp_path / "a", SeriesSpec(slices=3))
    server = serve()
    assert value(scrape(server.url), "dcmdb_conversions", state="pending") == 1

    result = dcmdb(volume, "convert")
    assert result.returncode == 0, result.stderr
    samples = scrape(server.url)

    assert value(samples, "dcmdb_conversions", state="pending") == 0
    assert value(samples, "dcmdb_conversions", state="converted") == 1
    [(finished_at,)] = volume.query("SELECT finished_at FROM job_runs WHERE name = 'convert'")
    assert value(samples, "dcmdb_job_last_success_timestamp_seconds", job="convert") == (
        finished_at
    )
    assert ("dcmdb_job_last_success_timestamp_seconds", (("job", "retention"),)) not in samples
    # The NIfTI outputs count towards the archive's bytes (what max_archive_size compares).
    [(nifti_bytes,)] = volume.query("SELECT sum(output_bytes) FROM conversions")
    assert isinstance(nifti_bytes, int)
    assert nifti_bytes > 0
    dicom_bytes = sum(path.stat().st_size for path in volume.archived_files())
    assert value(samples, "dcmdb_archive_bytes") == dicom_bytes + nifti_bytes


def test_a_running_job_keeps_its_last_success_until_it_finishes_again(
    volume: Volume, serve: Callable[..., MetricsServer]
) -> None:
    catalog = Catalog(volume.state)
    server = serve()
    try:
        catalog.record_job_run("retention", 1000.0, 1010.0, "space OK (5 GiB free)")
        assert value(
            scrape(server.url), "dcmdb_job_last_success_timestamp_seconds", job="retention"
        ) == (1010.0)
        catalog.record_job_run("retention", 2000.0, None, "running")

        during = scrape(server.url)
        catalog.record_job_run("retention", 2000.0, 2005.0, "space OK (5 GiB free)")
        after = scrape(server.url)
    finally:
        catalog.close()

    assert value(during, "dcmdb_job_last_success_timestamp_seconds", job="retention") == 1010.0
    assert value(after, "dcmdb_job_last_success_timestamp_seconds", job="retention") == 2005.0


def test_pruned_totals_come_from_pruned_jsonl_and_grow_as_lines_are_appended(
    volume: Volume, serve: Callable[..., MetricsServer]
) -> None:
    log = volume.state / "pruned.jsonl"
    log.write_text(pruned_line("1.2.3", 1000) + "\n" + pruned_line("1.2.4", 2345) + "\n")
    server = serve()

    samples = scrape(server.url)
    assert value(samples, "dcmdb_pruned_studies_total") == 2
    assert value(samples, "dcmdb_pruned_bytes_total") == 3345

    # A line being written (no newline yet) waits for the next scrape.
    third = pruned_line("1.2.5", 655)
    with open(log, "a", encoding="utf-8") as out:
        out.write(third[:20])
    samples = scrape(server.url)
    assert value(samples, "dcmdb_pruned_studies_total") == 2
    assert value(samples, "dcmdb_pruned_bytes_total") == 3345

    with open(log, "a", encoding="utf-8") as out:
        out.write(third[20:] + "\n")
    samples = scrape(server.url)
    assert value(samples, "dcmdb_pruned_studies_total") == 3
    assert value(samples, "dcmdb_pruned_bytes_total") == 4000


def test_pruned_log_is_read_only_from_where_the_last_read_stopped(tmp_path: Path) -> None:
    path = tmp_path / "pruned.jsonl"
    path.write_text(pruned_line("1.2.3", 100) + "\n")
    log = PrunedLog(path)
    assert (log.totals().studies, log.totals().bytes) == (1, 100)

    # Rewriting the first line in place (same size) is not seen: it was read already; only
    # what is appended is.
    path.write_text(pruned_line("1.2.3", 900) + "\n" + pruned_line("1.2.4", 50) + "\n")

    totals = log.totals()
    assert (totals.studies, totals.bytes) == (2, 150)


def test_pruned_log_that_was_rotated_or_removed_is_counted_afresh(tmp_path: Path) -> None:
    path = tmp_path / "pruned.jsonl"
    path.write_text(pruned_line("1.2.3", 100) + "\n" + pruned_line("1.2.4", 200) + "\n")
    log = PrunedLog(path)
    assert log.totals().studies == 2

    path.rename(tmp_path / "pruned.jsonl.1")
    path.write_text(pruned_line("1.2.5", 7) + "\n")
    totals = log.totals()
    assert (totals.studies, totals.bytes) == (1, 7)

    path.unlink()
    assert log.totals().studies == 0


def test_pruned_log_line_without_bytes_counts_its_study_but_no_bytes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "pruned.jsonl"
    path.write_text(
        pruned_line("1.2.3", 100) + "\nnot json\n" + json.dumps({"bytes": "12"}) + "\n\n"
    )

    totals = PrunedLog(path).totals()

    assert (totals.studies, totals.bytes) == (3, 100)
    assert "2 lines without a valid bytes figure" in caplog.text


def test_a_source_that_cannot_be_read_leaves_out_only_its_own_metrics(
    volume: Volume, serve: Callable[..., MetricsServer], caplog: pytest.LogCaptureFixture
) -> None:
    def broken_live() -> LiveFigures:
        raise RuntimeError("the ingest worker is gone")

    # No catalog yet in state/: a scrape must not create one.
    server = serve(live=broken_live)

    samples = scrape(server.url)
    scrape(server.url)

    assert not (volume.state / "catalog.sqlite").exists()
    assert value(samples, "dcmdb_up") == 1
    assert value(samples, "dcmdb_scrape_source_up", source="catalog") == 0
    assert value(samples, "dcmdb_scrape_source_up", source="live") == 0
    assert value(samples, "dcmdb_scrape_source_up", source="disk") == 1
    assert ("dcmdb_instances", ()) not in samples
    assert ("dcmdb_ingest_queue_depth", ()) not in samples
    assert value(samples, "dcmdb_disk_total_bytes") > 0
    assert value(samples, "dcmdb_pruned_studies_total") == 0
    # Logged once per episode, not at every scrape.
    assert caplog.text.count("cannot read the catalog") == 1
    assert caplog.text.count("cannot read the live") == 1


def test_the_server_listens_on_the_configured_address_only_and_stop_frees_the_port(
    volume: Volume, serve: Callable[..., MetricsServer]
) -> None:
    server = serve()
    port = server.settings.port
    assert server.url == f"http://127.0.0.1:{port}/metrics"
    listening = [
        connection.laddr
        for connection in psutil.Process().net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
    ]
    assert [address.ip for address in listening] == ["127.0.0.1"]
    assert try_scrape(server.url) is not None

    server.stop()
    server.stop()  # idempotent

    assert not server.serving
    assert not any(thread.name == "metrics-server" for thread in threading.enumerate())
    assert try_scrape(f"http://127.0.0.1:{port}/metrics") is None
    assert_port_is_free(port)
    # ... for this server too: it starts again.
    server.start()
    assert try_scrape(server.url) is not None


def test_an_ipv6_address_is_served_on_ipv6_only(
    volume: Volume, serve: Callable[..., MetricsServer]
) -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"this machine has no IPv6 loopback (::1): {exc}")
    server = serve(address="::1")
    port = server.settings.port

    assert server.url == f"http://[::1]:{port}/metrics"
    assert value(scrape(server.url), "dcmdb_up") == 1
    assert try_scrape(f"http://127.0.0.1:{port}/metrics") is None


def test_a_port_in_use_is_an_error_that_names_the_key(
    volume: Volume, serve: Callable[..., MetricsServer]
) -> None:
    first = serve()
    second = MetricsServer(first.settings, volume.state, volume.archive, lambda: IDLE)

    with pytest.raises(MetricsServerError) as raised:
        second.start()

    assert "metrics.port" in str(raised.value)
    assert f"port {first.settings.port}" in str(raised.value)
    assert not second.serving


def test_a_disabled_server_does_not_listen(volume: Volume) -> None:
    port = free_port()
    server = MetricsServer(
        MetricsConfig(enabled=False, port=port), volume.state, volume.archive, lambda: IDLE
    )

    server.start()

    assert not server.serving
    assert try_scrape(f"http://127.0.0.1:{port}/metrics") is None
    server.stop()


def test_the_daemon_serves_metrics_when_enabled_and_closes_the_port_when_it_stops(
    volume: Volume, tmp_path: Path, start_daemon: Callable[[], Daemon]
) -> None:
    port = free_port()
    write_config(volume.root, metrics={"enabled": True, "port": port})
    url = f"http://127.0.0.1:{port}/metrics"
    daemon = start_daemon()

    first = wait_for(lambda: try_scrape(url), what="the daemon's metrics endpoint")
    assert value(first, "dcmdb_up") == 1
    assert value(first, "dcmdb_ingested_total") == 0
    files = write_series(tmp_path / "series", SeriesSpec(slices=4))
    drop_into(volume.incoming, files)

    def scrape_with_four_instances() -> Samples | None:
        samples = try_scrape(url)
        return samples if samples and samples.get(("dcmdb_instances", ())) == 4 else None

    samples = wait_for(
        scrape_with_four_instances, what="the metrics to show the 4 instances ingested"
    )
    wait_for(
        lambda: value(scrape(url), "dcmdb_ingested_total") == 4,
        what="the daemon's own count of files ingested",
    )
    assert value(samples, "dcmdb_ingest_paused") == 0
    for source in ("catalog", "pruned_log", "disk", "live"):
        assert value(samples, "dcmdb_scrape_source_up", source=source) == 1

    assert daemon.stop() == 0
    assert try_scrape(url) is None
    assert_port_is_free(port)
