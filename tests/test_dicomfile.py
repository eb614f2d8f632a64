"""Tests for daemon.dicomfile: header values, file identity, and telling a whole file from a
cut-short one and from something that is not an instance at all. Real files only."""

from __future__ import annotations

import io
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.fileset import DIRECTORY_RECORDERS
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    SegmentationStorage,
)

from daemon.dicomfile import (
    IncompleteFileError,
    NotAcceptedError,
    RejectedFileError,
    data_set_offset,
    read_instance,
)
from daemon.model import InstanceHeader
from tests.conftest import fixtures_dir, fixtures_path
from tests.factory import SeriesSpec, make_dataset, pixel_pattern, write_dataset, write_series


def fixture_copy(tmp_path: Path, relative: str) -> Path:
    """Copy one fixture into tmp_path (the fixtures are read-only and shared)."""
    source = fixtures_dir() / relative
    target = tmp_path / "fixture" / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def fixture_dir_file(relative: str) -> Path:
    """A fixture to read in place (never to write)."""
    return fixtures_dir() / relative


def cut(path: Path, length: int) -> Path:
    """A copy of `path` holding only its first `length` bytes."""
    target = path.with_name(f"{path.stem}-cut{length}{path.suffix}")
    target.write_bytes(path.read_bytes()[:length])
    return target


def one_file(tmp_path: Path, **spec: object) -> Path:
    (path,) = write_series(tmp_path / "generated", SeriesSpec(slices=1, **spec))  # type: ignore[arg-type]
    return path


def write(tmp_path: Path, dataset: Dataset, name: str = "built.dcm") -> Path:
    return write_dataset(tmp_path / name, dataset)


def value_offset(path: Path, keyword: str) -> int:
    """Where the value of a top-level element starts in the file (pydicom's value_tell)."""
    dataset = pydicom.dcmread(path, stop_before_pixels=keyword != "PixelData")
    element = dataset.get_item(keyword)
    assert element is not None
    # a raw element knows its value_tell; a sequence pydicom parsed keeps it as file_tell
    position = getattr(element, "value_tell", None)
    if position is None:
        position = element.file_tell
    assert position is not None
    return int(position)


def element_offset(path: Path, keyword: str) -> int:
    """Where a short-VR element starts in an explicit VR file (tag, VR, 2-byte length)."""
    return value_offset(path, keyword) - 8


# --- header values ----------------------------------------------------------------------


def test_a_generated_file_reads_back_with_every_header_field_right(tmp_path: Path) -> None:
    spec = SeriesSpec(
        patient_name="Doe^Jane",
        patient_id="PID042",
        referring_physician="Smith^John",
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid="1.2.826.0.1.3680043.8.498.1.2",
        study_description="Brain tumour follow-up",
        series_description="T2 FLAIR",
        series_number=7,
        modality="MR",
        slices=4,
        rows=48,
        columns=40,
        specific_character_set="ISO_IR 100",
        study_date="20260314",
    )
    path = write_series(tmp_path, spec)[2]
    written = pydicom.dcmread(path)

    header, _ = read_instance(path)

    assert header.sop_instance_uid == written.SOPInstanceUID
    assert header.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4"
    assert header.study_instance_uid == "1.2.826.0.1.3680043.8.498.1"
    assert header.series_instance_uid == "1.2.826.0.1.3680043.8.498.1.2"
    assert header.transfer_syntax_uid == ExplicitVRLittleEndian
    assert header.specific_character_set == "ISO_IR 100"
    assert header.patient_id == "PID042"
    assert header.patient_name == "Doe^Jane"
    assert header.referring_physician_name == "Smith^John"
    assert header.study_date == "20260314"
    assert header.study_time == written.StudyTime
    assert header.study_description == "Brain tumour follow-up"
    assert header.study_id == written.StudyID
    assert header.accession_number == written.AccessionNumber
    assert header.accession_number  # the factory writes one
    assert header.modality == "MR"
    assert header.series_number == 7
    assert header.series_description == "T2 FLAIR"
    assert header.instance_number == 3
    assert (header.rows, header.columns) == (48, 40)
    assert header.number_of_frames is None
    # PS3.10 7.1: preamble + "DICM" + (0002,0000) element (12 bytes) + the group it counts
    assert header.data_set_offset == 132 + 12 + written.file_meta.FileMetaInformationGroupLength


def test_file_identity_is_the_os_stat_of_the_file_that_was_read(tmp_path: Path) -> None:
    path = one_file(tmp_path)
    os.utime(path, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))

    _, identity = read_instance(path)

    stat = os.stat(path)
    assert identity.device == stat.st_dev
    assert identity.inode == stat.st_ino
    assert identity.size == stat.st_size
    assert identity.mtime_ns == stat.st_mtime_ns == 1_700_000_000_123_456_789


def test_data_set_offset_points_at_the_first_data_set_element(tmp_path: Path) -> None:
    path = one_file(tmp_path)

    offset = data_set_offset(path)

    assert offset == read_instance(path)[0].data_set_offset
    # the factory's first data set element is (0008,0008) Image Type, explicit VR CS
    assert path.read_bytes()[offset : offset + 6] == b"\x08\x00\x08\x00CS"


def test_two_files_with_different_file_meta_have_the_same_data_set_bytes(
    tmp_path: Path,
) -> None:
    original = one_file(tmp_path)
    dataset = pydicom.dcmread(original)
    dataset.file_meta.SourceApplicationEntityTitle = "OTHER_PACS"
    resent = write(tmp_path, dataset, "resent.dcm")

    original_data = original.read_bytes()[data_set_offset(original) :]
    resent_data = resent.read_bytes()[data_set_offset(resent) :]

    assert data_set_offset(resent) > data_set_offset(original)
    assert original_data == resent_data


def test_uids_lose_trailing_nul_and_space_padding_and_strings_are_stripped(
    tmp_path: Path,
) -> None:
    dataset = make_dataset(SeriesSpec(), 0)
    dataset.StudyInstanceUID = "1.2.3.4"  # odd length: pydicom pads it with a NUL
    dataset.SeriesDescription = "  T1 axial "
    path = write(tmp_path, dataset)
    assert b"1.2.3.4\x00" in path.read_bytes()

    header, _ = read_instance(path)

    assert header.study_instance_uid == "1.2.3.4"
    assert header.series_description == "T1 axial"


@pytest.mark.parametrize(
    ("keyword", "raw_value"),
    [("SeriesNumber", b"ab"), ("InstanceNumber", b".5"), ("SeriesNumber", b"  ")],
)
def test_a_malformed_integer_string_reads_as_none(
    tmp_path: Path, keyword: str, raw_value: bytes
) -> None:
    path = one_file(tmp_path, series_number=77)
    data = bytearray(path.read_bytes())
    start = value_offset(path, keyword)
    length = struct.unpack("<H", data[start - 2 : start])[0]
    assert length == len(raw_value)  # "77" and InstanceNumber "1 " are two bytes each
    data[start : start + length] = raw_value
    path.write_bytes(bytes(data))

    header, _ = read_instance(path)

    number = header.series_number if keyword == "SeriesNumber" else header.instance_number
    assert number is None


def test_number_of_frames_of_an_enhanced_multiframe_file_is_read(tmp_path: Path) -> None:
    path = fixture_copy(tmp_path, "dcm_qa_enh_siemens/In/Siemens/XA10/6_1.dcm")

    header, _ = read_instance(path)

    assert header.number_of_frames == 6
    assert (header.rows, header.columns) == (64, 64)
    assert header.referring_physician_name == "Luci"


# PS3.5 H.3.1: "Yamada^Tarou=山田^太郎=やまだ^たろう" in ISO 2022 IR 87, byte for byte
YAMADA_ISO_2022_IR_87 = (
    b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B"
)


def test_a_japanese_iso_2022_ir_87_referring_physician_reads_as_its_alphabetic_group(
    tmp_path: Path,
) -> None:
    dataset = make_dataset(SeriesSpec(specific_character_set="\\ISO 2022 IR 87"), 0)
    dataset.ReferringPhysicianName = YAMADA_ISO_2022_IR_87
    dataset.PatientName = YAMADA_ISO_2022_IR_87
    path = write(tmp_path, dataset)
    assert YAMADA_ISO_2022_IR_87 in path.read_bytes()

    header, _ = read_instance(path)

    assert header.specific_character_set == "\\ISO 2022 IR 87"
    assert header.referring_physician_name == "Yamada^Tarou"
    assert header.patient_name == "Yamada^Tarou=山田^太郎=やまだ^たろう"


def test_a_latin_1_referring_physician_is_decoded_with_the_files_character_set(
    tmp_path: Path,
) -> None:
    dataset = make_dataset(SeriesSpec(specific_character_set="ISO_IR 100"), 0)
    dataset.ReferringPhysicianName = "Müller^Jürgen".encode("latin-1")
    dataset.StudyDescription = "Schädel".encode("latin-1")
    path = write(tmp_path, dataset)
    assert b"M\xfcller^J\xfcrgen" in path.read_bytes()

    header, _ = read_instance(path)

    assert header.referring_physician_name == "Müller^Jürgen"
    assert header.study_description == "Schädel"


def test_a_real_hitachi_file_keeps_its_two_character_sets(tmp_path: Path) -> None:
    path = fixture_copy(tmp_path, "dicom2nifti_subset/In/hitachi/anatomical/001/001.dcm")

    header, _ = read_instance(path)

    assert header.specific_character_set == "ISO 2022 IR 6\\ISO 2022 IR 87"


def test_a_multi_valued_referring_physician_gives_the_first_value(tmp_path: Path) -> None:
    path = one_file(tmp_path, referring_physician="Smith^John\\Jones^Ann")
    assert pydicom.dcmread(path).ReferringPhysicianName[1] == "Jones^Ann"

    header, _ = read_instance(path)

    assert header.referring_physician_name == "Smith^John"


@pytest.mark.parametrize(
    ("written", "expected"),
    [(None, ""), ("", ""), ("^^^^", ""), ("Smith^John^^^", "Smith^John"), ("Luci", "Luci")],
)
def test_an_absent_or_empty_referring_physician_reads_as_empty(
    tmp_path: Path, written: str | None, expected: str
) -> None:
    path = one_file(tmp_path, referring_physician=written)

    header, _ = read_instance(path)

    assert header.referring_physician_name == expected


# --- whole or cut short ------------------------------------------------------------------


@pytest.mark.parametrize(
    "transfer_syntax",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian],
    ids=["explicit-le", "implicit-le", "explicit-be"],
)
def test_a_whole_generated_file_in_each_native_transfer_syntax_reads(
    tmp_path: Path, transfer_syntax: str
) -> None:
    path = one_file(tmp_path, transfer_syntax=transfer_syntax)
    assert np.array_equal(pydicom.dcmread(path).pixel_array, pixel_pattern(64, 64, 0))

    header, _ = read_instance(path)

    assert header.transfer_syntax_uid == transfer_syntax
    assert (header.rows, header.columns) == (64, 64)


CUT_POINTS = {
    "inside-the-preamble": lambda path: 100,
    "inside-the-file-meta": lambda path: 140,
    "right-after-the-file-meta": lambda path: data_set_offset(path),
    "mid-header": lambda path: data_set_offset(path) + 101,
    "between-rows-and-columns": lambda path: element_offset(path, "Columns"),
    "inside-the-pixel-data-header": lambda path: value_offset(path, "PixelData") - 3,
    "right-before-the-pixel-values": lambda path: value_offset(path, "PixelData"),
    "mid-pixel-data": lambda path: value_offset(path, "PixelData") + 4096,
    "one-byte-short": lambda path: path.stat().st_size - 1,
}


@pytest.mark.parametrize("where", list(CUT_POINTS))
def test_a_generated_file_cut_short_is_incomplete(tmp_path: Path, where: str) -> None:
    whole = one_file(tmp_path)
    short = cut(whole, CUT_POINTS[where](whole))

    with pytest.raises(IncompleteFileError) as error:
        read_instance(short)

    assert "cut short" in error.value.reason or "shorter than" in error.value.reason


@pytest.mark.parametrize(
    "transfer_syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian], ids=["implicit", "big"]
)
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9, 0.9999])
def test_a_cut_short_file_in_another_byte_order_or_vr_encoding_is_incomplete(
    tmp_path: Path, transfer_syntax: str, fraction: float
) -> None:
    whole = one_file(tmp_path, transfer_syntax=transfer_syntax)

    with pytest.raises(IncompleteFileError):
        read_instance(cut(whole, int(whole.stat().st_size * fraction)))


def test_pydicom_parses_the_truncated_fixture_but_read_instance_calls_it_incomplete(
    tmp_path: Path,
) -> None:
    path = fixture_copy(tmp_path, "pydicom_edge_cases/In/MR_truncated.dcm")
    assert pydicom.dcmread(path, stop_before_pixels=True).Rows == 64  # no complaint

    with pytest.raises(IncompleteFileError) as error:
        read_instance(path)

    assert "Pixel Data (7FE0,0010)" in error.value.reason


def test_an_image_whose_pixel_data_element_never_arrived_is_incomplete(tmp_path: Path) -> None:
    dataset = make_dataset(SeriesSpec(), 0)
    del dataset.PixelData
    path = write(tmp_path, dataset)

    with pytest.raises(IncompleteFileError) as error:
        read_instance(path)

    assert "Rows (0028,0010)" in error.value.reason
    assert "Pixel Data (7FE0,0010)" in error.value.reason


def test_pixel_data_shorter_than_rows_times_columns_is_not_accepted(tmp_path: Path) -> None:
    dataset = make_dataset(SeriesSpec(rows=64, columns=64), 0)
    dataset.Rows = 128  # the header now promises twice the pixels the file holds
    path = write(tmp_path, dataset)

    with pytest.raises(NotAcceptedError) as error:
        read_instance(path)

    assert "8192 bytes" in error.value.reason
    assert "Rows (0028,0010) x Columns (0028,0011)" in error.value.reason
    assert "16384" in error.value.reason


def _colour_dataset(photometric: str, pixel_bytes: int) -> Dataset:
    dataset = make_dataset(SeriesSpec(rows=8, columns=8), 0)
    dataset.SamplesPerPixel = 3
    dataset.PhotometricInterpretation = photometric
    dataset.PlanarConfiguration = 0
    dataset.BitsAllocated = 8
    dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = bytes(pixel_bytes)
    dataset["PixelData"].VR = "OB"
    return dataset


def test_native_ybr_full_422_needs_two_samples_per_pixel_not_three(tmp_path: Path) -> None:
    whole = write(tmp_path, _colour_dataset("YBR_FULL_422", 8 * 8 * 2), "ybr.dcm")
    short = write(tmp_path, _colour_dataset("YBR_FULL_422", 8 * 8 * 2 - 2), "ybr-short.dcm")
    rgb = write(tmp_path, _colour_dataset("RGB", 8 * 8 * 3), "rgb.dcm")
    rgb_short = write(tmp_path, _colour_dataset("RGB", 8 * 8 * 2), "rgb-short.dcm")

    assert read_instance(whole)[0].rows == 8
    assert read_instance(rgb)[0].rows == 8
    for path in (short, rgb_short):
        with pytest.raises(NotAcceptedError):
            read_instance(path)


def test_float_pixel_data_is_checked_like_pixel_data(tmp_path: Path) -> None:
    dataset = make_dataset(SeriesSpec(rows=8, columns=8), 0)
    del dataset.PixelData
    for keyword in ("BitsStored", "HighBit", "PixelRepresentation"):
        delattr(dataset, keyword)
    dataset.BitsAllocated = 32
    dataset.FloatPixelData = np.arange(64, dtype="<f4").tobytes()
    whole = write(tmp_path, dataset)
    dataset.FloatPixelData = np.arange(60, dtype="<f4").tobytes()
    too_short = write(tmp_path, dataset, "short.dcm")

    assert read_instance(whole)[0].rows == 8
    with pytest.raises(IncompleteFileError):
        read_instance(cut(whole, whole.stat().st_size - 4))
    with pytest.raises(NotAcceptedError) as error:
        read_instance(too_short)
    assert "Float Pixel Data (7FE0,0008)" in error.value.reason


def test_a_file_cut_inside_an_undefined_length_sequence_in_its_header_is_incomplete(
    tmp_path: Path,
) -> None:
    dataset = make_dataset(SeriesSpec(), 0)
    item = Dataset()
    item.CodeValue = "T-A0100"
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = "Brain"
    dataset.AnatomicRegionSequence = [item, item]
    dataset["AnatomicRegionSequence"].is_undefined_length = True
    whole = write(tmp_path, dataset)
    sequence_start = value_offset(whole, "AnatomicRegionSequence")
    assert read_instance(whole)[0].rows == 64

    for length in (sequence_start + 4, sequence_start + 30, sequence_start + 60):
        with pytest.raises(IncompleteFileError):
            read_instance(cut(whole, length))


COMPRESSED_FIXTURES = [
    "pydicom_edge_cases/In/MR_small_jp2klossless.dcm",
    "pydicom_edge_cases/In/MR_small_jpeg_ls_lossless.dcm",
    "pydicom_edge_cases/In/MR_small_RLE.dcm",
    "dcm_qa_ts/In/4.dcm",  # RLE
    "dcm_qa_ts/In/5.dcm",  # JPEG lossless
    "dcm_qa_ts/In/6.dcm",
    "dcm_qa_ts/In/7.dcm",  # JPEG-LS
    "dcm_qa_ts/In/8.dcm",
    "dcm_qa_ts/In/9.dcm",  # JPEG 2000
]


@pytest.mark.parametrize("relative", COMPRESSED_FIXTURES)
def test_a_compressed_fixture_reads_and_the_same_cut_short_is_incomplete(
    tmp_path: Path, relative: str
) -> None:
    path = fixture_copy(tmp_path, relative)
    size = path.stat().st_size
    pixel_start = value_offset(path, "PixelData")

    header, _ = read_instance(path)

    assert header.rows
    assert header.columns
    assert header.transfer_syntax_uid not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    # cut: inside the first fragment, mid-way, and only the Sequence Delimitation Item missing
    for length in (pixel_start + 20, (pixel_start + size) // 2, size - 8, size - 1):
        with pytest.raises(IncompleteFileError):
            read_instance(cut(path, length))


@pytest.mark.parametrize(
    "relative", ["dcm_qa_ts/In/1.dcm", "dcm_qa_ts/In/2.dcm", "dcm_qa_ts/In/3.dcm"]
)
def test_a_native_fixture_in_each_byte_order_reads(tmp_path: Path, relative: str) -> None:
    header, _ = read_instance(fixture_copy(tmp_path, relative))

    assert (header.rows, header.columns) == (384, 384)


def test_an_rt_plan_reads_whole_and_cut_mid_sequence_is_incomplete(tmp_path: Path) -> None:
    path = fixture_copy(tmp_path, "pydicom_edge_cases/In/rtplan.dcm")
    short = cut(path, 1500)
    assert pydicom.dcmread(short).Modality == "RTPLAN"  # pydicom parses the cut file happily

    header, _ = read_instance(path)
    assert header.modality == "RTPLAN"
    assert header.rows is None

    with pytest.raises(IncompleteFileError):
        read_instance(short)


@pytest.mark.parametrize(
    "relative",
    [
        "pydicom_edge_cases/In/test-SR.dcm",
        "pydicom_edge_cases/In/reportsi.dcm",
        "pydicom_edge_cases/In/waveform_ecg.dcm",
    ],
)
def test_a_data_set_without_an_image_is_walked_to_its_end(tmp_path: Path, relative: str) -> None:
    path = fixture_copy(tmp_path, relative)
    assert read_instance(path)[0].rows is None

    for fraction in (0.6, 0.95):
        with pytest.raises(IncompleteFileError):
            read_instance(cut(path, int(path.stat().st_size * fraction)))


def test_a_deflated_fixture_reads_and_cut_short_is_incomplete(tmp_path: Path) -> None:
    path = fixture_copy(tmp_path, "pydicom_edge_cases/In/image_dfl.dcm")

    header, _ = read_instance(path)

    assert header.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert (header.rows, header.columns) == (512, 512)
    for length in (data_set_offset(path) + 50, path.stat().st_size // 2, 4600):
        with pytest.raises(IncompleteFileError) as error:
            read_instance(cut(path, length))
        assert "deflate" in error.value.reason


def test_a_generated_deflated_file_reads_with_its_pixel_length_checked_after_inflating(
    tmp_path: Path,
) -> None:
    path = one_file(tmp_path, transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert np.array_equal(pydicom.dcmread(path).pixel_array, pixel_pattern(64, 64, 0))

    header, _ = read_instance(path)

    assert header.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert header.rows == 64


def test_a_generated_rle_file_reads(tmp_path: Path) -> None:
    path = one_file(tmp_path, transfer_syntax=RLELossless)
    assert np.array_equal(pydicom.dcmread(path).pixel_array, pixel_pattern(64, 64, 0))

    assert read_instance(path)[0].transfer_syntax_uid == RLELossless
    with pytest.raises(IncompleteFileError):
        read_instance(cut(path, path.stat().st_size - 8))


# --- not an instance ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 100, 131])
def test_an_empty_or_very_short_file_is_incomplete(tmp_path: Path, size: int) -> None:
    path = tmp_path / "short.dcm"
    path.write_bytes(bytes(size))

    with pytest.raises(IncompleteFileError) as error:
        read_instance(path)

    assert f"only {size} bytes" in error.value.reason


def test_random_bytes_are_not_accepted(tmp_path: Path) -> None:
    path = tmp_path / "noise.dcm"
    path.write_bytes(np.random.default_rng(7).integers(0, 256, 5000, dtype=np.uint8).tobytes())

    with pytest.raises(NotAcceptedError) as error:
        read_instance(path)

    assert "'DICM'" in error.value.reason
    assert "PS3.10 7.1" in error.value.reason


def test_a_text_file_is_not_accepted_as_a_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("Scan notes: patient moved during series 3, repeated.\n" * 10)

    with pytest.raises(NotAcceptedError) as error:
        read_instance(path)

    assert "text file" in error.value.reason


def test_a_nifti_file_is_not_accepted_and_named_as_nifti(tmp_path: Path) -> None:
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)  # sizeof_hdr
    struct.pack_into("<8h", header, 40, 3, 4, 4, 4, 1, 1, 1, 1)  # dim
    struct.pack_into("<hh", header, 70, 4, 16)  # datatype int16, bitpix
    struct.pack_into("<f", header, 108, 352.0)  # vox_offset
    header[344:348] = b"n+1\0"
    path = tmp_path / "brain.nii"
    path.write_bytes(bytes(header) + bytes(4) + bytes(4 * 4 * 4 * 2))

    with pytest.raises(NotAcceptedError) as error:
        read_instance(path)

    assert "NIfTI" in error.value.reason


@pytest.mark.parametrize(
    ("relative", "expected"),
    [
        ("pydicom_edge_cases/In/zipMR.gz", "gzip-compressed"),
        ("pydicom_edge_cases/In/no_meta.dcm", "dcmconv +F"),
        ("pydicom_edge_cases/In/ExplVR_BigEndNoMeta.dcm", "without preamble and File Meta"),
        ("pydicom_edge_cases/In/meta_missing_tsyntax.dcm", "Transfer Syntax UID (0002,0010)"),
        ("pydicom_edge_cases/In/dicomdirtests/DICOMDIR", "DICOMDIR"),
        ("pydicom_edge_cases/In/dicomdirtests/DICOMDIR-implicit", "not an instance"),
        ("dcm_qa_siemens_orient/In/Orientation/ax/axasc35/6_ax_asc_35sl.nii", "NIfTI"),
        ("dcm_qa_siemens_orient/In/Orientation/test_slice_time_Protocols_20131111.pdf", "PDF"),
    ],
)
def test_a_fixture_that_is_not_an_instance_is_not_accepted_with_a_useful_reason(
    tmp_path: Path, relative: str, expected: str
) -> None:
    path = fixture_copy(tmp_path, relative)

    with pytest.raises(NotAcceptedError) as error:
        read_instance(path)

    assert expected in error.value.reason


@pytest.mark.parametrize(
    ("keyword", "named"),
    [
        ("SOPInstanceUID", "SOP Instance UID (0008,0018)"),
        ("StudyInstanceUID", "Study Instance UID (0020,000D)"),
        ("SeriesInstanceUID", "Series Instance UID (0020,000E)"),
    ],
)
@pytest.mark.parametrize("how", ["missing", "empty"])
def test_an_instance_without_one_of_its_three_uids_is_not_accepted(
    tmp_path: Path, keyword: str, named: str, how: str
) -> None:
    dataset = make_dataset(SeriesSpec(), 0)
    if how == "missing":
        delattr(dataset, keyword)
    else:
        setattr(dataset, keyword, "")
    path = write(tmp_path, dataset)

    with pytest.raises(NotAcceptedError) as error:
        read_instance(path)

    assert named in error.value.reason


def test_a_file_that_vanished_raises_os_error_not_a_rejection(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_instance(tmp_path / "gone.dcm")


def test_rejections_say_nothing_of_the_patient(tmp_path: Path) -> None:
    dataset = make_dataset(SeriesSpec(patient_name="Secret^Patient", patient_id="ID-SECRET"), 0)
    del dataset.SeriesInstanceUID
    dataset.Rows = 128
    for path in (write(tmp_path, dataset), cut(one_file(tmp_path), 2000)):
        with pytest.raises(RejectedFileError) as error:
            read_instance(path)
        assert "Secret" not in error.value.reason
        assert "SECRET" not in error.value.reason


# --- every real file --------------------------------------------------------------------


def _fixture_files() -> list[str]:
    root = fixtures_path()
    if not root.is_dir():
        return ["(fixtures missing)"]
    return sorted(str(path.relative_to(root)) for path in root.glob("*/In/**/*") if path.is_file())


# Files under the fixtures' In/ folders that are not whole, acceptable instances.
NOT_INSTANCES = {
    "pydicom_edge_cases/In/MR_truncated.dcm": IncompleteFileError,
    "pydicom_edge_cases/In/no_meta.dcm": NotAcceptedError,
    "pydicom_edge_cases/In/ExplVR_BigEndNoMeta.dcm": NotAcceptedError,
    "pydicom_edge_cases/In/rtstruct.dcm": NotAcceptedError,  # no File Meta
    "pydicom_edge_cases/In/meta_missing_tsyntax.dcm": NotAcceptedError,
    "pydicom_edge_cases/In/zipMR.gz": NotAcceptedError,
}


def _expected_outcome(relative: str) -> type[RejectedFileError] | None:
    name = Path(relative).name
    if relative in NOT_INSTANCES:
        return NOT_INSTANCES[relative]
    if name.startswith("DICOMDIR") or name.endswith((".txt", ".pdf", ".nii")):
        return NotAcceptedError
    if name == "README":
        return NotAcceptedError
    if "TINY_ALPHA/" in relative:
        # pydicom's File-set test images: CT Image Storage without Rows or Pixel Data, which
        # cannot be told from an image cut short before its Rows
        return IncompleteFileError
    return None


@pytest.mark.parametrize("relative", _fixture_files())
def test_every_fixture_file_reads_or_is_rejected_with_a_reason(
    tmp_path: Path, relative: str
) -> None:
    path = fixture_copy(tmp_path, relative)
    expected = _expected_outcome(relative)

    if expected is not None:
        with pytest.raises(expected) as error:
            read_instance(path)
        assert error.value.reason
        return
    header, identity = read_instance(path)
    assert header.sop_instance_uid
    assert header.study_instance_uid
    assert header.series_instance_uid
    assert identity.size == path.stat().st_size


# --- the instance's DICOMDIR record (PS3.3 F.5) ------------------------------------------


def record_keys(header: InstanceHeader) -> Dataset:
    """The record keys read_instance encoded, decoded again by pydicom."""
    encoded = header.directory_record_keys
    keys = read_dataset(io.BytesIO(encoded), is_implicit_VR=False, is_little_endian=True)
    tags = [int(element.tag) for element in keys]
    assert tags == sorted(tags)
    assert all(tag >> 16 != 0x0004 for tag in tags)
    return keys


def test_an_image_has_an_image_record_with_no_stored_keys(tmp_path: Path) -> None:
    header, _ = read_instance(one_file(tmp_path))

    assert header.directory_record_type == "IMAGE"
    assert header.directory_record_keys == b""


def test_a_segmentation_is_an_image_in_the_dicomdir(tmp_path: Path) -> None:
    header, _ = read_instance(fixture_copy(tmp_path, "pydicom_edge_cases/In/liver_1frame.dcm"))

    assert header.sop_class_uid == SegmentationStorage
    assert header.directory_record_type == "IMAGE"
    assert header.directory_record_keys == b""


@pytest.mark.parametrize("relative", ["test-SR.dcm", "reportsi.dcm"])
def test_a_structured_report_has_an_sr_document_record_with_its_own_keys(
    tmp_path: Path, relative: str
) -> None:
    path = fixture_copy(tmp_path, f"pydicom_edge_cases/In/{relative}")
    source = pydicom.dcmread(path)

    header, _ = read_instance(path)

    assert header.directory_record_type == "SR DOCUMENT"
    keys = record_keys(header)
    assert keys.SpecificCharacterSet == "ISO_IR 100"  # the instance's own
    for keyword in ("ContentDate", "ContentTime", "InstanceNumber"):
        assert keys[keyword].value == source[keyword].value
    assert keys.CompletionFlag == source.CompletionFlag
    assert keys.VerificationFlag == source.VerificationFlag
    assert keys.ConceptNameCodeSequence[0].CodeMeaning == (
        source.ConceptNameCodeSequence[0].CodeMeaning
    )
    # F.5.24: only the root's HAS CONCEPT MOD items, not the whole content tree
    assert "ContentSequence" not in keys
    assert len(header.directory_record_keys) < 400


def test_an_sr_keeps_the_concept_modifiers_of_its_root_in_its_record(tmp_path: Path) -> None:
    source = pydicom.dcmread(fixture_dir_file("pydicom_edge_cases/In/test-SR.dcm"))
    modifier = Dataset()
    modifier.RelationshipType = "HAS CONCEPT MOD"
    modifier.ValueType = "CODE"
    source.ContentSequence.insert(0, modifier)

    header, _ = read_instance(write(tmp_path, source))

    keys = record_keys(header)
    assert [item.RelationshipType for item in keys.ContentSequence] == ["HAS CONCEPT MOD"]


def test_an_rt_dose_without_an_instance_number_gets_an_invented_one(tmp_path: Path) -> None:
    path = fixture_copy(tmp_path, "pydicom_edge_cases/In/rtdose.dcm")  # Instance Number empty

    header, _ = read_instance(path)

    assert header.directory_record_type == "RT DOSE"
    assert header.instance_number is None
    keys = record_keys(header)
    assert keys.InstanceNumber == 1
    assert keys.DoseSummationType == "BEAM"
    assert "SpecificCharacterSet" not in keys  # the file has none


def test_an_rt_plan_has_an_rt_plan_record_with_its_label(tmp_path: Path) -> None:
    path = fixture_copy(tmp_path, "pydicom_edge_cases/In/rtplan.dcm")  # implicit VR

    header, _ = read_instance(path)

    assert header.directory_record_type == "RT PLAN"
    keys = record_keys(header)
    assert keys.RTPlanLabel == "Plan1"
    assert keys.RTPlanDate == "20030903"
    assert keys.InstanceNumber == 1  # invented: the file has none


def test_a_waveform_has_a_waveform_record(tmp_path: Path) -> None:
    header, _ = read_instance(fixture_copy(tmp_path, "pydicom_edge_cases/In/waveform_ecg.dcm"))

    assert header.directory_record_type == "WAVEFORM"
    keys = record_keys(header)
    assert (keys.ContentDate, keys.ContentTime, keys.InstanceNumber) == ("20130125", "105919", 1)
    assert keys.SpecificCharacterSet == "ISO_IR 100"


def test_a_missing_content_date_and_time_come_from_the_instances_other_dates(
    tmp_path: Path,
) -> None:
    source = pydicom.dcmread(fixture_dir_file("pydicom_edge_cases/In/test-SR.dcm"))
    del source.ContentDate
    source.ContentTime = ""

    header, _ = read_instance(write(tmp_path, source))

    assert header.directory_record_type == "SR DOCUMENT"
    keys = record_keys(header)
    assert (keys.ContentDate, keys.ContentTime) == (
        source.InstanceCreationDate,
        source.InstanceCreationTime,
    )


def test_a_missing_date_with_no_other_date_comes_from_the_files_modification_time(
    tmp_path: Path,
) -> None:
    source = pydicom.dcmread(fixture_dir_file("pydicom_edge_cases/In/waveform_ecg.dcm"))
    for keyword in ("ContentDate", "InstanceCreationDate", "StudyDate", "AcquisitionDate"):
        if keyword in source:
            delattr(source, keyword)
    path = write(tmp_path, source)
    os.utime(path, (0, 1_700_000_000))  # 2023-11-14 22:13:20 UTC

    header, _ = read_instance(path)

    assert record_keys(header).ContentDate == "20231114"


def test_an_sr_without_a_completion_flag_is_listed_as_private_not_rejected(
    tmp_path: Path,
) -> None:
    source = pydicom.dcmread(fixture_dir_file("pydicom_edge_cases/In/test-SR.dcm"))
    del source.CompletionFlag  # a fact about the report that dcmdb does not invent

    header, _ = read_instance(write(tmp_path, source))

    assert header.directory_record_type == "PRIVATE"
    assert header.directory_record_keys == b""
    assert header.sop_instance_uid == source.SOPInstanceUID


def test_an_instance_of_a_private_sop_class_without_pixels_is_listed_as_private(
    tmp_path: Path,
) -> None:
    dataset = make_dataset(SeriesSpec(slices=1), 0)
    dataset.SOPClassUID = "1.3.12.2.1107.5.9.1"  # Siemens CSA Non-Image Storage
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    for keyword in ("Rows", "Columns", "PixelData", "BitsAllocated", "BitsStored", "HighBit"):
        delattr(dataset, keyword)

    header, _ = read_instance(write(tmp_path, dataset))

    assert header.directory_record_type == "PRIVATE"
    assert header.directory_record_keys == b""


def test_every_standard_record_type_of_the_mapping_has_a_pydicom_recorder() -> None:
    from daemon.dicomfile import _DIRECTORY_RECORD_TYPES

    assert set(_DIRECTORY_RECORD_TYPES.values()) <= set(DIRECTORY_RECORDERS)
    assert all(UID(uid).is_valid for uid in _DIRECTORY_RECORD_TYPES)


# --- the factory the other tests rely on -------------------------------------------------


def test_the_factory_writes_what_pydicom_itself_writes_for_the_same_data_set(
    tmp_path: Path,
) -> None:
    for transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian):
        spec = SeriesSpec(
            slices=2, transfer_syntax=transfer_syntax, specific_character_set="ISO_IR 192"
        )
        spec.referring_physician = "Ωmega^Ünï"
        for path in write_series(tmp_path / transfer_syntax, spec):
            rewritten = tmp_path / "rewritten.dcm"
            dcmwrite(rewritten, pydicom.dcmread(path), enforce_file_format=True)
            assert rewritten.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal", "oblique"])
@pytest.mark.parametrize("descending", [False, True])
def test_the_factory_writes_slices_one_spacing_apart_along_the_slice_normal(
    tmp_path: Path, orientation: str, descending: bool
) -> None:
    spec = SeriesSpec(
        slices=4,
        orientation=orientation,  # type: ignore[arg-type]
        slice_spacing=2.5,
        pixel_spacing=(0.5, 0.75),
        descending=descending,
    )
    datasets = [pydicom.dcmread(path) for path in write_series(tmp_path, spec)]

    cosines = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(cosines[:3], cosines[3:])
    positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=float)
    steps = np.diff(positions @ normal)
    assert np.allclose(steps, -2.5 if descending else 2.5)
    assert [int(ds.InstanceNumber) for ds in datasets] == [1, 2, 3, 4]
    assert len({ds.SOPInstanceUID for ds in datasets}) == 4
    assert all(ds.PixelSpacing == [0.5, 0.75] for ds in datasets)
    assert all(float(ds.SliceThickness) == 2.5 for ds in datasets)
    for index, ds in enumerate(datasets):
        assert np.array_equal(ds.pixel_array, pixel_pattern(64, 64, index))


# --- series facts for NIfTI conversion ---------------------------------------------------
# (read_series_facts is imported in each test: this section was added after the module's
# import block, which other work owns)


def test_series_facts_give_each_file_its_geometry_class_and_acquisition_values(
    tmp_path: Path,
) -> None:
    from daemon.dicomfile import read_series_facts

    spec = SeriesSpec(
        slices=3,
        rows=32,
        columns=48,
        orientation="coronal",
        series_number=12,
        series_description="T2 cor",
        slice_spacing=4.0,
    )
    paths = write_series(tmp_path, spec)

    facts = read_series_facts(paths)

    assert [instance.path for instance in facts.instances] == paths
    first = facts.instances[0]
    assert first.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4"
    assert first.sop_class_name == "MR Image Storage"
    assert first.image_storage
    assert first.has_pixel_data
    assert first.is_image
    assert first.image_type == ("ORIGINAL", "PRIMARY", "M")
    assert first.image_orientation == (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    assert (first.rows, first.columns, first.number_of_frames) == (32, 48, None)
    assert first.series_number == 12
    assert [instance.instance_number for instance in facts.instances] == [1, 2, 3]
    assert first.echo_number is None
    acquisition = first.acquisition
    # DICOM's own units (PS3.3 C.8.3.1): milliseconds, tesla, millimetres
    assert acquisition.echo_time_ms == 10.0
    assert acquisition.repetition_time_ms == 500.0
    assert acquisition.magnetic_field_strength_t == 1.5
    assert acquisition.slice_thickness_mm == 4.0
    assert acquisition.flip_angle_degrees is None  # the factory writes none
    assert (acquisition.modality, acquisition.manufacturer) == ("MR", "DCMDB")
    assert acquisition.manufacturers_model_name == "Factory"
    assert acquisition.series_description == "T2 cor"
    assert acquisition.series_number == 12
    assert acquisition.image_type == ("ORIGINAL", "PRIMARY", "M")


@pytest.mark.parametrize(
    "transfer_syntax",
    [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, RLELossless],
)
def test_series_facts_read_every_transfer_syntax_the_archive_holds(
    tmp_path: Path, transfer_syntax: str
) -> None:
    from daemon.dicomfile import read_series_facts

    spec = SeriesSpec(slices=2, orientation="sagittal", transfer_syntax=transfer_syntax)
    facts = read_series_facts(write_series(tmp_path, spec))

    for instance in facts.instances:
        assert instance.is_image
        assert instance.image_orientation == (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
        assert (instance.rows, instance.columns) == (64, 64)
        assert instance.acquisition.echo_time_ms == 10.0


def test_series_facts_come_from_the_header_alone_even_when_the_pixels_are_cut_short(
    tmp_path: Path,
) -> None:
    from daemon.dicomfile import read_series_facts

    path = one_file(tmp_path, rows=256, columns=256)
    short = cut(path, value_offset(path, "PixelData") + 100)

    (instance,) = read_series_facts([short]).instances

    assert instance.has_pixel_data
    assert (instance.rows, instance.columns) == (256, 256)


def test_series_facts_read_a_header_longer_than_the_first_bytes_read(tmp_path: Path) -> None:
    from daemon.dicomfile import read_series_facts

    dataset = make_dataset(SeriesSpec(series_number=5), 0)
    # a large private element before the pixel data, as Siemens CSA headers are
    dataset.add_new(0x00291010, "OB", b"\x01" * 300_000)
    dataset.add_new(0x00291011, "LO", "after the large element")
    dataset.FlipAngle = "12"  # (0018,1314): parsed before the large element
    dataset.SharedFunctionalGroupsSequence = []  # (5200,9229): after it
    path = write(tmp_path, dataset)

    (instance,) = read_series_facts([path]).instances

    assert instance.has_pixel_data
    assert instance.series_number == 5
    assert instance.acquisition.flip_angle_degrees == 12.0


@pytest.mark.parametrize(
    ("name", "class_name", "has_pixel_data"),
    [
        ("test-SR.dcm", "Comprehensive SR Storage", False),
        ("rtplan.dcm", "RT Plan Storage", False),
        ("rtdose.dcm", "RT Dose Storage", True),
        ("waveform_ecg.dcm", "12-lead ECG Waveform Storage", False),
        ("liver_1frame.dcm", "Segmentation Storage", True),
    ],
)
def test_series_facts_tell_reports_plans_doses_waveforms_and_segmentations_from_images(
    name: str, class_name: str, has_pixel_data: bool
) -> None:
    from daemon.dicomfile import read_series_facts

    (instance,) = read_series_facts([fixture_dir_file(f"pydicom_edge_cases/In/{name}")]).instances

    assert instance.sop_class_name == class_name
    assert instance.has_pixel_data is has_pixel_data
    assert not instance.image_storage
    assert not instance.is_image


def test_series_facts_of_enhanced_multiframe_take_timing_from_the_shared_groups() -> None:
    from daemon.dicomfile import read_series_facts

    paths = sorted((fixtures_dir() / "dcm_qa_enh_siemens" / "In").rglob("*.dcm"))

    facts = read_series_facts(paths)

    for instance in facts.instances:
        assert instance.sop_class_name == "Enhanced MR Image Storage"
        assert instance.is_image  # its pixel data lies beyond the per-frame groups
        assert instance.number_of_frames == 6
        assert instance.image_orientation == ()  # in the functional groups, not read
        # PS3.3 C.8.13.5.2: MR Timing and Related Parameters, in the Shared Functional Groups
        assert instance.acquisition.repetition_time_ms == 500.0
        assert instance.acquisition.flip_angle_degrees == 52.0
        assert instance.acquisition.acquisition_time.startswith("0836")  # one a volume


def test_series_facts_name_the_file_that_is_not_dicom(tmp_path: Path) -> None:
    from daemon.dicomfile import read_series_facts

    good = one_file(tmp_path)
    notes = tmp_path / "README.txt"
    notes.write_text("series notes\n" * 20)

    with pytest.raises(NotAcceptedError, match=r"README\.txt"):
        read_series_facts([good, notes])
