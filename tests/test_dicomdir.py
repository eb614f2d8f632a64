"""Tests for daemon.dicomdir: DICOMDIRs of really archived folders, checked by three readers.

Every DICOMDIR written here is read by dciodvfy (dicom3tools: no "Error" lines, exit 0),
dcmdump (DCMTK: parses, exit 0) and pydicom's FileSet (loads without a warning; every
referenced file exists and holds the SOP Instance the record names). The folders are filled by
the real Archiver and Catalog from generated series and the real-scanner fixtures.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from daemon.catalog import Catalog
from daemon.config import SortingConfig
from daemon.dicomdir import (
    DICOMDIR,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    PRIVATE_RECORD_UID,
    DicomdirReadError,
    encode_dicomdir,
    read_dicomdir_references,
    write_dicomdir,
)
from daemon.ingest import Archiver, read_file
from daemon.model import (
    DirectoryInstance,
    DirectoryPatient,
    DirectorySeries,
    DirectoryStudy,
    FileSetContents,
    Outcome,
)
from tests.conftest import IN_CI, Volume, fixtures_dir
from tests.factory import SeriesSpec, make_dataset, write_dataset, write_series

# ---- filing real files and reading the catalog back ---------------------------------------


@pytest.fixture
def catalog(volume: Volume) -> Iterator[Catalog]:
    catalog = Catalog(volume.state)
    yield catalog
    catalog.close()


def _archive(volume: Volume, catalog: Catalog, paths: list[Path]) -> list[Outcome]:
    """Copy `paths` into incoming/ and file them with the real Archiver, 64 at a time; only
    files ingest can read are offered."""
    archiver = Archiver(
        catalog,
        archive=volume.archive,
        quarantine=volume.quarantine,
        incoming=volume.incoming,
        sorting=SortingConfig(),
    )
    outcomes: list[Outcome] = []
    batch = []
    for index, path in enumerate(paths):
        target = volume.incoming / f"{index:05d}_{path.name}"
        shutil.copyfile(path, target)
        read = read_file(str(target))
        if read.header is not None:
            batch.append(read)
        if batch and (len(batch) == 64 or index == len(paths) - 1):
            outcomes += [result.outcome for result in archiver.file_batch(batch)]
            batch = []
    return outcomes


def _contents_from_catalog(volume: Volume, folder: str) -> FileSetContents:
    """What the folder's DICOMDIR must list, from the real catalog's snapshot query."""
    catalog = Catalog(volume.state)
    try:
        snapshot = catalog.file_set_contents(folder)
    finally:
        catalog.close()
    assert snapshot is not None, f"no folder {folder} in the catalog"
    return snapshot[0]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (dcmtk for dcmdump, dicom3tools for dciodvfy)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def _dciodvfy(path: Path) -> list[str]:
    """dicom3tools' verdict: no errors; returns its warnings (and prints them)."""
    result = subprocess.run(
        [_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warned = sorted({line for line in lines if line.startswith("Warning")})
    assert not errors, "\n".join(errors + warned)
    assert result.returncode == 0, "\n".join(lines)
    print(f"dciodvfy {path}:", *warned, sep="\n  ")
    return warned


def _dcmdump(path: Path) -> str:
    result = subprocess.run(
        [_tool("dcmdump"), str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith("E:")]
    return result.stdout


def _file_set(path: Path) -> FileSet:
    """pydicom's FileSet of the DICOMDIR; any warning (a missing file, a bad offset) fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # how pydicom reports what it finds
        file_set = FileSet(pydicom.dcmread(path))
    for instance in file_set:
        file = Path(instance.path)
        assert file.is_file(), file
        stored = pydicom.dcmread(file, stop_before_pixels=True)
        assert stored.SOPInstanceUID == instance.ReferencedSOPInstanceUIDInFile
        assert stored.SOPClassUID == instance.ReferencedSOPClassUIDInFile
    return file_set


def _leaves(contents: FileSetContents) -> list[DirectoryInstance]:
    return [
        instance
        for patient in contents.patients
        for study in patient.studies
        for series in study.series
        for instance in series.instances
    ]


def _written_and_checked(folder_root: Path, contents: FileSetContents) -> Dataset:
    """Write the folder's DICOMDIR and have all three readers check it; returns it as
    pydicom reads it."""
    write_dicomdir(folder_root, contents)
    path = folder_root / DICOMDIR
    _dciodvfy(path)
    _dcmdump(path)
    file_set = _file_set(path)
    leaves = _leaves(contents)
    assert {i.SOPInstanceUID for i in file_set} == {i.sop_instance_uid for i in leaves}
    assert read_dicomdir_references(path) == [(i.file_id, i.sop_instance_uid) for i in leaves]
    return pydicom.dcmread(path)


def _records(dicomdir: Dataset, record_type: str) -> list[Dataset]:
    return [r for r in dicomdir.DirectoryRecordSequence if r.DirectoryRecordType == record_type]


# ---- real archived folders -----------------------------------------------------------------


def test_a_folder_of_several_patients_studies_and_series_gives_a_dicomdir_all_readers_accept(
    volume: Volume, catalog: Catalog, tmp_path: Path
) -> None:
    paths = []
    for patient in range(3):
        study_uid = generate_uid()
        for series in range(1, patient + 2):
            spec = SeriesSpec(
                patient_name=f"Patient{patient}^Test",
                patient_id=f"PID{patient}",
                study_instance_uid=study_uid,
                series_number=series,
                series_description=f"Series {series}",
                modality="CT" if series == 2 else "MR",
                slices=3,
            )
            paths += write_series(tmp_path / f"p{patient}s{series}", spec)
    paths += write_series(tmp_path / "second study", SeriesSpec(patient_id="PID0", slices=2))
    assert set(_archive(volume, catalog, paths)) == {Outcome.ARCHIVED}
    contents = _contents_from_catalog(volume, "Smith_John")

    dicomdir = _written_and_checked(volume.archive / "Smith_John", contents)

    assert dicomdir.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert dicomdir.file_meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert dicomdir.file_meta.MediaStorageSOPInstanceUID == contents.file_set_uid
    assert dicomdir.FileSetID == "SMITH_JOHN"
    assert dicomdir.FileSetConsistencyFlag == 0
    assert len(_records(dicomdir, "PATIENT")) == 4  # "Doe^Jane"/PID0 and Patient0/PID0 differ
    assert len(_records(dicomdir, "STUDY")) == 4
    assert len(_records(dicomdir, "SERIES")) == 7
    assert len(_records(dicomdir, "IMAGE")) == 3 * 6 + 2
    series_records = _records(dicomdir, "SERIES")
    assert {(r.Modality, r.SeriesNumber) for r in series_records} >= {
        ("MR", 1),
        ("CT", 2),
        ("MR", 3),
    }
    assert all(r.RecordInUseFlag == 0xFFFF for r in dicomdir.DirectoryRecordSequence)
    assert not [r for r in dicomdir.DirectoryRecordSequence if "SpecificCharacterSet" in r]


def test_records_are_depth_first_and_every_offset_points_at_the_right_item(
    volume: Volume, catalog: Catalog, tmp_path: Path
) -> None:
    paths = []
    for patient in range(2):
        study_uid = generate_uid()
        for series in (1, 2):
            paths += write_series(
                tmp_path / f"{patient}-{series}",
                SeriesSpec(
                    patient_id=f"P{patient}",
                    study_instance_uid=study_uid,
                    series_number=series,
                    slices=2,
                ),
            )
    _archive(volume, catalog, paths)
    write_dicomdir(volume.archive / "Smith_John", _contents_from_catalog(volume, "Smith_John"))
    dicomdir = pydicom.dcmread(volume.archive / "Smith_John" / DICOMDIR)
    records = list(dicomdir.DirectoryRecordSequence)
    raw = (volume.archive / "Smith_John" / DICOMDIR).read_bytes()
    by_offset = {record.seq_item_tell: record for record in records}
    # PS3.3 F.3.2.1: offsets count from the first byte of the file to an Item tag
    assert all(raw[offset : offset + 4] == b"\xfe\xff\x00\xe0" for offset in by_offset)

    visited: list[Dataset] = []
    children = {"PATIENT": "STUDY", "STUDY": "SERIES", "SERIES": "IMAGE", "IMAGE": None}

    def walk(offset: int, record_type: str) -> None:
        while offset:
            record = by_offset[offset]
            assert record.DirectoryRecordType == record_type
            visited.append(record)
            lower = record.OffsetOfReferencedLowerLevelDirectoryEntity
            child_type = children[record_type]
            assert bool(lower) == (child_type is not None)
            if child_type is not None:
                walk(lower, child_type)
            offset = record.OffsetOfTheNextDirectoryRecord

    walk(dicomdir.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity, "PATIENT")
    assert [id(r) for r in visited] == [id(r) for r in records]  # file order is depth-first
    patients = _records(dicomdir, "PATIENT")
    assert dicomdir.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity == (
        patients[-1].seq_item_tell
    )


def test_every_fixture_file_ingest_accepts_is_listed_in_a_valid_dicomdir(
    volume: Volume, catalog: Catalog
) -> None:
    folders = sorted(fixtures_dir().glob("*/In"))
    inputs = sorted(p for folder in folders for p in folder.rglob("*") if p.is_file())
    outcomes = _archive(volume, catalog, inputs)
    assert outcomes.count(Outcome.ARCHIVED) > 150
    record_types: set[str] = set()
    syntaxes: set[str] = set()

    for folder_root in sorted(p for p in volume.archive.iterdir() if p.is_dir()):
        contents = _contents_from_catalog(volume, folder_root.name)
        dicomdir = _written_and_checked(folder_root, contents)
        record_types |= {r.DirectoryRecordType for r in dicomdir.DirectoryRecordSequence}
        syntaxes |= {i.transfer_syntax_uid for i in _leaves(contents)}

    assert record_types >= {
        "PATIENT",
        "STUDY",
        "SERIES",
        "IMAGE",
        "SR DOCUMENT",
        "RT DOSE",
        "RT PLAN",
        "WAVEFORM",
    }
    assert syntaxes >= {RLELossless, JPEGLosslessSV1, JPEG2000Lossless, ExplicitVRLittleEndian}


def test_names_in_latin_1_and_japanese_are_written_in_utf_8_records_that_read_back(
    volume: Volume, catalog: Catalog, tmp_path: Path
) -> None:
    specs = [
        SeriesSpec(
            patient_name="Müller^Jürgen",
            patient_id="M1",
            study_description="Schädel nativ",
            series_description="T1 axial Übersicht",
            specific_character_set="ISO_IR 100",
        ),
        SeriesSpec(
            patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう",
            patient_id="Y1",
            specific_character_set="\\ISO 2022 IR 87",
        ),
        SeriesSpec(patient_name="Doe^Jane", patient_id="D1"),
    ]
    paths = [
        p for index, spec in enumerate(specs) for p in write_series(tmp_path / f"{index}", spec)
    ]
    _archive(volume, catalog, paths)

    dicomdir = _written_and_checked(
        volume.archive / "Smith_John", _contents_from_catalog(volume, "Smith_John")
    )

    patients = {str(r.PatientID): r for r in _records(dicomdir, "PATIENT")}
    assert patients["M1"].PatientName == "Müller^Jürgen"
    assert patients["Y1"].PatientName == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert patients["M1"].SpecificCharacterSet == "ISO_IR 192"
    assert patients["Y1"].SpecificCharacterSet == "ISO_IR 192"
    assert "SpecificCharacterSet" not in patients["D1"]  # all ASCII: none
    descriptions = {str(r.StudyDescription) for r in _records(dicomdir, "STUDY")}
    assert "Schädel nativ" in descriptions
    assert "T1 axial Übersicht" in {
        str(r.get("SeriesDescription")) for r in _records(dicomdir, "SERIES")
    }


def test_empty_type_1_values_get_documented_invented_values(
    volume: Volume, catalog: Catalog, tmp_path: Path
) -> None:
    spec = SeriesSpec(patient_id="", study_date="", modality="", slices=3)
    spec.study_instance_uid, spec.series_instance_uid = generate_uid(), generate_uid()
    files = []
    for index in range(spec.slices):
        dataset = make_dataset(spec, index)
        for keyword in ("StudyTime", "StudyID", "SeriesNumber", "InstanceNumber"):
            delattr(dataset, keyword)
        files.append(write_dataset(tmp_path / f"{index}.dcm", dataset))
    before = time.time()
    _archive(volume, catalog, files)
    contents = _contents_from_catalog(volume, "Smith_John")
    (study,) = contents.patients[0].studies
    assert (study.study_date, study.study_time, study.study_id) == ("", "", "")

    dicomdir = _written_and_checked(volume.archive / "Smith_John", contents)

    (patient,) = _records(dicomdir, "PATIENT")
    assert patient.PatientID.startswith("DCMDB_")
    (study_record,) = _records(dicomdir, "STUDY")
    received = time.gmtime(study.first_received_at)
    assert study.first_received_at >= before - 1
    assert study_record.StudyDate == time.strftime("%Y%m%d", received)
    assert study_record.StudyTime == time.strftime("%H%M%S", received)
    assert study_record.StudyID == spec.study_instance_uid[-16:]
    (series,) = _records(dicomdir, "SERIES")
    assert (series.Modality, series.SeriesNumber) == ("OT", 1)
    assert sorted(r.InstanceNumber for r in _records(dicomdir, "IMAGE")) == [1, 2, 3]


def test_a_folder_after_some_studies_are_removed_lists_only_what_remains(
    volume: Volume, catalog: Catalog, tmp_path: Path
) -> None:
    paths = [
        p
        for index in range(3)
        for p in write_series(tmp_path / str(index), SeriesSpec(patient_id=f"P{index}", slices=2))
    ]
    _archive(volume, catalog, paths)
    folder_root = volume.archive / "Smith_John"
    _written_and_checked(folder_root, _contents_from_catalog(volume, "Smith_John"))
    removed_study = str(pydicom.dcmread(paths[2]).StudyInstanceUID)
    removed = volume.query(
        "SELECT i.id, i.rel_path FROM instances i JOIN series se ON se.id = i.series_row_id "
        "JOIN studies st ON st.id = se.study_row_id WHERE st.study_instance_uid = ?",
        removed_study,
    )
    with catalog.transaction():
        catalog.undo_staged([int(row_id) for row_id, _ in removed])  # type: ignore[call-overload]
    for _, rel_path in removed:
        (folder_root / str(rel_path)).unlink()

    dicomdir = _written_and_checked(folder_root, _contents_from_catalog(volume, "Smith_John"))

    studies = {str(r.StudyInstanceUID) for r in _records(dicomdir, "STUDY")}
    assert len(studies) == 2
    assert removed_study not in studies
    assert len(_records(dicomdir, "IMAGE")) == 4
    assert [p.name for p in folder_root.iterdir() if p.name.startswith(".tmp-")] == []


def test_an_instance_of_a_private_sop_class_gets_a_private_record(
    volume: Volume, catalog: Catalog, tmp_path: Path
) -> None:
    spec = SeriesSpec(slices=2)
    image = write_series(tmp_path / "image", spec)
    dataset = make_dataset(spec, 0)
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = UID("1.3.12.2.1107.5.9.1")
    dataset.StudyInstanceUID = pydicom.dcmread(image[0]).StudyInstanceUID
    for keyword in ("Rows", "Columns", "PixelData", "BitsAllocated", "BitsStored", "HighBit"):
        delattr(dataset, keyword)
    private = write_dataset(tmp_path / "csa.dcm", dataset)
    _archive(volume, catalog, [*image, private])

    dicomdir = _written_and_checked(
        volume.archive / "Smith_John", _contents_from_catalog(volume, "Smith_John")
    )

    (record,) = _records(dicomdir, "PRIVATE")
    assert record.PrivateRecordUID == PRIVATE_RECORD_UID
    assert record.ReferencedSOPInstanceUIDInFile == dataset.SOPInstanceUID


def test_rewriting_a_dicomdir_replaces_it_and_leaves_no_temp_file(
    volume: Volume, catalog: Catalog, tmp_path: Path
) -> None:
    _archive(volume, catalog, write_series(tmp_path / "a", SeriesSpec(slices=2)))
    folder_root = volume.archive / "Smith_John"
    first = _contents_from_catalog(volume, "Smith_John")
    write_dicomdir(folder_root, first)
    _archive(volume, catalog, write_series(tmp_path / "b", SeriesSpec(slices=3)))

    _written_and_checked(folder_root, _contents_from_catalog(volume, "Smith_John"))

    assert len(read_dicomdir_references(folder_root / DICOMDIR)) == 5
    assert sorted(p.name for p in folder_root.iterdir()) == ["DICOM", "DICOMDIR"]


# ---- the encoder on its own ---------------------------------------------------------------


def _instance(index: int, **fields: object) -> DirectoryInstance:
    values: dict[str, object] = {
        "file_id": f"DICOM/P/S/SE/I{index}",
        "sop_class_uid": MRImageStorage,
        "sop_instance_uid": f"1.2.3.{index}",
        "transfer_syntax_uid": ExplicitVRLittleEndian,
        "instance_number": index,
        "record_type": "IMAGE",
        "record_keys": b"",
    }
    values.update(fields)
    return DirectoryInstance(**values)  # type: ignore[arg-type]


def _contents(*instances: DirectoryInstance, **study_fields: object) -> FileSetContents:
    study: dict[str, object] = {
        "study_instance_uid": "1.2.3",
        "study_date": "20260101",
        "study_time": "083000",
        "study_description": "",
        "study_id": "1",
        "accession_number": "",
        "first_received_at": 0.0,
    }
    study.update(study_fields)
    series = DirectorySeries("1.2.3.1", "MR", 1, "", instances)
    return FileSetContents(
        "SET",
        "1.2.3.4",
        (DirectoryPatient("P", "Doe^Jane", (DirectoryStudy(**study, series=(series,)),)),),  # type: ignore[arg-type]
    )


def test_an_empty_folder_gives_a_valid_dicomdir_without_records(tmp_path: Path) -> None:
    contents = FileSetContents("", generate_uid(), ())

    write_dicomdir(tmp_path, contents)

    path = tmp_path / DICOMDIR
    _dciodvfy(path)
    _dcmdump(path)
    assert list(_file_set(path)) == []
    dicomdir = pydicom.dcmread(path)
    assert len(dicomdir.DirectoryRecordSequence) == 0
    assert dicomdir.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity == 0
    assert read_dicomdir_references(path) == []


def test_odd_length_values_are_padded_uids_with_nul_and_text_with_a_space() -> None:
    data = encode_dicomdir(_contents(_instance(1, sop_instance_uid="1.2.345")))

    assert struct.pack("<HH2sH", 0x0004, 0x1511, b"UI", 8) + b"1.2.345\x00" in data
    assert struct.pack("<HH2sH", 0x0010, 0x0010, b"PN", 8) + b"Doe^Jane" in data
    assert struct.pack("<HH2sH", 0x0004, 0x1430, b"CS", 6) + b"IMAGE " in data
    assert len(data) % 2 == 0


def test_invalid_dates_too_long_texts_and_numbers_out_of_range_are_replaced_or_cut() -> None:
    contents = _contents(
        _instance(1, instance_number=10**12),
        study_date="2026-01-01",
        study_time="8:30",
        study_id="A" * 20,
        study_description="x" * 70,
        first_received_at=86400.0 * 365,
    )

    records = pydicom.dcmread(io.BytesIO(encode_dicomdir(contents))).DirectoryRecordSequence

    study, image = records[1], records[3]
    assert (study.StudyDate, study.StudyTime) == ("19710101", "000000")  # first reception
    assert study.StudyID == "A" * 16
    assert study.StudyDescription == "x" * 64
    assert image.InstanceNumber == 1  # IS holds -2^31..2^31-1: its position instead


def test_a_file_set_id_outside_the_ps3_10_repertoire_is_refused() -> None:
    contents = FileSetContents("smith-john", "1.2.3", ())

    with pytest.raises(ValueError, match="File-set ID"):
        encode_dicomdir(contents)


def test_a_leaf_with_stored_keys_carries_them_after_its_group_0004_elements(
    tmp_path: Path,
) -> None:
    keys = struct.pack("<HH2sH", 0x0020, 0x0013, b"IS", 2) + b"7 "  # RADIOTHERAPY's only key
    contents = _contents(_instance(1, record_type="RADIOTHERAPY", record_keys=keys))

    write_dicomdir(tmp_path, contents)

    (leaf,) = _records(pydicom.dcmread(tmp_path / DICOMDIR), "RADIOTHERAPY")
    assert leaf.InstanceNumber == 7
    _dciodvfy(tmp_path / DICOMDIR)


def test_a_hundred_thousand_instances_are_listed_and_read_back_in_order() -> None:
    instances = tuple(_instance(index) for index in range(100_000))

    data = encode_dicomdir(_contents(*instances))

    path_free = pydicom.dcmread(io.BytesIO(data[:4096]), stop_before_pixels=True, force=True)
    assert path_free.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10"
    assert data.count(b"\xfe\xff\x00\xe0") == 100_003  # one item per record


# ---- reading DICOMDIRs back ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["DICOMDIR", "DICOMDIR-implicit", "DICOMDIR-bigEnd", "DICOMDIR-reordered"]
)
def test_references_of_dicomdirs_from_other_writers_match_pydicoms_reading(name: str) -> None:
    path = fixtures_dir() / "pydicom_edge_cases" / "In" / "dicomdirtests" / name
    expected = [
        ("/".join(record.ReferencedFileID), str(record.ReferencedSOPInstanceUIDInFile))
        for record in pydicom.dcmread(path).DirectoryRecordSequence
        if "ReferencedFileID" in record
    ]

    references = read_dicomdir_references(path)

    assert len(references) == 31
    assert references == expected


def test_a_file_that_is_not_a_dicomdir_is_refused_with_a_reason(tmp_path: Path) -> None:
    (instance,) = write_series(tmp_path, SeriesSpec(slices=1))
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM at all")

    with pytest.raises(DicomdirReadError, match="Media Storage SOP Class"):
        read_dicomdir_references(instance)
    with pytest.raises(DicomdirReadError, match="DICM"):
        read_dicomdir_references(text)
    with pytest.raises(DicomdirReadError, match="cannot be read"):
        read_dicomdir_references(tmp_path / "missing")


def test_a_dicomdir_cut_short_is_refused_not_read_in_part(tmp_path: Path) -> None:
    write_dicomdir(tmp_path, _contents(*(_instance(index) for index in range(5))))
    path = tmp_path / DICOMDIR
    data = path.read_bytes()

    for length in (len(data) - 10, len(data) // 2, 200):
        path.write_bytes(data[:length])
        with pytest.raises(DicomdirReadError, match="not a readable DICOMDIR"):
            read_dicomdir_references(path)
