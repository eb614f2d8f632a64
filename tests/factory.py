"""Generate conformant, realistic DICOM series with pydicom, for tests and benchmarks.

Every series is a stack of single-frame images (MR Image Storage for "MR", CT Image Storage for
"CT", Secondary Capture otherwise) with consistent geometry: ImageOrientationPatient,
ImagePositionPatient, PixelSpacing, SliceThickness and SliceLocation agree, so a converter can
rebuild the volume. Pixel data is int16 with a known pattern (see `pixel_pattern`), so a test
can check what a reader or converter produced.

Speed matters (the benchmark writes tens of thousands of files): `write_series` builds one
template Dataset per series, has pydicom encode its constant elements once, and per slice has
pydicom encode only the per-slice elements (UIDs, InstanceNumber, position, pixels) and splices
them in. The result is byte for byte what `dcmwrite` writes for the same data set (a test in
test_dicomfile.py checks it).
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_data_element
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

Orientation = Literal["axial", "coronal", "sagittal", "oblique"]

# Row and column direction cosines (LPS patient coordinates, PS3.3 C.7.6.2.1.1).
_ORIENTATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    # axial tilted 20 degrees about the left-right axis, as for an AC-PC aligned stack
    "oblique": (
        (1.0, 0.0, 0.0),
        (0.0, math.cos(math.radians(20.0)), -math.sin(math.radians(20.0))),
    ),
}

_SOP_CLASSES: dict[str, UID] = {"MR": MRImageStorage, "CT": CTImageStorage}

NATIVE_TRANSFER_SYNTAXES = frozenset(
    {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    }
)
SUPPORTED_TRANSFER_SYNTAXES = NATIVE_TRANSFER_SYNTAXES | {RLELossless}

_SERIES_DESCRIPTIONS = ("T1", "T2", "FLAIR", "DWI", "SWI", "T1_POST", "PD", "BOLD")


@dataclass
class SeriesSpec:
    """One series to generate. UIDs left as None are generated (fresh on each call)."""

    patient_name: str = "Doe^Jane"
    patient_id: str = "PID001"
    referring_physician: str | None = "Smith^John"  # None: element absent; "": empty value
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    study_description: str = "Brain"
    series_description: str = "T1"
    series_number: int = 1
    modality: str = "MR"
    slices: int = 5
    rows: int = 64
    columns: int = 64
    orientation: Orientation = "axial"
    slice_spacing: float = 3.0
    pixel_spacing: tuple[float, float] = (1.0, 1.0)  # (between rows, between columns) in mm
    descending: bool = False  # slice 1 at the far end of the normal, stepping back
    specific_character_set: str | None = None  # e.g. "ISO_IR 100", "\\ISO 2022 IR 87"
    study_date: str = "20260101"
    transfer_syntax: str = ExplicitVRLittleEndian
    # "pattern": `pixel_pattern`, exact and checkable; "phantom": an MR-like head with noise,
    # which compresses like scanner data does (benchmarks of gzip'd NIfTI need that).
    texture: Literal["pattern", "phantom"] = "pattern"


def slice_normal(orientation: Orientation) -> np.ndarray:
    """The unit normal (row cosine x column cosine) for an orientation."""
    row, column = _ORIENTATIONS[orientation]
    return np.cross(np.array(row), np.array(column))


def slice_position(spec: SeriesSpec, index: int) -> np.ndarray:
    """ImagePositionPatient of slice `index` (0-based): the volume is centred on the origin."""
    row, column = (np.array(v) for v in _ORIENTATIONS[spec.orientation])
    normal = np.cross(row, column)
    row_spacing, column_spacing = spec.pixel_spacing
    step = spec.slices - 1 - index if spec.descending else index
    corner = (
        -row * column_spacing * (spec.columns - 1) / 2.0
        - column * row_spacing * (spec.rows - 1) / 2.0
        - normal * spec.slice_spacing * (spec.slices - 1) / 2.0
    )
    return corner + normal * spec.slice_spacing * step


def pixel_pattern(rows: int, columns: int, index: int) -> np.ndarray:
    """The int16 pixels of slice `index` (0-based): (row + 2 * column) % 1000 + 1000 * index,
    wrapped into 0..32767, so every slice differs and a transposed or flipped image is caught."""
    base = _base_pattern(rows, columns)
    return ((base.astype(np.int32) + 1000 * index) % 32768).astype(np.int16)


def phantom_slice(spec: SeriesSpec, index: int) -> np.ndarray:
    """Slice `index` of an ellipsoid "head" (tissue rings around 600-900) in noise, 12-bit like
    MR; the same for the same spec and index."""
    rng = np.random.default_rng(index)
    rows = (np.arange(spec.rows) - spec.rows / 2) / (0.42 * spec.rows)
    columns = (np.arange(spec.columns) - spec.columns / 2) / (0.36 * spec.columns)
    depth = (index - spec.slices / 2) / (0.48 * max(spec.slices, 1))
    radius = np.sqrt(rows[:, None] ** 2 + columns[None, :] ** 2 + depth**2)
    tissue = np.where(radius < 1.0, 750 + 150 * np.cos(9.0 * radius), 0.0)
    noise = np.abs(rng.normal(0.0, 18.0, (spec.rows, spec.columns)))
    return np.clip(tissue + noise, 0, 4095).astype(np.int16)


def _base_pattern(rows: int, columns: int) -> np.ndarray:
    row_index = np.arange(rows, dtype=np.int32)[:, None]
    column_index = np.arange(columns, dtype=np.int32)[None, :]
    return ((row_index + 2 * column_index) % 1000).astype(np.int16)


def _ds(value: float) -> str:
    """Format a number as a DS value (PS3.5 6.2: at most 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _encoding(transfer_syntax: str) -> tuple[bool, bool]:
    """(implicit VR, little endian) of the data set as written before any compression."""
    if transfer_syntax == ImplicitVRLittleEndian:
        return True, True
    if transfer_syntax == ExplicitVRBigEndian:
        return False, False
    return False, True


class _SeriesTemplate:
    """One Dataset per series; `apply(index)` rewrites only the per-slice elements."""

    def __init__(self, spec: SeriesSpec) -> None:
        if spec.transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
            raise ValueError(
                f"factory cannot write transfer syntax {spec.transfer_syntax}; "
                f"use one of {sorted(SUPPORTED_TRANSFER_SYNTAXES)}"
            )
        if spec.slices < 1:
            raise ValueError("a series needs at least one slice")
        self.spec = spec
        self.study_instance_uid = spec.study_instance_uid or generate_uid()
        self.series_instance_uid = spec.series_instance_uid or generate_uid()
        self.sop_class_uid = _SOP_CLASSES.get(spec.modality, SecondaryCaptureImageStorage)
        self.implicit_vr, self.little_endian = _encoding(spec.transfer_syntax)
        self._base_pixels = _base_pattern(spec.rows, spec.columns).astype(np.int32)
        self._pixel_dtype = np.dtype("<i2" if self.little_endian else ">i2")
        normal = slice_normal(spec.orientation)
        self._positions = []
        for index in range(spec.slices):
            position = slice_position(spec, index)
            location = _ds(float(np.dot(position, normal)))
            self._positions.append(([_ds(v) for v in position], location))
        self.dataset = self._build()
        self._encoded: _EncodedSeries | None = None

    def _build(self) -> Dataset:
        spec = self.spec
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = self.sop_class_uid
        meta.MediaStorageSOPInstanceUID = UID("1.2")  # replaced per slice
        meta.TransferSyntaxUID = UID(spec.transfer_syntax)
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "DCMDB_TEST"
        meta.FileMetaInformationVersion = b"\x00\x01"

        ds = Dataset()
        ds.file_meta = meta
        if spec.specific_character_set is not None:
            values = spec.specific_character_set.split("\\")
            ds.SpecificCharacterSet = values if len(values) > 1 else values[0]
        third = {"MR": "M", "CT": "AXIAL"}.get(spec.modality, "OTHER")
        ds.ImageType = ["ORIGINAL", "PRIMARY", third]
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = "1.2"  # replaced per slice
        ds.StudyDate = spec.study_date
        ds.SeriesDate = spec.study_date
        ds.ContentDate = spec.study_date
        ds.StudyTime = "083000"
        ds.SeriesTime = f"08{30 + spec.series_number % 30:02d}00"
        ds.ContentTime = ds.SeriesTime
        ds.AccessionNumber = "ACC" + self.study_instance_uid.replace(".", "")[-8:]
        ds.Modality = spec.modality
        if self.sop_class_uid == SecondaryCaptureImageStorage:
            ds.ConversionType = "WSD"
        ds.Manufacturer = "DCMDB"
        ds.InstitutionName = "Imaging Lab"
        if spec.referring_physician is not None:
            ds.ReferringPhysicianName = spec.referring_physician
        ds.StationName = "SCANNER1"
        ds.StudyDescription = spec.study_description
        ds.SeriesDescription = spec.series_description
        ds.ManufacturerModelName = "Factory"
        ds.PatientName = spec.patient_name
        ds.PatientID = spec.patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        if spec.modality == "MR":
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.SliceThickness = _ds(spec.slice_spacing)
            ds.RepetitionTime = "500"
            ds.EchoTime = "10"
            ds.EchoTrainLength = "1"
            ds.ImagingFrequency = "63.86"
            ds.MagneticFieldStrength = "1.5"
            ds.SpacingBetweenSlices = _ds(spec.slice_spacing)
        else:
            ds.SliceThickness = _ds(spec.slice_spacing)
        if spec.modality == "CT":
            ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = self.study_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.StudyID = "1"
        ds.SeriesNumber = spec.series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = 1  # replaced per slice
        ds.ImagePositionPatient = ["0", "0", "0"]  # replaced per slice
        row, column = _ORIENTATIONS[spec.orientation]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row, *column)]
        ds.FrameOfReferenceUID = generate_uid()
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = "0"  # replaced per slice
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = spec.rows
        ds.Columns = spec.columns
        ds.PixelSpacing = [_ds(spec.pixel_spacing[0]), _ds(spec.pixel_spacing[1])]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        if spec.modality == "CT":
            ds.RescaleIntercept = "-1024"
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
        ds.WindowCenter = "500"
        ds.WindowWidth = "1000"
        ds.PixelData = b""  # replaced per slice
        ds["PixelData"].VR = "OW"
        return ds

    def pixels(self, index: int) -> np.ndarray:
        if self.spec.texture == "phantom":
            return phantom_slice(self.spec, index).astype(self._pixel_dtype)
        values = (self._base_pixels + 1000 * index) % 32768
        return values.astype(self._pixel_dtype)

    def _slice_values(self, index: int) -> tuple[str, int, list[str], str]:
        """SOP Instance UID, InstanceNumber, ImagePositionPatient, SliceLocation of a slice."""
        position, location = self._positions[index]
        return generate_uid(prefix=None), index + 1, position, location

    def apply(self, index: int) -> Dataset:
        """Set the per-slice elements of slice `index` (0-based) and return the template."""
        ds = self.dataset
        sop_instance_uid, instance_number, position, location = self._slice_values(index)
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
        ds.SOPInstanceUID = sop_instance_uid
        ds.InstanceNumber = instance_number
        ds.ImagePositionPatient = position
        ds.SliceLocation = location
        if self.spec.transfer_syntax == RLELossless:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.PixelData = self.pixels(index).tobytes()
            ds["PixelData"].VR = "OW"
            ds.compress(RLELossless, encoding_plugin="pydicom")
        else:
            ds.PixelData = self.pixels(index).tobytes()
            ds["PixelData"].VR = "OW"
        return ds

    def write(self, path: Path, index: int) -> None:
        """Write slice `index` to `path`: what dcmwrite(apply(index)) writes, byte for byte."""
        if self.spec.transfer_syntax == RLELossless:
            dcmwrite(path, self.apply(index), enforce_file_format=True)
            return
        if self._encoded is None:
            self._encoded = _EncodedSeries(self.dataset, self.implicit_vr, self.little_endian)
        sop_instance_uid, instance_number, position, location = self._slice_values(index)
        data = self._encoded.encode(
            sop_instance_uid, instance_number, position, location, self.pixels(index).tobytes()
        )
        with open(path, "wb") as fh:
            fh.write(data)


# The elements that differ between slices of one series, in tag order.
_META_SOP_INSTANCE_UID = 0x00020003
_PER_SLICE_TAGS = (0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)


class _EncodedSeries:
    """A series template encoded once by pydicom; per slice only the per-slice elements are
    encoded (by pydicom's own element writer) and spliced between the constant runs."""

    def __init__(self, template: Dataset, implicit_vr: bool, little_endian: bool) -> None:
        self.implicit_vr = implicit_vr
        self.little_endian = little_endian
        self.deflate = template.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
        charset = template.get("SpecificCharacterSet")
        self.encodings: list[str] = (
            convert_encodings(charset) if charset is not None else [default_encoding]
        )
        meta = template.file_meta
        self.meta_before = self._encode_run(meta, 0x00020001, _META_SOP_INSTANCE_UID, True)
        self.meta_after = self._encode_run(meta, _META_SOP_INSTANCE_UID + 1, 0x00030000, True)
        # constant runs of the data set: before, between and after the per-slice elements
        bounds = [0x00030000, *_PER_SLICE_TAGS, 0xFFFFFFFF + 1]
        self.runs = [
            self._encode_run(template, start + (0 if i == 0 else 1), stop, False)
            for i, (start, stop) in enumerate(itertools.pairwise(bounds))
        ]

    def _buffer(self, meta: bool) -> DicomBytesIO:
        buffer = DicomBytesIO()
        buffer.is_implicit_VR = False if meta else self.implicit_vr
        buffer.is_little_endian = True if meta else self.little_endian
        return buffer

    def _encode_run(self, source: Dataset, start: int, stop: int, meta: bool) -> bytes:
        buffer = self._buffer(meta)
        for tag in sorted(source.keys()):
            if start <= tag < stop:
                write_data_element(buffer, source.get_item(tag), self.encodings)
        return bytes(buffer.getvalue())

    def _write(self, buffer: DicomBytesIO, tag: int, vr: str, value: object) -> None:
        # the values are ours and valid: skip pydicom's per-value PS3.5 validation (it costs
        # more than the encoding)
        element = DataElement(tag, vr, value, validation_mode=pydicom_config.IGNORE)
        write_data_element(buffer, element, self.encodings)

    def encode(
        self,
        sop_instance_uid: str,
        instance_number: int,
        position: list[str],
        location: str,
        pixels: bytes,
    ) -> bytes:
        """The whole file for one slice: preamble, File Meta, data set."""
        meta = self._buffer(meta=True)
        self._write(meta, _META_SOP_INSTANCE_UID, "UI", sop_instance_uid)
        uid_element = bytes(meta.getvalue())
        meta = self._buffer(meta=True)
        meta_length = len(self.meta_before) + len(uid_element) + len(self.meta_after)
        self._write(meta, 0x00020000, "UL", meta_length)

        fp = self._buffer(meta=False)
        runs = iter(self.runs)
        fp.write(next(runs))
        self._write(fp, 0x00080018, "UI", sop_instance_uid)
        fp.write(next(runs))
        self._write(fp, 0x00200013, "IS", str(instance_number))
        fp.write(next(runs))
        self._write(fp, 0x00200032, "DS", position)
        fp.write(next(runs))
        self._write(fp, 0x00201041, "DS", location)
        fp.write(next(runs))
        self._write(fp, 0x7FE00010, "OW", pixels)
        fp.write(next(runs))
        data_set = bytes(fp.getvalue())
        if self.deflate:
            # PS3.5 A.5: the whole data set deflated (raw RFC 1951), padded to even length
            compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            data_set = compressor.compress(data_set) + compressor.flush()
            if len(data_set) % 2:
                data_set += b"\x00"
        return b"".join(
            (
                _PREAMBLE,
                bytes(meta.getvalue()),
                self.meta_before,
                uid_element,
                self.meta_after,
                data_set,
            )
        )


_PREAMBLE = b"\x00" * 128 + b"DICM"


def make_dataset(spec: SeriesSpec, index: int) -> Dataset:
    """A complete Dataset (with file_meta) for slice `index` (0-based) of `spec`.

    With generated UIDs (spec UIDs left None) each call starts a new study and series; set
    `spec.study_instance_uid`/`series_instance_uid` to build slices of one series one by one.
    """
    if not 0 <= index < spec.slices:
        raise IndexError(f"slice index {index} outside 0..{spec.slices - 1}")
    return _SeriesTemplate(spec).apply(index)


def write_dataset(path: Path, ds: Dataset) -> Path:
    """Write `ds` as a DICOM file (preamble, File Meta, data set in its transfer syntax)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def write_series(out_dir: Path, spec: SeriesSpec, *, name_prefix: str = "IM") -> list[Path]:
    """Write one file per slice as `<out_dir>/<name_prefix><NNNN>.dcm` (InstanceNumber 1..n);
    return the paths in slice order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    template = _SeriesTemplate(spec)
    paths = []
    for index in range(spec.slices):
        path = out_dir / f"{name_prefix}{index + 1:04d}.dcm"
        template.write(path, index)
        paths.append(path)
    return paths


def write_studies(
    out_dir: Path,
    *,
    physicians: Sequence[str],
    studies_per_physician: int,
    series_per_study: int,
    slices_per_series: int,
    rows: int = 64,
    columns: int = 64,
) -> list[Path]:
    """Write a whole generated set as `<out_dir>/STUDY<nnnn>/SERIES<nn>/IM<nnnn>.dcm`.

    Every study has its own patient ("Patient<nnnn>^Test", "PID<nnnn>"), referred by one of
    `physicians` in turn ("" gives an empty ReferringPhysicianName); series are numbered 1..n
    with distinct descriptions. Returns every path written.
    """
    paths: list[Path] = []
    counter = itertools.count(1)
    for physician in physicians:
        for _ in range(studies_per_physician):
            study_number = next(counter)
            study_instance_uid = generate_uid()
            study_dir = out_dir / f"STUDY{study_number:04d}"
            for series_number in range(1, series_per_study + 1):
                spec = SeriesSpec(
                    patient_name=f"Patient{study_number:04d}^Test",
                    patient_id=f"PID{study_number:04d}",
                    referring_physician=physician,
                    study_instance_uid=study_instance_uid,
                    study_description=f"Study {study_number}",
                    series_description=_SERIES_DESCRIPTIONS[
                        (series_number - 1) % len(_SERIES_DESCRIPTIONS)
                    ],
                    series_number=series_number,
                    slices=slices_per_series,
                    rows=rows,
                    columns=columns,
                )
                paths += write_series(study_dir / f"SERIES{series_number:02d}", spec)
    return paths
