"""Plain values passed between modules. No behaviour beyond trivial helpers, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """What dcmdb keeps of one DICOM instance, read once from its header.

    Strings are decoded (SpecificCharacterSet applied) and stripped of DICOM padding; a value
    the file does not carry is "" (or None for numbers).
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    specific_character_set: str  # as in the file, values joined with "\\"; "" when absent
    patient_id: str
    patient_name: str  # full decoded PN, all component groups ("Yamada^Tarou=山田^太郎")
    referring_physician_name: str  # alphabetic group of the first value ("Smith^John"), or ""
    study_date: str
    study_time: str
    study_description: str
    study_id: str
    accession_number: str
    modality: str
    series_number: int | None
    series_description: str
    instance_number: int | None
    rows: int | None
    columns: int | None
    number_of_frames: int | None
    data_set_offset: int  # byte offset where the data set starts (after preamble + File Meta)


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """Identifies one version of a file: if any field changes, the file is not the one we read."""

    device: int
    inode: int
    size: int
    mtime_ns: int


class Hint(Enum):
    """Why a path was put on the ingest queue."""

    CLOSED = "closed"  # inotify close-write, or moved in by rename: the writer is done
    CHANGED = "changed"  # created or modified: may still be written
    SCANNED = "scanned"  # found by a scan of incoming/: nothing known about its writer


class Outcome(Enum):
    """What ingest did with one input file."""

    ARCHIVED = "archived"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"
    RETRY = "retry"  # incomplete or changed under us: looked at again later


@dataclass(frozen=True, slots=True)
class IngestResult:
    source: str
    outcome: Outcome
    detail: str  # archive-relative path, quarantine reason, or why it is retried
