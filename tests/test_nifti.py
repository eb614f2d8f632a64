"""Tests for daemon.nifti: real dcm2niix and real dicom2nifti on series the factory writes and on
scanner fixtures. Expected geometry is computed here from the DICOM itself (read with pydicom),
never from the converter under test."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from daemon.dicomfile import pydicom_character_sets, restore_pydicom_character_sets
from daemon.nifti import (
    ENGINES,
    ConversionOutcome,
    ConversionRequest,
    EngineNotFoundError,
    convert_series,
    engine_version,
    find_dcm2niix,
)
from tests.conftest import fixtures_dir
from tests.factory import SeriesSpec, make_dataset, write_dataset, write_series

STEM = "003_T1_MPRAGE"
ORIENTATIONS = ["axial", "coronal", "sagittal", "oblique"]
# what a sidecar must never hold (a sample of daemon.nifti's deny-list)
IDENTIFYING_KEYS = {
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "ReferringPhysicianName",
    "InstitutionName",
    "StationName",
    "DeviceSerialNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
}


# --- helpers -------------------------------------------------------------------------------


def convert(
    tmp_path: Path,
    files: list[Path] | tuple[Path, ...],
    engine: str = "dcm2niix",
    *,
    preview: bool = True,
    dcm2niix: Path | None = None,
) -> tuple[ConversionOutcome, Path]:
    """Convert into a fresh output folder with a scratch folder of its own; check what every
    conversion must leave: exactly the outputs it names, no `.tmp-` file, no scratch."""
    output_dir = tmp_path / f"out-{engine}"
    index = 1
    while output_dir.exists():
        index += 1
        output_dir = tmp_path / f"out-{engine}-{index}"
    output_dir.mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    outcome = convert_series(
        ConversionRequest(
            files=tuple(files),
            output_dir=output_dir,
            stem=STEM,
            engine=engine,
            dcm2niix=dcm2niix,
            preview=preview,
            scratch_dir=scratch,
        )
    )
    assert sorted(p.name for p in output_dir.iterdir()) == list(outcome.outputs)
    assert list(scratch.iterdir()) == []
    assert outcome.engine == engine
    return outcome, output_dir


def write_variant(
    out_dir: Path, spec: SeriesSpec, *, name_prefix: str = "IM", **elements: object
) -> list[Path]:
    """Write `spec` slice by slice with extra or changed DICOM elements (by keyword); the
    slices share the spec's UIDs (generated here when the spec has none)."""
    spec.series_instance_uid = spec.series_instance_uid or generate_uid()
    spec.study_instance_uid = spec.study_instance_uid or generate_uid()
    paths = []
    for index in range(spec.slices):
        dataset = make_dataset(spec, index)
        for keyword, value in elements.items():
            setattr(dataset, keyword, value)
        paths.append(write_dataset(out_dir / f"{name_prefix}{index + 1:04d}.dcm", dataset))
    return paths


def expected_image(paths: list[Path]) -> nib.Nifti1Image:
    """The volume the DICOM describes (PS3.3 C.7.6.2.1.1), built here: voxel (i, j, k) is
    column i, row j of the k-th slice along the slice normal; the affine's columns are the row
    direction x column spacing, the column direction x row spacing and the normal x slice
    spacing, from the first slice's position; LPS to RAS negates x and y."""
    datasets = [pydicom.dcmread(path) for path in paths]
    cosines = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    row, column = cosines[:3], cosines[3:]
    normal = np.cross(row, column)
    datasets.sort(key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, float), normal)))
    positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=float)
    spacing = float(np.mean(np.diff(positions @ normal)))
    row_spacing, column_spacing = (float(v) for v in datasets[0].PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = row * column_spacing
    affine[:3, 1] = column * row_spacing
    affine[:3, 2] = normal * spacing
    affine[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    slope = float(getattr(datasets[0], "RescaleSlope", 1))
    intercept = float(getattr(datasets[0], "RescaleIntercept", 0))
    data = np.stack([ds.pixel_array.T * slope + intercept for ds in datasets], axis=-1)
    return nib.Nifti1Image(data, affine)


def load(path: Path) -> nib.Nifti1Image:
    image = nib.load(path)
    assert isinstance(image, nib.Nifti1Image)
    return image


def assert_same_in_world(output: Path, expected: nib.Nifti1Image) -> None:
    out = nib.as_closest_canonical(load(output))
    ref = nib.as_closest_canonical(expected)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-4)
    assert np.array_equal(out.get_fdata(), ref.get_fdata())


def sidecar(output_dir: Path, name: str = STEM) -> dict[str, object]:
    value = json.loads((output_dir / f"{name}.json").read_text(encoding="utf-8"))
    assert isinstance(value, dict)
    return value


def all_output_bytes(output_dir: Path) -> bytes:
    """Everything written, decompressed (the NIfTI header included)."""
    parts = []
    for path in sorted(output_dir.iterdir()):
        data = path.read_bytes()
        parts.append(gzip.decompress(data) if path.name.endswith(".gz") else data)
    return b"".join(parts)


def plain_dicom2nifti(input_dir: Path, output: Path) -> nib.Nifti1Image:
    """dicom2nifti's own conversion, as its users call it (imported here with pydicom's
    character set table put back, as daemon.nifti does, so no other test sees its patch)."""
    table = pydicom_character_sets()
    try:
        import dicom2nifti.convert_dicom
    finally:
        restore_pydicom_character_sets(table)
    dicom2nifti.convert_dicom.dicom_series_to_nifti(str(input_dir), str(output))
    return load(output)


def fixture_copy(tmp_path: Path, relative: str) -> Path:
    source = fixtures_dir() / relative
    target = tmp_path / "fixture" / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


# --- geometry and voxels -------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("descending", [False, True], ids=["ascending", "descending"])
def test_a_generated_series_lands_where_its_dicom_geometry_says_with_its_voxels_intact(
    tmp_path: Path, engine: str, orientation: str, descending: bool
) -> None:
    spec = SeriesSpec(
        slices=5,
        rows=20,
        columns=24,  # not square: a transposed image cannot pass
        orientation=orientation,  # type: ignore[arg-type]
        descending=descending,
        pixel_spacing=(0.9, 1.2),
        slice_spacing=2.5,
    )
    paths = write_series(tmp_path / "dicom", spec)

    outcome, output_dir = convert(tmp_path, paths, engine)

    assert outcome.state == "converted", outcome.reason
    assert outcome.reason == ""
    assert outcome.outputs == (f"{STEM}.json", f"{STEM}.nii.gz", f"{STEM}.png")
    assert_same_in_world(output_dir / f"{STEM}.nii.gz", expected_image(paths))


def test_dcm2niix_output_keeps_the_stored_int16_voxels(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "dicom", SeriesSpec(slices=4))

    _, output_dir = convert(tmp_path, paths, "dcm2niix")

    image = load(output_dir / f"{STEM}.nii.gz")
    assert image.get_data_dtype() == np.int16


def test_dicom2nifti_float_output_is_stored_as_int16_with_the_same_world_values(
    tmp_path: Path,
) -> None:
    # CT: RescaleIntercept -1024 makes dicom2nifti write float64 Hounsfield units
    paths = write_series(tmp_path / "dicom", SeriesSpec(modality="CT", slices=4, rows=32))
    uncompacted = plain_dicom2nifti(tmp_path / "dicom", tmp_path / "plain.nii")
    assert uncompacted.get_data_dtype() == np.float64

    _, output_dir = convert(tmp_path, paths, "dicom2nifti")

    image = load(output_dir / f"{STEM}.nii.gz")
    assert image.get_data_dtype() == np.int16
    assert image.header.get_slope_inter() in ((None, None), (1.0, 0.0))
    assert np.array_equal(image.affine, uncompacted.affine)
    assert np.array_equal(image.get_fdata(), uncompacted.get_fdata())
    assert image.get_fdata().min() == -1024.0
    assert_same_in_world(output_dir / f"{STEM}.nii.gz", expected_image(paths))


@pytest.mark.parametrize(
    ("slope", "stored"),
    [("0.5", np.float32), ("0.1", np.float64)],
    ids=["halves-fit-float32", "tenths-stay-float64"],
)
def test_dicom2nifti_float64_becomes_float32_only_where_that_is_exact(
    tmp_path: Path, slope: str, stored: type
) -> None:
    spec = SeriesSpec(modality="CT", slices=4, rows=16, columns=16)
    paths = write_variant(tmp_path / "dicom", spec, RescaleSlope=slope)
    plain = plain_dicom2nifti(tmp_path / "dicom", tmp_path / "plain.nii")

    _, output_dir = convert(tmp_path, paths, "dicom2nifti")

    image = load(output_dir / f"{STEM}.nii.gz")
    assert image.get_data_dtype() == stored
    assert np.array_equal(image.affine, plain.affine)
    assert np.array_equal(image.get_fdata(), plain.get_fdata())


# --- sidecar -------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_the_sidecar_reports_the_acquisition_in_bids_units(tmp_path: Path, engine: str) -> None:
    spec = SeriesSpec(slices=4, series_number=3, series_description="T1 MPRAGE sag")
    paths = write_variant(
        tmp_path / "dicom",
        spec,
        ProtocolName="T1_MPRAGE",
        EchoTime="2.98",
        RepetitionTime="2300",
        FlipAngle="9",
        MagneticFieldStrength="3",
        AcquisitionTime="083015.5",
    )

    outcome, output_dir = convert(tmp_path, paths, engine)

    values = sidecar(output_dir)
    assert values["EchoTime"] == pytest.approx(0.00298)  # seconds
    assert values["RepetitionTime"] == pytest.approx(2.3)  # seconds
    assert values["FlipAngle"] == pytest.approx(9.0)  # degrees
    assert values["MagneticFieldStrength"] == pytest.approx(3.0)
    assert values["SliceThickness"] == pytest.approx(3.0)
    assert values["AcquisitionTime"] == "08:30:15.500000"
    assert values["Modality"] == "MR"
    assert values["Manufacturer"] == "DCMDB"
    assert values["ManufacturersModelName"] == "Factory"
    assert values["SeriesDescription"] == "T1 MPRAGE sag"
    assert values["ProtocolName"] == "T1_MPRAGE"
    assert values["SeriesNumber"] == 3
    assert values["ImageType"] == ["ORIGINAL", "PRIMARY", "M"]
    assert values["ConversionSoftware"] == engine
    assert values["ConversionSoftwareVersion"] == engine_version(engine)
    assert outcome.engine_version == engine_version(engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_no_patient_name_id_or_birth_date_is_written_anywhere(tmp_path: Path, engine: str) -> None:
    spec = SeriesSpec(slices=4, patient_name="Roewinkel^Richarda", patient_id="MRN-77310")
    paths = write_variant(
        tmp_path / "dicom",
        spec,
        PatientBirthDate="19610203",
        AccessionNumber="ACC99887766",
        OtherPatientIDs="OTHER-4455",
        ImageComments="scanned for Richarda Roewinkel",
    )

    outcome, output_dir = convert(tmp_path, paths, engine)

    assert outcome.state == "converted", outcome.reason
    assert not IDENTIFYING_KEYS & set(sidecar(output_dir))
    everything = all_output_bytes(output_dir)
    for secret in (
        b"Roewinkel",
        b"Richarda",
        b"MRN-77310",
        b"19610203",
        b"ACC99887766",
        b"OTHER-4455",
    ):
        assert secret not in everything
    assert b"Richarda" not in " ".join(outcome.notes).encode()


def test_a_series_without_series_number_gets_none_invented(tmp_path: Path) -> None:
    spec = SeriesSpec(slices=4)
    spec.series_instance_uid, spec.study_instance_uid = generate_uid(), generate_uid()
    paths = []
    for index in range(spec.slices):
        dataset = make_dataset(spec, index)
        del dataset.SeriesNumber
        paths.append(write_dataset(tmp_path / "dicom" / f"IM{index}.dcm", dataset))

    outcome, output_dir = convert(tmp_path, paths, "dcm2niix")

    assert outcome.state == "converted", outcome.reason
    assert "SeriesNumber" not in sidecar(output_dir)  # dcm2niix writes a checksum there


# --- several volumes from one series -------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_two_echoes_become_two_volumes_named_by_echo_each_with_its_own_echo_time(
    tmp_path: Path, engine: str
) -> None:
    spec = SeriesSpec(slices=4, series_instance_uid=generate_uid())
    paths = write_variant(tmp_path / "dicom", spec, name_prefix="E1_", EchoNumbers=1)
    paths += write_variant(
        tmp_path / "dicom", spec, name_prefix="E2_", EchoNumbers=2, EchoTime="20"
    )

    outcome, output_dir = convert(tmp_path, paths, engine)

    assert outcome.state == "converted", outcome.reason
    assert outcome.outputs == tuple(
        sorted(
            f"{STEM}_{echo}.{kind}" for echo in ("e1", "e2") for kind in ("nii.gz", "json", "png")
        )
    )
    assert sidecar(output_dir, f"{STEM}_e1")["EchoTime"] == pytest.approx(0.01)
    assert sidecar(output_dir, f"{STEM}_e2")["EchoTime"] == pytest.approx(0.02)
    expected = expected_image(paths[:4])
    assert_same_in_world(output_dir / f"{STEM}_e1.nii.gz", expected)
    assert_same_in_world(output_dir / f"{STEM}_e2.nii.gz", expected)


@pytest.mark.parametrize("engine", ENGINES)
def test_several_series_numbers_in_one_series_are_named_s_and_their_number(
    tmp_path: Path, engine: str
) -> None:
    uid = generate_uid()
    paths = []
    for number in (7, 12):
        spec = SeriesSpec(slices=4, series_number=number, series_instance_uid=uid)
        paths += write_variant(tmp_path / "dicom", spec, name_prefix=f"S{number}_")

    outcome, output_dir = convert(tmp_path, paths, engine)

    assert outcome.state == "converted", outcome.reason
    assert {name.split(".")[0] for name in outcome.outputs} == {f"{STEM}_s7", f"{STEM}_s12"}
    assert sidecar(output_dir, f"{STEM}_s7")["SeriesNumber"] == 7
    assert sidecar(output_dir, f"{STEM}_s12")["SeriesNumber"] == 12


def test_the_nine_transfer_syntaxes_of_one_uid_give_nine_volumes_named_by_series_number(
    tmp_path: Path,
) -> None:
    paths = sorted((fixtures_dir() / "dcm_qa_ts" / "In").glob("*.dcm"))

    outcome, output_dir = convert(tmp_path, paths, "dcm2niix")

    assert outcome.state == "converted", outcome.reason
    volumes = sorted(name for name in outcome.outputs if name.endswith(".nii.gz"))
    assert volumes == sorted(f"{STEM}_s{number}.nii.gz" for number in range(1, 10))
    for number in range(1, 10):
        assert sidecar(output_dir, f"{STEM}_s{number}")["SeriesNumber"] == number
        reference = load(fixtures_dir() / "dcm_qa_ts" / "Ref" / f"{number}.nii")
        assert_same_in_world(output_dir / f"{STEM}_s{number}.nii.gz", reference)


def test_a_diffusion_series_gets_bval_and_bvec_beside_its_volume(tmp_path: Path) -> None:
    paths = sorted((fixtures_dir() / "dicom2nifti_subset" / "In" / "ge" / "dti" / "001").glob("*"))

    outcome, output_dir = convert(tmp_path, paths, "dcm2niix")

    assert outcome.state == "converted", outcome.reason
    assert {f"{STEM}.bval", f"{STEM}.bvec", f"{STEM}.nii.gz"} <= set(outcome.outputs)
    assert np.loadtxt(output_dir / f"{STEM}.bvec").shape == (3, 2)


# --- skipped -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "class_name"),
    [
        ("test-SR.dcm", "Comprehensive SR Storage"),
        ("reportsi.dcm", "Basic Text SR Storage"),
        ("rtplan.dcm", "RT Plan Storage"),
        ("rtdose.dcm", "RT Dose Storage"),
        ("waveform_ecg.dcm", "12-lead ECG Waveform Storage"),
        ("liver_1frame.dcm", "Segmentation Storage"),
    ],
)
def test_reports_plans_doses_waveforms_and_segmentations_are_skipped_as_not_images(
    tmp_path: Path, name: str, class_name: str
) -> None:
    path = fixture_copy(tmp_path, f"pydicom_edge_cases/In/{name}")

    outcome, _ = convert(tmp_path, [path])

    assert outcome.state == "skipped"
    assert outcome.reason == f"not an image series: {class_name}"
    assert outcome.outputs == ()


@pytest.mark.parametrize("image_type", ["LOCALIZER", "SCOUT"])
def test_a_localizer_is_skipped_naming_its_image_type(tmp_path: Path, image_type: str) -> None:
    paths = write_variant(
        tmp_path / "dicom", SeriesSpec(slices=3), ImageType=["ORIGINAL", "PRIMARY", image_type]
    )

    outcome, _ = convert(tmp_path, paths)

    assert outcome.state == "skipped"
    assert (
        outcome.reason == f"a localizer (ImageType ORIGINAL\\PRIMARY\\{image_type}): not converted"
    )


def test_localizer_images_in_a_series_are_left_out_and_noted(tmp_path: Path) -> None:
    uid = generate_uid()
    paths = write_series(tmp_path / "dicom", SeriesSpec(slices=4, series_instance_uid=uid))
    paths += write_variant(
        tmp_path / "dicom",
        SeriesSpec(slices=1, series_instance_uid=uid, orientation="sagittal"),
        name_prefix="LOC",
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
    )

    outcome, output_dir = convert(tmp_path, paths)

    assert outcome.state == "converted", outcome.reason
    assert any("1 localizer image(s) left out" in note for note in outcome.notes)
    assert_same_in_world(output_dir / f"{STEM}.nii.gz", expected_image(paths[:4]))


@pytest.mark.parametrize("engine", ENGINES)
def test_a_two_slice_series_is_skipped_as_too_thin_for_a_volume(
    tmp_path: Path, engine: str
) -> None:
    paths = write_series(tmp_path / "dicom", SeriesSpec(slices=2))

    outcome, _ = convert(tmp_path, paths, engine)

    assert outcome.state == "skipped"
    assert outcome.reason == "2 slices: a volume needs at least 3"


def test_images_in_two_planes_are_skipped_as_inconsistent_geometry(tmp_path: Path) -> None:
    uid = generate_uid()
    paths = write_series(tmp_path / "ax", SeriesSpec(slices=3, series_instance_uid=uid))
    paths += write_series(
        tmp_path / "sag", SeriesSpec(slices=3, series_instance_uid=uid, orientation="sagittal")
    )

    outcome, _ = convert(tmp_path, paths)

    assert outcome.state == "skipped"
    assert outcome.reason.startswith("inconsistent geometry: ImageOrientationPatient differs")
    assert "2 distinct orientations" in outcome.reason


def test_images_of_two_sizes_are_skipped_as_inconsistent_geometry(tmp_path: Path) -> None:
    uid = generate_uid()
    paths = write_series(tmp_path / "a", SeriesSpec(slices=3, series_instance_uid=uid))
    paths += write_series(
        tmp_path / "b", SeriesSpec(slices=3, series_instance_uid=uid, rows=32, columns=32)
    )

    outcome, _ = convert(tmp_path, paths)

    assert outcome.state == "skipped"
    assert "Rows x Columns differ" in outcome.reason
    assert "2 distinct sizes: 32x32, 64x64" in outcome.reason


def test_the_two_planes_of_the_sliceorientation_fixture_are_skipped(tmp_path: Path) -> None:
    folder = fixtures_dir() / "dicom2nifti_subset" / "In" / "failing" / "sliceorientation" / "001"

    outcome, _ = convert(tmp_path, sorted(folder.glob("*.dcm")))

    assert outcome.state == "skipped"
    assert "ImageOrientationPatient differs" in outcome.reason


def test_orientations_that_differ_only_by_rounding_are_one_plane(tmp_path: Path) -> None:
    spec = SeriesSpec(slices=4)
    paths = write_series(tmp_path / "dicom", spec)
    dataset = pydicom.dcmread(paths[1])
    dataset.ImageOrientationPatient = ["0.99999", "0.00001", "0", "0", "1", "0.00002"]
    dataset.save_as(paths[1])

    outcome, _ = convert(tmp_path, paths)

    assert outcome.state == "converted", outcome.reason


# --- failed --------------------------------------------------------------------------------


def test_a_failed_conversion_leaves_no_file_behind_and_says_what_the_engine_said(
    tmp_path: Path,
) -> None:
    # dcm2niix cannot read Deflated Explicit VR Little Endian (PS3.5 A.5)
    spec = SeriesSpec(slices=4, transfer_syntax=DeflatedExplicitVRLittleEndian)
    paths = write_series(tmp_path / "dicom", spec)

    outcome, output_dir = convert(tmp_path, paths, "dcm2niix")  # checks folder and scratch

    assert outcome.state == "failed"
    assert outcome.reason.startswith("dcm2niix failed (exit code 2: no DICOM it could convert")
    assert "Unsupported transfer syntax" in outcome.reason
    assert "dicom2nifti" in outcome.reason  # what to try
    assert list(output_dir.iterdir()) == []


def test_dicom2nifti_refuses_a_series_with_a_missing_slice_and_says_why(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "dicom", SeriesSpec(slices=6))
    del paths[2]

    outcome, output_dir = convert(tmp_path, paths, "dicom2nifti")

    assert outcome.state == "failed"
    assert "the slices are not evenly spaced" in outcome.reason
    assert "SLICE_INCREMENT_INCONSISTENT" in outcome.reason
    assert list(output_dir.iterdir()) == []


def test_a_sagittal_mosaic_matches_its_dcm2niix_reference_and_dicom2nifti_refuses_it(
    tmp_path: Path,
) -> None:
    pieces = fixtures_dir() / "dcm_qa_siemens_orient"
    paths = sorted((pieces / "In" / "Orientation" / "sag" / "sagasc35").iterdir())

    converted, output_dir = convert(tmp_path, paths, "dcm2niix")
    refused, _ = convert(tmp_path, paths, "dicom2nifti")

    assert converted.state == "converted", converted.reason
    reference = load(pieces / "Ref" / "sag_asc_35sl_22.nii")
    assert_same_in_world(output_dir / f"{STEM}.nii.gz", reference)
    # dicom2nifti 2.6 mirrors it left-right in the world: refused, not written wrong
    assert refused.state == "failed"
    assert "sagittal mosaic" in refused.reason
    assert "dcm2niix" in refused.reason


def test_dicom2nifti_refuses_a_series_of_several_multiframe_instances(tmp_path: Path) -> None:
    # it would convert the first of the four and drop the rest without a word
    paths = sorted((fixtures_dir() / "dcm_qa_enh_siemens" / "In").rglob("*.dcm"))

    outcome, _ = convert(tmp_path, paths, "dicom2nifti")

    assert outcome.state == "failed"
    assert "only one multi-frame instance per series" in outcome.reason
    assert "has 4" in outcome.reason


def test_an_instance_missing_from_the_archive_fails_the_conversion(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "dicom", SeriesSpec(slices=4))
    paths[1].unlink()

    outcome, _ = convert(tmp_path, paths)

    assert outcome.state == "failed"
    assert str(paths[1]) in outcome.reason
    assert "dcmdb check" in outcome.reason


def test_a_configured_dcm2niix_that_is_not_there_fails_saying_what_to_configure(
    tmp_path: Path,
) -> None:
    paths = write_series(tmp_path / "dicom", SeriesSpec(slices=4))

    outcome, _ = convert(tmp_path, paths, dcm2niix=tmp_path / "no" / "dcm2niix")

    assert outcome.state == "failed"
    assert "convert.dcm2niix" in outcome.reason
    with pytest.raises(EngineNotFoundError, match=r"convert\.dcm2niix"):
        find_dcm2niix(tmp_path / "no" / "dcm2niix")


# --- engines -------------------------------------------------------------------------------


def test_dcm2niix_is_the_configured_binary_else_the_one_installed_with_dcmdb(
    tmp_path: Path,
) -> None:
    import dcm2niix as dcm2niix_package

    packaged = Path(dcm2niix_package.bin)
    configured = tmp_path / "bin" / "dcm2niix"
    configured.parent.mkdir()
    configured.symlink_to(packaged)

    assert find_dcm2niix() == packaged
    assert find_dcm2niix(configured) == configured
    assert engine_version("dcm2niix", configured) == engine_version("dcm2niix")


def test_engine_versions_are_what_the_engines_report() -> None:
    assert re.fullmatch(r"v1\.0\.\d{8}\w*", engine_version("dcm2niix"))
    assert engine_version("dicom2nifti") == importlib.metadata.version("dicom2nifti")
    with pytest.raises(ValueError, match="unknown NIfTI engine"):
        engine_version("mri_convert")


def test_converting_with_dicom2nifti_leaves_pydicoms_character_sets_as_they_were(
    tmp_path: Path,
) -> None:
    before = pydicom_character_sets()
    paths = write_series(tmp_path / "dicom", SeriesSpec(slices=4))

    outcome, _ = convert(tmp_path, paths, "dicom2nifti")

    assert outcome.state == "converted", outcome.reason
    assert pydicom_character_sets() == before
    assert before["ISO 2022 IR 159"] == "iso2022_jp_2"  # JIS X 0212; dicom2nifti's cannot


# --- preview and bytes ---------------------------------------------------------------------


def test_the_preview_is_a_grey_png_montage_at_most_1024_pixels_wide(tmp_path: Path) -> None:
    spec = SeriesSpec(slices=40, rows=256, columns=256, texture="phantom")
    paths = write_series(tmp_path / "dicom", spec)

    _, output_dir = convert(tmp_path, paths)

    with Image.open(output_dir / f"{STEM}.png") as preview:
        assert preview.format == "PNG"
        assert preview.mode == "L"
        assert preview.size == (1024, 1024)  # 16 slices of 256 x 256 pixels, 4 by 4
        assert 20 < np.asarray(preview).mean() < 200


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_the_preview_shows_each_plane_as_a_dicom_viewer_does(
    tmp_path: Path, orientation: str
) -> None:
    # The factory's pixels grow to the right and downwards within a slice. Shown as on the
    # scanner's console (radiological; anterior or the head up), a slice reads as the DICOM
    # image does for these orientations.
    spec = SeriesSpec(slices=3, rows=40, columns=40, orientation=orientation)  # type: ignore[arg-type]
    paths = write_series(tmp_path / "dicom", spec)

    _, output_dir = convert(tmp_path, paths)

    with Image.open(output_dir / f"{STEM}.png") as preview:
        pixels = np.asarray(preview, dtype=float)
    tile = pixels[: pixels.shape[0] // 2, : pixels.shape[1] // 2]  # the first of 2 x 2
    height, width = tile.shape
    assert tile[:, : width // 3].mean() < tile[:, -width // 3 :].mean()  # darker on the left
    assert tile[: height // 3].mean() < tile[-height // 3 :].mean()  # darker at the top


def test_no_preview_is_written_when_none_is_asked_for(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "dicom", SeriesSpec(slices=4))

    outcome, _ = convert(tmp_path, paths, preview=False)

    assert outcome.outputs == (f"{STEM}.json", f"{STEM}.nii.gz")


def test_converting_a_series_twice_writes_the_same_bytes(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "dicom", SeriesSpec(slices=4))

    _, first = convert(tmp_path, paths)
    _, second = convert(tmp_path, paths)

    for name in (f"{STEM}.nii.gz", f"{STEM}.json", f"{STEM}.png"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
