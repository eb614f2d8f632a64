"""The DICOMDIR of one physician folder, written from the catalog alone (PS3.10 File-set).

A physician folder is a File-set: `DICOMDIR` beside `DICOM/<P>/<S>/<SE>/<I>`. `encode_dicomdir`
turns the catalog's `FileSetContents` into the whole DICOMDIR file without opening a single
instance: PATIENT, STUDY and SERIES records from catalog columns, and each instance's leaf
record from what `dicomfile.read_instance` stored at ingest (its record type and keys).

The Directory Record Sequence is encoded here by hand with struct: a pydicom Dataset per record
takes about 40 s to build and write for 100,000 instances, this about 0.4 s. pydicom encodes
the File Meta, and reads DICOMDIRs of other writers back. Records are laid out depth-first
(PATIENT, its first STUDY, that study's first SERIES, its leaves, the next SERIES, ...), every
item and the sequence with defined lengths.

Where a Type 1 key is empty in the catalog, a value is invented so the DICOMDIR stays valid
(PS3.3 F.5); none of these is ever written back to an instance:
- Patient ID: "DCMDB_" + the first 12 hex digits of SHA-256 of the patient name (UTF-8): stable
  across rewrites and distinct per name, as F.5.1 wants Patient IDs unique in a File-set.
- Study Date and Study Time: the study's first reception at dcmdb, in UTC; also when the value
  is not a valid DA/TM.
- Study ID: the last 16 characters of the Study Instance UID (SH holds 16).
- Modality: "OT" (other).
- Series Number, Instance Number: the series' (instance's) position in its study (series),
  from 1, in the order the catalog lists them; also when the number is outside IS's range.
Text longer than its VR allows (LO 64, SH 16, PN 64 per component group) is cut to fit.

Text in the catalog is decoded Unicode. A record whose values are all ASCII has no Specific
Character Set; any other record has (0008,0005) "ISO_IR 192" and UTF-8 values (PS3.3 F.5: the
Specific Character Set of a record is its own). Leaf keys copied from an instance keep the
instance's own character set.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from pydicom import config as pydicom_config
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, MediaStorageDirectoryStorage

from daemon import fsops
from daemon.catalog import Catalog
from daemon.config import DicomdirConfig
from daemon.model import (
    DirectoryInstance,
    DirectoryPatient,
    DirectorySeries,
    DirectoryStudy,
    FileSetContents,
)

logger = logging.getLogger(__name__)

# As in dicomfile: pydicom's warnings about invalid values quote the value, which can be a
# patient's name or ID (DESIGN: none in log lines).
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

__all__ = [
    "DICOMDIR",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "PRIVATE_RECORD_UID",
    "DicomdirReadError",
    "encode_dicomdir",
    "read_dicomdir_references",
    "write_dicomdir",
]

DICOMDIR: Final = "DICOMDIR"
# dcmdb's own UIDs, each made once from a random UUID (PS3.5 B.2: "2.25." + UUID as integer).
IMPLEMENTATION_CLASS_UID: Final = "2.25.259056120537041861391682908121311521763"
IMPLEMENTATION_VERSION_NAME: Final = "DCMDB_0_1"
# Private Record UID (0004,1432) of dcmdb's PRIVATE leaf records: an instance of a SOP Class
# with no standard record type (private or newer than dcmdb), or one whose record would lack a
# key dcmdb cannot invent (see dicomfile). Such a record has no keys beyond group 0004.
PRIVATE_RECORD_UID: Final = "2.25.119722228488380684161988057903416283062"

_PRIVATE_RECORD: Final = "PRIVATE"  # see dicomfile.PRIVATE_RECORD
_IMAGE_RECORD: Final = "IMAGE"
_UTF8: Final = b"ISO_IR 192"  # PS3.3 C.12.1.1.2: Unicode in UTF-8
_INVENTED_MODALITY: Final = "OT"

# PS3.3 F.3.2.1: File-set ID is CS of at most 16 characters, from the File ID repertoire
_FILE_SET_ID: Final = re.compile(r"[A-Z0-9_ ]{0,16}")
# PS3.5 6.2: DA is YYYYMMDD; TM is HH[MM[SS[.F{1,6}]]]
_DA: Final = re.compile(r"\d{8}")
_TM: Final = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
# PS3.5 6.2: maximum lengths in characters
_LO_MAX: Final = 64
_SH_MAX: Final = 16
_CS_MAX: Final = 16
_PN_GROUP_MAX: Final = 64
_IS_MIN: Final = -(2**31)
_IS_MAX: Final = 2**31 - 1

_PREAMBLE: Final = b"\x00" * 128 + b"DICM"  # PS3.10 7.1
_MAX_UL: Final = 0xFFFFFFFF


class DicomdirReadError(ValueError):
    """The file is not a DICOMDIR that can be read; the message names the file and says why."""


# ---- encoding: PS3.5 7.1.2 (Explicit VR Little Endian), 7.5 (sequences), PS3.3 F.3 --------

_LENGTH = struct.Struct("<H")


def _tag_vr(group: int, element: int, vr: bytes) -> bytes:
    """Tag and VR of an element with a 2-byte length (PS3.5 7.1.2): the length follows."""
    return struct.pack("<HH2s", group, element, vr)


def _short(tag_vr: bytes, value: bytes, pad: bytes) -> bytes:
    """One element with a 16-bit length; values are padded to even length (PS3.5 7.1.1):
    UI with NUL, text with a space (PS3.5 6.2)."""
    if len(value) & 1:
        value += pad
    return tag_vr + _LENGTH.pack(len(value)) + value


# Directory Record keys (PS3.3 F.3.2.2 and F.5): (group, element, VR)
_SPECIFIC_CHARACTER_SET = _tag_vr(0x0008, 0x0005, b"CS")
_RECORD_TYPE = _tag_vr(0x0004, 0x1430, b"CS")
_PRIVATE_RECORD_UID = _tag_vr(0x0004, 0x1432, b"UI")
_REFERENCED_FILE_ID = _tag_vr(0x0004, 0x1500, b"CS")
_REFERENCED_SOP_CLASS = _tag_vr(0x0004, 0x1510, b"UI")
_REFERENCED_SOP_INSTANCE = _tag_vr(0x0004, 0x1511, b"UI")
_REFERENCED_TRANSFER_SYNTAX = _tag_vr(0x0004, 0x1512, b"UI")
_STUDY_DATE = _tag_vr(0x0008, 0x0020, b"DA")
_STUDY_TIME = _tag_vr(0x0008, 0x0030, b"TM")
_ACCESSION_NUMBER = _tag_vr(0x0008, 0x0050, b"SH")
_MODALITY = _tag_vr(0x0008, 0x0060, b"CS")
_STUDY_DESCRIPTION = _tag_vr(0x0008, 0x1030, b"LO")
_SERIES_DESCRIPTION = _tag_vr(0x0008, 0x103E, b"LO")
_PATIENT_NAME = _tag_vr(0x0010, 0x0010, b"PN")
_PATIENT_ID = _tag_vr(0x0010, 0x0020, b"LO")
_STUDY_INSTANCE_UID = _tag_vr(0x0020, 0x000D, b"UI")
_SERIES_INSTANCE_UID = _tag_vr(0x0020, 0x000E, b"UI")
_STUDY_ID = _tag_vr(0x0020, 0x0010, b"SH")
_SERIES_NUMBER = _tag_vr(0x0020, 0x0011, b"IS")
_INSTANCE_NUMBER = _tag_vr(0x0020, 0x0013, b"IS")

# The start of every record item: Item (FFFE,E000) with its length (PS3.5 7.5.2), then the
# three elements whose values are offsets or flags (PS3.3 F.3.2.2): Offset of the Next
# Directory Record (0004,1400) UL, Record In-use Flag (0004,1410) US FFFFH, Offset of
# Referenced Lower-Level Directory Entity (0004,1420) UL. Offsets count from the first byte of
# the file, the preamble's (PS3.3 F.3.2.1); 0 means none.
_RECORD_HEAD = struct.Struct("<4sL8sL10s8sL")
_ITEM_TAG = struct.pack("<HH", 0xFFFE, 0xE000)
_NEXT_OFFSET = struct.pack("<HH2sH", 0x0004, 0x1400, b"UL", 4)
_IN_USE = struct.pack("<HH2sHH", 0x0004, 0x1410, b"US", 2, 0xFFFF)
_LOWER_OFFSET = struct.pack("<HH2sH", 0x0004, 0x1420, b"UL", 4)
_ITEM_HEADER_LENGTH = 8  # the Item tag and its length are not part of the item's length

# The Basic Directory data set before the records (PS3.3 F.3.2.1), after File-set ID
# (0004,1130): offsets of the first and last root records (0004,1200)/(0004,1202) UL,
# File-set Consistency Flag (0004,1212) US 0 (no known inconsistencies), then the Directory
# Record Sequence (0004,1220) SQ with its 4-byte length after 2 reserved bytes (PS3.5 7.1.2).
_ROOT_OFFSETS = struct.Struct("<8sL8sL10s8sL")
_FIRST_ROOT = struct.pack("<HH2sH", 0x0004, 0x1200, b"UL", 4)
_LAST_ROOT = struct.pack("<HH2sH", 0x0004, 0x1202, b"UL", 4)
_CONSISTENCY = struct.pack("<HH2sHH", 0x0004, 0x1212, b"US", 2, 0)
_RECORD_SEQUENCE = struct.pack("<HH2sH", 0x0004, 0x1220, b"SQ", 0)
_FILE_SET_ID_ELEMENT = _tag_vr(0x0004, 0x1130, b"CS")


def _fit(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit]


def _fit_person_name(name: str) -> str:
    """PS3.5 6.2: at most 64 characters per component group."""
    if len(name) <= _PN_GROUP_MAX:
        return name
    return "=".join(group[:_PN_GROUP_MAX] for group in name.split("="))


class _Records:
    """The records in file order, with the links between them as indices until the offsets
    are known (each record's size does not depend on the offsets' values)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []  # from Directory Record Type (0004,1430) on
        self.next: list[int] = []  # index of the next record at the same level, or -1
        self.lower: list[int] = []  # index of the first record one level down, or -1
        self.root: list[int] = []  # the PATIENT records

    def add(self, body: bytes, previous: int, parent: int) -> int:
        """Append a record after sibling `previous` (-1: the first of `parent`'s, or of the
        root when `parent` is -1 too); return its index."""
        index = len(self.bodies)
        self.bodies.append(body)
        self.next.append(-1)
        self.lower.append(-1)
        if previous >= 0:
            self.next[previous] = index
        elif parent >= 0:
            self.lower[parent] = index
        if parent < 0:
            self.root.append(index)
        return index


def _text_record(record_type: bytes, keys: list[tuple[bytes, str]]) -> bytes:
    """A PATIENT, STUDY or SERIES record body: its type and text keys (ascending tags), in
    UTF-8 with (0008,0005) ISO_IR 192 when any value is not ASCII."""
    ascii_only = all(value.isascii() for _, value in keys)
    encoding = "ascii" if ascii_only else "utf-8"
    parts = [_short(_RECORD_TYPE, record_type, b" ")]
    if not ascii_only:
        parts.append(_short(_SPECIFIC_CHARACTER_SET, _UTF8, b" "))
    for tag_vr, value in keys:
        pad = b"\x00" if tag_vr[4:] == b"UI" else b" "
        parts.append(_short(tag_vr, value.encode(encoding), pad))
    return b"".join(parts)


def _patient_body(patient: DirectoryPatient) -> bytes:
    patient_id = patient.patient_id
    if not patient_id:
        digest = hashlib.sha256(patient.patient_name.encode("utf-8")).hexdigest()
        patient_id = f"DCMDB_{digest[:12].upper()}"
    return _text_record(
        b"PATIENT",
        [
            (_PATIENT_NAME, _fit_person_name(patient.patient_name)),
            (_PATIENT_ID, _fit(patient_id, _LO_MAX)),
        ],
    )


def _study_body(study: DirectoryStudy) -> bytes:
    received = time.gmtime(study.first_received_at)
    study_date = study.study_date if _DA.fullmatch(study.study_date) else ""
    study_time = study.study_time if _TM.fullmatch(study.study_time) else ""
    return _text_record(
        b"STUDY",
        [
            (_STUDY_DATE, study_date or time.strftime("%Y%m%d", received)),
            (_STUDY_TIME, study_time or time.strftime("%H%M%S", received)),
            (_ACCESSION_NUMBER, _fit(study.accession_number, _SH_MAX)),
            (_STUDY_DESCRIPTION, _fit(study.study_description, _LO_MAX)),
            (_STUDY_INSTANCE_UID, study.study_instance_uid),
            (_STUDY_ID, _fit(study.study_id, _SH_MAX) or study.study_instance_uid[-_SH_MAX:]),
        ],
    )


def _is_value(number: int | None, position: int) -> str:
    """An IS value (PS3.5 6.2: -2^31 to 2^31 - 1): `number`, else the record's position."""
    if number is None or not _IS_MIN <= number <= _IS_MAX:
        number = position
    return str(number)


def _series_body(series: DirectorySeries, position: int) -> bytes:
    keys = [(_MODALITY, _fit(series.modality, _CS_MAX) or _INVENTED_MODALITY)]
    if series.series_description:  # Type 3
        keys.append((_SERIES_DESCRIPTION, _fit(series.series_description, _LO_MAX)))
    keys += [
        (_SERIES_INSTANCE_UID, series.series_instance_uid),
        (_SERIES_NUMBER, _is_value(series.series_number, position)),
    ]
    return _text_record(b"SERIES", keys)


class _LeafEncoder:
    """Leaf record bodies, the hot loop: UIDs and record types repeat, so their encoded
    elements are cached."""

    def __init__(self) -> None:
        self._uid_elements: dict[tuple[bytes, str], bytes] = {}
        self._record_types: dict[str, bytes] = {}

    def _uid(self, tag_vr: bytes, uid: str) -> bytes:
        key = (tag_vr, uid)
        element = self._uid_elements.get(key)
        if element is None:
            element = self._uid_elements[key] = _short(tag_vr, uid.encode("ascii"), b"\x00")
        return element

    def _record_type(self, record_type: str) -> bytes:
        element = self._record_types.get(record_type)
        if element is None:
            element = _short(_RECORD_TYPE, record_type.encode("ascii"), b" ")
            if record_type == _PRIVATE_RECORD:
                element += _short(_PRIVATE_RECORD_UID, PRIVATE_RECORD_UID.encode(), b"\x00")
            self._record_types[record_type] = element
        return element

    def body(self, instance: DirectoryInstance, position: int) -> bytes:
        record_type = instance.record_type
        # PS3.3 F.3.2.2: Referenced File ID holds the File ID's components (PS3.10 8.2) as values
        file_id = _short(
            _REFERENCED_FILE_ID, instance.file_id.replace("/", "\\").encode("ascii"), b" "
        )
        parts = [
            self._record_type(record_type),
            file_id,
            self._uid(_REFERENCED_SOP_CLASS, instance.sop_class_uid),
            _short(_REFERENCED_SOP_INSTANCE, instance.sop_instance_uid.encode("ascii"), b"\x00"),
            self._uid(_REFERENCED_TRANSFER_SYNTAX, instance.transfer_syntax_uid),
        ]
        if record_type == _IMAGE_RECORD:
            number = _is_value(instance.instance_number, position).encode("ascii")
            parts.append(_short(_INSTANCE_NUMBER, number, b" "))
        else:
            parts.append(instance.record_keys)  # encoded at ingest, ascending tags after 0004
        return b"".join(parts)


def _file_meta(file_set_uid: str) -> bytes:
    """The File Meta Information group (PS3.10 7.1), encoded by pydicom."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = UID(file_set_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return bytes(buffer.getvalue())


def encode_dicomdir(contents: FileSetContents) -> bytes:
    """The whole DICOMDIR file (preamble, File Meta, Basic Directory data set) for `contents`.

    Patients, studies and series without instances get no record. Raises ValueError when the
    File-set ID is not PS3.10 conformant or a UID or File ID is not ASCII.
    """
    if not _FILE_SET_ID.fullmatch(contents.file_set_id):
        raise ValueError(
            f"File-set ID {contents.file_set_id!r} is not a PS3.10 File-set ID: at most 16 of "
            "A-Z 0-9 _ and space"
        )
    records = _Records()
    leaf = _LeafEncoder()
    try:
        previous_patient = -1
        for patient in contents.patients:
            studies = [s for s in patient.studies if any(se.instances for se in s.series)]
            if not studies:
                continue
            patient_index = records.add(_patient_body(patient), previous_patient, -1)
            previous_patient = patient_index
            previous_study = -1
            for study in studies:
                study_index = records.add(_study_body(study), previous_study, patient_index)
                previous_study = study_index
                previous_series = -1
                series_position = 0
                for series in study.series:
                    series_position += 1
                    if not series.instances:
                        continue
                    series_index = records.add(
                        _series_body(series, series_position), previous_series, study_index
                    )
                    previous_series = series_index
                    previous_leaf = -1
                    for position, instance in enumerate(series.instances, start=1):
                        previous_leaf = records.add(
                            leaf.body(instance, position), previous_leaf, series_index
                        )
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"a UID, File ID or record type is not ASCII ({exc.object!r}): the catalog holds "
            "something no DICOM writer produces"
        ) from None
    return _assemble(contents, records)


def _assemble(contents: FileSetContents, records: _Records) -> bytes:
    """Lay the records out after the Basic Directory's first elements and fill in offsets."""
    meta = _file_meta(contents.file_set_uid)
    file_set_id = _short(_FILE_SET_ID_ELEMENT, contents.file_set_id.encode("ascii"), b" ")
    position = len(_PREAMBLE) + len(meta) + len(file_set_id) + _ROOT_OFFSETS.size
    first_record = position
    offsets: list[int] = []
    for body in records.bodies:
        offsets.append(position)
        position += _RECORD_HEAD.size + len(body)
    sequence_length = position - first_record
    if position > _MAX_UL:
        raise ValueError(f"the DICOMDIR would be {position} bytes; offsets (UL) reach only 4 GiB")
    offsets.append(0)  # index -1: no record
    root_first = offsets[records.root[0]] if records.root else 0
    root_last = offsets[records.root[-1]] if records.root else 0
    parts = [
        _PREAMBLE,
        meta,
        file_set_id,
        _ROOT_OFFSETS.pack(
            _FIRST_ROOT, root_first, _LAST_ROOT, root_last, _CONSISTENCY, _RECORD_SEQUENCE,
            sequence_length,
        ),
    ]  # fmt: skip
    pack = _RECORD_HEAD.pack
    item_base = _RECORD_HEAD.size - _ITEM_HEADER_LENGTH
    for index, body in enumerate(records.bodies):
        parts.append(
            pack(
                _ITEM_TAG,
                item_base + len(body),
                _NEXT_OFFSET,
                offsets[records.next[index]],
                _IN_USE,
                _LOWER_OFFSET,
                offsets[records.lower[index]],
            )
        )
        parts.append(body)
    return b"".join(parts)


def write_dicomdir(folder_root: Path, contents: FileSetContents) -> None:
    """Replace `folder_root`/DICOMDIR with the DICOMDIR of `contents`, atomically: SMB readers
    see the old file or the new one (fsops)."""
    data = encode_dicomdir(contents)
    fsops.write_bytes_atomically(folder_root / DICOMDIR, data)
    logger.debug("wrote %s (%d bytes)", folder_root / DICOMDIR, len(data))


# ---- reading back, for `dcmdb check` ----------------------------------------------------
#
# A DICOMDIR in Explicit VR Little Endian (dcmdb's, and nearly every other writer's) is walked
# here by its element headers (PS3.5 7.1.2, 7.5): 1.6 s for 100,000 records where pydicom,
# building a Dataset per record, takes 15 s. Anything else (another transfer syntax, an
# undefined-length UN) is read with pydicom.

_ITEM: Final = 0xFFFEE000
_ITEM_DELIMITATION: Final = 0xFFFEE00D
_SEQUENCE_DELIMITATION: Final = 0xFFFEE0DD
_UNDEFINED_LENGTH: Final = 0xFFFFFFFF
_DIRECTORY_RECORD_SEQUENCE: Final = 0x00041220
_RECORD_IN_USE: Final = 0x00041410
_FILE_ID: Final = 0x00041500
_SOP_INSTANCE_IN_FILE: Final = 0x00041511
_MEDIA_STORAGE_SOP_CLASS: Final = 0x00020002
_TRANSFER_SYNTAX: Final = 0x00020010
# PS3.5 7.1.2: explicit VRs with 2 reserved bytes and a 4-byte length
_LONG_LENGTH_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_EXPLICIT_HEADER = struct.Struct("<HH2sH")
_LONG_LENGTH = struct.Struct("<L")
# What pydicom raises for bytes it cannot parse (the bytes are in memory: an OSError is one too)
_READ_ERRORS: Final = (
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    EOFError,
    OSError,
    struct.error,
)


class _NotExplicitLittleEndian(Exception):
    """Structure the fast reader leaves to pydicom."""


def _header_at(data: bytes, position: int) -> tuple[int, bytes, int, int]:
    """(tag, VR, value length, value position) of the Explicit VR Little Endian element, item
    or delimiter at `position` (PS3.5 7.1.2, 7.5)."""
    if position + 8 > len(data):
        raise DicomdirReadError(f"the file ends inside an element header at byte {position}")
    group, element, vr, length = _EXPLICIT_HEADER.unpack_from(data, position)
    tag = group << 16 | element
    if group == 0xFFFE:  # items and delimiters carry no VR
        return tag, b"", _LONG_LENGTH.unpack_from(data, position + 4)[0], position + 8
    if not (vr.isalpha() and vr.isupper()):
        raise _NotExplicitLittleEndian
    if vr in _LONG_LENGTH_VRS:
        if position + 12 > len(data):
            raise DicomdirReadError(f"the file ends inside an element header at byte {position}")
        return tag, vr, _LONG_LENGTH.unpack_from(data, position + 8)[0], position + 12
    return tag, vr, length, position + 8


def _after_value(data: bytes, vr: bytes, length: int, position: int) -> int:
    """Where the element whose value starts at `position` ends."""
    if length != _UNDEFINED_LENGTH:
        end = position + length
        if end > len(data):
            raise DicomdirReadError(f"an element at byte {position} runs past the end of the file")
        return end
    if vr != b"SQ":
        raise _NotExplicitLittleEndian  # e.g. an undefined-length UN holds implicit VR items
    return _walk_sequence(data, position, None, _ignore_item)


def _ignore_item(_elements: dict[int, bytes]) -> None:
    return None


def _walk_sequence(
    data: bytes, position: int, end: int | None, visit: Callable[[dict[int, bytes]], None]
) -> int:
    """Walk the items of a sequence value from `position` to `end` (defined length) or to its
    Sequence Delimitation Item (end None); call visit({tag: value} of the item's own elements
    of defined length) for each item; return where the sequence ends."""
    while end is None or position < end:
        tag, _, length, value = _header_at(data, position)
        if tag == _SEQUENCE_DELIMITATION and end is None:
            return value
        if tag != _ITEM:
            raise DicomdirReadError(
                f"byte {position} holds ({tag >> 16:04X},{tag & 0xFFFF:04X}) where a sequence "
                "item must be"
            )
        item_end = None if length == _UNDEFINED_LENGTH else value + length
        elements: dict[int, bytes] = {}
        position = value
        while item_end is None or position < item_end:
            tag, vr, length, value = _header_at(data, position)
            if tag == _ITEM_DELIMITATION and item_end is None:
                position = value
                break
            position = _after_value(data, vr, length, value)
            if length != _UNDEFINED_LENGTH:
                elements[tag] = data[value:position]
        visit(elements)
    return position


def _meta_values(data: bytes) -> tuple[int, dict[int, str]]:
    """Where the File Meta Information ends, and its UIDs (PS3.10 7.1)."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise DicomdirReadError("it has no DICOM preamble and 'DICM' prefix (PS3.10 7.1)")
    position = 132
    values: dict[int, str] = {}
    while position + 8 <= len(data):
        tag, vr, length, value = _header_at(data, position)
        if tag >> 16 != 0x0002:
            break
        position = _after_value(data, vr, length, value)
        values[tag] = data[value:position].decode("ascii", "replace").strip(" \0")
    return position, values


def read_dicomdir_references(path: Path) -> list[tuple[str, str]]:
    """(File ID with '/', Referenced SOP Instance UID in File) of every leaf record of the
    DICOMDIR at `path`, in file order. Inactive records (Record In-use Flag 0) are skipped; a
    leaf without a Referenced SOP Instance UID in File gives "".

    Raises DicomdirReadError when the file cannot be read (missing, permissions, I/O error) or
    is not a DICOMDIR that can be parsed.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DicomdirReadError(f"{path} cannot be read: {exc.strerror or exc}") from None
    try:
        try:
            start, meta = _meta_values(data)
            _check_media_storage_sop_class(meta.get(_MEDIA_STORAGE_SOP_CLASS, ""))
            if meta.get(_TRANSFER_SYNTAX) != ExplicitVRLittleEndian:
                raise _NotExplicitLittleEndian
            return _references_explicit_little_endian(data, start)
        except _NotExplicitLittleEndian:
            return _references_with_pydicom(data)
    except DicomdirReadError as exc:
        raise DicomdirReadError(f"{path} is not a readable DICOMDIR: {exc}") from None
    except _READ_ERRORS as exc:
        raise DicomdirReadError(
            f"{path} is not a readable DICOMDIR ({type(exc).__name__}: {exc})"
        ) from None


def _check_media_storage_sop_class(sop_class_uid: str) -> None:
    if sop_class_uid != MediaStorageDirectoryStorage:
        raise DicomdirReadError(
            f"its Media Storage SOP Class UID (0002,0002) is {sop_class_uid or 'missing'}, not "
            f"{MediaStorageDirectoryStorage} (Media Storage Directory)"
        )


def _references_explicit_little_endian(data: bytes, position: int) -> list[tuple[str, str]]:
    references: list[tuple[str, str]] = []

    def visit(elements: dict[int, bytes]) -> None:
        file_id = elements.get(_FILE_ID)
        if not file_id or elements.get(_RECORD_IN_USE) == b"\x00\x00":
            return
        components = file_id.decode("ascii", "replace").strip(" \0").split("\\")
        uid = elements.get(_SOP_INSTANCE_IN_FILE, b"").decode("ascii", "replace").strip(" \0")
        references.append(("/".join(component.strip() for component in components), uid))

    while position < len(data):
        tag, vr, length, value = _header_at(data, position)
        if tag == _DIRECTORY_RECORD_SEQUENCE:
            end = None if length == _UNDEFINED_LENGTH else value + length
            _walk_sequence(data, value, end, visit)
            return references
        position = _after_value(data, vr, length, value)
    raise DicomdirReadError("it has no Directory Record Sequence (0004,1220)")


def _references_with_pydicom(data: bytes) -> list[tuple[str, str]]:
    """The slow path, for DICOMDIRs in another transfer syntax (pydicom's FileSet writes
    implicit VR ones on request; DCMTK's dcmodify makes big endian ones)."""
    try:
        ds = dcmread(io.BytesIO(data))
    except InvalidDicomError as exc:
        raise DicomdirReadError(f"pydicom cannot read it ({exc})") from None
    _check_media_storage_sop_class(str(ds.file_meta.get("MediaStorageSOPClassUID", "")))
    if "DirectoryRecordSequence" not in ds:
        raise DicomdirReadError("it has no Directory Record Sequence (0004,1220)")
    references = []
    for record in ds.DirectoryRecordSequence:
        file_id = record.get("ReferencedFileID")
        if not file_id or record.get("RecordInUseFlag", 0xFFFF) == 0:
            continue
        components = [file_id] if isinstance(file_id, str) else list(file_id)
        uid = record.get("ReferencedSOPInstanceUIDInFile", "")
        references.append(("/".join(components), str(uid)))
    return references


# ---- upkeep: one folder, from the catalog ---------------------------------------------------


class UnknownFolderError(KeyError):
    """The catalog has no physician folder of that name."""


def rewrite_folder(catalog: Catalog, archive: Path, folder_name: str, *, now: float) -> int:
    """Write the folder's DICOMDIR from a catalog snapshot; returns the instances it lists.

    The catalog then records which content the DICOMDIR shows, so a folder that received
    instances meanwhile stays due for the next run.
    """
    snapshot = catalog.file_set_contents(folder_name)
    if snapshot is None:
        raise UnknownFolderError(folder_name)
    contents, content_at = snapshot
    folder_root = archive / folder_name
    folder_root.mkdir(parents=True, exist_ok=True)
    fsops.remove_temp_files_for(folder_root / DICOMDIR)  # left by a writer that was killed
    write_dicomdir(folder_root, contents)
    with catalog.transaction():
        catalog.mark_dicomdir_written(folder_name, content_at, now)
    return sum(
        len(series.instances)
        for patient in contents.patients
        for study in patient.studies
        for series in study.series
    )


def rewrite_due_folders(
    catalog: Catalog,
    archive: Path,
    settings: DicomdirConfig,
    *,
    now: float,
    ignore_delay: bool = False,
) -> list[str]:
    """Rewrite every folder whose DICOMDIR is due (see Catalog.folders_due_for_dicomdir);
    each folder is its own failure boundary. Returns the folders rewritten."""
    delay = 0.0 if ignore_delay else settings.delay_seconds
    written: list[str] = []
    for folder in catalog.folders_due_for_dicomdir(now, delay, settings.max_delay_seconds):
        started = time.monotonic()
        try:
            count = rewrite_folder(catalog, archive, folder, now=now)
        except OSError as exc:
            if exc.errno in fsops.NO_SPACE_ERRNOS:
                raise  # every other folder would fail too: the caller waits for room
            logger.exception(
                "rewriting the DICOMDIR of %s failed; it is tried again at the next run", folder
            )
            continue
        except Exception:
            logger.exception(
                "rewriting the DICOMDIR of %s failed; it is tried again at the next run", folder
            )
            continue
        written.append(folder)
        logger.info(
            "wrote %s/DICOMDIR: %d instances in %.2f s",
            folder,
            count,
            time.monotonic() - started,
        )
    return written
