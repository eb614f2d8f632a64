"""The real-scanner fixtures that come with reference NIfTI outputs, seen as the daemon sees them:
one case per DICOM series (files grouped by SeriesInstanceUID, non-DICOM files left out), each
mapped to the reference volumes it must produce; and a comparison of two NIfTI volumes in world
space. Reads the fixtures in place and never writes to them.

How a case finds its references:
- `Ref/` (dcm_qa pieces): each reference sidecar names its ProtocolName and SeriesNumber; a
  series claims the references whose pair it holds (SeriesNumber alone is not unique in
  dcm_qa_siemens_orient: 8 and 9 appear twice).
- `Ref_regen_dcm2niix/<folder>/` (dicom2nifti_subset): the references of the case in <folder>.
A reference or a series left without a partner is an error at collection, not a silent skip.

How the outputs of one case are paired with its references: by (SeriesNumber, postfix), where
SeriesNumber comes from the JSON sidecar of each and the postfix is what dcm2niix appends after
`%s` (`_e2`, `_ph`, ... ; empty for a plain volume). Every flag set in SOURCE.json ends in `%s`,
so a reference is named `<anything>_<SeriesNumber><postfix>`; the daemon names its outputs
`<stem>[_s<SeriesNumber>][<postfix>]`.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

# The pieces that have reference outputs, with the short name used in test ids.
PIECES = {
    "dcm_qa_enh_siemens": "enh_siemens",
    "dcm_qa_nih_siemens": "nih_siemens",
    "dcm_qa_siemens_orient": "siemens_orient",
    "dcm_qa_ts": "ts",
    "dicom2nifti_subset": "d2n_subset",
}

# dicom2nifti_subset cases the converter must refuse (fixtures README; both have a dcm2niix
# output all the same, which is why they are listed here rather than found by a missing Ref).
EXPECTED_SKIPS = {
    ("dicom2nifti_subset", "failing/slicecount/001"): "2 slices: too few for a volume",
    # One 2D image: "fewer than 3 slices" (issue 4) is not a volume, whatever dcm2niix writes.
    ("dicom2nifti_subset", "ge/anatomical/001_single_slice"): "1 slice: too few for a volume",
    ("dicom2nifti_subset", "failing/sliceorientation/001"): (
        "one SeriesInstanceUID holding two SeriesNumbers with different orientations"
    ),
}

# Affine agreement in mm after canonical reorientation (both engines compute the same geometry
# from the same DICOM fields; 1 micrometre leaves room for float32 storage only).
AFFINE_ATOL_MM = 1e-3
# Diffusion directions are unit vectors written as text with 4-6 significant digits.
BVEC_ATOL = 1e-3
BVAL_ATOL = 1e-3


@dataclass(frozen=True)
class Reference:
    """One reference volume and the files beside it."""

    nifti: Path
    sidecar: Path
    series_number: int
    postfix: str

    @property
    def bval(self) -> Path | None:
        return _sibling(self.nifti, ".bval")

    @property
    def bvec(self) -> Path | None:
        return _sibling(self.nifti, ".bvec")


@dataclass(frozen=True)
class Case:
    """One DICOM series (one SeriesInstanceUID) of one fixture piece."""

    case_id: str
    piece: str
    folder: str  # the series' folder below In/ ("." for the top)
    series_instance_uid: str
    files: tuple[Path, ...]
    series_numbers: tuple[int, ...]
    manufacturer: str
    references: tuple[Reference, ...]
    expected_skip: str | None  # why the converter must skip it; None when it must convert

    @property
    def is_philips(self) -> bool:
        return self.manufacturer.lower().startswith("philips")


@dataclass(frozen=True)
class SeriesHeader:
    """What case discovery needs from one DICOM file."""

    path: Path
    series_instance_uid: str
    series_number: int | None
    protocol_name: str
    manufacturer: str


class ReferenceLayoutError(Exception):
    """The fixtures and their references do not pair up one to one."""


def read_series_header(path: Path) -> SeriesHeader | None:
    """The header of a DICOM file, or None for anything that is not one (README-*.txt, a PDF, a
    stray .nii): pydicom's own test, a Part 10 preamble or a parseable data set, plus a
    SeriesInstanceUID, which every image the daemon archives has."""
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return None
    uid = dataset.get("SeriesInstanceUID")
    if not uid:
        return None
    number = dataset.get("SeriesNumber")
    return SeriesHeader(
        path=path,
        series_instance_uid=str(uid),
        series_number=None if number in (None, "") else int(number),
        protocol_name=str(dataset.get("ProtocolName") or ""),
        manufacturer=str(dataset.get("Manufacturer") or ""),
    )


def discover_cases(fixtures: Path) -> list[Case]:
    """Every series of every piece with references, in a stable order."""
    cases: list[Case] = []
    for piece in sorted(PIECES):
        cases.extend(_piece_cases(fixtures, piece))
    ids = [case.case_id for case in cases]
    duplicates = sorted({case_id for case_id in ids if ids.count(case_id) > 1})
    if duplicates:
        raise ReferenceLayoutError(f"two cases share an id: {duplicates}")
    return cases


def _piece_cases(fixtures: Path, piece: str) -> list[Case]:
    inputs = fixtures / piece / "In"
    groups: dict[str, list[SeriesHeader]] = defaultdict(list)
    for path in sorted(p for p in inputs.rglob("*") if p.is_file()):
        header = read_series_header(path)
        if header is not None:
            groups[header.series_instance_uid].append(header)
    if piece == "dicom2nifti_subset":
        return _cases_by_folder(fixtures, piece, groups)
    return _cases_by_protocol(fixtures, piece, groups)


def _cases_by_protocol(
    fixtures: Path, piece: str, groups: dict[str, list[SeriesHeader]]
) -> list[Case]:
    """dcm_qa pieces: a series claims the Ref/ volumes whose (ProtocolName, SeriesNumber) it
    holds."""
    unclaimed = {
        (json.loads(ref.sidecar.read_text())["ProtocolName"], ref.series_number): ref
        for ref in _references_in(fixtures / piece / "Ref", ".nii")
    }
    cases = []
    for uid, headers in groups.items():
        keys = sorted({(h.protocol_name, h.series_number) for h in headers}, key=str)
        claimed = [unclaimed.pop(key) for key in keys if key in unclaimed]
        if len(claimed) != len(keys):
            raise ReferenceLayoutError(
                f"{piece}: series {uid} ({keys}) has no reference for some of its "
                f"(ProtocolName, SeriesNumber) pairs; claimed {[r.nifti.name for r in claimed]}"
            )
        if len(claimed) == 1:
            label = claimed[0].nifti.name.removesuffix(".nii")
        else:
            numbers = sorted(ref.series_number for ref in claimed)
            label = f"series_{numbers[0]}_to_{numbers[-1]}"
        cases.append(_case(piece, label, uid, headers, claimed, inputs=fixtures / piece / "In"))
    if unclaimed:
        names = sorted(ref.nifti.name for ref in unclaimed.values())
        raise ReferenceLayoutError(f"{piece}: references without a series: {names}")
    return cases


def _cases_by_folder(
    fixtures: Path, piece: str, groups: dict[str, list[SeriesHeader]]
) -> list[Case]:
    """dicom2nifti_subset: the references of a series are those of its folder."""
    inputs = fixtures / piece / "In"
    regenerated = fixtures / piece / "Ref_regen_dcm2niix"
    reference_folders = {
        sidecar.parent.relative_to(regenerated).as_posix()
        for sidecar in regenerated.rglob("*.json")
    }
    cases = []
    for uid, headers in groups.items():
        folders = {h.path.parent.relative_to(inputs).as_posix() for h in headers}
        if len(folders) != 1:
            raise ReferenceLayoutError(f"{piece}: series {uid} spans folders {sorted(folders)}")
        (folder,) = folders
        if folder not in reference_folders:
            raise ReferenceLayoutError(f"{piece}: no Ref_regen_dcm2niix/{folder}/ for {uid}")
        reference_folders.discard(folder)
        references = _references_in(regenerated / folder, ".nii.gz")
        cases.append(
            _case(piece, folder.replace("/", "_"), uid, headers, references, inputs=inputs)
        )
    if reference_folders:
        raise ReferenceLayoutError(
            f"{piece}: reference folders without a series: {sorted(reference_folders)}"
        )
    return cases


def _case(
    piece: str,
    label: str,
    uid: str,
    headers: list[SeriesHeader],
    references: list[Reference],
    *,
    inputs: Path,
) -> Case:
    folders = sorted({h.path.parent.relative_to(inputs).as_posix() for h in headers})
    folder = folders[0] if len(folders) == 1 else ",".join(folders)
    return Case(
        case_id=f"{PIECES[piece]}-{label}",
        piece=piece,
        folder=folder,
        series_instance_uid=uid,
        files=tuple(h.path for h in headers),
        series_numbers=tuple(sorted({h.series_number for h in headers if h.series_number})),
        manufacturer=headers[0].manufacturer,
        references=tuple(sorted(references, key=lambda r: (r.series_number, r.postfix))),
        expected_skip=EXPECTED_SKIPS.get((piece, folder)),
    )


def _references_in(folder: Path, suffix: str) -> list[Reference]:
    references = []
    for nifti in sorted(folder.glob(f"*{suffix}")):
        stem = nifti.name.removesuffix(suffix)
        sidecar = nifti.with_name(f"{stem}.json")
        number = int(json.loads(sidecar.read_text())["SeriesNumber"])
        match = re.fullmatch(rf"(?:.*_)?{number}((?:_.+)?)", stem)
        if match is None:
            raise ReferenceLayoutError(f"{nifti}: name does not end in _{number}[_postfix]")
        references.append(Reference(nifti, sidecar, number, match.group(1)))
    return references


def _sibling(nifti: Path, suffix: str) -> Path | None:
    stem = nifti.name.removesuffix(".gz").removesuffix(".nii")
    path = nifti.with_name(stem + suffix)
    return path if path.exists() else None


@dataclass(frozen=True)
class Output:
    """One volume the converter wrote."""

    nifti: Path
    sidecar: Path
    series_number: int
    postfix: str

    @property
    def bval(self) -> Path | None:
        return _sibling(self.nifti, ".bval")

    @property
    def bvec(self) -> Path | None:
        return _sibling(self.nifti, ".bvec")


def read_outputs(output_dir: Path, names: Iterable[str], stem: str) -> list[Output]:
    """The volumes among `names` (files in output_dir), each with its sidecar's SeriesNumber and
    the postfix its name carries after `<stem>[_s<SeriesNumber>]`."""
    outputs = []
    for name in sorted(names):
        if not name.endswith(".nii.gz"):
            continue
        base = name.removesuffix(".nii.gz")
        sidecar = output_dir / f"{base}.json"
        if not sidecar.is_file():
            raise ReferenceLayoutError(f"{name}: no JSON sidecar {sidecar.name}")
        number = int(json.loads(sidecar.read_text())["SeriesNumber"])
        match = re.fullmatch(rf"{re.escape(stem)}(?:_s(\d+))?((?:_.+)?)", base)
        if match is None:
            raise ReferenceLayoutError(f"{name}: not named {stem}[_s<SeriesNumber>][_postfix]")
        if match.group(1) is not None and int(match.group(1)) != number:
            raise ReferenceLayoutError(f"{name}: sidecar says SeriesNumber {number}")
        outputs.append(Output(output_dir / name, sidecar, number, match.group(2)))
    return outputs


def pair_outputs(
    outputs: list[Output], references: Iterable[Reference]
) -> list[tuple[Output, Reference]]:
    """Each output with its reference, by (SeriesNumber, postfix); raises when either side
    has one the other lacks."""
    by_key = {(ref.series_number, ref.postfix): ref for ref in references}
    produced = {(out.series_number, out.postfix): out for out in outputs}
    if len(produced) != len(outputs):
        raise ReferenceLayoutError(
            f"two outputs share a (SeriesNumber, postfix): {[o.nifti.name for o in outputs]}"
        )
    missing = sorted(set(by_key) - set(produced))
    extra = sorted(set(produced) - set(by_key))
    if missing or extra:
        raise ReferenceLayoutError(
            "outputs and references do not pair up by (SeriesNumber, postfix): "
            f"references without an output {[by_key[k].nifti.name for k in missing]}, "
            f"outputs without a reference {[produced[k].nifti.name for k in extra]}"
        )
    return [(produced[key], by_key[key]) for key in sorted(by_key)]


def compare_volumes(
    output: Path,
    reference: Path,
    *,
    value_rtol: float = 0.0,
    value_scales: tuple[float, ...] = (1.0,),
    bvals: tuple[Path | None, Path | None] = (None, None),
    bvecs: tuple[Path | None, Path | None] = (None, None),
) -> list[str]:
    """Differences between two NIfTI volumes as they lie in the world; empty when they agree.

    - Both are reoriented with `nibabel.as_closest_canonical` (RAS+ voxel axes), so that two
      engines storing the same volume in different voxel orders compare equal; then shapes
      (4D included), affines (within AFFINE_ATOL_MM) and voxel values must agree.
    - Values are compared scaled (`get_fdata()`: raw x scl_slope + scl_inter), because one engine
      may keep raw integers with a slope while another stores the scaled floats. With
      value_rtol=0 they must be identical. The output may also equal the reference times one of
      `value_scales`, within value_rtol: both are for Philips data only (see the tests).
    - b-values must agree within BVAL_ATOL. b-vectors are FSL-style, in the voxel axes of the
      image as stored (x negated when the affine's determinant is positive); each is turned into a
      world direction with its own image's affine and those are compared, so the comparison
      holds whatever voxel order either engine stored.
    """
    out_img = load_nifti(output)
    ref_img = load_nifti(reference)
    problems: list[str] = []
    out_canonical = nib.as_closest_canonical(out_img)
    ref_canonical = nib.as_closest_canonical(ref_img)
    if out_canonical.shape != ref_canonical.shape:
        problems.append(
            f"shape {out_canonical.shape} (stored {out_img.shape}), "
            f"reference {ref_canonical.shape} (stored {ref_img.shape})"
        )
    if not np.allclose(out_canonical.affine, ref_canonical.affine, atol=AFFINE_ATOL_MM):
        problems.append(
            "world affine (canonical) differs:\n"
            f"output {nib.aff2axcodes(out_img.affine)}\n{np.round(out_canonical.affine, 4)}\n"
            f"reference {nib.aff2axcodes(ref_img.affine)}\n{np.round(ref_canonical.affine, 4)}"
        )
    if not problems:
        problems.extend(_compare_values(out_canonical, ref_canonical, value_rtol, value_scales))
    problems.extend(_compare_bvals(*bvals))
    if bvecs != (None, None):
        problems.extend(_compare_bvecs(bvecs, (out_img.affine, ref_img.affine)))
    return problems


def load_nifti(path: Path) -> nib.Nifti1Image:
    """A NIfTI-1 image (.nii or .nii.gz), or an error naming the file."""
    image = nib.load(path)
    if not isinstance(image, nib.Nifti1Image):
        raise ReferenceLayoutError(f"{path}: {type(image).__name__}, not a NIfTI-1 image")
    return image


def _compare_values(
    output: nib.Nifti1Image,
    reference: nib.Nifti1Image,
    value_rtol: float,
    value_scales: tuple[float, ...],
) -> list[str]:
    out_data = output.get_fdata()
    ref_data = reference.get_fdata()
    for scale in value_scales:
        if _values_agree(out_data, ref_data * scale, value_rtol):
            return []
    unequal = ~_values_close(out_data, ref_data, value_rtol)
    first = tuple(int(i) for i in np.argwhere(unequal)[0])
    flipped = [
        axis
        for axis in range(3)
        if _values_agree(np.flip(out_data, axis), ref_data, max(value_rtol, 1e-6))
    ]
    hint = f"; equal if flipped along canonical axis {flipped}" if flipped else ""
    scales = f" (nor times {value_scales[1:]})" if len(value_scales) > 1 else ""
    return [
        f"voxel values differ{scales} at {int(unequal.sum())} of {unequal.size} voxels "
        f"(first at {first}: {out_data[first]} vs reference {ref_data[first]}; "
        f"output range {out_data.min()}..{out_data.max()}, "
        f"reference {ref_data.min()}..{ref_data.max()}{hint})"
    ]


def _values_close(output: np.ndarray, reference: np.ndarray, rtol: float) -> np.ndarray:
    if rtol == 0.0:
        return np.asarray(output == reference)
    # atol: a value the reference holds as 0 may come out as a rounding residue
    atol = rtol * float(np.max(np.abs(reference)))
    return np.isclose(output, reference, rtol=rtol, atol=atol)


def _values_agree(output: np.ndarray, reference: np.ndarray, rtol: float) -> bool:
    return output.shape == reference.shape and bool(np.all(_values_close(output, reference, rtol)))


def _compare_bvals(output: Path | None, reference: Path | None) -> list[str]:
    if output is None and reference is None:
        return []
    if output is None or reference is None:
        return [f"bval: output {output}, reference {reference}"]
    out_values = np.loadtxt(output, ndmin=1)
    ref_values = np.loadtxt(reference, ndmin=1)
    if out_values.shape == ref_values.shape and np.allclose(out_values, ref_values, atol=BVAL_ATOL):
        return []
    return [f"bval differ: output {out_values.tolist()}, reference {ref_values.tolist()}"]


def world_directions(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """FSL b-vectors (3 x N, voxel axes of the stored image) as world (RAS+) directions."""
    rotation = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    voxel = np.array(bvecs, dtype=float)
    if np.linalg.det(rotation) > 0:
        # FSL treats a neurologically stored image as if its x axis ran the other way
        voxel[0] = -voxel[0]
    return np.asarray(rotation @ voxel)


def _compare_bvecs(
    paths: tuple[Path | None, Path | None], affines: tuple[np.ndarray, np.ndarray]
) -> list[str]:
    output, reference = paths
    if output is None or reference is None:
        return [f"bvec: output {output}, reference {reference}"]
    out_world = world_directions(np.loadtxt(output, ndmin=2), affines[0])
    ref_world = world_directions(np.loadtxt(reference, ndmin=2), affines[1])
    if out_world.shape == ref_world.shape and np.allclose(out_world, ref_world, atol=BVEC_ATOL):
        return []
    return [
        "bvec differ as world directions (RAS+), columns are volumes:\n"
        f"output\n{np.round(out_world, 4)}\nreference\n{np.round(ref_world, 4)}"
    ]
