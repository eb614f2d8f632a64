"""Load and validate ``config.toml`` into frozen dataclasses.

Every problem in the file is collected, prefixed by its key path (``ingest.settle_seconds``),
and raised at once in one :class:`ConfigError`, so an admin fixes the file in one pass. The CLI
turns that into exit status :data:`EX_CONFIG` (78), which the systemd unit does not restart on.

This is the one place where what the admin wrote is checked: ``daemon.layout`` takes the
sorting settings as given. So whatever :func:`load_config` accepts must work there, and the rules
below follow layout's (a folder name any SMB client can open) and model's (when two Referring
Physician spellings are one person: :func:`daemon.model.person_name_key`).

This module imports the standard library, ``daemon.model`` (itself stdlib only) and, for the
``[convert]`` schedule, APScheduler's cron parser and tzlocal: it runs before anything else is
set up.

``[retention]`` deletes studies, which cannot be undone, so it is off unless ``low_free`` is set
and then has no default for how far it prunes (``target_free``).

``[metrics]`` (a Prometheus endpoint) is off by default, and listens on loopback when on.

``[listener]`` (a DICOM C-STORE SCP) and ``[retrieve]`` (query/retrieve from the PACS) are off by
default. The PACS named in ``[retrieve]`` is also the one ``retention.require_pacs_copy`` asks.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import shutil
import string
import tomllib
import unicodedata
import zoneinfo
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from datetime import date, datetime, time
from datetime import tzinfo as TzInfo
from fractions import Fraction
from pathlib import Path
from typing import Any, Final, Literal

import tzlocal  # the server's local time zone, DST-aware; APScheduler 3 depends on it

# convert.schedule is checked with the parser the daemon schedules with, so that the daemon and
# the check agree on what is valid.
from apscheduler.triggers.cron import CronTrigger

from daemon.model import NAME_MAX_BYTES, WINDOWS_DEVICE_NAMES, fold_case, person_name_key

__all__ = [
    "ENV_VAR",
    "EX_CONFIG",
    "SERIES_TEMPLATE_FIELDS",
    "STUDY_TEMPLATE_FIELDS",
    "SYSTEM_CONFIG_PATH",
    "Config",
    "ConfigError",
    "ConvertConfig",
    "DicomdirConfig",
    "IngestConfig",
    "ListenerConfig",
    "LoggingConfig",
    "MetricsConfig",
    "PathsConfig",
    "RetentionConfig",
    "RetrieveConfig",
    "SortingConfig",
    "SpaceThreshold",
    "find_config_file",
    "load_config",
    "parse_size",
    "parse_threshold",
    "render_config",
]

EX_CONFIG: Final = 78  # sysexits.h: configuration error
ENV_VAR: Final = "DCMDB_CONFIG"
SYSTEM_CONFIG_PATH: Final = Path("/etc/dcmdb/config.toml")

OBSERVERS: Final = ("inotify", "polling")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")
# The components of a PN value's alphabetic group, PS3.5 6.2.1.1, in their DICOM order.
PN_COMPONENTS: Final = ("family", "given", "middle", "prefix", "suffix")
# Characters Windows clients cannot use in a name on the SMB share, plus the path separators.
FORBIDDEN_FOLDER_CHARS: Final = '/\\:*?"<>|'
CONVERT_ENGINES: Final = ("dcm2niix", "dicom2nifti")
# retention.order: which eligible studies go first, the oldest by when dcmdb received them or by
# their StudyDate.
RETENTION_ORDERS: Final = ("received", "study_date")
# retrieve.method: C-MOVE to our own listener, or C-GET on the association we open.
RETRIEVE_METHODS: Final = ("move", "get")
# PS3.5 6.2, AE VR: at most 16 characters of the default repertoire, no backslash, no control
# characters; leading and trailing spaces are not significant.
_AE_TITLE_MAX: Final = 16
# The fields convert.study_template and convert.series_template may use, in the order error
# messages list them. SeriesNumber is an int (so "{SeriesNumber:03d}" works); the others are str.
_STUDY_FIELDS: Final = (
    "PatientID",
    "PatientName",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "StudyID",
    "AccessionNumber",
)
_SERIES_FIELDS: Final = (*_STUDY_FIELDS, "SeriesNumber", "SeriesDescription", "Modality")
STUDY_TEMPLATE_FIELDS: Final = frozenset(_STUDY_FIELDS)
SERIES_TEMPLATE_FIELDS: Final = frozenset(_SERIES_FIELDS)
# What a template is test-filled with: a format spec that fails on these fails on real data.
_TEMPLATE_SAMPLE: Final[Mapping[str, str | int]] = {
    "PatientID": "P0042",
    "PatientName": "DOE^JANE",
    "StudyDate": "20240131",
    "StudyTime": "093000",
    "StudyDescription": "Brain MRI",
    "StudyID": "1",
    "AccessionNumber": "A12345",
    "SeriesNumber": 3,
    "SeriesDescription": "T1 MPRAGE",
    "Modality": "MR",
}
# A conversion process (Python, numpy, pydicom) does not start with less address space.
MIN_MEMORY_LIMIT_BYTES: Final = 256 * 1024**2
# setrlimit takes a signed 64-bit limit.
_MAX_MEMORY_LIMIT_BYTES: Final = 2**63 - 1
_NOT_ZONE_NAMES: Final = frozenset({"localtime", "posixrules", "Factory"})
_SIZE_UNITS: Final = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_UNIT_NAMES: Final = ("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB")
_SIZE_EXAMPLES: Final = '"4GiB", "512 MiB", "1.5GB", "1000000" (bytes) or "unlimited"'
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[A-Za-z]*)")
_PERCENT = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*%")
_THRESHOLD_EXAMPLES: Final = '"10%", "12.5%" (of the filesystem), "200GiB" or "500 GB"'
_ARCHIVE_SIZE_EXAMPLES: Final = '"2TiB", "500 GB" or "1.5TB", or "" for no limit'
# No filesystem holds more; statvfs sizes are 64-bit.
_MAX_THRESHOLD_BYTES: Final = 2**63 - 1

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_ERROR_POSITION = re.compile(
    r"^(?P<what>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)$"
)
_TOML_ERROR_AT_END = re.compile(r"^(?P<what>.*) \(at end of document\)$")


class ConfigError(Exception):
    """The configuration cannot be used; ``errors`` holds every problem, one message each."""

    def __init__(self, errors: str | Iterable[str]) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__(tuple(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


class _FrozenMapping(Mapping[str, tuple[str, ...]]):
    """A read-only, hashable mapping, so config sections stay hashable (e.g. as cache keys)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Iterable[str]] | None = None) -> None:
        self._data: dict[str, tuple[str, ...]] = {
            key: tuple(values) for key, values in (data or {}).items()
        }

    def __getitem__(self, key: str) -> tuple[str, ...]:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"{{{', '.join(f'{key!r}: {value!r}' for key, value in self._data.items())}}}"


@dataclass(frozen=True)
class PathsConfig:
    """The four folders of the volume; absolute, resolved, distinct and not nested."""

    incoming: Path
    archive: Path
    quarantine: Path
    state: Path


@dataclass(frozen=True)
class IngestConfig:
    observer: str = "inotify"  # "polling" for network mounts, which send no inotify events
    polling_interval_seconds: float = 2.0
    # A file with no close-write event is taken once its size and mtime are unchanged this long.
    settle_seconds: float = 10.0
    # A truncated or unreadable file unchanged this long is quarantined.
    incomplete_timeout_seconds: float = 300.0
    # Full scan of incoming/: inotify drops events silently when its queue overflows.
    rescan_seconds: float = 60.0
    empty_folder_grace_seconds: float = 300.0
    parse_workers: int = 0  # 0 = one per CPU core but one (at least one)
    batch_size: int = 256  # files per catalog transaction
    # Ingest pauses while the archive's filesystem has less free space than this, as written.
    min_free: str = "1GiB"
    # min_free parsed; derived, so not a key of the file.
    min_free_threshold: SpaceThreshold = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_free_threshold", parse_threshold(self.min_free))


@dataclass(frozen=True)
class SortingConfig:
    folder_template: str = "{family}_{given}"
    unknown_folder: str = "unknown"
    max_folder_length: int = 64
    # Folder name -> Referring Physician spellings (DICOM PN form, e.g. "SMITH^J").
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=_FrozenMapping)

    def __post_init__(self) -> None:
        if not isinstance(self.aliases, _FrozenMapping):
            object.__setattr__(self, "aliases", _FrozenMapping(self.aliases))


@dataclass(frozen=True)
class DicomdirConfig:
    delay_seconds: float = 60.0  # > 0: quiet time after the last new instance before a rewrite
    max_delay_seconds: float = 600.0  # >= delay_seconds: rewrite at least this often meanwhile


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "text"


def schedule_timezone(name: str) -> TzInfo:
    """A schedule's time zone: the IANA zone ``name``, or the server's local zone (DST-aware)
    when it is ""."""
    if name:
        return zoneinfo.ZoneInfo(name)
    return tzlocal.get_localzone()


@dataclass(frozen=True)
class ConvertConfig:
    enabled: bool = True  # the scheduled conversion job runs
    engine: str = "dcm2niix"  # or "dicom2nifti"
    schedule: str = "0 5 * * *"  # crontab: minute hour day month weekday (weekdays by name)
    timezone: str = ""  # IANA name of the schedule's zone; "" = the server's local zone
    settle_minutes: float = 30.0  # a series with no new instance this long is converted
    workers: int = 0  # conversions at once; 0 = one per CPU core
    timeout_seconds: float = 3600.0  # one series' conversion is stopped after this
    memory_limit: str = "4GiB"  # address-space limit of a conversion process, as written
    max_attempts: int = 3  # failures with unchanged content before the schedule gives up
    preview: bool = True  # a PNG preview per series
    study_template: str = "{PatientID}_{StudyDate}_{StudyDescription}"
    series_template: str = "{SeriesNumber:03d}_{SeriesDescription}"
    dcm2niix: Path | None = None  # None: the binary installed with dcmdb, then PATH
    # memory_limit in bytes, 0 = unlimited; derived, so not a key of the file.
    memory_limit_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory_limit_bytes", parse_size(self.memory_limit))

    @property
    def tzinfo(self) -> TzInfo:
        return schedule_timezone(self.timezone)

    @property
    def effective_workers(self) -> int:
        """``workers``, or the number of CPU cores (at least one) when it is 0."""
        return self.workers or max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class SpaceThreshold:
    """An amount of free space: a percentage of a filesystem's size, or a number of bytes."""

    kind: Literal["percent", "bytes"]
    value: float  # percent: 0 < value < 100; bytes: a whole number >= 0

    def __post_init__(self) -> None:
        if self.kind == "percent":
            if not (math.isfinite(self.value) and 0 < self.value < 100):
                raise ValueError(f"a percentage must be more than 0 and less than 100: {self}")
        elif self.kind == "bytes":
            if not (0 <= self.value <= _MAX_THRESHOLD_BYTES and self.value == int(self.value)):
                raise ValueError(f"a number of bytes must be a whole number >= 0: {self}")
        else:
            raise ValueError(f'kind must be "percent" or "bytes": {self}')

    def bytes_of(self, total_bytes: int) -> int:
        """The threshold in bytes on a filesystem of ``total_bytes`` (statvfs f_blocks*f_frsize).

        A percentage is rounded up, so for a whole number of free bytes ``free < bytes_of(t)``
        holds exactly when free is below the percentage, and ``>=`` when it has reached it.
        """
        if self.kind == "percent":
            # The decimal the admin wrote (repr is the shortest that round-trips), not the
            # binary float: 12.3% of 1000 bytes is 123 bytes, not 124.
            return math.ceil(Fraction(repr(self.value)) * total_bytes / 100)
        return int(self.value)


@dataclass(frozen=True)
class RetentionConfig:
    """When the archive is pruned of its oldest studies; off unless ``low_free`` is set."""

    # Prune when the archive's filesystem has less free space than this ("10%", "200GiB").
    low_free: str = ""
    # ... until it has at least this much; required with low_free, at least low_free.
    target_free: str = ""
    # Also prune while the catalogued archive is larger than this size; "" = no limit.
    max_archive_size: str = ""
    min_age_days: float = 30.0  # a study received more recently is never pruned
    # Physician folders never pruned, as named in the archive (compared as on the share:
    # ignoring case, see is_protected).
    protect: tuple[str, ...] = ()
    keep_unconverted: bool = True  # a study with series waiting for NIfTI conversion is kept
    order: str = "received"  # or "study_date": which eligible studies go first (oldest first)
    max_studies_per_run: int = 100
    check_every_minutes: float = 10.0  # how often the daemon checks free space
    # Keep a study unless the PACS ([retrieve]) holds all of its instances (C-FIND at prune).
    require_pacs_copy: bool = False
    # Parsed from low_free, target_free and max_archive_size (None when ""); derived, so not
    # keys of the file.
    low_free_threshold: SpaceThreshold | None = field(init=False)
    target_free_threshold: SpaceThreshold | None = field(init=False)
    max_archive_bytes: int | None = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.protect, tuple):
            object.__setattr__(self, "protect", tuple(self.protect))
        low = parse_threshold(self.low_free) if self.low_free else None
        target = parse_threshold(self.target_free) if self.target_free else None
        max_bytes = _parse_archive_size(self.max_archive_size) if self.max_archive_size else None
        problems = _retention_problems(self.low_free, self.target_free, self.max_archive_size)
        if problems:
            raise ValueError("; ".join(f"retention.{key}: {problem}" for key, problem in problems))
        object.__setattr__(self, "low_free_threshold", low)
        object.__setattr__(self, "target_free_threshold", target)
        object.__setattr__(self, "max_archive_bytes", max_bytes)

    @property
    def enabled(self) -> bool:
        """Whether the daemon prunes at all: only once ``low_free`` is set."""
        return self.low_free != ""

    def is_protected(self, folder: str) -> bool:
        """Whether the physician folder ``folder`` is listed in ``protect`` (case-insensitively,
        as on the SMB share: :func:`daemon.model.fold_case`, layout's folder key)."""
        key = fold_case(folder)
        return any(fold_case(name) == key for name in self.protect)


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint, ``http://<address>:<port>/metrics``; off unless enabled.

    It carries counts and sizes only, never a patient's name or ID, and has no authentication:
    keep ``address`` on loopback and let a reverse proxy (with TLS and a password) or a
    Prometheus on the same host reach it. Any IP address is accepted, as an admin may know
    better (a dedicated monitoring interface), but not a host name: a name may resolve to an
    address on every interface.
    """

    enabled: bool = False
    address: str = "127.0.0.1"  # an IP address literal (IPv4 or IPv6), not a host name
    port: int = 9723


@dataclass(frozen=True)
class ListenerConfig:
    """The DICOM listener: a C-STORE SCP that writes what it receives into ``incoming/``."""

    enabled: bool = False
    ae_title: str = "DCMDB"  # our AE title, the one scanners and the PACS send to
    address: str = "0.0.0.0"  # an IP address literal; 0.0.0.0 = every IPv4 interface
    port: int = 11112  # the registered DICOM port (PS3.8); 104 needs root
    # Calling AE titles accepted; required once enabled (an open store takes anything).
    allowed_ae_titles: tuple[str, ...] = ()
    # Peer addresses or networks ("10.1.2.0/24") accepted; () = any address.
    allowed_addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("allowed_ae_titles", "allowed_addresses"):
            if not isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True)
class RetrieveConfig:
    """Query/retrieve from the PACS on a schedule; the PACS is also what
    ``retention.require_pacs_copy`` and ``dcmdb echo`` ask."""

    enabled: bool = False  # the scheduled retrieve runs
    pacs_host: str = ""  # host name or IP address of the PACS
    pacs_port: int = 104
    pacs_ae_title: str = ""  # the PACS's AE title (the called AE)
    ae_title: str = "DCMDB"  # our AE title when we call the PACS
    method: str = "move"  # "move": C-MOVE to listener.ae_title; "get": C-GET
    schedule: str = "0 1 * * *"  # crontab: minute hour day month weekday (weekdays by name)
    timezone: str = ""  # IANA name of the schedule's zone; "" = the server's local zone
    lookback_days: int = 2  # studies of today and the days before, by StudyDate
    modalities: tuple[str, ...] = ()  # only studies with one of these; () = any
    study_description: str = ""  # fnmatch pattern, case-insensitive; "" = any
    referring_physician: str = ""  # fnmatch pattern on the PN value, case-insensitive
    timeout_seconds: float = 60.0  # association, DIMSE and network timeouts

    def __post_init__(self) -> None:
        if not isinstance(self.modalities, tuple):
            object.__setattr__(self, "modalities", tuple(self.modalities))

    @property
    def tzinfo(self) -> TzInfo:
        return schedule_timezone(self.timezone)

    @property
    def pacs_configured(self) -> bool:
        return bool(self.pacs_host and self.pacs_ae_title)


@dataclass(frozen=True)
class Config:
    source: Path  # the config file that was loaded (absolute)
    paths: PathsConfig
    ingest: IngestConfig
    sorting: SortingConfig
    logging: LoggingConfig
    dicomdir: DicomdirConfig = field(default_factory=DicomdirConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)


_SECTIONS: Final = {
    "paths": PathsConfig,
    "ingest": IngestConfig,
    "sorting": SortingConfig,
    "dicomdir": DicomdirConfig,
    "convert": ConvertConfig,
    "retention": RetentionConfig,
    "metrics": MetricsConfig,
    "listener": ListenerConfig,
    "retrieve": RetrieveConfig,
    "logging": LoggingConfig,
}


def _keys(section: type) -> tuple[str, ...]:
    """The keys of a section in the file: its fields, less those derived from other keys."""
    return tuple(item.name for item in fields(section) if item.init)


# ---------------------------------------------------------------------------------------------
# Finding the file


def find_config_file(
    explicit: str | None,
    environ: Mapping[str, str],
    *,
    system_config: Path = SYSTEM_CONFIG_PATH,
) -> Path:
    """The config file to load, as an absolute path.

    Order: ``explicit`` (``--config``) > ``environ["DCMDB_CONFIG"]`` > ``./config.toml`` >
    ``system_config`` (``/etc/dcmdb/config.toml``). A path the admin named that does not exist
    is an error rather than a silent fall-through to another file. An empty ``DCMDB_CONFIG``
    counts as unset.
    """
    if explicit is not None:
        return _named_file(explicit, "--config")
    from_env = environ.get(ENV_VAR, "")
    if from_env:
        return _named_file(from_env, ENV_VAR)
    tried = [Path.cwd() / "config.toml", system_config]
    for candidate in tried:
        if candidate.exists():
            return Path(os.path.abspath(candidate))
    listed = ", ".join(str(candidate) for candidate in tried)
    raise ConfigError(
        f"no config file found (tried {listed}); name one with --config PATH or {ENV_VAR}=PATH"
    )


def _named_file(given: str, origin: str) -> Path:
    try:
        path = Path(given).expanduser()
    except RuntimeError as exc:
        raise ConfigError(f"{origin} {given}: cannot expand '~': {exc}") from exc
    if not path.exists():
        raise ConfigError(f"{origin} {given}: no such file")
    return Path(os.path.abspath(path))


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: Path) -> Config:
    """Read and validate ``path``; raise :class:`ConfigError` listing every problem."""
    source = Path(os.path.abspath(path.expanduser()))
    document = _read_toml(source)
    errors: list[str] = []
    config = _build_config(document, source, errors)
    if errors or config is None:
        raise ConfigError(errors or [f"{source}: invalid configuration"])
    return config


def _read_toml(source: Path) -> dict[str, object]:
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{source}: line {line}: not UTF-8 text (TOML must be UTF-8)") from exc
    try:
        # Editors on Windows may prepend a byte order mark, which TOML does not allow.
        return tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {_describe_toml_error(exc)}") from exc


def _describe_toml_error(exc: tomllib.TOMLDecodeError) -> str:
    message = str(exc)
    if match := _TOML_ERROR_POSITION.match(message):
        return (
            f"TOML syntax error at line {match['line']}, column {match['column']}: {match['what']}"
        )
    if match := _TOML_ERROR_AT_END.match(message):
        return f"TOML syntax error at end of file: {match['what']}"
    return f"TOML syntax error: {message}"


def _build_config(document: Mapping[str, object], source: Path, errors: list[str]) -> Config | None:
    for name, value in document.items():
        if name not in _SECTIONS:
            errors.append(_unknown_top_level(name, value))
    paths = _load_paths(document, source, errors)
    ingest_table = _optional_table(document, "ingest", errors)
    ingest = _load_ingest(ingest_table, errors)
    sorting = _load_sorting(_optional_table(document, "sorting", errors), errors)
    dicomdir = _load_dicomdir(_optional_table(document, "dicomdir", errors), errors)
    convert = _load_convert(_optional_table(document, "convert", errors), source, errors)
    # An ingest.min_free that was refused (and replaced by its default) is not compared with.
    min_free_valid = ingest_table.get("min_free", ingest.min_free) == ingest.min_free
    retention = _load_retention(
        _optional_table(document, "retention", errors),
        errors,
        max_folder_length=sorting.max_folder_length,
        ingest_min_free=ingest.min_free if min_free_valid else None,
    )
    metrics = _load_metrics(_optional_table(document, "metrics", errors), errors)
    listener = _load_listener(_optional_table(document, "listener", errors), errors)
    retrieve = _load_retrieve(_optional_table(document, "retrieve", errors), errors)
    logging = _load_logging(_optional_table(document, "logging", errors), errors)
    _check_network_sections(listener, retrieve, retention, errors)
    if paths is None:
        return None
    return Config(
        source=source,
        paths=paths,
        ingest=ingest,
        sorting=sorting,
        logging=logging,
        dicomdir=dicomdir,
        convert=convert,
        retention=retention,
        metrics=metrics,
        listener=listener,
        retrieve=retrieve,
    )


def _unknown_top_level(name: str, value: object) -> str:
    shown = _key_path(name)
    if isinstance(value, dict):
        return f"{shown}: unknown section{_suggest(name, _SECTIONS)}"
    owners = [section for section, cls in _SECTIONS.items() if name in _keys(cls)]
    if owners:
        return f"{shown}: unknown top-level key; it belongs under [{owners[0]}]"
    return f"{shown}: unknown key{_suggest(name, _SECTIONS)}"


def _optional_table(
    document: Mapping[str, object], name: str, errors: list[str]
) -> Mapping[str, object]:
    value = document.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.append(f"{name}: expected a table [{name}], got {_describe(value)}")
        return {}
    return value


class _Section:
    """Typed access to one table; every problem is appended to ``errors`` with its key path."""

    def __init__(
        self,
        prefix: tuple[str, ...],
        table: Mapping[str, object],
        known: Iterable[str],
        errors: list[str],
    ) -> None:
        self.prefix = prefix
        self.table = table
        self.errors = errors
        known = tuple(known)
        for key in table:
            if key not in known:
                self.error(key, f"unknown key{_suggest(key, known)}")

    def path(self, key: str) -> str:
        return _key_path(*self.prefix, key)

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.path(key)}: {message}")

    def number(self, key: str, default: float, *, minimum: float, exclusive: bool) -> float:
        if key not in self.table:
            return default
        value = self.table[key]
        expected = f"expected a number {'>' if exclusive else '>='} {minimum:g}"
        if (
            isinstance(value, bool)  # bool is an int subclass, but `true` is not a duration
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < minimum
            or (exclusive and value == minimum)
        ):
            self.error(key, f"{expected}, got {_describe(value)}")
            return default
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        if key not in self.table:
            return default
        value = self.table[key]
        if maximum is None:
            expected = f"expected an integer >= {minimum}"
        else:
            expected = f"expected an integer from {minimum} to {maximum}"
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            self.error(key, f"{expected}, got {_describe(value)}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        if key not in self.table:
            return default
        value = self.table[key]
        if not isinstance(value, bool):
            self.error(key, f"expected true or false, got {_describe(value)}")
            return default
        return value

    def string(self, key: str, default: str) -> str:
        if key not in self.table:
            return default
        value = self.table[key]
        if not isinstance(value, str):
            self.error(key, f"expected a string, got {_describe(value)}")
            return default
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        """One of ``choices``, compared case-insensitively and stored lowercase."""
        if key not in self.table:
            return default
        value = self.table[key]
        expected = "expected one of " + ", ".join(_toml_string(choice) for choice in choices)
        if not isinstance(value, str):
            self.error(key, f"{expected}, got {_describe(value)}")
            return default
        lowered = value.lower()
        if lowered not in choices:
            self.error(key, f"{expected}, got {_describe(value)}{_suggest(lowered, choices)}")
            return default
        return lowered


def _load_paths(
    document: Mapping[str, object], source: Path, errors: list[str]
) -> PathsConfig | None:
    required = _keys(PathsConfig)
    table = document.get("paths")
    if table is None:
        errors.append(
            f"paths: missing required section [paths] with keys {', '.join(required)} "
            "(absolute, or relative to the config file's folder)"
        )
        return None
    if not isinstance(table, dict):
        errors.append(f"paths: expected a table [paths], got {_describe(table)}")
        return None
    section = _Section(("paths",), table, required, errors)
    resolved: dict[str, Path] = {}
    for key in required:
        if key not in table:
            section.error(
                key, "missing required key (absolute, or relative to the config file's folder)"
            )
            continue
        path = _resolve_path(section, key, table[key], source.parent)
        if path is not None:
            resolved[key] = path
    _check_paths_apart(resolved, source, errors)
    if len(resolved) != len(required):
        return None
    return PathsConfig(**resolved)


def _resolve_path(section: _Section, key: str, value: object, base: Path) -> Path | None:
    if not isinstance(value, str) or not value.strip():
        section.error(key, f"expected a path (a non-empty string), got {_describe(value)}")
        return None
    if "\x00" in value:
        section.error(key, "must not contain a NUL character")
        return None
    try:
        expanded = Path(value).expanduser()
    except RuntimeError as exc:  # unknown ~user, or no home directory
        section.error(key, f"cannot expand '~' in {_describe(value)}: {exc}")
        return None
    try:
        # Relative paths are relative to the config file, not to wherever the daemon started.
        return (base / expanded).resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop
        section.error(key, f"cannot resolve {_describe(value)}: {exc}")
        return None


def _check_paths_apart(resolved: Mapping[str, Path], source: Path, errors: list[str]) -> None:
    """Ingest would eat its own output if one folder were inside another."""
    items = list(resolved.items())
    for index, (first_key, first) in enumerate(items):
        for second_key, second in items[index + 1 :]:
            if first == second:
                errors.append(
                    f"paths.{second_key}: must differ from paths.{first_key} (both are {first})"
                )
            elif first.is_relative_to(second):
                errors.append(
                    f"paths.{first_key}: must not be inside paths.{second_key} "
                    f"({first} is inside {second})"
                )
            elif second.is_relative_to(first):
                errors.append(
                    f"paths.{second_key}: must not be inside paths.{first_key} "
                    f"({second} is inside {first})"
                )
    incoming = resolved.get("incoming")
    if incoming is not None:
        try:
            real_source = source.resolve()
        except (OSError, RuntimeError):
            real_source = source
        if real_source.is_relative_to(incoming):
            errors.append(
                f"paths.incoming: must not contain the config file ({real_source} is inside "
                f"{incoming}); ingest would quarantine it"
            )


def _load_ingest(table: Mapping[str, object], errors: list[str]) -> IngestConfig:
    default = IngestConfig()
    section = _Section(("ingest",), table, _keys(IngestConfig), errors)
    errors_before = len(errors)
    settle = section.number("settle_seconds", default.settle_seconds, minimum=0, exclusive=False)
    incomplete = section.number(
        "incomplete_timeout_seconds",
        default.incomplete_timeout_seconds,
        minimum=0,
        exclusive=True,
    )
    if len(errors) == errors_before and incomplete < settle:
        # A file must get the chance to settle before it can be judged truncated.
        section.error(
            "incomplete_timeout_seconds",
            f"must be at least ingest.settle_seconds ({settle:g}), or files still being "
            "written would be quarantined",
        )
    return IngestConfig(
        observer=section.choice("observer", default.observer, OBSERVERS),
        polling_interval_seconds=section.number(
            "polling_interval_seconds",
            default.polling_interval_seconds,
            minimum=0,
            exclusive=True,
        ),
        settle_seconds=settle,
        incomplete_timeout_seconds=incomplete,
        rescan_seconds=section.number(
            "rescan_seconds", default.rescan_seconds, minimum=0, exclusive=True
        ),
        empty_folder_grace_seconds=section.number(
            "empty_folder_grace_seconds",
            default.empty_folder_grace_seconds,
            minimum=0,
            exclusive=False,
        ),
        parse_workers=section.integer("parse_workers", default.parse_workers, minimum=0),
        batch_size=section.integer("batch_size", default.batch_size, minimum=1, maximum=10000),
        min_free=_load_threshold(
            section, "min_free", default.min_free, allow_empty=False, hint=', or "0" never to pause'
        )
        or default.min_free,
    )


def _load_sorting(table: Mapping[str, object], errors: list[str]) -> SortingConfig:
    default = SortingConfig()
    section = _Section(("sorting",), table, _keys(SortingConfig), errors)
    max_length = section.integer(
        "max_folder_length", default.max_folder_length, minimum=8, maximum=200
    )
    template = section.string("folder_template", default.folder_template)
    for problem in _template_problems(template):
        section.error("folder_template", problem)
    unknown_folder = section.string("unknown_folder", default.unknown_folder)
    if folder_problem := _folder_name_problem(unknown_folder, max_length):
        section.error("unknown_folder", folder_problem)
    aliases = _load_aliases(section, unknown_folder, max_length)
    return SortingConfig(
        folder_template=template,
        unknown_folder=unknown_folder,
        max_folder_length=max_length,
        aliases=aliases,
    )


def _parse_template(template: str, listed: str) -> tuple[list[Any], list[str]]:
    """string.Formatter's parse of a naming template, or why it cannot be parsed."""
    if not template:
        return [], [f"must not be empty; use some of {listed}"]
    try:
        return list(string.Formatter().parse(template)), []
    except ValueError as exc:
        return [], [f"is not a valid template ({exc}); write a literal brace as {{{{ or }}}}"]


def _shown_placeholder(name: str, conversion: str | None, format_spec: str | None) -> str:
    return (
        "{"
        + name
        + (f"!{conversion}" if conversion else "")
        + (f":{format_spec}" if format_spec else "")
        + "}"
    )


def _template_text_problems(template: str, literal: str, hidden: str) -> list[str]:
    """The text a template writes as it is must be valid in a name on the share."""
    problems: list[str] = []
    forbidden = sorted({char for char in literal if char in FORBIDDEN_FOLDER_CHARS})
    if forbidden:
        problems.append(f"text outside placeholders must not contain {' '.join(forbidden)}")
    if any(_is_control(char) for char in literal):
        problems.append("must not contain control characters")
    if template.startswith("."):
        problems.append(f"must not start with '.' (a hidden {hidden})")
    return problems


def _template_problems(template: str) -> list[str]:
    allowed = ", ".join(f"{{{name}}}" for name in PN_COMPONENTS)
    parsed, problems = _parse_template(template, allowed)
    if problems:
        return problems
    literal = ""
    placeholders = 0
    for text, name, format_spec, conversion in parsed:
        literal += text
        if name is None:
            continue
        placeholders += 1
        shown = _shown_placeholder(name, conversion, format_spec)
        if name not in PN_COMPONENTS:
            hint = _suggest(name, PN_COMPONENTS, wrap="{}")
            problems.append(f"unknown placeholder {shown}; allowed: {allowed}{hint}")
        elif conversion or format_spec:
            problems.append(
                f"placeholder {shown}: conversions and format specs are not supported; "
                f"write {{{name}}}"
            )
    if placeholders == 0:
        problems.append(
            f"has no placeholder, so every physician would share one folder; use some of {allowed}"
        )
    return problems + _template_text_problems(template, literal, "folder")


def _folder_name_problem(name: str, max_length: int) -> str | None:
    """Why ``name`` cannot be a physician folder on the share, or None if it can.

    Only what breaks a client is refused; the cosmetic rules of generated names (no '..' inside,
    no '_' or '-' at the ends, NFC) are not imposed on a name the admin chose.
    """
    if not name:
        return "must not be empty"
    if name.startswith("."):
        # Hidden, and .tmp-* names are reserved for half-written files.
        return "must not start with '.' (a hidden folder)"
    forbidden = sorted({char for char in name if char in FORBIDDEN_FOLDER_CHARS})
    if forbidden:
        return f"must not contain {' '.join(forbidden)}"
    if any(_is_control(char) for char in name):
        return "must not contain control characters"
    if any(unicodedata.category(char) == "Cs" for char in name):
        # TOML cannot carry one, but a name that is not encodable as UTF-8 is no file name.
        return "must not contain lone surrogates (not encodable as UTF-8)"
    if name[-1] in ". ":
        return "must not end with '.' or a space (Windows clients cannot open it over SMB)"
    # Windows decides by the part before the first dot, trailing spaces ignored.
    device = name.partition(".")[0].rstrip(" ")
    if device.upper() in WINDOWS_DEVICE_NAMES:
        return (
            f"must not be the Windows device name {device.upper()}, in any case or before an "
            "extension"
        )
    if len(name) > max_length:
        return f"is {len(name)} characters long, over sorting.max_folder_length ({max_length})"
    size = len(name.encode("utf-8"))
    if size > NAME_MAX_BYTES:
        return f"is {size} bytes long in UTF-8, over the {NAME_MAX_BYTES} a file name may have"
    return None


def _load_aliases(sorting: _Section, unknown_folder: str, max_length: int) -> _FrozenMapping:
    if "aliases" not in sorting.table:
        return _FrozenMapping()
    table = sorting.table["aliases"]
    errors = sorting.errors
    if not isinstance(table, dict):
        sorting.error(
            "aliases",
            f'expected a table of folder = ["SPELLING^ONE", ...], got {_describe(table)}',
        )
        return _FrozenMapping()
    # SMB shares are case-insensitive: two folder names differing only in case (or Unicode
    # normalization) are one folder. fold_case is also daemon.layout's folder_key.
    folders_seen: dict[str, str] = {}
    # person_name_key -> (folder, as written): the key ingest looks the spelling up by.
    spellings_seen: dict[str, tuple[str, str]] = {}
    aliases: dict[str, tuple[str, ...]] = {}
    for folder, spellings in table.items():
        folder_path = _key_path("sorting", "aliases", folder)
        if problem := _folder_name_problem(folder, max_length):
            errors.append(f"{folder_path}: folder name {problem}")
        folded = fold_case(folder)
        if folded == fold_case(unknown_folder):
            errors.append(
                f"{folder_path}: folder name must differ from sorting.unknown_folder "
                f"({_toml_string(unknown_folder)})"
            )
        elif folded in folders_seen:
            errors.append(
                f"{folder_path}: same folder as "
                f"{_key_path('sorting', 'aliases', folders_seen[folded])} "
                "on a case-insensitive share"
            )
        folders_seen.setdefault(folded, folder)
        if not isinstance(spellings, list):
            errors.append(
                f"{folder_path}: expected an array of Referring Physician spellings "
                f'(["SMITH^J", ...]), got {_describe(spellings)}'
            )
            continue
        if not spellings:
            errors.append(f"{folder_path}: lists no spellings")
            continue
        accepted: list[str] = []
        for index, spelling in enumerate(spellings):
            item_path = f"{folder_path}[{index}]"
            if not isinstance(spelling, str):
                errors.append(f"{item_path}: expected a string, got {_describe(spelling)}")
                continue
            spelling = spelling.strip()
            if not spelling:
                errors.append(f"{item_path}: must not be empty")
                continue
            if "\\" in spelling or any(_is_control(char) for char in spelling):
                # PS3.5 6.2: backslash separates values; PN allows no control characters.
                errors.append(f"{item_path}: must not contain a backslash or control characters")
                continue
            key = person_name_key(spelling)
            if not key:
                errors.append(f"{item_path}: names no one (only '^' and spaces)")
                continue
            owner = spellings_seen.get(key)
            if owner is not None and owner[0] != folder:
                errors.append(
                    f"{item_path}: {_toml_string(spelling)} is already listed under "
                    f"{_key_path('sorting', 'aliases', owner[0])} as {_toml_string(owner[1])}; "
                    "a spelling can lead to one folder only"
                )
                continue
            spellings_seen.setdefault(key, (folder, spelling))
            accepted.append(spelling)
        aliases[folder] = tuple(accepted)
    return _FrozenMapping(aliases)


def _load_dicomdir(table: Mapping[str, object], errors: list[str]) -> DicomdirConfig:
    default = DicomdirConfig()
    section = _Section(("dicomdir",), table, _keys(DicomdirConfig), errors)
    delay = section.number("delay_seconds", default.delay_seconds, minimum=0, exclusive=True)
    max_delay = section.number(
        "max_delay_seconds", default.max_delay_seconds, minimum=0, exclusive=True
    )
    if max_delay < delay:
        section.error(
            "max_delay_seconds",
            f"must be at least dicomdir.delay_seconds ({delay:g}), got {max_delay:g}",
        )
    return DicomdirConfig(delay_seconds=delay, max_delay_seconds=max_delay)


def _load_convert(table: Mapping[str, object], source: Path, errors: list[str]) -> ConvertConfig:
    default = ConvertConfig()
    section = _Section(("convert",), table, _keys(ConvertConfig), errors)
    # Read in the order of the keys, so problems are reported in that order (but timezone
    # first: the schedule is checked in that zone).
    enabled = section.boolean("enabled", default.enabled)
    engine = section.choice("engine", default.engine, CONVERT_ENGINES)
    timezone = _load_timezone(section, default.timezone)
    schedule = _load_schedule(section, default.schedule, timezone)
    settle_minutes = section.number(
        "settle_minutes", default.settle_minutes, minimum=0, exclusive=False
    )
    workers = section.integer("workers", default.workers, minimum=0)
    timeout_seconds = section.number(
        "timeout_seconds", default.timeout_seconds, minimum=0, exclusive=True
    )
    memory_limit = _load_memory_limit(section, default.memory_limit)
    max_attempts = section.integer("max_attempts", default.max_attempts, minimum=1)
    preview = section.boolean("preview", default.preview)
    study_template = section.string("study_template", default.study_template)
    for problem in _naming_template_problems(study_template, _STUDY_FIELDS, "study"):
        section.error("study_template", problem)
    series_template = section.string("series_template", default.series_template)
    for problem in _naming_template_problems(series_template, _SERIES_FIELDS, "series"):
        section.error("series_template", problem)
    return ConvertConfig(
        enabled=enabled,
        engine=engine,
        schedule=schedule,
        timezone=timezone,
        settle_minutes=settle_minutes,
        workers=workers,
        timeout_seconds=timeout_seconds,
        memory_limit=memory_limit,
        max_attempts=max_attempts,
        preview=preview,
        study_template=study_template,
        series_template=series_template,
        dcm2niix=_load_program(section, "dcm2niix", source.parent),
    )


def _load_timezone(section: _Section, default: str) -> str:
    name = section.string("timezone", default)
    if not name:
        return name
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        # OSError: a key naming a folder of the database ("Europe") on some Pythons.
        # Not the aliases of the database's own layout ("localtime", "posix/...").
        known = {
            zone
            for zone in zoneinfo.available_timezones()
            if zone not in _NOT_ZONE_NAMES and not zone.startswith(("posix/", "right/"))
        }
        if not known:
            section.error(
                "timezone",
                f"unknown time zone {_describe(name)}, and this machine has no time zone "
                'database: install it (apt-get install tzdata), or write "" for the server\'s '
                "local time zone",
            )
            return default
        same = [zone for zone in known if zone.casefold() == name.strip().casefold()]
        hint = f"; did you mean {same[0]}?" if same else _suggest(name, sorted(known))
        section.error(
            "timezone",
            f"unknown time zone {_describe(name)}; write an IANA name such as "
            f'"Europe/Berlin" or "UTC", or "" for the server\'s local time zone{hint}',
        )
        return default
    return name


def _load_schedule(section: _Section, default: str, timezone: str) -> str:
    schedule = section.string("schedule", default)
    example = 'e.g. "0 5 * * *" (05:00 every day) or "30 22 * * mon-fri"'
    fields_ = schedule.split()
    if len(fields_) == 5 and _has_weekday_number(fields_[4]):
        # APScheduler 3 counts weekdays from Monday = 0, crontab from Sunday = 0: a number
        # would run the job on another day than a crontab reader expects.
        section.error(
            "schedule",
            f"write the weekday (5th field) of {_describe(schedule)} by name, mon tue wed thu "
            "fri sat sun (e.g. mon-fri): crontab counts from 0 = Sunday, the scheduler from "
            "0 = Monday",
        )
        return default
    try:
        trigger = CronTrigger.from_crontab(
            schedule, timezone=zoneinfo.ZoneInfo(timezone) if timezone else None
        )
    except ValueError as exc:
        section.error(
            "schedule",
            f"not a valid crontab schedule {_describe(schedule)} ({exc}); write 5 fields, "
            f"minute hour day month weekday, {example}",
        )
        return default
    if trigger.get_next_fire_time(None, datetime.now(trigger.timezone)) is None:
        section.error(
            "schedule",
            f"{_describe(schedule)} never runs (no such date); {example}",
        )
        return default
    return schedule


def _has_weekday_number(weekdays: str) -> bool:
    # A step ("*/2") is a count, not a weekday.
    return any(
        any(char.isdigit() for char in part.partition("/")[0]) for part in weekdays.split(",")
    )


def parse_size(text: str) -> int:
    """Bytes in a size as an admin writes it: "4GiB", "512 MiB", "1.5GB", "1000000".

    Units, case-insensitive: B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of
    1024); no unit means bytes. A fraction of a byte is dropped. "unlimited" gives 0. Raises
    ValueError with a message that shows valid sizes.
    """
    if text.strip().lower() == "unlimited":
        return 0
    return _parse_bytes(text, what="a size", examples=_SIZE_EXAMPLES, percent=False)


def _parse_bytes(text: str, *, what: str, examples: str, percent: bool) -> int:
    """A size in bytes; the errors name ``what`` was expected and show ``examples``."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        unit = "a unit or %" if percent else "a unit"
        raise ValueError(
            f"{_describe(text)} is not {what}; write a number and {unit}, e.g. {examples}"
        )
    multiplier = _SIZE_UNITS.get(match["unit"].lower() or "b")
    if multiplier is None:
        raise ValueError(
            f"{_describe(text)}: unknown unit {_describe(match['unit'])}; use "
            f"{'% or ' if percent else ''}one of {', '.join(_SIZE_UNIT_NAMES)}, e.g. {examples}"
        )
    return int(Fraction(match["number"]) * multiplier)


def _load_memory_limit(section: _Section, default: str) -> str:
    if "memory_limit" not in section.table:
        return default
    value = section.table["memory_limit"]
    if not isinstance(value, str):
        section.error(
            "memory_limit",
            f"expected a size as a string, e.g. {_SIZE_EXAMPLES}, got {_describe(value)}",
        )
        return default
    try:
        size = parse_size(value)
    except ValueError as exc:
        section.error("memory_limit", str(exc))
        return default
    unlimited = value.strip().lower() == "unlimited"
    if not unlimited and size < MIN_MEMORY_LIMIT_BYTES:
        section.error(
            "memory_limit",
            f"{_describe(value)} is below 256 MiB, too little for a conversion process to "
            'start; write at least "256MiB" (4GiB suits most series), or "unlimited"',
        )
        return default
    if size > _MAX_MEMORY_LIMIT_BYTES:
        section.error(
            "memory_limit", f'{_describe(value)} is more than any system has; write "unlimited"'
        )
        return default
    return value


def _naming_template_problems(template: str, allowed: tuple[str, ...], what: str) -> list[str]:
    """Why ``template`` cannot name a converted study or series (``what``), if it cannot."""
    listed = ", ".join(f"{{{name}}}" for name in allowed)
    parsed, problems = _parse_template(template, listed)
    if problems:
        return problems
    literal = ""
    placeholders = 0
    for text, name, spec, conversion in parsed:
        literal += text
        if name is None:
            continue
        placeholders += 1
        format_spec = spec or ""
        shown = _shown_placeholder(name, conversion, format_spec)
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not name or name.isdigit():
            problems.append(f"placeholder {shown} has no field name; use one of {listed}")
        elif base != name:
            write = f"write {{{base}}}" if base in allowed else f"use one of {listed}"
            problems.append(
                f"placeholder {shown}: attribute and index access are not supported; {write}"
            )
        elif name not in allowed:
            same = [field for field in allowed if field.lower() == name.lower()]
            hint = f"; did you mean {{{same[0]}}}?" if same else _suggest(name, allowed, wrap="{}")
            problems.append(f"unknown field {shown}; allowed: {listed}{hint}")
        elif conversion:
            problems.append(
                f"placeholder {shown}: conversions (!r, !s, !a) are not supported; write "
                f"{{{name}{':' + format_spec if format_spec else ''}}}"
            )
        elif "{" in format_spec:
            problems.append(f"placeholder {shown}: a format spec must not contain a placeholder")
        else:
            try:
                format(_TEMPLATE_SAMPLE[name], format_spec)
            except (ValueError, TypeError) as exc:
                kind = "a number" if isinstance(_TEMPLATE_SAMPLE[name], int) else "text"
                problems.append(f"placeholder {shown}: {exc} ({name} is {kind})")
    if placeholders == 0:
        problems.append(
            f"has no field, so every {what} would get the same name; use some of {listed}"
        )
    problems += _template_text_problems(template, literal, "file")
    if not problems:
        try:
            template.format_map(_TEMPLATE_SAMPLE)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            problems.append(f"cannot be filled in ({exc})")
    return problems


def _load_program(section: _Section, key: str, base: Path) -> Path | None:
    """An executable the admin named, resolved like the other paths; None when unset ("")."""
    value = section.table.get(key, "")
    if value == "":
        return None
    path = _resolve_path(section, key, value, base)
    if path is None:
        return None
    bundled = '"" for the one installed with dcmdb'
    if not path.exists():
        on_path = shutil.which(value) if isinstance(value, str) and "/" not in value else None
        found = f" (on PATH: {on_path})" if on_path else ""
        section.error(
            key,
            f"{path}: no such file; write the full path of the {key} program{found}, or {bundled}",
        )
    elif path.is_dir():
        section.error(key, f"{path} is a folder; name the {key} program inside it, or {bundled}")
    elif not os.access(path, os.X_OK):
        section.error(
            key, f"{path} is not executable; make it so (chmod +x {path}), or write {bundled}"
        )
    else:
        return path
    return None


def parse_threshold(text: str) -> SpaceThreshold:
    """Free space as an admin writes it: a percentage of the filesystem ("10%", "12.5 %") or a
    size ("200GiB", "500 GB", "1000000" bytes; units as :func:`parse_size`).

    A percentage must be more than 0 and less than 100; a size may be "0" but not "unlimited".
    Raises ValueError with a message that shows valid thresholds.
    """
    stripped = text.strip()
    if stripped.endswith("%"):
        match = _PERCENT.fullmatch(stripped)
        if match is None:
            raise ValueError(
                f"{_describe(text)} is not a percentage; write a number and %, e.g. "
                f"{_THRESHOLD_EXAMPLES}"
            )
        percent = float(match["number"])
        if not 0 < percent < 100:
            raise ValueError(
                f"{_describe(text)}: a percentage of the filesystem must be more than 0 and less "
                f"than 100, e.g. {_THRESHOLD_EXAMPLES}"
            )
        return SpaceThreshold("percent", percent)
    if stripped.lower() == "unlimited":
        raise ValueError(
            f"{_describe(text)} is no amount of free space; write a percentage or a size, e.g. "
            f"{_THRESHOLD_EXAMPLES}"
        )
    size = _parse_bytes(
        text, what="a percentage or a size", examples=_THRESHOLD_EXAMPLES, percent=True
    )
    if size > _MAX_THRESHOLD_BYTES:
        raise ValueError(
            f"{_describe(text)} is more than any filesystem holds; write less, e.g. "
            f"{_THRESHOLD_EXAMPLES}"
        )
    return SpaceThreshold("bytes", size)


def _parse_archive_size(text: str) -> int:
    """retention.max_archive_size in bytes: a size (no percentage), more than 0."""
    stripped = text.strip()
    if stripped.endswith("%"):
        raise ValueError(
            f"{_describe(text)}: write the archive's size limit as a size, not a percentage, "
            f"e.g. {_ARCHIVE_SIZE_EXAMPLES}"
        )
    if stripped.lower() == "unlimited":
        raise ValueError(f'{_describe(text)}: write "" for no limit')
    size = _parse_bytes(text, what="a size", examples=_ARCHIVE_SIZE_EXAMPLES, percent=False)
    if size == 0:
        raise ValueError(
            f"{_describe(text)} would prune every study it may; write a size more than 0, e.g. "
            f"{_ARCHIVE_SIZE_EXAMPLES}"
        )
    if size > _MAX_THRESHOLD_BYTES:
        raise ValueError(
            f"{_describe(text)} is more than any filesystem holds; write less, e.g. "
            f"{_ARCHIVE_SIZE_EXAMPLES}"
        )
    return size


def _retention_problems(
    low_free: str | None, target_free: str | None, max_archive_size: str | None
) -> list[tuple[str, str]]:
    """(key, problem) for the rules between retention's space keys.

    Each argument is the key's valid value ("" when unset), or None when it is set but invalid
    (already reported): the rules that need its value are then skipped.
    """
    problems: list[tuple[str, str]] = []
    low = parse_threshold(low_free) if low_free else None
    target = parse_threshold(target_free) if target_free else None
    if low is not None and low.kind == "bytes" and low.value == 0:
        problems.append(
            (
                "low_free",
                "must be more than 0 (free space is never below 0, so nothing would be pruned); "
                'write "" or leave low_free out to turn retention off',
            )
        )
    if target is not None and target.kind == "bytes" and target.value == 0:
        problems.append(("target_free", f"must be more than 0, e.g. {_THRESHOLD_EXAMPLES}"))
    if low_free == "":
        off = "retention is off unless low_free is set"
        if target_free != "":
            problems.append(
                (
                    "target_free",
                    f'is set but low_free is not, and {off}; set low_free too (e.g. "10%"), or '
                    "remove target_free",
                )
            )
        if max_archive_size != "":
            problems.append(
                (
                    "max_archive_size",
                    f"is set but low_free is not, and {off}; set low_free and target_free too, "
                    "or remove max_archive_size",
                )
            )
    elif target_free == "":
        written = f" ({_describe(low_free)})" if low_free is not None else ""
        problems.append(
            (
                "target_free",
                "must be set when low_free is: how much free space pruning makes, e.g. "
                f"{_THRESHOLD_EXAMPLES}, at least low_free{written}; deleting studies cannot be "
                "undone, so there is no default",
            )
        )
    elif (
        low is not None
        and target is not None
        and low.kind == target.kind
        and target.value < low.value
    ):
        problems.append(
            (
                "target_free",
                f"{_describe(target_free)} is less than low_free ({_describe(low_free)}); "
                "pruning stops once free space reaches target_free, so it must be at least "
                "low_free",
            )
        )
    return problems


def _load_threshold(
    section: _Section, key: str, default: str, *, allow_empty: bool, hint: str = ""
) -> str | None:
    """A free-space key as written ("" when ``allow_empty``); None when it is refused."""
    if key not in section.table:
        return default
    value = section.table[key]
    if not isinstance(value, str):
        section.error(
            key,
            f"expected a percentage or a size as a string, e.g. {_THRESHOLD_EXAMPLES}{hint}, "
            f"got {_describe(value)}",
        )
        return None
    if value == "":
        if allow_empty:
            return value
        section.error(key, f"must not be empty; write e.g. {_THRESHOLD_EXAMPLES}{hint}")
        return None
    try:
        parse_threshold(value)
    except ValueError as exc:
        section.error(key, f"{exc}{hint}")
        return None
    return value


def _load_archive_size(section: _Section, default: str) -> str | None:
    key = "max_archive_size"
    if key not in section.table:
        return default
    value = section.table[key]
    if not isinstance(value, str):
        section.error(
            key,
            f"expected a size as a string, e.g. {_ARCHIVE_SIZE_EXAMPLES}, got {_describe(value)}",
        )
        return None
    if value == "":
        return value
    try:
        _parse_archive_size(value)
    except ValueError as exc:
        section.error(key, str(exc))
        return None
    return value


def _load_protect(section: _Section, max_length: int) -> tuple[str, ...]:
    """retention.protect: physician folder names, by the rules of sorting's folder names."""
    if "protect" not in section.table:
        return ()
    value = section.table["protect"]
    if not isinstance(value, list):
        section.error(
            "protect",
            f'expected an array of physician folder names (["Smith_John", ...]), got '
            f"{_describe(value)}",
        )
        return ()
    names: list[str] = []
    for index, name in enumerate(value):
        item_path = f"{section.path('protect')}[{index}]"
        if not isinstance(name, str):
            section.errors.append(
                f"{item_path}: expected a folder name (a string), got {_describe(name)}"
            )
            continue
        if problem := _folder_name_problem(name, max_length):
            section.errors.append(f"{item_path}: folder name {problem}")
            continue
        names.append(name)
    return tuple(names)


def _load_retention(
    table: Mapping[str, object],
    errors: list[str],
    *,
    max_folder_length: int,
    ingest_min_free: str | None,
) -> RetentionConfig:
    default = RetentionConfig()
    section = _Section(("retention",), table, _keys(RetentionConfig), errors)
    errors_before = len(errors)
    low_free = _load_threshold(
        section,
        "low_free",
        default.low_free,
        allow_empty=True,
        hint=', or "" to turn retention off',
    )
    target_free = _load_threshold(section, "target_free", default.target_free, allow_empty=True)
    max_archive_size = _load_archive_size(section, default.max_archive_size)
    for key, problem in _retention_problems(low_free, target_free, max_archive_size):
        section.error(key, problem)
    if low_free and ingest_min_free is not None:
        low = parse_threshold(low_free)
        pause = parse_threshold(ingest_min_free)
        if low.kind == pause.kind and 0 < low.value < pause.value:
            # Ingest would stop filling the disk before pruning starts, and wait for ever.
            section.error(
                "low_free",
                f"{_describe(low_free)} is less than ingest.min_free "
                f"({_describe(ingest_min_free)}): ingest would pause first and wait for space "
                "that pruning never frees; make low_free at least ingest.min_free",
            )
    min_age_days = section.number("min_age_days", default.min_age_days, minimum=0, exclusive=False)
    protect = _load_protect(section, max_folder_length)
    keep_unconverted = section.boolean("keep_unconverted", default.keep_unconverted)
    order = section.choice("order", default.order, RETENTION_ORDERS)
    max_studies_per_run = section.integer(
        "max_studies_per_run", default.max_studies_per_run, minimum=1
    )
    check_every_minutes = section.number(
        "check_every_minutes", default.check_every_minutes, minimum=0, exclusive=True
    )
    require_pacs_copy = section.boolean("require_pacs_copy", default.require_pacs_copy)
    if len(errors) != errors_before or low_free is None or target_free is None:
        return default  # the file is refused anyway; the values need not agree
    return RetentionConfig(
        low_free=low_free,
        target_free=target_free,
        max_archive_size=max_archive_size or "",
        min_age_days=min_age_days,
        protect=protect,
        keep_unconverted=keep_unconverted,
        order=order,
        max_studies_per_run=max_studies_per_run,
        check_every_minutes=check_every_minutes,
        require_pacs_copy=require_pacs_copy,
    )


def _load_metrics(table: Mapping[str, object], errors: list[str]) -> MetricsConfig:
    default = MetricsConfig()
    section = _Section(("metrics",), table, _keys(MetricsConfig), errors)
    return MetricsConfig(
        enabled=section.boolean("enabled", default.enabled),
        address=_load_ip_address(section, "address", default.address),
        # 0 would be "any free port": nothing could find the endpoint.
        port=section.integer("port", default.port, minimum=1, maximum=65535),
    )


def _load_ip_address(section: _Section, key: str, default: str) -> str:
    """An IPv4 or IPv6 address literal, as written."""
    value = section.string(key, default)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        section.error(
            key,
            'expected an IP address such as "127.0.0.1" (loopback, the safe choice) or "::1", '
            f"got {_describe(value)}; a host name is not accepted",
        )
        return default
    return value


def _load_listener(table: Mapping[str, object], errors: list[str]) -> ListenerConfig:
    default = ListenerConfig()
    section = _Section(("listener",), table, _keys(ListenerConfig), errors)
    return ListenerConfig(
        enabled=section.boolean("enabled", default.enabled),
        ae_title=_load_ae_title(section, "ae_title", default.ae_title),
        address=_load_ip_address(section, "address", default.address),
        # 0 would be "any free port": no scanner could be told where to send.
        port=section.integer("port", default.port, minimum=1, maximum=65535),
        allowed_ae_titles=_load_ae_titles(section, "allowed_ae_titles"),
        allowed_addresses=_load_networks(section, "allowed_addresses"),
    )


def _load_retrieve(table: Mapping[str, object], errors: list[str]) -> RetrieveConfig:
    default = RetrieveConfig()
    section = _Section(("retrieve",), table, _keys(RetrieveConfig), errors)
    enabled = section.boolean("enabled", default.enabled)
    pacs_host = section.string("pacs_host", default.pacs_host).strip()
    pacs_port = section.integer("pacs_port", default.pacs_port, minimum=1, maximum=65535)
    pacs_ae_title = section.string("pacs_ae_title", default.pacs_ae_title)
    if pacs_ae_title:
        pacs_ae_title = _load_ae_title(section, "pacs_ae_title", default.pacs_ae_title)
    ae_title = _load_ae_title(section, "ae_title", default.ae_title)
    method = section.choice("method", default.method, RETRIEVE_METHODS)
    timezone = _load_timezone(section, default.timezone)
    schedule = _load_schedule(section, default.schedule, timezone)
    lookback_days = section.integer("lookback_days", default.lookback_days, minimum=1)
    modalities = _load_modalities(section)
    study_description = section.string("study_description", default.study_description)
    referring_physician = section.string("referring_physician", default.referring_physician)
    timeout_seconds = section.number(
        "timeout_seconds", default.timeout_seconds, minimum=0, exclusive=True
    )
    if enabled:
        for key, value, example in (
            ("pacs_host", pacs_host, '"pacs.example.org" or "10.1.2.3"'),
            ("pacs_ae_title", pacs_ae_title, '"PACS"'),
        ):
            already = f"{section.path(key)}:"
            if not value and not any(error.startswith(already) for error in section.errors):
                section.error(key, f"must be set when retrieve.enabled is true, e.g. {example}")
    return RetrieveConfig(
        enabled=enabled,
        pacs_host=pacs_host,
        pacs_port=pacs_port,
        pacs_ae_title=pacs_ae_title,
        ae_title=ae_title,
        method=method,
        schedule=schedule,
        timezone=timezone,
        lookback_days=lookback_days,
        modalities=modalities,
        study_description=study_description,
        referring_physician=referring_physician,
        timeout_seconds=timeout_seconds,
    )


def _check_network_sections(
    listener: ListenerConfig,
    retrieve: RetrieveConfig,
    retention: RetentionConfig,
    errors: list[str],
) -> None:
    """The rules between [listener], [retrieve] and retention.require_pacs_copy."""
    if listener.enabled and not listener.allowed_ae_titles:
        errors.append(
            "listener.allowed_ae_titles: must list the calling AE titles that may send (your "
            'scanners, and the PACS for retrieve.method = "move"), e.g. ["MRI_SCANNER", '
            '"PACS"], when listener.enabled is true: an open listener would accept anything'
        )
    if retrieve.enabled and retrieve.method == "move" and not listener.enabled:
        errors.append(
            'retrieve.method: "move" has the PACS send the studies to our listener, but '
            "listener.enabled is false; enable [listener] (and register listener.ae_title "
            'with its host and port at the PACS), or use method = "get"'
        )
    if retention.require_pacs_copy and not retrieve.pacs_configured:
        errors.append(
            "retention.require_pacs_copy: needs the PACS to ask: set retrieve.pacs_host and "
            "retrieve.pacs_ae_title (retrieve.enabled may stay false)"
        )


def _ae_title_problem(value: str) -> str | None:
    stripped = value.strip(" ")
    if not stripped:
        return "must not be empty or only spaces"
    if len(stripped) > _AE_TITLE_MAX:
        return f"is {len(stripped)} characters long; an AE title has at most {_AE_TITLE_MAX}"
    if any(char == "\\" or not (" " <= char <= "~") for char in stripped):
        return "may hold only printable ASCII characters and no backslash (PS3.5 AE)"
    return None


def _load_ae_title(section: _Section, key: str, default: str) -> str:
    value = section.string(key, default)
    if problem := _ae_title_problem(value):
        section.error(key, f"AE title {_describe(value)} {problem}")
        return default
    return value.strip(" ")


def _string_list(section: _Section, key: str, example: str) -> list[tuple[str, str]]:
    """(item key path, string) of an array of strings; other items are reported."""
    if key not in section.table:
        return []
    value = section.table[key]
    if not isinstance(value, list):
        section.error(key, f"expected an array of strings, e.g. {example}, got {_describe(value)}")
        return []
    items: list[tuple[str, str]] = []
    for index, item in enumerate(value):
        item_path = f"{section.path(key)}[{index}]"
        if not isinstance(item, str):
            section.errors.append(f"{item_path}: expected a string, got {_describe(item)}")
            continue
        items.append((item_path, item))
    return items


def _load_ae_titles(section: _Section, key: str) -> tuple[str, ...]:
    titles: list[str] = []
    for item_path, title in _string_list(section, key, '["MRI_SCANNER", "PACS"]'):
        if problem := _ae_title_problem(title):
            section.errors.append(f"{item_path}: AE title {_describe(title)} {problem}")
            continue
        titles.append(title.strip(" "))
    return tuple(titles)


def _load_networks(section: _Section, key: str) -> tuple[str, ...]:
    networks: list[str] = []
    for item_path, text in _string_list(section, key, '["10.1.2.3", "10.1.4.0/24"]'):
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            section.errors.append(
                f'{item_path}: expected an IP address or network such as "10.1.2.3" or '
                f'"10.1.4.0/24", got {_describe(text)}; a host name is not accepted'
            )
            continue
        networks.append(text)
    return tuple(networks)


def _load_modalities(section: _Section) -> tuple[str, ...]:
    modalities: list[str] = []
    for item_path, text in _string_list(section, "modalities", '["MR", "CT"]'):
        code = text.strip().upper()
        # PS3.5 CS: at most 16 of A-Z 0-9 _ and space.
        if not code or len(code) > 16 or not re.fullmatch(r"[A-Z0-9_ ]+", code):
            section.errors.append(
                f'{item_path}: expected a modality code such as "MR" or "CT", got {_describe(text)}'
            )
            continue
        modalities.append(code)
    return tuple(modalities)


def _load_logging(table: Mapping[str, object], errors: list[str]) -> LoggingConfig:
    default = LoggingConfig()
    section = _Section(("logging",), table, _keys(LoggingConfig), errors)
    return LoggingConfig(
        level=section.choice("level", default.level, LOG_LEVELS),
        format=section.choice("format", default.format, LOG_FORMATS),
    )


# ---------------------------------------------------------------------------------------------
# Rendering


def render_config(config: Config) -> str:
    """The effective configuration as TOML: every key, defaults filled in, absolute paths.

    ``load_config`` of the result gives an equal ``Config`` (apart from ``source``).
    """
    lines = [
        "# Effective dcmdb configuration: defaults filled in, paths resolved.",
        f"# Loaded from {_toml_string(str(config.source))}",
    ]
    sections: dict[
        str,
        PathsConfig
        | IngestConfig
        | SortingConfig
        | DicomdirConfig
        | ConvertConfig
        | RetentionConfig
        | MetricsConfig
        | ListenerConfig
        | RetrieveConfig
        | LoggingConfig,
    ] = {
        "paths": config.paths,
        "ingest": config.ingest,
        "sorting": config.sorting,
        "dicomdir": config.dicomdir,
        "convert": config.convert,
        "retention": config.retention,
        "metrics": config.metrics,
        "listener": config.listener,
        "retrieve": config.retrieve,
        "logging": config.logging,
    }
    for name, section in sections.items():
        lines += ["", f"[{name}]"]
        for item in fields(section):
            if item.name == "aliases" or not item.init:
                continue
            value = getattr(section, item.name)
            # An unset optional path (convert.dcm2niix) is written as the file spells it: "".
            shown = '""' if value is None else _toml_value(value)
            lines.append(f"{_key_path(item.name)} = {shown}")
        if name == "sorting":
            lines += ["", "[sorting.aliases]"]
            for folder, spellings in config.sorting.aliases.items():
                values = ", ".join(_toml_string(spelling) for spelling in spellings)
                lines.append(f"{_key_path(folder)} = [{values}]")
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # "10.0", "1e-05": both valid TOML floats
    if isinstance(value, Path):
        return _toml_string(str(value))
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, tuple):  # retention.protect, listener.allowed_ae_titles, ...
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")


# ---------------------------------------------------------------------------------------------
# Helpers


def _toml_string(text: str) -> str:
    """``text`` as a TOML basic string (also how error messages quote strings)."""
    out = ['"']
    for char in text:
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif _is_control(char) and ord(char) < 0x80:
            # TOML 1.0: U+0000-U+001F (but tab) and U+007F must be escaped in basic strings.
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _key_path(*parts: str) -> str:
    """Dotted TOML key path, quoting the parts that are not bare keys."""
    return ".".join(part if _BARE_KEY.fullmatch(part) else _toml_string(part) for part in parts)


def _is_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code < 0xA0


def _describe(value: object) -> str:
    """A short, TOML-like rendering of a wrong value for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = _toml_string(value)
        return shown if len(shown) <= 80 else shown[:76] + '..."'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime | date | time):
        return f"a date/time ({value.isoformat()})"
    return type(value).__name__


def _suggest(word: str, candidates: Iterable[str], *, wrap: str = "") -> str:
    matches = difflib.get_close_matches(word, list(candidates), n=1)
    if not matches:
        return ""
    match = f"{wrap[0]}{matches[0]}{wrap[1]}" if wrap else matches[0]
    return f"; did you mean {match}?"
