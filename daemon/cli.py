"""The `dcmdb` command. The only module that prints or exits."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from daemon.audit import check_archive, status_report
from daemon.catalog import Catalog, CatalogError
from daemon.config import EX_CONFIG, Config, ConfigError, find_config_file, load_config
from daemon.config import render_config as render_effective_config
from daemon.convert import ConversionBusyError, run_conversions
from daemon.dicomdir import UnknownFolderError, rewrite_due_folders, rewrite_folder
from daemon.ingest import ParallelReader, effective_workers, ingest_paths, is_ignored_name
from daemon.model import IngestResult, Outcome, format_size
from daemon.network import PacsError, echo_pacs, pacs_copy_check
from daemon.nifti import EngineNotFoundError
from daemon.retention import PruneBusyError, PrunePlan, PruneResult, effective_policy, prune_now
from daemon.service import ServiceError, open_archiver, prepare_paths, retrieve_now, run_daemon

logger = logging.getLogger("dcmdb")

EX_OK = 0
EX_FAILURE = 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config_path = find_config_file(args.config, os.environ)
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"dcmdb: invalid configuration:\n{exc}", file=sys.stderr)
        return EX_CONFIG
    _setup_logging(args.log_level or config.logging.level, args.log_format or config.logging.format)
    try:
        return int(args.handler(config, args))
    except (
        ServiceError,
        CatalogError,
        ConversionBusyError,
        EngineNotFoundError,
        PruneBusyError,
        PacsError,
    ) as exc:
        print(f"dcmdb: {exc}", file=sys.stderr)
        return EX_FAILURE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcmdb",
        description="Sort incoming DICOM into per-physician folders, keep them indexed.",
    )
    parser.add_argument(
        "--config",
        help="config file (default: $DCMDB_CONFIG, ./config.toml, /etc/dcmdb/config.toml)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="override logging.format: text (journald-friendly) or one JSON object per line",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="override logging.level",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.set_defaults(handler=_run)

    ingest = commands.add_parser(
        "ingest", help="import files or folders once, through the same checks as the daemon"
    )
    ingest.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    ingest.add_argument(
        "--move", action="store_true", help="move the files instead of copying them"
    )
    ingest.set_defaults(handler=_ingest)

    status = commands.add_parser("status", help="what the archive holds")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)

    check = commands.add_parser(
        "check", help="compare the catalog with the disk; exit 0 only when they agree"
    )
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(handler=_check)

    dicomdir = commands.add_parser(
        "dicomdir", help="rewrite the DICOMDIR of one physician folder, or of all, now"
    )
    which = dicomdir.add_mutually_exclusive_group(required=True)
    which.add_argument("--folder", metavar="NAME", help="the physician folder's name")
    which.add_argument("--all", action="store_true", help="every physician folder")
    dicomdir.set_defaults(handler=_dicomdir)

    convert = commands.add_parser(
        "convert",
        help="run the NIfTI conversion job now: every series quiet for convert.settle_minutes "
        "with no current NIfTI",
    )
    convert.add_argument("--folder", metavar="NAME", help="only this physician folder")
    convert.add_argument(
        "--series",
        metavar="UID",
        help="convert this series (SeriesInstanceUID) now, whatever its state: a retry",
    )
    convert.set_defaults(handler=_convert)

    prune = commands.add_parser(
        "prune",
        help="delete the oldest studies now if space is low, by the [retention] rules",
    )
    prune.add_argument(
        "--dry-run", action="store_true", help="show what would be deleted and why; delete nothing"
    )
    prune.add_argument("--json", action="store_true", help="machine-readable output")
    prune.set_defaults(handler=_prune)

    for name, protected, text in (
        ("protect", True, "never prune this study"),
        ("unprotect", False, "let retention prune this study again"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("study_instance_uid", metavar="STUDY_UID")
        command.set_defaults(handler=_protect, protected=protected)

    retrieve = commands.add_parser(
        "retrieve",
        help="query/retrieve from the PACS now: the studies of the last retrieve.lookback_days "
        "days (or of --date) not yet complete in the archive, into incoming/",
    )
    retrieve.add_argument(
        "--date", metavar="YYYYMMDD", help="the studies of this StudyDate instead of the lookback"
    )
    retrieve.set_defaults(handler=_retrieve)

    echo = commands.add_parser(
        "echo", help="check the connection to the PACS of [retrieve] (C-ECHO); exit 0 if it works"
    )
    echo.set_defaults(handler=_echo)

    check_config = commands.add_parser(
        "check-config", help="validate the config and print the effective settings"
    )
    check_config.set_defaults(handler=_check_config)
    return parser


_CONVERSION_STATES = ("converted", "skipped", "failed", "pending")

_SYSLOG_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class _Formatter(logging.Formatter):
    """Plain lines for a terminal; under journald (JOURNAL_STREAM set) no timestamp, and a
    <N> syslog priority prefix that journald turns into the entry's level."""

    def __init__(self, journald: bool) -> None:
        if journald:
            super().__init__("%(name)s: %(message)s")
        else:
            super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self._journald:
            return f"<{_SYSLOG_PRIORITY.get(record.levelname, 6)}>{text}"
        return text


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _setup_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_Formatter(journald=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # watchdog logs every event at debug level: far too much even for debugging dcmdb.
    logging.getLogger("watchdog").setLevel(max(logging.INFO, root.level))
    # APScheduler logs two lines per job run at info level; dcmdb's jobs log what they do.
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, root.level))
    # pynetdicom logs every association and message at info level; dcmdb logs what matters.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))


# ---- commands --------------------------------------------------------------------------


def _run(config: Config, _args: argparse.Namespace) -> int:
    return run_daemon(config)


def _check_config(config: Config, _args: argparse.Namespace) -> int:
    print(f"# {config.source}: valid")
    print(render_effective_config(config), end="")
    return EX_OK


def _status(config: Config, args: argparse.Namespace) -> int:
    catalog = Catalog(config.paths.state)
    try:
        report = status_report(catalog, config.paths, config.ingest)
    finally:
        catalog.close()
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return EX_OK
    disk = report["disk"]
    print(f"archive     {config.paths.archive}")
    print(
        f"instances   {report['instances']} in {report['series']} series, "
        f"{report['studies']} studies ({format_size(report['bytes'])})"
    )
    print(f"incoming    {report['incoming_pending']} files waiting")
    if report["ingest_paused_reason"]:
        print(f"INGEST PAUSED: {report['ingest_paused_reason']}")
    print(f"quarantined {report['quarantined']} (see {config.paths.quarantine})")
    print(f"duplicates  {report['duplicates']} dropped")
    print(
        f"disk        {format_size(disk['free_bytes'])} free of {format_size(disk['total_bytes'])} "
        f"({disk['free_percent']}%)"
    )
    print(f"retention   {report['retention'] or 'off, or not run yet'}")
    retrieve = report["retrieve"]
    if retrieve["last_run"] or retrieve["failed_studies"]:
        print(f"retrieve    {retrieve['last_run'] or 'not run yet'}")
        failed = retrieve["failed_studies"]
        if failed:
            print(f"  {len(failed)} studies failed to retrieve; the next run retries them:")
        for failure in failed[:20]:
            print(
                f"  failed: {failure['study_instance_uid']} ({failure['attempts']} attempts, "
                f"last {failure['at']}): {failure['error']}"
            )
    conversions = report["conversions"]
    print(
        "nifti       "
        + ", ".join(f"{conversions[state]} {state}" for state in _CONVERSION_STATES)
        + f"; last run: {conversions['last_run'] or 'never'}"
    )
    for failure in conversions["latest_failures"]:
        print(f"  failed: {failure['folder']} / {failure['series']}: {failure['reason']}")
    if report["folders"]:
        print()
        print(f"{'folder':<40} {'studies':>8} {'series':>8} {'instances':>10} {'size':>10}")
        for name, folder in report["folders"].items():
            print(
                f"{name:<40} {folder['studies']:>8} {folder['series']:>8} "
                f"{folder['instances']:>10} {format_size(folder['bytes']):>10}"
            )
    return EX_OK


def _check(config: Config, args: argparse.Namespace) -> int:
    catalog = Catalog(config.paths.state)
    try:
        report = check_archive(catalog, config.paths.archive)
    finally:
        catalog.close()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return EX_OK if report.ok else EX_FAILURE
    print(f"checked {report.checked_files} catalogued files under {config.paths.archive}")
    problems = [
        ("missing (catalogued, not on disk)", report.missing),
        ("different size on disk", report.size_mismatch),
        ("orphans (on disk, not catalogued)", report.orphans),
        ("temporary files left behind", report.temp_files),
    ]
    problems += [
        ("folders without a DICOMDIR", report.dicomdir_missing),
        ("DICOMDIR not listing exactly the folder's instances (stale)", report.dicomdir_stale),
        ("DICOMDIR entries whose file is not there", report.dicomdir_dangling),
    ]
    for title, paths in problems:
        if paths:
            print(f"{title}: {len(paths)}")
            for path in paths[:50]:
                print(f"  {path}")
            if len(paths) > 50:
                print(f"  ... and {len(paths) - 50} more (--json lists all)")
    if report.moves_in_flight:
        print(
            f"{report.moves_in_flight} moves in flight: normal while the daemon runs; "
            "otherwise `dcmdb run` finishes them at start-up"
        )
    print("OK: catalog and disk agree" if report.ok else "NOT OK: see above")
    return EX_OK if report.ok else EX_FAILURE


def _dicomdir(config: Config, args: argparse.Namespace) -> int:
    catalog = Catalog(config.paths.state)
    try:
        folders = catalog.folder_names() if args.all else [args.folder]
        for folder in folders:
            started = time.monotonic()
            try:
                count = rewrite_folder(catalog, config.paths.archive, folder, now=time.time())
            except UnknownFolderError:
                print(
                    f"dcmdb: no physician folder named {folder!r} in the catalog", file=sys.stderr
                )
                print(f"  known folders: {', '.join(catalog.folder_names()) or 'none'}")
                return EX_FAILURE
            print(
                f"{folder}/DICOMDIR: {count} instances, "
                f"written in {time.monotonic() - started:.2f} s"
            )
    finally:
        catalog.close()
    return EX_OK


def _convert(config: Config, args: argparse.Namespace) -> int:
    catalog = Catalog(config.paths.state)
    try:
        known = catalog.folder_names()
    finally:
        catalog.close()
    if args.folder is not None and args.folder not in known:
        print(f"dcmdb: no physician folder named {args.folder!r} in the catalog", file=sys.stderr)
        print(f"  known folders: {', '.join(known) or 'none'}", file=sys.stderr)
        return EX_FAILURE
    run = run_conversions(
        config.convert,
        config.paths,
        folder_name=args.folder,
        series_instance_uid=args.series,
    )
    if args.series is not None and run.due == 0:
        print(f"dcmdb: no series {args.series} in the catalog", file=sys.stderr)
        return EX_FAILURE
    print(f"{run.describe()} in {run.finished_at - run.started_at:.1f} s")
    if run.worker_peak_rss:
        print(run.describe_memory())
    if run.due == 0 and args.series is None:
        print(
            f"nothing due: every series quiet for {config.convert.settle_minutes:g} minutes "
            "has a current NIfTI (see `dcmdb status`)"
        )
    return EX_FAILURE if run.counts["failed"] else EX_OK


def _prune(config: Config, args: argparse.Namespace) -> int:
    if not config.retention.enabled:
        print(
            "dcmdb: retention is off: set retention.low_free and retention.target_free in "
            f"{config.source} (see README, Retention)",
            file=sys.stderr,
        )
        return EX_FAILURE
    prepare_paths(config.paths)
    catalog = Catalog(config.paths.state)
    try:
        verify = (
            pacs_copy_check(config.retrieve, catalog)
            if config.retention.require_pacs_copy
            else None
        )
        plan, result = prune_now(
            catalog,
            effective_policy(config.retention, config.convert.enabled),
            config.paths.archive,
            config.paths.state,
            dry_run=args.dry_run,
            now=time.time,
            verify=verify,
        )
        if not args.dry_run:  # leave every folder it touched a valid File-set
            rewrite_due_folders(
                catalog, config.paths.archive, config.dicomdir, now=time.time(), ignore_delay=True
            )
    finally:
        catalog.close()
    if args.json:
        report = plan.as_dict()
        report["dry_run"] = args.dry_run
        report["deleted"] = [deletion.study_instance_uid for deletion in result.deleted]
        report["changed_since_planned"] = result.skipped
        report["kept_by_check"] = [
            {"study_instance_uid": item.study.study_instance_uid, "reason": item.reason}
            for item in result.verified_kept
        ]
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _print_plan(plan, dry_run=args.dry_run)
        _print_verified_kept(result)
        if result.skipped:
            print(f"{len(result.skipped)} planned studies changed since (new instances): kept")
    return EX_OK


def _print_plan(plan: PrunePlan, *, dry_run: bool) -> None:
    disk = plan.disk
    print(
        f"free {format_size(disk.free_bytes)} of {format_size(disk.total_bytes)}; "
        f"low_free {format_size(plan.low_free_bytes)}, target_free "
        f"{format_size(plan.target_free_bytes)}; archive {format_size(disk.archive_bytes)}"
    )
    if not plan.trigger:
        print("nothing to prune: space is above retention.low_free")
        return
    print(f"prune: {plan.trigger}; to free: {format_size(plan.needed_bytes)}")
    rows = [("delete", item) for item in plan.deletions] + [("keep", item) for item in plan.kept]
    if rows:
        print()
        print(f"{'':<7}{'received':<12}{'study date':<12}{'size':>10}  {'folder':<24}why / study")
    for action, item in rows:
        study = item.study
        received = time.strftime("%Y-%m-%d", time.localtime(study.received_at))
        print(
            f"{action:<7}{received:<12}{study.study_date or '-':<12}"
            f"{format_size(study.bytes):>10}  {study.folder_name:<24}{item.reason}"
        )
        print(f"{'':<7}{study.study_instance_uid}  {study.study_description}")
    verb = "would free" if dry_run else "freed"
    print(f"\n{len(plan.deletions)} studies, {verb} {format_size(plan.freed_bytes)}")
    if plan.limited:
        print("retention.max_studies_per_run reached: the next check goes on")
    if plan.shortfall_bytes:
        print(
            f"WARNING: {format_size(plan.shortfall_bytes)} short of the target and nothing "
            "more may be pruned (see why each study is kept above)"
        )


def _print_verified_kept(result: PruneResult) -> None:
    for item in result.verified_kept:
        print(f"kept   {item.study.study_instance_uid} in {item.study.folder_name}: {item.reason}")


def _retrieve(config: Config, args: argparse.Namespace) -> int:
    settings = config.retrieve
    if not settings.pacs_configured:
        print(
            "dcmdb: no PACS configured: set retrieve.pacs_host, retrieve.pacs_port and "
            f"retrieve.pacs_ae_title in {config.source} (see README, Retrieve)",
            file=sys.stderr,
        )
        return EX_FAILURE
    if settings.method == "move" and not config.listener.enabled:
        print(
            'dcmdb: retrieve.method = "move" has the PACS send to our listener, but [listener] '
            f'is off in {config.source}: enable it, or set retrieve.method = "get"',
            file=sys.stderr,
        )
        return EX_FAILURE
    date_range = None
    if args.date is not None:
        try:
            time.strptime(args.date, "%Y%m%d")
        except ValueError:
            print(f"dcmdb: --date {args.date}: expected YYYYMMDD, e.g. 20250131", file=sys.stderr)
            return EX_FAILURE
        date_range = args.date
    prepare_paths(config.paths)
    run = retrieve_now(config, date_range=date_range)
    print(run.describe())
    for uid, error in run.failures:
        print(f"  failed: {uid}: {error}")
    if run.instances:
        print(
            f"{run.instances} instances written into {config.paths.incoming}; dcmdb run files them"
        )
    return EX_FAILURE if run.failures else EX_OK


def _echo(config: Config, _args: argparse.Namespace) -> int:
    try:
        print(echo_pacs(config.retrieve))
    except PacsError as exc:
        print(f"dcmdb: C-ECHO failed: {exc}", file=sys.stderr)
        return EX_FAILURE
    return EX_OK


def _protect(config: Config, args: argparse.Namespace) -> int:
    catalog = Catalog(config.paths.state)
    try:
        outcome = catalog.set_study_protected(args.study_instance_uid, args.protected)
    finally:
        catalog.close()
    if outcome == "unknown":
        print(f"dcmdb: no study {args.study_instance_uid} in the catalog", file=sys.stderr)
        return EX_FAILURE
    if outcome == "deleting":
        print(
            f"dcmdb: study {args.study_instance_uid} is being deleted by retention; too late "
            "to protect it (see state/pruned.jsonl)",
            file=sys.stderr,
        )
        return EX_FAILURE
    state = "protected from pruning" if args.protected else "no longer protected"
    print(f"study {args.study_instance_uid}: {state}")
    return EX_OK


def _ingest(config: Config, args: argparse.Namespace) -> int:
    files = list(_expand(args.paths))
    progress = _Progress(len(files), sys.stderr)
    reader = ParallelReader(effective_workers(config.ingest.parse_workers))
    try:
        with open_archiver(config, keep_source=not args.move) as archiver:
            counts = ingest_paths(
                archiver,
                reader,
                (str(path) for path in files),
                batch_size=config.ingest.batch_size,
                progress=progress.update,
            )
    finally:
        reader.shutdown()
    progress.finish()
    catalog = Catalog(config.paths.state)
    try:  # leave every folder it touched a valid File-set, as the daemon would
        rewrite_due_folders(
            catalog, config.paths.archive, config.dicomdir, now=time.time(), ignore_delay=True
        )
    finally:
        catalog.close()
    print(
        f"{len(files)} files: {counts[Outcome.ARCHIVED]} archived, "
        f"{counts[Outcome.DUPLICATE]} duplicates dropped, "
        f"{counts[Outcome.QUARANTINED]} quarantined"
        + (
            f", {counts[Outcome.RETRY]} not archived (vanished, changed while read, or no "
            "space left): run the command again"
            if counts[Outcome.RETRY]
            else ""
        )
    )
    if counts[Outcome.QUARANTINED]:
        print(f"see the .reason.txt files in {config.paths.quarantine}")
    return EX_OK


def _expand(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for folder, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not is_ignored_name(d))
                for name in sorted(names):
                    if not is_ignored_name(name):
                        yield Path(folder, name).absolute()
        elif path.exists():
            yield path.absolute()
        else:
            print(f"dcmdb: {path}: no such file or folder, skipped", file=sys.stderr)


class _Progress:
    """A one-line progress bar on a terminal; a line every few seconds otherwise."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self._total = total
        self._stream = stream
        self._done = 0
        self._counts: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        self._tty = stream.isatty()
        self._last = 0.0
        self._started = time.monotonic()

    def update(self, result: IngestResult) -> None:
        self._done += 1
        self._counts[result.outcome] += 1
        now = time.monotonic()
        if now - self._last >= (0.1 if self._tty else 5.0) or self._done == self._total:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        fraction = self._done / self._total if self._total else 1.0
        rate = self._done / max(now - self._started, 1e-9)
        text = (
            f"{self._done}/{self._total} files ({rate:.0f}/s): "
            f"archived {self._counts[Outcome.ARCHIVED]}, "
            f"duplicates {self._counts[Outcome.DUPLICATE]}, "
            f"quarantined {self._counts[Outcome.QUARANTINED]}"
        )
        if self._tty:
            bar = "#" * int(fraction * 30)
            self._stream.write(f"\r[{bar:<30}] {text}")
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._tty and self._total:
            self._stream.write("\n")


if __name__ == "__main__":
    sys.exit(main())
