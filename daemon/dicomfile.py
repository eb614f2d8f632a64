"""Read one DICOM instance's header and prove the file is whole: the only pydicom reader.

`read_instance` opens the file once, takes its identity from that open file, lets pydicom parse
the header (stopping before the pixel data) and then walks the rest of the file's structure
itself, because pydicom parses a truncated file without complaint. A file is whole when every
element it declares is in the file, every undefined-length sequence or encapsulated pixel data
reaches its Sequence Delimitation Item, and native Pixel Data is as long as Rows x Columns x
Frames x Samples x BitsAllocated / 8 (PS3.5 8.1.1).

A file cut exactly at an element boundary looks whole when nothing in it says more must follow.
So an instance is also incomplete when it has Rows or Columns but no Pixel Data, when its SOP
Class always has pixel data but it has none, and when it lacks a UID whose tag would come after
its last element. What remains undetectable (a cut right after the pixel data, before trailing
elements; a non-image data set cut between top-level elements after its UIDs) is left to the
caller's settle time.

Outcomes:
- `IncompleteFileError`: a valid DICOM prefix that ends early; it may still be being written and
  the caller retries later.
- `NotAcceptedError`: definitively not an instance dcmdb can archive (not DICOM, no File Meta,
  no UIDs, a DICOMDIR, a header that contradicts its pixel data, unparseable).
- `OSError` with an errno: the file could not be opened or read (vanished, permissions, I/O
  error); the caller decides.

The same parsed header gives the instance's DICOMDIR leaf record (PS3.3 F.5): its Directory
Record Type by SOP Class, and for non-image types its keys encoded by pydicom's own recorders,
so the DICOMDIR is later written from the catalog without opening the file again. A key the
record needs but the file lacks never rejects the instance (see _INVENTED_KEYS).

A pydicom `Dataset` never leaves this module: callers get `InstanceHeader` and `FileIdentity`.

Importing this module sets pydicom's `reading_validation_mode` to IGNORE for the process: value
validation on read only produces warnings, and pydicom's warnings quote the offending value,
which can be a patient name or ID (DESIGN: none in log lines). Nothing here depends on it.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, NoReturn

from pydicom import config as pydicom_config
from pydicom import uid as sop
from pydicom.charset import decode_bytes, default_encoding
from pydicom.datadict import dictionary_description, dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import dcmread, read_dataset
from pydicom.fileset import DIRECTORY_RECORDERS
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.valuerep import TEXT_VR_DELIMS, PersonName

from daemon.model import FileIdentity, InstanceHeader

logger = logging.getLogger(__name__)

pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

__all__ = [
    "IMAGE_RECORD",
    "PRIVATE_RECORD",
    "IncompleteFileError",
    "NotAcceptedError",
    "RejectedFileError",
    "data_set_offset",
    "read_instance",
]


class RejectedFileError(Exception):
    """The file cannot be archived (now). `reason` says why, for a lab admin: which DICOM
    element or structure is wrong and what to do about it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class IncompleteFileError(RejectedFileError):
    """A valid DICOM prefix that ends early: the file may still be being written."""


class NotAcceptedError(RejectedFileError):
    """Definitively not an acceptable DICOM instance; retrying will not help."""


# PS3.10 7.1: 128-byte preamble, then "DICM", then the File Meta Information group (0002).
_PREAMBLE_LENGTH: Final = 128
_PREFIX: Final = b"DICM"
_META_START: Final = _PREAMBLE_LENGTH + len(_PREFIX)
# The first read: enough to recognise the usual non-DICOM files (NIfTI-1 has its magic at
# byte 344) and, nearly always, to hold the whole File Meta Information.
_HEAD_LENGTH: Final = 4096

_IMPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2"
_EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1"
_DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1.99"
_EXPLICIT_VR_BIG_ENDIAN: Final = "1.2.840.10008.1.2.2"
# Transfer syntaxes whose Pixel Data is native (not encapsulated), PS3.5 A.1-A.3, A.5.
_NATIVE_TRANSFER_SYNTAXES: Final = frozenset(
    {
        _IMPLICIT_VR_LITTLE_ENDIAN,
        _EXPLICIT_VR_LITTLE_ENDIAN,
        _DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        _EXPLICIT_VR_BIG_ENDIAN,
    }
)
_MEDIA_STORAGE_DIRECTORY: Final = "1.2.840.10008.1.3.10"  # PS3.4 Annex F: the DICOMDIR

_TRANSFER_SYNTAX_UID: Final = 0x00020010
_MEDIA_STORAGE_SOP_CLASS_UID: Final = 0x00020002
_SPECIFIC_CHARACTER_SET: Final = 0x00080005
_SOP_INSTANCE_UID: Final = 0x00080018
_STUDY_INSTANCE_UID: Final = 0x0020000D
_SERIES_INSTANCE_UID: Final = 0x0020000E
_ROWS: Final = 0x00280010
_COLUMNS: Final = 0x00280011
_PIXEL_DATA: Final = 0x7FE00010
_FLOAT_PIXEL_DATA: Final = 0x7FE00008
_DOUBLE_FLOAT_PIXEL_DATA: Final = 0x7FE00009
_PIXEL_TAGS: Final = frozenset({_PIXEL_DATA, _FLOAT_PIXEL_DATA, _DOUBLE_FLOAT_PIXEL_DATA})

# PS3.5 7.5: items and delimiters
_ITEM: Final = 0xFFFEE000
_ITEM_DELIMITATION: Final = 0xFFFEE00D
_SEQUENCE_DELIMITATION: Final = 0xFFFEE0DD
_UNDEFINED_LENGTH: Final = 0xFFFFFFFF
# PS3.5 7.1.2: explicit VRs with a 2-byte reserved field and a 4-byte length
_LONG_LENGTH_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)

_RESEND = "re-send it from the scanner/PACS"
_CUT_SHORT = (
    "the file is cut short: it may still be being written or copied (it will be retried); "
    f"if it stays like this, {_RESEND}"
)


def _tag_text(tag: int) -> str:
    """'Rows (0028,0010)', or '(0009,1001)' for a tag pydicom does not know."""
    numbers = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    try:
        return f"{dictionary_description(tag)} {numbers}"
    except KeyError:
        return numbers


# --- structure walking -------------------------------------------------------------------


class _Truncated(Exception):
    """The file ends inside something it declared."""


class _Malformed(Exception):
    """The structure is broken in a way no complete writer produces."""


class _Walker:
    """Walks DICOM elements by their tag/VR/length headers only (PS3.5 7.1, 7.5): defined
    lengths are checked against the file size and skipped; undefined lengths (SQ, UN,
    encapsulated Pixel Data) are followed item by item to their Sequence Delimitation Item."""

    def __init__(self, fh: BinaryIO, size: int, *, little_endian: bool = True) -> None:
        self.fh = fh
        self.size = size
        endian = "<" if little_endian else ">"
        self._tag_and_length = struct.Struct(f"{endian}HHL")
        self._explicit = struct.Struct(f"{endian}HH2sH")
        self._long_length = struct.Struct(f"{endian}L")
        # top-level pixel data elements seen: tag -> (value offset, declared length)
        self.pixel_elements: dict[int, tuple[int, int]] = {}

    def read(self, position: int, length: int, what: str | int) -> bytes:
        """`length` bytes from `position`; `what` (a description, or the tag whose value or
        header it is) names them in the _Truncated message."""
        data = b""
        if position + length <= self.size:
            self.fh.seek(position)
            data = self.fh.read(length)
        if len(data) < length:
            named = what if isinstance(what, str) else f"the value of {_tag_text(what)}"
            raise _Truncated(f"the file ends inside {named} at byte {position}")
        return data

    def header(self, position: int, implicit_vr: bool) -> tuple[int, bytes, int, int]:
        """(tag, VR or b"", length, value offset) of the element header at `position`."""
        raw = self.read(position, 8, "an element header")
        group, element, vr, short_length = self._explicit.unpack(raw)
        tag = group << 16 | element
        if (
            implicit_vr
            or group == 0xFFFE  # items and delimiters carry no VR (PS3.5 7.5)
            # an implicit VR element in an explicit VR data set: pydicom reads those too
            or not (0x41 <= vr[0] <= 0x5A and 0x41 <= vr[1] <= 0x5A)
        ):
            return tag, b"", self._tag_and_length.unpack(raw)[2], position + 8
        if vr in _LONG_LENGTH_VRS:
            extra = self.read(position + 8, 4, "an element header")
            return tag, vr, self._long_length.unpack(extra)[0], position + 12
        return tag, vr, short_length, position + 8

    def walk_data_set(self, position: int, *, top_level: bool, implicit_vr: bool) -> int:
        """Walk elements from `position` to the end of the file (top level) or to the Item
        Delimitation Item (inside an undefined-length item); return the offset after it."""
        size = self.size
        while True:
            if position >= size:
                if top_level:
                    return position
                raise _Truncated(f"the file ends inside a sequence item at byte {position}")
            if top_level and size - position < 8 and self.pixel_elements:
                # fewer bytes than an element header after whole pixel data: padding some
                # writers leave; pydicom ignores it too
                return size
            tag, vr, length, value_position = self.header(position, implicit_vr)
            if tag in (_ITEM_DELIMITATION, _SEQUENCE_DELIMITATION):
                if not top_level:
                    if tag == _ITEM_DELIMITATION:
                        return value_position
                    raise _Malformed(
                        f"a Sequence Delimitation Item (FFFE,E0DD) at byte {position} closes a "
                        "sequence item that was never ended"
                    )
                # a stray delimiter at the top level: pydicom skips it, so do we
                position = value_position
                continue
            if length == _UNDEFINED_LENGTH:
                # PS3.5 6.2.2: an undefined-length UN holds implicit VR items
                position = self.walk_items(
                    value_position, tag, implicit_vr=implicit_vr or vr == b"UN"
                )
            else:
                end = value_position + length
                if end > size:
                    raise _Truncated(
                        f"{_tag_text(tag)} declares {length} bytes from byte {value_position} "
                        f"but the file ends at byte {size}"
                    )
                position = end
            if top_level and tag in _PIXEL_TAGS:
                self.pixel_elements[tag] = (value_position, length)

    def walk_items(self, position: int, tag: int, *, implicit_vr: bool) -> int:
        """Walk the items of an undefined-length element (`tag`) to its Sequence
        Delimitation Item; return the offset after it."""
        while True:
            try:
                item_tag, _, length, value_position = self.header(position, implicit_vr=True)
            except _Truncated:
                raise _Truncated(
                    f"the file ends inside {_tag_text(tag)} at byte {position}, before its "
                    "Sequence Delimitation Item (FFFE,E0DD)"
                ) from None
            if item_tag == _SEQUENCE_DELIMITATION:
                return value_position
            if item_tag != _ITEM:
                raise _Malformed(
                    f"{_tag_text(tag)} holds {_tag_text(item_tag)} at byte {position} where an "
                    "Item (FFFE,E000) or a Sequence Delimitation Item (FFFE,E0DD) must be"
                )
            if length == _UNDEFINED_LENGTH:
                position = self.walk_data_set(
                    value_position, top_level=False, implicit_vr=implicit_vr
                )
            else:
                position = value_position + length
                if position > self.size:
                    raise _Truncated(
                        f"an item of {_tag_text(tag)} declares {length} bytes from byte "
                        f"{value_position} but the file ends at byte {self.size}"
                    )


# --- File Meta Information ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _FileMeta:
    end: int  # where the data set begins
    transfer_syntax_uid: str
    media_storage_sop_class_uid: str


def _uid_bytes(value: bytes) -> str:
    return value.decode("ascii", "replace").strip(" \0")


def _looks_like_bare_data_set(head: bytes) -> bool:
    """A data set written without preamble and File Meta starts with a group 0002 or 0008
    element; some writers put a stray byte or two before it."""
    for start in range(4):
        if head[start : start + 2] not in (b"\x08\x00", b"\x00\x08", b"\x02\x00", b"\x00\x02"):
            continue
        vr = head[start + 4 : start + 6]
        if len(vr) == 2 and 0x41 <= vr[0] <= 0x5A and 0x41 <= vr[1] <= 0x5A:
            return True  # explicit VR
        if start == 0 and head[6:8] == b"\x00\x00":
            return True  # implicit VR little endian: a short 4-byte length
    return False


def _not_dicom_reason(head: bytes) -> str:
    """Say what a file without the 'DICM' prefix looks like and what to do with it."""
    missing = "no DICOM File Meta Information (PS3.10 7.1): there is no 'DICM' prefix at byte 128"
    if head.startswith(b"\x1f\x8b"):
        return (
            f"{missing}; the file is gzip-compressed: decompress it (gunzip) and put the DICOM "
            "file it contains into incoming/"
        )
    if head[344:348] in (b"n+1\0", b"ni1\0") or head[4:8] in (b"n+2\0", b"ni2\0"):
        return (
            f"{missing}; the file is a NIfTI image (.nii), not DICOM: dcmdb archives DICOM "
            "and makes its own NIfTI; send the original DICOM series instead"
        )
    if head.startswith(b"%PDF"):
        return f"{missing}; the file is a PDF document, not DICOM: remove it from incoming/"
    if head.startswith(b"PK\x03\x04"):
        return (
            f"{missing}; the file is a ZIP archive: unpack it and put the DICOM files it "
            "contains into incoming/"
        )
    if _looks_like_bare_data_set(head):
        return (
            f"{missing}; it looks like a bare DICOM data set without preamble and File Meta "
            f"(as ACR-NEMA tools and some exports write): {_RESEND} or convert it with "
            "`dcmconv +F <file> <out.dcm>` (DCMTK) and put the result into incoming/"
        )
    if b"\0" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            # a multi-byte character cut by the sniff window is still text
            looks_like_text = exc.start >= len(head) - 3
        else:
            looks_like_text = True
        if looks_like_text:
            return f"{missing}; the file is a text file, not DICOM: remove it from incoming/"
    return (
        f"{missing}; the file is not DICOM (or a DICOM data set without File Meta): "
        f"{_RESEND} or convert it with `dcmconv +F <file> <out.dcm>` (DCMTK)"
    )


def _check_prefix(head: bytes, size: int) -> None:
    if size < _META_START:
        raise IncompleteFileError(
            f"the file is only {size} bytes, shorter than the 128-byte preamble and 'DICM' "
            f"prefix every DICOM file starts with (PS3.10 7.1); {_CUT_SHORT}"
        )
    if head[_PREAMBLE_LENGTH:_META_START] != _PREFIX:
        raise NotAcceptedError(_not_dicom_reason(head))


def _walk_file_meta(walker: _Walker) -> tuple[int, dict[int, str]]:
    """Walk the group 0002 elements from byte 132; return where they end and the UIDs dcmdb
    needs. Raises _Truncated when the walker's bytes end inside them."""
    position = _META_START
    values: dict[int, str] = {}
    while position < walker.size:
        tag, _, length, value_position = walker.header(position, implicit_vr=False)
        if tag >> 16 != 0x0002:
            break
        if length == _UNDEFINED_LENGTH:
            raise NotAcceptedError(
                f"{_tag_text(tag)} in the File Meta Information has an undefined length, "
                f"which PS3.10 7.1 does not allow; {_RESEND}"
            )
        if tag in (_TRANSFER_SYNTAX_UID, _MEDIA_STORAGE_SOP_CLASS_UID):
            values[tag] = _uid_bytes(walker.read(value_position, length, tag))
        position = value_position + length
        if position > walker.size:
            raise _Truncated(f"{_tag_text(tag)} runs past the end of the file")
    return position, values


def _read_file_meta(fh: BinaryIO, size: int, head: bytes) -> _FileMeta:
    """Read the File Meta Information group (PS3.10 7.1: explicit VR little endian, though
    some writers use implicit VR there; pydicom reads both) up to the first non-0002 tag, from
    `head` (the file's first bytes) when it holds all of it."""
    try:
        try:
            position, values = _walk_file_meta(_Walker(io.BytesIO(head), len(head)))
            if position >= len(head) and len(head) < size:
                raise _Truncated("the File Meta Information goes on beyond the first bytes read")
        except _Truncated:
            if len(head) >= size:
                raise
            position, values = _walk_file_meta(_Walker(fh, size))
    except _Truncated as exc:
        raise IncompleteFileError(
            f"the file ends inside its File Meta Information ({exc}); {_CUT_SHORT}"
        ) from None
    transfer_syntax_uid = values.get(_TRANSFER_SYNTAX_UID, "")
    if not transfer_syntax_uid and position >= size:
        raise IncompleteFileError(
            "the file ends inside its File Meta Information, before Transfer Syntax UID "
            f"(0002,0010); {_CUT_SHORT}"
        )
    if not transfer_syntax_uid:
        raise NotAcceptedError(
            "the File Meta Information has no Transfer Syntax UID (0002,0010) (PS3.10 7.1), so "
            f"its data set cannot be decoded: {_RESEND} or rewrite it with "
            "`dcmconv +F <file> <out.dcm>` (DCMTK)"
        )
    return _FileMeta(position, transfer_syntax_uid, values.get(_MEDIA_STORAGE_SOP_CLASS_UID, ""))


def data_set_offset(path: Path) -> int:
    """Byte offset where the data set begins (after preamble and File Meta Information), for
    comparing two files' data sets. For a deflated transfer syntax that is where the deflate
    stream starts. Raises RejectedFileError for a file without (complete) File Meta, OSError
    when the file cannot be read."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(_HEAD_LENGTH)
        _check_prefix(head, size)
        return _read_file_meta(fh, size, head).end


# --- header values -----------------------------------------------------------------------

# Tags of the values read from the header.
_SOP_CLASS_UID: Final = 0x00080016
_STUDY_DATE: Final = 0x00080020
_STUDY_TIME: Final = 0x00080030
_ACCESSION_NUMBER: Final = 0x00080050
_MODALITY: Final = 0x00080060
_REFERRING_PHYSICIAN_NAME: Final = 0x00080090
_STUDY_DESCRIPTION: Final = 0x00081030
_SERIES_DESCRIPTION: Final = 0x0008103E
_PATIENT_NAME: Final = 0x00100010
_PATIENT_ID: Final = 0x00100020
_STUDY_ID: Final = 0x00200010
_SERIES_NUMBER: Final = 0x00200011
_INSTANCE_NUMBER: Final = 0x00200013
_SAMPLES_PER_PIXEL: Final = 0x00280002
_PHOTOMETRIC_INTERPRETATION: Final = 0x00280004
_NUMBER_OF_FRAMES: Final = 0x00280008
_BITS_ALLOCATED: Final = 0x00280100

_BINARY_INTEGER_VRS: Final = {"US": "H", "SS": "h", "UL": "L", "SL": "l"}
# VRs decoded with the Specific Character Set (PS3.5 6.1.2.3); the other string VRs hold only
# the default repertoire
_VRS_WITH_CHARACTER_SET: Final = frozenset({"PN", "SH", "LO", "UC", "ST", "LT", "UT"})


class _Values:
    """The header values dcmdb keeps, decoded from pydicom's raw elements with pydicom's own
    character set decoder. Dataset attribute access does the same through several more layers
    (element conversion, validation, PersonName objects) and costs as much again as the whole
    parse."""

    def __init__(self, ds: Dataset) -> None:
        # the top-level elements as read: raw, not yet converted (BaseTag keys hash as ints)
        self.elements: dict[int, RawDataElement | DataElement] = dict(ds.items())
        character_set = ds.original_character_set
        self.encodings: list[str] = (
            [character_set] if isinstance(character_set, str) else list(character_set)
        )

    def _element(self, tag: int) -> RawDataElement | DataElement | None:
        return self.elements.get(tag)

    def present(self, tag: int) -> bool:
        return self._element(tag) is not None

    def _vr(self, element: RawDataElement | DataElement) -> str:
        if element.VR:
            return str(element.VR)
        try:
            return str(dictionary_VR(element.tag))  # implicit VR: the dictionary's
        except KeyError:
            return "UN"

    def values(self, tag: int) -> list[str]:
        """The element's values as stripped strings; [] when absent or empty."""
        element = self._element(tag)
        if element is None or element.value is None:
            return []
        value: object = element.value
        if isinstance(element, RawDataElement) and isinstance(value, bytes):
            vr = self._vr(element)
            if vr in _VRS_WITH_CHARACTER_SET:
                # what pydicom's convert_PN/convert_text decode, without building PersonName
                # objects (PN component groups are kept as written: "A^B=C^D")
                value = decode_bytes(value, self.encodings, TEXT_VR_DELIMS).split("\\")
            elif vr in _BINARY_INTEGER_VRS:
                return [str(number) for number in self._binary_integers(element, value, vr)]
            else:
                value = value.decode(default_encoding, "replace").split("\\")
        if isinstance(value, str | PersonName):
            value = [value]
        if not isinstance(value, list | tuple | MultiValue):
            value = [value]
        stripped = [str(item).strip(" \0") for item in value]
        return [] if stripped == [""] else stripped

    @staticmethod
    def _binary_integers(element: RawDataElement, value: bytes, vr: str) -> tuple[int, ...]:
        code = _BINARY_INTEGER_VRS[vr]
        width = struct.calcsize(code)
        endian = "<" if element.is_little_endian else ">"
        return struct.unpack(
            f"{endian}{len(value) // width}{code}", value[: len(value) // width * width]
        )

    def text(self, tag: int) -> str:
        return "\\".join(self.values(tag))

    def number(self, tag: int) -> int | None:
        """The first value as int; None when absent, empty or malformed (IS "abc", "1.5")."""
        values = self.values(tag)
        if not values:
            return None
        try:
            number = float(values[0])
        except ValueError:
            return None
        return int(number) if number.is_integer() else None

    def uid(self, tag: int) -> str:
        values = self.values(tag)
        if len(values) > 1:
            raise NotAcceptedError(
                f"{_tag_text(tag)} has {len(values)} values; it must have exactly one: {_RESEND}"
            )
        return values[0] if values else ""

    def person_name(self, tag: int) -> str:
        """The full decoded PN value, all component groups ("Yamada^Tarou=山田^太郎")."""
        return self.text(tag)

    def alphabetic_name(self, tag: int) -> str:
        """The alphabetic component group of the first value (PS3.5 6.2.1)."""
        values = self.values(tag)
        if not values:
            return ""
        # PS3.5 6.2.1: trailing empty components may be left out, so "Smith^John^^^" is
        # "Smith^John" and "^^^^" is no name at all
        return values[0].split("=")[0].strip().rstrip("^ ")

    def specific_character_set(self) -> str:
        """(0008,0005) as in the file: its values joined with a backslash."""
        element = self._element(_SPECIFIC_CHARACTER_SET)
        if element is None or element.value is None:
            return ""
        value = element.value
        if isinstance(value, bytes):
            items = value.decode(default_encoding, "replace").split("\\")
        elif isinstance(value, str):
            items = [value]
        else:
            items = [str(item) for item in value]
        return "\\".join(item.strip(" \0") for item in items)


# --- completeness ------------------------------------------------------------------------


def _expected_pixel_bytes(values: _Values, tag: int) -> int | None:
    """PS3.5 8.1.1: Rows x Columns x Frames x Samples x BitsAllocated / 8, rounded up; None
    when the header does not say."""
    rows = values.number(_ROWS)
    columns = values.number(_COLUMNS)
    if not rows or not columns or rows < 0 or columns < 0:
        return None
    frames = values.number(_NUMBER_OF_FRAMES) or 1
    samples = values.number(_SAMPLES_PER_PIXEL) or 1
    if tag == _FLOAT_PIXEL_DATA:
        bits: int | None = 32
    elif tag == _DOUBLE_FLOAT_PIXEL_DATA:
        bits = 64
    else:
        bits = values.number(_BITS_ALLOCATED)
        if values.text(_PHOTOMETRIC_INTERPRETATION).endswith("_422"):
            samples = 2  # PS3.3 C.7.6.3.1.2: YBR_FULL_422 stores two samples per pixel
    if not bits or bits < 0 or frames < 1 or samples < 1:
        return None
    return math.ceil(rows * columns * frames * samples * bits / 8)


def _pixel_formula(tag: int) -> str:
    if tag == _PIXEL_DATA:
        bits = "Bits Allocated (0028,0100)"
    else:
        bits = "32" if tag == _FLOAT_PIXEL_DATA else "64"
    return (
        "Rows (0028,0010) x Columns (0028,0011) x Number of Frames (0028,0008) x "
        f"Samples per Pixel (0028,0002) x {bits} / 8"
    )


def _check_pixel_lengths(walker: _Walker, values: _Values, transfer_syntax_uid: str) -> None:
    if transfer_syntax_uid not in _NATIVE_TRANSFER_SYNTAXES:
        return  # encapsulated: walking to the Sequence Delimitation Item was the check
    for tag, (_, length) in walker.pixel_elements.items():
        if length == _UNDEFINED_LENGTH:
            continue
        expected = _expected_pixel_bytes(values, tag)
        if expected is not None and length < expected:
            raise NotAcceptedError(
                f"{_tag_text(tag)} holds {length} bytes but {_pixel_formula(tag)} = "
                f"{expected}: the header and the pixel data disagree; {_RESEND}"
            )


def _ends_before(ds: Dataset, tag: int) -> bool:
    """True when the data set's last element comes before `tag` (so a missing `tag` may just
    not be written yet)."""
    last = max(map(int, ds.keys()), default=0)
    return last < tag


# Storage SOP Classes whose instances always carry pixel data, beyond the "... Image Storage"
# ones (PS3.4 B.5)
_PIXEL_STORAGE_KEYWORDS: Final = frozenset(
    {"SegmentationStorage", "ParametricMapStorage", "EnhancedUSVolumeStorage"}
)


def _always_has_pixels(sop_class_uid: str) -> bool:
    keyword = UID(sop_class_uid).keyword if sop_class_uid else ""
    return "ImageStorage" in keyword or keyword in _PIXEL_STORAGE_KEYWORDS


def _walk_data_set(
    walker: _Walker, start: int, transfer_syntax_uid: str, implicit_vr: bool
) -> None:
    try:
        walker.walk_data_set(start, top_level=True, implicit_vr=implicit_vr)
    except _Truncated as exc:
        raise IncompleteFileError(f"{exc}; {_CUT_SHORT}") from None
    except _Malformed as exc:
        raise NotAcceptedError(
            f"the data set is malformed ({exc}; transfer syntax {transfer_syntax_uid}): {_RESEND}"
        ) from None


def _first_element_is_implicit(fh: BinaryIO, start: int, size: int, implicit_vr: bool) -> bool:
    """pydicom decides a data set's VR encoding from its first element (its
    `_is_implicit_vr`); do the same so the walk reads what pydicom read."""
    if start + 6 > size:
        return implicit_vr
    fh.seek(start + 4)
    vr = fh.read(2)
    return not (len(vr) == 2 and 0x41 <= vr[0] <= 0x5A and 0x41 <= vr[1] <= 0x5A)


def _inflate(fh: BinaryIO, start: int, size: int) -> bytes:
    """PS3.5 A.5: the data set of a deflated transfer syntax is one raw deflate stream."""
    fh.seek(start)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(fh.read(size - start)) + inflater.flush()
    except zlib.error as exc:
        raise NotAcceptedError(
            f"the deflated data set (transfer syntax {_DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN}) is "
            f"corrupt ({exc}): {_RESEND}"
        ) from None
    if not inflater.eof:
        raise IncompleteFileError(
            "the deflated data set (transfer syntax "
            f"{_DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN}) ends before its deflate stream does; "
            f"{_CUT_SHORT}"
        )
    return data


def _check_complete(
    fh: BinaryIO, size: int, ds: Dataset, values: _Values, meta: _FileMeta, implicit_vr: bool
) -> None:
    """Raise unless the file holds everything its data set declares (module docstring)."""
    transfer_syntax_uid = meta.transfer_syntax_uid
    if transfer_syntax_uid == _DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        inflated = _inflate(fh, meta.end, size)
        walker = _Walker(io.BytesIO(inflated), len(inflated), little_endian=True)
        _walk_data_set(walker, 0, transfer_syntax_uid, implicit_vr=False)
    else:
        little_endian = transfer_syntax_uid != _EXPLICIT_VR_BIG_ENDIAN
        walker = _Walker(fh, size, little_endian=little_endian)
        stopped_at = fh.tell()  # dcmread(stop_before_pixels=True) leaves fh on the pixel data
        start = meta.end
        if values.present(_ROWS) and stopped_at + 8 <= size:
            tag = walker.header(stopped_at, implicit_vr)[0]
            if tag in _PIXEL_TAGS:
                start = stopped_at  # pydicom parsed the header; walk the pixel data and the rest
        _walk_data_set(walker, start, transfer_syntax_uid, implicit_vr)

    if not walker.pixel_elements:
        if values.present(_ROWS) or values.present(_COLUMNS):
            raise IncompleteFileError(
                "the data set has Rows (0028,0010) or Columns (0028,0011) but no Pixel Data "
                f"(7FE0,0010); {_CUT_SHORT}"
            )
        sop_class_uid = values.uid(_SOP_CLASS_UID) or meta.media_storage_sop_class_uid
        if _always_has_pixels(sop_class_uid):
            raise IncompleteFileError(
                f"the data set of this {UID(sop_class_uid).name} instance has no Rows "
                "(0028,0010) and no Pixel Data (7FE0,0010): it is cut short, or an image without "
                f"pixel data; if it is still being written it will be retried; {_RESEND}"
            )
    _check_pixel_lengths(walker, values, transfer_syntax_uid)


# --- the instance's DICOMDIR record (PS3.3 F.5) ------------------------------------------


def _record_type_of(record_type: str, *sop_class_uids: str) -> dict[str, str]:
    return dict.fromkeys(sop_class_uids, record_type)


# Directory Record Type (0004,1430) of the leaf record for each Storage SOP Class that is not
# an image (PS3.3 F.5.x "This Directory Record shall be used to reference ..."). Image SOP
# Classes (Segmentation, Parametric Map, RT Image, video and every "... Image Storage") are not
# listed: a SOP Class not listed here is IMAGE when the instance has Rows or its class always has
# pixel data, and PRIVATE otherwise (private and future SOP Classes; see dicomdir.py). Hanging
# protocols, palettes and implant templates have top-level records of their own and no study to
# file them under, so ingest never accepts them.
_DIRECTORY_RECORD_TYPES: Final[dict[str, str]] = {
    **_record_type_of("RT DOSE", sop.RTDoseStorage),
    **_record_type_of("RT STRUCTURE SET", sop.RTStructureSetStorage),
    **_record_type_of("RT PLAN", sop.RTPlanStorage, sop.RTIonPlanStorage),
    **_record_type_of(
        "RT TREAT RECORD",
        sop.RTBeamsTreatmentRecordStorage,
        sop.RTBrachyTreatmentRecordStorage,
        sop.RTTreatmentSummaryRecordStorage,
        sop.RTIonBeamsTreatmentRecordStorage,
    ),
    **_record_type_of(
        "PRESENTATION",
        sop.GrayscaleSoftcopyPresentationStateStorage,
        sop.ColorSoftcopyPresentationStateStorage,
        sop.PseudoColorSoftcopyPresentationStateStorage,
        sop.BlendingSoftcopyPresentationStateStorage,
        sop.XAXRFGrayscaleSoftcopyPresentationStateStorage,
        sop.GrayscalePlanarMPRVolumetricPresentationStateStorage,
        sop.CompositingPlanarMPRVolumetricPresentationStateStorage,
        sop.AdvancedBlendingPresentationStateStorage,
        sop.VolumeRenderingVolumetricPresentationStateStorage,
        sop.SegmentedVolumeRenderingVolumetricPresentationStateStorage,
        sop.MultipleVolumeRenderingVolumetricPresentationStateStorage,
        sop.VariableModalityLUTSoftcopyPresentationStateStorage,
        sop.BasicStructuredDisplayStorage,
    ),
    **_record_type_of(
        "WAVEFORM",
        sop.TwelveLeadECGWaveformStorage,
        sop.GeneralECGWaveformStorage,
        sop.General32bitECGWaveformStorage,
        sop.AmbulatoryECGWaveformStorage,
        sop.HemodynamicWaveformStorage,
        sop.CardiacElectrophysiologyWaveformStorage,
        sop.BasicVoiceAudioWaveformStorage,
        sop.GeneralAudioWaveformStorage,
        sop.ArterialPulseWaveformStorage,
        sop.RespiratoryWaveformStorage,
        sop.MultichannelRespiratoryWaveformStorage,
        sop.RoutineScalpElectroencephalogramWaveformStorage,
        sop.ElectromyogramWaveformStorage,
        sop.ElectrooculogramWaveformStorage,
        sop.SleepElectroencephalogramWaveformStorage,
        sop.BodyPositionWaveformStorage,
    ),
    **_record_type_of(
        "SR DOCUMENT",
        sop.BasicTextSRStorage,
        sop.EnhancedSRStorage,
        sop.ComprehensiveSRStorage,
        sop.Comprehensive3DSRStorage,
        sop.ExtensibleSRStorage,
        sop.ProcedureLogStorage,
        sop.MammographyCADSRStorage,
        sop.ChestCADSRStorage,
        sop.ColonCADSRStorage,
        sop.XRayRadiationDoseSRStorage,
        sop.EnhancedXRayRadiationDoseSRStorage,
        sop.RadiopharmaceuticalRadiationDoseSRStorage,
        sop.PatientRadiationDoseSRStorage,
        sop.AcquisitionContextSRStorage,
        sop.SimplifiedAdultEchoSRStorage,
        sop.PlannedImagingAgentAdministrationSRStorage,
        sop.PerformedImagingAgentAdministrationSRStorage,
        sop.WaveformAnnotationSRStorage,
        sop.ImplantationPlanSRStorage,
        sop.SpectaclePrescriptionReportStorage,
        sop.MacularGridThicknessAndVolumeReportStorage,
    ),
    **_record_type_of("KEY OBJECT DOC", sop.KeyObjectSelectionDocumentStorage),
    **_record_type_of("SPECTROSCOPY", sop.MRSpectroscopyStorage),
    **_record_type_of("RAW DATA", sop.RawDataStorage),
    **_record_type_of(
        "REGISTRATION", sop.SpatialRegistrationStorage, sop.DeformableSpatialRegistrationStorage
    ),
    **_record_type_of("FIDUCIAL", sop.SpatialFiducialsStorage),
    **_record_type_of(
        "ENCAP DOC",
        sop.EncapsulatedPDFStorage,
        sop.EncapsulatedCDAStorage,
        sop.EncapsulatedSTLStorage,
        sop.EncapsulatedOBJStorage,
        sop.EncapsulatedMTLStorage,
    ),
    **_record_type_of("VALUE MAP", sop.RealWorldValueMappingStorage),
    **_record_type_of("STEREOMETRIC", sop.StereometricRelationshipStorage),
    **_record_type_of(
        "MEASUREMENT",
        sop.LensometryMeasurementsStorage,
        sop.AutorefractionMeasurementsStorage,
        sop.KeratometryMeasurementsStorage,
        sop.SubjectiveRefractionMeasurementsStorage,
        sop.VisualAcuityMeasurementsStorage,
        sop.OphthalmicAxialMeasurementsStorage,
        sop.IntraocularLensCalculationsStorage,
        sop.OphthalmicVisualFieldStaticPerimetryMeasurementsStorage,
    ),
    **_record_type_of("SURFACE", sop.SurfaceSegmentationStorage),
    **_record_type_of("SURFACE SCAN", sop.SurfaceScanMeshStorage, sop.SurfaceScanPointCloudStorage),
    **_record_type_of("TRACT", sop.TractographyResultsStorage),
    **_record_type_of("ASSESSMENT", sop.ContentAssessmentResultsStorage),
    # PS3.3 F.5.46: the RT Second Generation IODs
    **_record_type_of(
        "RADIOTHERAPY",
        sop.RTPhysicianIntentStorage,
        sop.RTSegmentAnnotationStorage,
        sop.RTRadiationSetStorage,
        sop.CArmPhotonElectronRadiationStorage,
        sop.TomotherapeuticRadiationStorage,
        sop.RoboticArmRadiationStorage,
        sop.RTRadiationRecordSetStorage,
        sop.RTRadiationSalvageRecordStorage,
        sop.CArmPhotonElectronRadiationRecordStorage,
        sop.TomotherapeuticRadiationRecordStorage,
        sop.RoboticRadiationRecordStorage,
        sop.RTRadiationSetDeliveryInstructionStorage,
        sop.RTTreatmentPreparationStorage,
        sop.RTPatientPositionAcquisitionInstructionStorage,
    ),
    # PS3.3 F.5.40: instances with Modality PLAN
    **_record_type_of(
        "PLAN",
        sop.RTBeamsDeliveryInstructionStorage,
        sop.RTBrachyApplicationSetupDeliveryInstructionStorage,
    ),
}

IMAGE_RECORD: Final = "IMAGE"
# A leaf of a SOP Class without a standard record type (PS3.3 F.3.2.2); dicomdir.py gives it
# dcmdb's Private Record UID.
PRIVATE_RECORD: Final = "PRIVATE"

# The Type 1 keys of each record type (PS3.3 F.5) that dcmdb invents when the instance lacks
# them, so that the DICOMDIR stays valid: Instance Number "1"; a missing label "UNLABELED"; a
# date or time from the instance's other dates and times (_DATE_SOURCES, _TIME_SOURCES), else
# from the file's modification time in UTC. Any other missing Type 1 key (a flag, a code
# sequence, a dose summation type: facts about the content that cannot be guessed) makes the
# record PRIVATE instead.
_NUMBER_DATE_TIME: Final = ("InstanceNumber", "ContentDate", "ContentTime")
_INVENTED_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "RT DOSE": ("InstanceNumber",),
    "RT STRUCTURE SET": ("InstanceNumber", "StructureSetLabel"),
    "RT PLAN": ("InstanceNumber", "RTPlanLabel"),
    "RT TREAT RECORD": ("InstanceNumber",),
    "PRESENTATION": (
        "InstanceNumber",
        "PresentationCreationDate",
        "PresentationCreationTime",
        "ContentLabel",
    ),
    "WAVEFORM": _NUMBER_DATE_TIME,
    "RAW DATA": _NUMBER_DATE_TIME,
    "SR DOCUMENT": _NUMBER_DATE_TIME,
    "KEY OBJECT DOC": _NUMBER_DATE_TIME,
    "SPECTROSCOPY": _NUMBER_DATE_TIME,
    "REGISTRATION": (*_NUMBER_DATE_TIME, "ContentLabel"),
    "FIDUCIAL": (*_NUMBER_DATE_TIME, "ContentLabel"),
    "VALUE MAP": (*_NUMBER_DATE_TIME, "ContentLabel"),
    "MEASUREMENT": (*_NUMBER_DATE_TIME, "ContentLabel"),
    "SURFACE": (*_NUMBER_DATE_TIME, "ContentLabel"),
    "TRACT": (*_NUMBER_DATE_TIME, "ContentLabel"),
    "SURFACE SCAN": ("ContentDate", "ContentTime"),
    "STEREOMETRIC": (*_NUMBER_DATE_TIME, "ContentLabel"),
    "ENCAP DOC": ("InstanceNumber",),
    "ASSESSMENT": ("InstanceNumber", "InstanceCreationDate"),
    "RADIOTHERAPY": ("InstanceNumber",),
}
_DATE_SOURCES: Final = (
    "ContentDate",
    "InstanceCreationDate",
    "SeriesDate",
    "AcquisitionDate",
    "StudyDate",
)
_TIME_SOURCES: Final = (
    "ContentTime",
    "InstanceCreationTime",
    "SeriesTime",
    "AcquisitionTime",
    "StudyTime",
)
_INVENTED_LABEL: Final = "UNLABELED"
_INVENTED_INSTANCE_NUMBER: Final = "1"

# pydicom's STEREOMETRIC recorder writes no keys, but the record has the Content
# Identification Macro (PS3.3 F.5; dciodvfy checks its Content Label), as FIDUCIAL's does
_RECORDER_OF: Final = {"STEREOMETRIC": "FIDUCIAL"}

# PS3.3 F.5.24, F.5.27: the record's Content Sequence holds only the root's HAS CONCEPT MOD
# items (pydicom's recorder copies the whole content tree)
_RECORDS_WITH_CONCEPT_MODIFIERS: Final = frozenset({"SR DOCUMENT", "KEY OBJECT DOC"})

# pydicom signals a broken file with these (its OSError "No tag to read at file position"
# has no errno, unlike a real I/O error).
_PARSE_ERRORS: Final = (
    InvalidDicomError,
    EOFError,
    struct.error,
    zlib.error,
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    NotImplementedError,
    OverflowError,
    RecursionError,
)

# What pydicom's recorders and writer raise for a missing, empty or undecodable key: the
# same as for a broken file.
_RECORD_ERRORS: Final = _PARSE_ERRORS


def _directory_record(
    ds: Dataset, values: _Values, sop_class_uid: str, sop_instance_uid: str, modified_at: float
) -> tuple[str, bytes]:
    """The instance's Directory Record Type and, for every type but IMAGE and PRIVATE, its
    record keys as Explicit VR Little Endian elements (see InstanceHeader)."""
    record_type = _DIRECTORY_RECORD_TYPES.get(sop_class_uid)
    if record_type is None:
        if values.present(_ROWS) or _always_has_pixels(sop_class_uid):
            return IMAGE_RECORD, b""
        logger.debug(
            "SOP Class %s of %s has no standard DICOMDIR record type: listed as PRIVATE",
            sop_class_uid,
            sop_instance_uid,
        )
        return PRIVATE_RECORD, b""
    try:
        recorder = DIRECTORY_RECORDERS[_RECORDER_OF.get(record_type, record_type)]
        try:
            record = recorder(ds)
        except ValueError:  # a Type 1 key is missing or empty
            logger.debug(
                "%s: inventing missing keys of its %s record", sop_instance_uid, record_type
            )
            record = recorder(_with_invented_keys(ds, record_type, modified_at))
        if record_type == "SR DOCUMENT":
            _add_verification_date_time(ds, record)
        if record_type in _RECORDS_WITH_CONCEPT_MODIFIERS and "ContentSequence" in record:
            modifiers = [
                item
                for item in record.ContentSequence
                if item.get("RelationshipType") == "HAS CONCEPT MOD"
            ]
            if modifiers:
                record.ContentSequence = modifiers
            else:
                del record.ContentSequence
        if values.specific_character_set():
            record.SpecificCharacterSet = ds.SpecificCharacterSet
        buffer = DicomBytesIO()
        buffer.is_little_endian = True
        buffer.is_implicit_VR = False
        write_dataset(buffer, record)
    except _RECORD_ERRORS as exc:
        # the message may quote a value: only its type goes to the log
        logger.info(
            "%s (SOP Class %s) lacks a key its %s DICOMDIR record needs, or has one that "
            "cannot be encoded (%s): listed as PRIVATE",
            sop_instance_uid,
            sop_class_uid,
            record_type,
            type(exc).__name__,
        )
        return PRIVATE_RECORD, b""
    return record_type, bytes(buffer.getvalue())


def _add_verification_date_time(ds: Dataset, record: Dataset) -> None:
    """PS3.3 F.5.24: a VERIFIED report's record has Verification DateTime, the latest of its
    Verifying Observer Sequence (C.17.2), where the instance keeps it; pydicom's recorder looks
    for it at the top level only. Raises ValueError when a VERIFIED report has none."""
    if record.get("VerificationFlag") != "VERIFIED" or "VerificationDateTime" in record:
        return
    times = [
        str(observer.VerificationDateTime)
        for observer in ds.get("VerifyingObserverSequence") or ()
        if observer.get("VerificationDateTime")
    ]
    if not times:
        raise ValueError("a VERIFIED report without a Verification DateTime")
    record.VerificationDateTime = max(times)


def _with_invented_keys(ds: Dataset, record_type: str, modified_at: float) -> Dataset:
    """A copy of `ds` (sharing its elements) with the invented keys of _INVENTED_KEYS that it
    lacks or has empty."""
    patched = Dataset(dict(ds.items()))
    for keyword in _INVENTED_KEYS.get(record_type, ()):
        if keyword in patched and patched[keyword].VM:
            continue
        if keyword == "InstanceNumber":
            value = _INVENTED_INSTANCE_NUMBER
        elif keyword.endswith("Label"):
            value = _INVENTED_LABEL
        elif keyword.endswith("Date"):
            value = _first_value(ds, _DATE_SOURCES) or time.strftime(
                "%Y%m%d", time.gmtime(modified_at)
            )
        else:
            value = _first_value(ds, _TIME_SOURCES) or time.strftime(
                "%H%M%S", time.gmtime(modified_at)
            )
        setattr(patched, keyword, value)
    return patched


def _first_value(ds: Dataset, keywords: tuple[str, ...]) -> str:
    for keyword in keywords:
        value = ds.get(keyword)
        if isinstance(value, str) and value.strip(" \0"):
            return value.strip(" \0")
    return ""


def _required_uid(ds: Dataset, values: _Values, tag: int) -> str:
    value = values.uid(tag)
    if value:
        return value
    if _ends_before(ds, tag):
        raise IncompleteFileError(
            f"the data set ends before {_tag_text(tag)}, which every instance has; {_CUT_SHORT}"
        )
    raise NotAcceptedError(
        f"{_tag_text(tag)} is missing or empty; dcmdb files every instance by its Study, Series "
        f"and SOP Instance UIDs: {_RESEND} or fix the file with a DICOM editor"
    )


def _header(ds: Dataset, values: _Values, meta: _FileMeta, modified_at: float) -> InstanceHeader:
    sop_instance_uid = _required_uid(ds, values, _SOP_INSTANCE_UID)
    study_instance_uid = _required_uid(ds, values, _STUDY_INSTANCE_UID)
    series_instance_uid = _required_uid(ds, values, _SERIES_INSTANCE_UID)
    sop_class_uid = values.uid(_SOP_CLASS_UID) or meta.media_storage_sop_class_uid
    record_type, record_keys = _directory_record(
        ds, values, sop_class_uid, sop_instance_uid, modified_at
    )
    return InstanceHeader(
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class_uid,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        transfer_syntax_uid=meta.transfer_syntax_uid,
        specific_character_set=values.specific_character_set(),
        patient_id=values.text(_PATIENT_ID),
        patient_name=values.person_name(_PATIENT_NAME),
        referring_physician_name=values.alphabetic_name(_REFERRING_PHYSICIAN_NAME),
        study_date=values.text(_STUDY_DATE),
        study_time=values.text(_STUDY_TIME),
        study_description=values.text(_STUDY_DESCRIPTION),
        study_id=values.text(_STUDY_ID),
        accession_number=values.text(_ACCESSION_NUMBER),
        modality=values.text(_MODALITY),
        series_number=values.number(_SERIES_NUMBER),
        series_description=values.text(_SERIES_DESCRIPTION),
        instance_number=values.number(_INSTANCE_NUMBER),
        rows=values.number(_ROWS),
        columns=values.number(_COLUMNS),
        number_of_frames=values.number(_NUMBER_OF_FRAMES),
        data_set_offset=meta.end,
        directory_record_type=record_type,
        directory_record_keys=record_keys,
    )


_DICOMDIR_REASON: Final = (
    "this is a DICOMDIR (Media Storage Directory, SOP Class 1.2.840.10008.1.3.10), not an "
    "instance: dcmdb writes its own DICOMDIRs; put the image files it indexes into incoming/ "
    "instead"
)


def read_instance(path: Path) -> tuple[InstanceHeader, FileIdentity]:
    """Read the header of the DICOM file at `path` and prove the file is whole.

    The file is opened once; FileIdentity comes from fstat of that open file, so it names the
    version that was read. Raises IncompleteFileError (retry later), NotAcceptedError (never
    acceptable) or OSError with an errno (cannot open/read: vanished, permissions, I/O).
    """
    with open(path, "rb") as fh:
        stat = os.fstat(fh.fileno())
        identity = FileIdentity(
            device=stat.st_dev, inode=stat.st_ino, size=stat.st_size, mtime_ns=stat.st_mtime_ns
        )
        size = stat.st_size
        head = fh.read(_HEAD_LENGTH)
        _check_prefix(head, size)
        meta = _read_file_meta(fh, size, head)
        if meta.media_storage_sop_class_uid == _MEDIA_STORAGE_DIRECTORY:
            raise NotAcceptedError(_DICOMDIR_REASON)
        if meta.end >= size:
            raise IncompleteFileError(
                f"the file ends after its File Meta Information, before the data set; {_CUT_SHORT}"
            )
        implicit_vr = _first_element_is_implicit(
            fh, meta.end, size, meta.transfer_syntax_uid == _IMPLICIT_VR_LITTLE_ENDIAN
        )
        try:
            ds = _read_header(fh, meta, implicit_vr)
            values = _Values(ds)
            _check_complete(fh, size, ds, values, meta, implicit_vr)
            if values.uid(_SOP_CLASS_UID) == _MEDIA_STORAGE_DIRECTORY:
                raise NotAcceptedError(_DICOMDIR_REASON)
            header = _header(ds, values, meta, stat.st_mtime)
        except OSError as exc:
            if exc.errno is not None:
                raise
            _raise_parse_failure(fh, size, meta, implicit_vr, exc)
        except _PARSE_ERRORS as exc:
            _raise_parse_failure(fh, size, meta, implicit_vr, exc)
    return header, identity


def _stop_at_pixel_data(tag: int, _vr: str | None, _length: int) -> bool:
    return tag in _PIXEL_TAGS


def _read_header(fh: BinaryIO, meta: _FileMeta, implicit_vr: bool) -> Dataset:
    """The data set up to its pixel data, leaving fh on the pixel data element's tag.

    The File Meta is already read: pydicom parses just the data set from where it starts
    (reading the preamble and File Meta again cost a fifth of the parse).
    """
    if meta.transfer_syntax_uid == _DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        fh.seek(0)  # pydicom inflates the stream itself
        return dcmread(fh, stop_before_pixels=True)
    fh.seek(meta.end)
    return read_dataset(
        fh,
        implicit_vr,
        meta.transfer_syntax_uid != _EXPLICIT_VR_BIG_ENDIAN,
        stop_when=_stop_at_pixel_data,
    )


def _raise_parse_failure(
    fh: BinaryIO, size: int, meta: _FileMeta, implicit_vr: bool, error: Exception
) -> NoReturn:
    """pydicom gave up: a cut-short file is incomplete, anything else is not accepted."""
    logger.debug("pydicom could not parse %s: %s", getattr(fh, "name", "?"), type(error).__name__)
    if meta.transfer_syntax_uid == _DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        _inflate(fh, meta.end, size)
    else:
        little_endian = meta.transfer_syntax_uid != _EXPLICIT_VR_BIG_ENDIAN
        walker = _Walker(fh, size, little_endian=little_endian)
        _walk_data_set(walker, meta.end, meta.transfer_syntax_uid, implicit_vr)
    raise NotAcceptedError(
        f"pydicom cannot decode the data set ({type(error).__name__}: {error}): {_RESEND}"
    ) from error


# --- series facts for NIfTI conversion ---------------------------------------------------
#
# What daemon.nifti needs to decide whether a series can become a volume, and what its JSON
# sidecar reports, read from the headers only: each file is parsed up to its pixel data with
# only the elements below kept (pydicom skips the values of all others), and the File Meta
# read and the raw value decoding are this module's own (see _Values). The archived files
# were proven whole at ingest, so nothing here walks the rest of the file.


@dataclass(frozen=True, slots=True)
class AcquisitionFacts:
    """The acquisition values of one image instance, in DICOM's own units (PS3.3 C.8.3.1,
    C.8.13.5): times in ms, angles in degrees, field strength in T, thickness in mm. Strings
    are decoded and stripped; a value the instance lacks is "" or None. Enhanced (multi-frame)
    instances give their timing from the Shared Functional Groups (PS3.3 C.7.6.16) when it is
    there and not per frame."""

    modality: str
    manufacturer: str
    manufacturers_model_name: str
    magnetic_field_strength_t: float | None
    echo_time_ms: float | None
    repetition_time_ms: float | None
    flip_angle_degrees: float | None
    slice_thickness_mm: float | None
    series_description: str
    protocol_name: str
    series_number: int | None
    acquisition_time: str  # DICOM TM ("HHMMSS.FFFFFF"), "" when absent
    image_type: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class InstanceFacts:
    """What NIfTI conversion needs to know about one instance file."""

    path: Path
    sop_class_uid: str
    sop_class_name: str  # pydicom's UID dictionary name; the UID itself when unknown (private)
    # An image Storage SOP Class: not SR, RT plan/structure set/dose, waveform, presentation
    # state, key object selection, encapsulated document, segmentation, raw data, ...
    image_storage: bool
    has_pixel_data: bool
    image_type: tuple[str, ...]  # upper case, as in (0008,0008)
    # Image Orientation (Patient) (0020,0037): six direction cosines; () when absent (an
    # enhanced multi-frame instance has it in its functional groups)
    image_orientation: tuple[float, ...]
    rows: int | None
    columns: int | None
    number_of_frames: int | None
    series_number: int | None
    instance_number: int | None
    echo_number: int | None  # the first value of Echo Numbers (0018,0086)
    acquisition: AcquisitionFacts

    @property
    def is_image(self) -> bool:
        """An image a converter can make a volume of (its class and its pixel data)."""
        return self.image_storage and self.has_pixel_data


@dataclass(frozen=True, slots=True)
class SeriesFacts:
    """The facts of every file of one series, in the order the paths were given."""

    instances: tuple[InstanceFacts, ...]


_IMAGE_TYPE: Final = 0x00080008
_ACQUISITION_DATE_TIME: Final = 0x0008002A
_ACQUISITION_TIME: Final = 0x00080032
_MANUFACTURER: Final = 0x00080070
_MANUFACTURERS_MODEL_NAME: Final = 0x00081090
_SLICE_THICKNESS: Final = 0x00180050
_REPETITION_TIME: Final = 0x00180080
_ECHO_TIME: Final = 0x00180081
_ECHO_NUMBERS: Final = 0x00180086
_MAGNETIC_FIELD_STRENGTH: Final = 0x00180087
_PROTOCOL_NAME: Final = 0x00181030
_FLIP_ANGLE: Final = 0x00181314
_IMAGE_ORIENTATION_PATIENT: Final = 0x00200037
_SHARED_FUNCTIONAL_GROUPS: Final = 0x52009229
_PER_FRAME_FUNCTIONAL_GROUPS: Final = 0x52009230
# inside the functional groups (PS3.3 C.8.13.5.2, C.8.13.5.6, C.7.6.16.2.1)
_MR_TIMING_AND_RELATED_PARAMETERS: Final = 0x00189112
_MR_ECHO: Final = 0x00189114
_EFFECTIVE_ECHO_TIME: Final = 0x00189082
_PIXEL_MEASURES: Final = 0x00289110

# Bytes read at once from the start of a file: preamble, File Meta and the usual header.
_FACT_HEAD_LENGTH: Final = 1 << 17

_FACT_TAGS: Final = [
    _SPECIFIC_CHARACTER_SET,
    _IMAGE_TYPE,
    _SOP_CLASS_UID,
    _ACQUISITION_DATE_TIME,
    _ACQUISITION_TIME,
    _MODALITY,
    _MANUFACTURER,
    _SERIES_DESCRIPTION,
    _MANUFACTURERS_MODEL_NAME,
    _SLICE_THICKNESS,
    _REPETITION_TIME,
    _ECHO_TIME,
    _ECHO_NUMBERS,
    _MAGNETIC_FIELD_STRENGTH,
    _PROTOCOL_NAME,
    _FLIP_ANGLE,
    _SERIES_NUMBER,
    _INSTANCE_NUMBER,
    _IMAGE_ORIENTATION_PATIENT,
    _NUMBER_OF_FRAMES,
    _ROWS,
    _COLUMNS,
    _SHARED_FUNCTIONAL_GROUPS,
]

# Storage SOP Classes that carry pixel data but are not images of the patient to make a
# volume of (PS3.3 A.51: a segmentation is labels over another series' images).
_NON_IMAGE_PIXEL_CLASSES: Final = frozenset({sop.SegmentationStorage})

_FLOAT_VRS: Final = {"FD": "d", "FL": "f"}


def _floats(values: _Values, tag: int) -> list[float]:
    """The element's numbers: DS/IS text or FD/FL binary; [] when absent or malformed."""
    element = values.elements.get(tag)
    if element is None or element.value is None:
        return []
    raw = element.value
    vr = values._vr(element)
    if isinstance(element, RawDataElement) and isinstance(raw, bytes) and vr in _FLOAT_VRS:
        code = _FLOAT_VRS[vr]
        width = struct.calcsize(code)
        endian = "<" if element.is_little_endian else ">"
        count = len(raw) // width
        return [float(v) for v in struct.unpack(f"{endian}{count}{code}", raw[: count * width])]
    numbers = []
    for text in values.values(tag):
        try:
            number = float(text)
        except ValueError:
            return []
        if not math.isfinite(number):
            return []
        numbers.append(number)
    return numbers


def _first_float(values: _Values, tag: int) -> float | None:
    numbers = _floats(values, tag)
    return numbers[0] if numbers else None


def _item_values(values: _Values, *path: int) -> _Values | None:
    """The first item at the end of a path of sequences (e.g. shared groups -> MR Echo)."""
    current = values
    for tag in path:
        element = current.elements.get(tag)
        sequence = element.value if element is not None else None
        if not sequence or isinstance(sequence, str | bytes):
            return None
        item = sequence[0]
        if not isinstance(item, Dataset):
            return None
        current = _Values(item)
    return current


def _from_shared_groups(values: _Values, group: int, tag: int) -> float | None:
    item = _item_values(values, _SHARED_FUNCTIONAL_GROUPS, group)
    return None if item is None else _first_float(item, tag)


def _acquisition_time(values: _Values) -> str:
    time_of_day = values.text(_ACQUISITION_TIME)
    if time_of_day:
        return time_of_day
    # PS3.5 6.2 DT: YYYYMMDDHHMMSS.FFFFFF&ZZXX; the time of day follows the 8-digit date
    date_time = values.text(_ACQUISITION_DATE_TIME)
    return date_time[8:].split("+")[0].split("-")[0] if len(date_time) > 8 else ""


def _acquisition_facts(values: _Values, image_type: tuple[str, ...]) -> AcquisitionFacts:
    echo_time = _first_float(values, _ECHO_TIME)
    if echo_time is None:
        echo_time = _from_shared_groups(values, _MR_ECHO, _EFFECTIVE_ECHO_TIME)
    repetition_time = _first_float(values, _REPETITION_TIME)
    if repetition_time is None:
        repetition_time = _from_shared_groups(
            values, _MR_TIMING_AND_RELATED_PARAMETERS, _REPETITION_TIME
        )
    flip_angle = _first_float(values, _FLIP_ANGLE)
    if flip_angle is None:
        flip_angle = _from_shared_groups(values, _MR_TIMING_AND_RELATED_PARAMETERS, _FLIP_ANGLE)
    slice_thickness = _first_float(values, _SLICE_THICKNESS)
    if slice_thickness is None:
        slice_thickness = _from_shared_groups(values, _PIXEL_MEASURES, _SLICE_THICKNESS)
    return AcquisitionFacts(
        modality=values.text(_MODALITY),
        manufacturer=values.text(_MANUFACTURER),
        manufacturers_model_name=values.text(_MANUFACTURERS_MODEL_NAME),
        magnetic_field_strength_t=_first_float(values, _MAGNETIC_FIELD_STRENGTH),
        echo_time_ms=echo_time,
        repetition_time_ms=repetition_time,
        flip_angle_degrees=flip_angle,
        slice_thickness_mm=slice_thickness,
        series_description=values.text(_SERIES_DESCRIPTION),
        protocol_name=values.text(_PROTOCOL_NAME),
        series_number=values.number(_SERIES_NUMBER),
        acquisition_time=_acquisition_time(values),
        image_type=image_type,
    )


def _parse_fact_tags(
    data: bytes, start: int, implicit_vr: bool, little_endian: bool
) -> tuple[Dataset, int | None]:
    """Parse the data set in `data` from `start` with only _FACT_TAGS kept, up to its pixel
    data or its Per-frame Functional Groups (megabytes, and nothing needed here); return it
    and the tag it stopped at (None: it ran out of bytes first)."""
    stopped_at: list[int] = []

    def stop(tag: int, _vr: str | None, _length: int) -> bool:
        number = int(tag)  # BaseTag compares in Python; int in C
        if number == _PER_FRAME_FUNCTIONAL_GROUPS or number in _PIXEL_TAGS:
            stopped_at.append(number)
            return True
        return False

    source = io.BytesIO(data)
    source.seek(start)
    ds = read_dataset(source, implicit_vr, little_endian, stop_when=stop, specific_tags=_FACT_TAGS)
    return ds, stopped_at[0] if stopped_at else None


def _read_fact_header(path: Path) -> tuple[Dataset, _FileMeta, bool | None]:
    """The data set of `path` up to its pixel data (see _parse_fact_tags), and whether a pixel
    data element follows: None when the parse stopped at the Per-frame Functional Groups."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        data = fh.read(_FACT_HEAD_LENGTH)
        _check_prefix(data, size)
        meta = _read_file_meta(fh, size, data)
        if meta.transfer_syntax_uid == _DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            data, start, size = _inflate(fh, meta.end, size), 0, 0
            implicit_vr, little_endian = False, True
        else:
            start = meta.end
            implicit_vr = _first_element_is_implicit(
                fh, meta.end, size, meta.transfer_syntax_uid == _IMPLICIT_VR_LITTLE_ENDIAN
            )
            little_endian = meta.transfer_syntax_uid != _EXPLICIT_VR_BIG_ENDIAN
        # The header is parsed from bytes in memory (a file object costs system calls per
        # element). Stopping at the pixel data proves every element before it was in those
        # bytes; running out of them first (an element cut at their end reads short without
        # an error) means the header goes on in the file: read more and parse again.
        while True:
            try:
                ds, stopped_at = _parse_fact_tags(data, start, implicit_vr, little_endian)
            except (*_PARSE_ERRORS, OSError) as exc:  # no I/O here: OSError is a parse error
                if len(data) >= size:
                    raise NotAcceptedError(
                        f"pydicom cannot decode the header ({type(exc).__name__}): {_RESEND}"
                    ) from exc
                stopped_at = None
            else:
                if stopped_at is not None or len(data) >= size:
                    break
            fh.seek(len(data))
            data += fh.read(len(data))
    if stopped_at is None:
        return ds, meta, False
    return ds, meta, None if stopped_at == _PER_FRAME_FUNCTIONAL_GROUPS else True


def _instance_facts(path: Path) -> InstanceFacts:
    ds, meta, pixel_data_follows = _read_fact_header(path)
    values = _Values(ds)
    sop_class_uid = values.uid(_SOP_CLASS_UID) or meta.media_storage_sop_class_uid
    rows = values.number(_ROWS)
    if pixel_data_follows is None:
        # the pixel data comes after the per-frame groups; ingest proved that an instance
        # with Rows has it (see _check_complete)
        pixel_data_follows = rows is not None
    image_type = tuple(value.upper() for value in values.values(_IMAGE_TYPE))
    orientation = _floats(values, _IMAGE_ORIENTATION_PATIENT)
    echo_numbers = values.values(_ECHO_NUMBERS)
    return InstanceFacts(
        path=path,
        sop_class_uid=sop_class_uid,
        sop_class_name=UID(sop_class_uid).name if sop_class_uid else "no SOP Class UID",
        image_storage=sop_class_uid not in _DIRECTORY_RECORD_TYPES
        and sop_class_uid not in _NON_IMAGE_PIXEL_CLASSES,
        has_pixel_data=pixel_data_follows,
        image_type=image_type,
        image_orientation=tuple(orientation) if len(orientation) == 6 else (),
        rows=rows,
        columns=values.number(_COLUMNS),
        number_of_frames=values.number(_NUMBER_OF_FRAMES),
        series_number=values.number(_SERIES_NUMBER),
        instance_number=values.number(_INSTANCE_NUMBER),
        echo_number=values.number(_ECHO_NUMBERS) if echo_numbers else None,
        acquisition=_acquisition_facts(values, image_type),
    )


def read_series_facts(paths: tuple[Path, ...] | list[Path]) -> SeriesFacts:
    """The facts of each file of one series (headers only; fast: no pixel data is read).

    Raises NotAcceptedError naming the file when one is not DICOM or its header cannot be
    decoded, IncompleteFileError when one is cut short, and OSError when one cannot be read.
    """
    instances = []
    for path in paths:
        try:
            instances.append(_instance_facts(path))
        except RejectedFileError as exc:
            raise type(exc)(f"{path}: {exc.reason}") from None
    return SeriesFacts(instances=tuple(instances))


# --- pydicom's character set table -------------------------------------------------------


def pydicom_character_sets() -> dict[str, str]:
    """A copy of pydicom's table from Specific Character Set terms (PS3.3 C.12.1.1.2) to
    Python codecs, to put back with restore_pydicom_character_sets after code that changes
    it: importing dicom2nifti rewrites entries process-wide (ISO 2022 IR 159 to a codec that
    cannot decode JIS X 0212, ISO 2022 IR 58 to another), which would change how this module
    decodes names."""
    from pydicom.charset import python_encoding

    return dict(python_encoding)


def restore_pydicom_character_sets(table: dict[str, str]) -> None:
    """Make pydicom's character set table `table` again (see pydicom_character_sets)."""
    from pydicom.charset import python_encoding

    python_encoding.clear()
    python_encoding.update(table)
