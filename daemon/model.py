"""Plain values passed between modules. No behaviour beyond trivial helpers, no I/O.

`person_name_key`, `fold_case` and the file-name limits are here because config (which
validates what the admin writes) and layout (which builds names at ingest) must agree on them
exactly, and config may import nothing but the standard library and this module.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from enum import Enum
from typing import Final, NamedTuple

# Windows device names: reserved in any case, also before an extension ("nul.txt"); COM0/LPT0
# and the superscript digits per Microsoft's "Naming Files, Paths, and Namespaces", CONIN$ and
# CONOUT$ per CreateFile. A folder on the SMB share must not be one.
WINDOWS_DEVICE_NAMES: Final = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{port}{digit}" for port in ("COM", "LPT") for digit in "0123456789\u00b9\u00b2\u00b3"]
)
# NAME_MAX of ext4, XFS, btrfs and ZFS: a file name component is at most 255 bytes.
NAME_MAX_BYTES: Final = 255


def fold_case(text: str) -> str:
    """Caseless form of `text`, at least as coarse as an SMB server's case-insensitivity.

    casefold() alone keeps Turkish dotless 'ı' apart from 'i', but Samba and NTFS upper-case
    both to 'I' (simple case mapping), so "Yıldız" and "YILDIZ" are one folder there: upper-case
    first, then casefold. NFC on both sides so precomposed and decomposed spellings agree.
    """
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).upper().casefold())


def format_size(count: int) -> str:
    """Bytes for people: "512 B", "1.5 MiB", "2.0 TiB"."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def person_name_key(name: str) -> str:
    """Identity of one PN spelling (one component group, e.g. the alphabetic group).

    Surrounding whitespace of the whole and of each ^-component is stripped, runs of whitespace
    inside a component become one space, empty trailing components are dropped, then the result
    is NFC-normalized and case-folded (see `fold_case`). "SMITH^JOHN", "Smith^John" and
    " smith^john^^ " share one key; an empty or blank name has the key "".
    """
    components = [" ".join(component.split()) for component in name.strip().split("^")]
    while components and not components[-1]:
        components.pop()
    return fold_case("^".join(components))


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
    # The DICOMDIR record for this instance (PS3.3 F.5): its Directory Record Type ("IMAGE",
    # "SR DOCUMENT", "RT DOSE", ..., or "PRIVATE" for a class with no standard record) and,
    # for every type but IMAGE (whose only key, Instance Number, is above) and PRIVATE, the
    # record's keys as read from the file, encoded as Explicit VR Little Endian elements in
    # ascending tag order (with their own Specific Character Set when the text needs one), so
    # the DICOMDIR is written without opening the file again.
    directory_record_type: str = "IMAGE"
    directory_record_keys: bytes = b""


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


# ---- a physician folder as its DICOMDIR describes it (PS3.10 File-set, PS3.3 F) --------------


class DirectoryInstance(NamedTuple):
    """A tuple, not a dataclass: a folder's DICOMDIR lists 100,000 of these, built from rows."""

    file_id: str  # "DICOM/P/S/SE/I" below the folder, '/'-separated (PS3.10 8.2)
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    record_type: str  # see InstanceHeader.directory_record_type
    record_keys: bytes  # see InstanceHeader.directory_record_keys


@dataclass(frozen=True, slots=True)
class DirectorySeries:
    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    instances: tuple[DirectoryInstance, ...]


@dataclass(frozen=True, slots=True)
class DirectoryStudy:
    study_instance_uid: str
    study_date: str
    study_time: str
    study_description: str
    study_id: str
    accession_number: str
    first_received_at: float  # to invent Study Date/Time when the instances carry none
    series: tuple[DirectorySeries, ...]


@dataclass(frozen=True, slots=True)
class DirectoryPatient:
    patient_id: str
    patient_name: str  # decoded, all component groups
    studies: tuple[DirectoryStudy, ...]


@dataclass(frozen=True, slots=True)
class FileSetContents:
    """Everything a folder's DICOMDIR lists, read from the catalog in one snapshot."""

    file_set_id: str  # (0004,1130), at most 16 CS characters
    file_set_uid: str  # the DICOMDIR's Media Storage SOP Instance UID; stable across rewrites
    patients: tuple[DirectoryPatient, ...]
