"""NIfTI for one DICOM series: facts first, then an engine, then compact outputs beside it.

`convert_series` turns the archived files of one series (one SeriesInstanceUID) into
`<stem>.nii.gz` with a JSON sidecar, `.bval`/`.bvec` for diffusion and a `.png` preview, in a
folder of the caller's. It never raises for bad data: every series ends `converted`, `skipped`
(there is no volume to make: the reason says why) or `failed` (the engine could not make one:
the reason says what it said and what to do).

Order of work:
1. Facts (`daemon.dicomfile.read_series_facts`, headers only) decide what is skipped, in this
   order: not an image (SR, RT plan/structure set/dose, waveforms, presentation states, key
   objects, encapsulated documents, SEG, raw data, anything without pixel data); a localizer
   (ImageType LOCALIZER or SCOUT); inconsistent geometry (single-frame images whose Image
   Orientation (Patient) differs by more than 1e-3 in any component, or different Rows/Columns).
   A series mixing images with other instances (or with localizers) converts its images and
   notes what it left out.
2. The engine writes uncompressed `.nii` into a private scratch folder (`scratch_dir`, else the
   system's temporary folder), removed in a `finally`:
   - dcm2niix (the default) gets a folder of symlinks to exactly the series' files (the archive
     folder may hold others) and runs with `-g i` (an admin's ~/.dcm2nii.ini cannot change
     what it does) and its own defaults otherwise, written out: those are what its QA
     references were made with (`-i n`: localizers and derived images are ours to judge;
     `-m 2`: echoes, phase and magnitude stay apart; `-l o`: stored integers kept, with
     scl_slope/scl_inter where the scanner scaled; `-p y`; `-x n`: 3D acquisitions are
     rotated to the nearest canonical orientation, so the slice axis is not always the 3rd).
     `-ba y` leaves patient data out of its JSON, `-c ""` Image Comments out of the NIfTI
     header's aux_file.
   - dicom2nifti converts each SeriesNumber of the series, and each echo of a multi-echo
     series, on its own (as dcm2niix splits them), with its global settings set explicitly
     each time, its own reorientation (its b-vectors are made for it) and no gzip of its own.
     It reads the files where they are (`common.read_dicom_directory` +
     `dicom_array_to_nifti`: what `dicom_series_to_nifti` does after copying the whole series
     to the system's temporary folder). A series of several multi-frame instances fails with
     dicom2nifti, which would convert the first and drop the rest without a word; so does a
     Siemens mosaic that is not axial, which dicom2nifti 2.6 places wrongly. It is imported
     only when used, and pydicom's character set table is put back after the import, which
     rewrites it process-wide (`dicomfile.pydicom_character_sets`).
3. Volumes of fewer than 3 images (slices, the smallest of the first three dimensions since
   dcm2niix may put the slice axis first, times time points or diffusion directions) are
   dropped with a note; nothing left is `skipped`.
4. Outputs are written to `.tmp-*` names in `output_dir`, fsynced, and renamed to their final
   names only when all of them are written; a failure removes them.

Names: one volume gives `<stem>.nii.gz`, `.json`, `.bval`/`.bvec` (diffusion only) and `.png`.
Several volumes give `<stem>_<suffix>.*`: `s<SeriesNumber>` first when the series holds several
SeriesNumbers, then dcm2niix's own postfixes (`e2`, `ph`, `real`, `imaginary`, `ADC`,
`i00001`, ...; dicom2nifti's echoes get `e<N>` the same way), joined by '_'. A volume dcm2niix
gives no postfix and that needs no `s<N>` (the magnitude beside a `_ph`) keeps the bare stem.
Two volumes left with one name (never seen from dcm2niix) get `_2`, `_3` in the engine's order.
Volumes dropped as too thin do not count: one volume left is the bare stem.

Data: gzip by ISA-L (`isal.igzip`, level 3, streamed; gzip header without time, so equal input
gives equal bytes). dcm2niix's `.nii` is copied unchanged (integers, with scl_slope/scl_inter
where the scanner scaled). dicom2nifti's is made compact where that is exact: floats that are
all integral are stored as int16, else uint16, else int32 (scl_slope 1, scl_inter 0); float64
that float32 holds exactly becomes float32; wider integers are narrowed the same way; anything
else is kept as it is. The affine is never touched.

Sidecar: dcm2niix's JSON when it ran, without the keys in _IDENTIFYING_KEYS; then what our own
header read knows and the JSON lacks (BIDS units: EchoTime and RepetitionTime in seconds,
FlipAngle in degrees): dcm2niix's per-volume values (the echo time of echo 2, the SeriesNumber
of each of several) are never overwritten. ConversionSoftware and ConversionSoftwareVersion name
the engine that ran. A series without SeriesNumber gets none (dcm2niix would write a checksum
of the UID there).

Preview: one PNG per volume, `<name>.png`: up to 16 slices evenly spaced through the first 3D
volume, in the acquisition plane (the plane of the DICOM slices; for enhanced multi-frame
instances, the plane of the stored slices), oriented as on the scanner's console (radiological:
the patient's right on the left; anterior, or the head, up), pixels in their true aspect ratio,
windowed from the 1st to the 99th percentile of the nonzero voxels shown, 8-bit grey, at most
1024 pixels wide.

Nothing here logs patient names or IDs: dcm2niix is given file names and an output name of our
own, so its messages name no patient either.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal, Protocol

import nibabel as nib
import numpy as np
from isal import igzip
from PIL import Image

from daemon.dicomfile import (
    AcquisitionFacts,
    InstanceFacts,
    RejectedFileError,
    SeriesFacts,
    pydicom_character_sets,
    read_series_facts,
    restore_pydicom_character_sets,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ENGINES",
    "ConversionOutcome",
    "ConversionRequest",
    "EngineNotFoundError",
    "convert_series",
    "engine_version",
    "find_dcm2niix",
]

ENGINES: Final = ("dcm2niix", "dicom2nifti")

_TEMP_PREFIX: Final = ".tmp-"  # Samba vetoes these (DESIGN: nothing half-written is visible)
_GZIP_LEVEL: Final = 3
_COPY_CHUNK: Final = 1 << 20
_MIN_SLICES: Final = 3
# PS3.3 C.7.6.2.1.1: direction cosines; a difference below this is rounding, not a new plane
_ORIENTATION_TOLERANCE: Final = 1e-3
_LOCALIZER_TYPES: Final = frozenset({"LOCALIZER", "SCOUT"})
_ENGINE_MESSAGE_LINES: Final = 6
_MAX_NOTES_FROM_ENGINE: Final = 10

# Keys never written to a sidecar, though dcm2niix may (with `-ba n`, or in later versions):
# the attributes of PS3.15 Annex E (Basic Application Level Confidentiality Profile, Table
# E.1-1) that dcm2niix reports: the patient, the people involved, the institution and device,
# dates, the study's and series' identifiers, and free-text comments that may hold any of
# these. Times of day are kept (BIDS AcquisitionTime), as are the study's and series'
# descriptions (its "Retain Description" spirit: a researcher needs them to know the series).
_IDENTIFYING_KEYS: Final = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "PatientAge",
        "PatientWeight",
        "PatientSize",
        "OtherPatientIDs",
        "PatientAddress",
        "AccessionNumber",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "OperatorsName",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "DeviceSerialNumber",
        "StationName",
        "StudyID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "AcquisitionDateTime",
        "AcquisitionDate",
        "StudyDate",
        "SeriesDate",
        "ContentDate",
        "ImageComments",
        "TextComments",
        "ProcedureStepDescription",
    }
)

# dcm2niix's exit codes (nii_dicom_batch.h, kEXIT_*), in words
_DCM2NIIX_EXIT_CODES: Final = {
    1: "an unspecified error",
    2: "no DICOM it could convert was found",
    4: "a corrupt DICOM file",
    5: "the input folder is invalid",
    6: "the output folder is invalid",
    7: "the output folder is read-only",
    8: "some volumes were converted, some not",
    9: "a rename error",
    10: "incomplete volumes",
}
# Exit codes after which what dcm2niix did write is still good
_DCM2NIIX_PARTIAL_CODES: Final = frozenset({8, 10})
_DCM2NIIX_PREFIX: Final = "dcmdb_"  # `-f dcmdb_%s`: %s is the SeriesNumber
_DCM2NIIX_NAME = re.compile(rf"{_DCM2NIIX_PREFIX}(\d*)(.*)")
_VERSION = re.compile(r"v\d+\.\d+\.\d{8}\w*")

# dicom2nifti's validation codes (its ConversionValidationError/ConversionError messages)
_DICOM2NIFTI_SKIPS: Final = {
    "TOO_FEW_SLICES/LOCALIZER": "too few slices for a volume (dicom2nifti: a localizer?)",
    "NON_IMAGING_DICOM_FILES": "not an image series (dicom2nifti found no image geometry)",
}
_DICOM2NIFTI_FAILURES: Final = {
    "SLICE_INCREMENT_INCONSISTENT": (
        "the slices are not evenly spaced (missing or duplicate slices?)"
    ),
    "IMAGE_ORIENTATION_INCONSISTENT": "the slices do not all lie in one plane",
    "NON_CUBICAL_IMAGE/GANTRY_TILT": "the slices are tilted (gantry tilt)",
    "INSTANCE_NUMBER_INCONSISTENT": "the instance numbers are not consecutive",
    "INCONSISTENT_ACQUISITION_NUMBERS": "the series holds several acquisitions",
    "MISSING_DICOM_FILES": "instances are missing",
    "NOT_A_VOLUME": "the images do not form a volume",
    "NO_DICOM_FILES_FOUND": "no DICOM files were found",
    "UNSUPPORTED_DATA": "this kind of data is not supported",
    "MOSAIC_TYPE_NOT_SUPPORTED": "this mosaic type is not supported",
    "IMPLICIT_VR_ENHANCED_DICOM": "enhanced multi-frame DICOM in implicit VR is not supported",
}
_TRY_OTHER_ENGINE: Final = {
    "dcm2niix": 'the DICOM is kept; try convert.engine = "dicom2nifti", or ask your admin',
    "dicom2nifti": 'the DICOM is kept; try convert.engine = "dcm2niix", or ask your admin',
}

# PNG preview
_PREVIEW_SLICES: Final = 16
_PREVIEW_MAX_WIDTH: Final = 1024
_PREVIEW_TILE_WIDTH: Final = 256
_PREVIEW_PERCENTILES: Final = (1.0, 99.0)
_PREVIEW_SAMPLE: Final = 200_000  # nonzero voxels enough for the percentiles
_PNG_COMPRESS_LEVEL: Final = 1  # noisy MR compresses little better at 6, at 3x the time


class EngineNotFoundError(Exception):
    """The configured engine is not installed or not where the config says; the message says
    how to install or configure it."""


class _EngineFailed(Exception):
    """The engine made no volume; `reason` says what it said and what to do."""

    def __init__(self, reason: str, *, skipped: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.skipped = skipped


@dataclass(frozen=True, slots=True)
class ConversionRequest:
    files: tuple[Path, ...]  # the archived instance files of ONE series (one SeriesInstanceUID)
    output_dir: Path  # exists, empty, private to this conversion
    stem: str  # base name of outputs, already safe, e.g. "003_T1_MPRAGE"
    engine: str  # "dcm2niix" | "dicom2nifti"
    dcm2niix: Path | None = None  # None -> find_dcm2niix()
    preview: bool = True
    scratch_dir: Path | None = None  # room for uncompressed intermediates; None -> tempfile


@dataclass(frozen=True, slots=True)
class ConversionOutcome:
    state: Literal["converted", "skipped", "failed"]
    reason: str  # "" when converted; else why, for a researcher or admin, and what to do
    engine: str
    engine_version: str
    outputs: tuple[str, ...]  # file names written into output_dir, sorted
    notes: tuple[str, ...] = ()  # outputs dropped and why, engine warnings worth keeping


# --- engines: where and which version ------------------------------------------------------


def find_dcm2niix(configured: Path | None = None) -> Path:
    """`configured` if given (it must exist); else the binary of the `dcm2niix` PyPI package
    installed with dcmdb; else `dcm2niix` on PATH. Raises EngineNotFoundError."""
    if configured is not None:
        if configured.is_file() and os.access(configured, os.X_OK):
            return configured
        raise EngineNotFoundError(
            f"dcm2niix is not an executable file at {configured} (convert.dcm2niix): fix the "
            "path, or remove the key to use the dcm2niix installed with dcmdb"
        )
    try:
        import dcm2niix as dcm2niix_package  # the PyPI package: a binary and its path
    except ImportError:
        logger.debug("the dcm2niix Python package is not installed; looking on PATH")
    else:
        packaged = Path(str(dcm2niix_package.bin))
        if packaged.is_file():
            return packaged
    found = shutil.which("dcm2niix")
    if found is not None:
        return Path(found)
    raise EngineNotFoundError(
        "dcm2niix is not installed: install dcmdb's dependencies (`pip install dcm2niix` in "
        "its environment) or the system package (`apt install dcm2niix`), or set "
        "convert.dcm2niix to the path of the binary"
    )


def engine_version(engine: str, dcm2niix: Path | None = None) -> str:
    """The version of `engine`: "v1.0.20260724" for dcm2niix (`dcm2niix` given, or found by
    find_dcm2niix), the package version for dicom2nifti. Raises EngineNotFoundError, or
    ValueError for an engine not in ENGINES."""
    if engine == "dcm2niix":
        binary = find_dcm2niix(dcm2niix)
        stat = binary.stat()
        return _dcm2niix_version(str(binary), stat.st_mtime_ns, stat.st_size)
    if engine == "dicom2nifti":
        try:
            return importlib.metadata.version("dicom2nifti")
        except importlib.metadata.PackageNotFoundError:
            raise EngineNotFoundError(
                "dicom2nifti is not installed: `pip install dicom2nifti` in dcmdb's "
                'environment, or set convert.engine = "dcm2niix"'
            ) from None
    raise ValueError(f"unknown NIfTI engine {engine!r}: use one of {', '.join(ENGINES)}")


@functools.lru_cache(maxsize=8)
def _dcm2niix_version(binary: str, _mtime_ns: int, _size: int) -> str:
    """Cached per binary file version (its mtime and size are part of the key)."""
    try:
        result = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, errors="replace", check=False
        )
    except OSError as exc:
        raise EngineNotFoundError(
            f"dcm2niix at {binary} cannot be run ({exc.strerror}): reinstall it or fix "
            "convert.dcm2niix"
        ) from exc
    match = _VERSION.search(result.stdout + result.stderr)
    if match is None:
        raise EngineNotFoundError(
            f"{binary} does not report a dcm2niix version (`--version` said "
            f"{_tail(result.stdout + result.stderr, 2)!r}): point convert.dcm2niix at dcm2niix"
        )
    return match.group(0)


# --- the conversion ------------------------------------------------------------------------


@dataclass
class _Volume:
    """One volume an engine wrote into scratch, before it is named and placed."""

    nifti: Path
    sidecar: dict[str, Any]
    series_number: int | None
    postfix: tuple[str, ...]  # dcm2niix's postfix parts ("e2", "ph", ...)
    echo_number: int | None = None  # the echo of a dicom2nifti volume split by echo
    bval: Path | None = None
    bvec: Path | None = None
    compact: bool = False  # make its data type compact (dicom2nifti output)
    name: str = ""
    plane_normal: np.ndarray | None = field(default=None, repr=False)  # RAS, for the preview


@dataclass(frozen=True, slots=True)
class _Plan:
    """What the facts leave to convert."""

    images: tuple[InstanceFacts, ...]
    notes: tuple[str, ...]


class _Skip(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def convert_series(request: ConversionRequest) -> ConversionOutcome:
    """Convert one series (see the module docstring). Never raises for bad data: a series
    that is not a volume is `skipped`, one the engine cannot convert is `failed`, both with a
    reason; running out of memory is `failed` too."""
    started = time.monotonic()
    version = ""

    def outcome(
        state: Literal["converted", "skipped", "failed"],
        reason: str,
        outputs: Sequence[str] = (),
        notes: Sequence[str] = (),
    ) -> ConversionOutcome:
        logger.debug(
            "%s in %.2f s: %s%s",
            request.stem,
            time.monotonic() - started,
            state,
            f" ({reason})" if reason else "",
        )
        return ConversionOutcome(
            state=state,
            reason=reason,
            engine=request.engine,
            engine_version=version,
            outputs=tuple(sorted(outputs)),
            notes=tuple(notes),
        )

    try:
        binary = find_dcm2niix(request.dcm2niix) if request.engine == "dcm2niix" else None
        version = engine_version(request.engine, binary)
    except (EngineNotFoundError, ValueError) as exc:
        return outcome("failed", str(exc))
    try:
        return _convert(request, binary, version, outcome)
    except MemoryError:
        return outcome(
            "failed",
            "out of memory: the series needs more memory than this process may use "
            "(convert.memory_limit); raise it, or lower convert.workers",
        )


class _OutcomeMaker(Protocol):
    def __call__(
        self,
        state: Literal["converted", "skipped", "failed"],
        reason: str,
        outputs: Sequence[str] = (),
        notes: Sequence[str] = (),
    ) -> ConversionOutcome: ...


def _convert(
    request: ConversionRequest, binary: Path | None, version: str, outcome: _OutcomeMaker
) -> ConversionOutcome:
    """convert_series after the engine is found: facts, engine, outputs."""
    try:
        facts = read_series_facts(request.files)
    except RejectedFileError as exc:
        return outcome("failed", f"an instance cannot be read: {exc.reason}")
    except OSError as exc:
        return outcome(
            "failed",
            f"cannot read {exc.filename or 'an instance'} ({exc.strerror or exc}): the archive "
            "and the catalog disagree; run `dcmdb check`",
        )
    try:
        plan = _plan(facts)
    except _Skip as skip:
        return outcome("skipped", skip.reason)

    try:
        scratch = Path(tempfile.mkdtemp(prefix="dcmdb-nifti-", dir=request.scratch_dir))
    except OSError as exc:
        return outcome(
            "failed",
            f"cannot make a scratch folder in {request.scratch_dir or tempfile.gettempdir()}: "
            f"{exc.strerror or exc}",
        )
    written: list[Path] = []
    notes = list(plan.notes)
    try:
        if binary is not None:
            volumes, engine_notes = _run_dcm2niix(binary, plan.images, scratch)
        else:
            volumes, engine_notes = _run_dicom2nifti(plan.images, scratch)
        notes += engine_notes
        volumes, dropped, most_slices = _drop_thin(volumes)
        notes += dropped
        if not volumes:
            return outcome(
                "skipped",
                f"{most_slices} slice{'s' if most_slices != 1 else ''}: a volume needs at "
                f"least {_MIN_SLICES}",
                notes=notes,
            )
        _name_volumes(volumes, plan.images, request.stem)
        _fill_sidecars(volumes, plan.images, request.engine, version)
        for volume in volumes:
            written += _write_volume(volume, request.output_dir, request.preview)
        outputs = _commit(written, request.output_dir)
        written.clear()
        return outcome("converted", "", outputs, notes)
    except _EngineFailed as exc:
        return outcome("skipped" if exc.skipped else "failed", exc.reason, notes=notes)
    except nib.filebasedimages.ImageFileError as exc:
        return outcome(
            "failed",
            f"the engine wrote a file that is not NIfTI ({exc}); "
            f"{_TRY_OTHER_ENGINE.get(request.engine, '')}",
            notes=notes,
        )
    except OSError as exc:
        where = f" on {exc.filename}" if exc.filename else ""
        return outcome(
            "failed",
            f"file system error{where}: {exc.strerror or exc}; check the free space and "
            f"permissions of {request.output_dir} and of the scratch folder {scratch.parent}",
            notes=notes,
        )
    finally:
        for path in written:
            path.unlink(missing_ok=True)
        shutil.rmtree(scratch, onerror=_log_removal_error)


def _log_removal_error(_function: Callable[..., object], path: str, exc_info: Any) -> None:
    logger.warning("cannot remove scratch %s: %s", path, exc_info[1])


def _plan(facts: SeriesFacts) -> _Plan:
    """The images to convert, or _Skip with the reason (module docstring, step 1)."""
    instances = facts.instances
    if not instances:
        raise _Skip("the series has no instances")
    images = [instance for instance in instances if instance.is_image]
    notes: list[str] = []
    if not images:
        raise _Skip(f"not an image series: {_class_names(instances)}")
    if len(images) < len(instances):
        others = [instance for instance in instances if not instance.is_image]
        notes.append(
            f"{len(others)} instance(s) that are not images left out: {_class_names(others)}"
        )
    localizers = [image for image in images if _LOCALIZER_TYPES & set(image.image_type)]
    if len(localizers) == len(images):
        image_type = "\\".join(localizers[0].image_type)
        raise _Skip(f"a localizer (ImageType {image_type}): not converted")
    if localizers:
        notes.append(f"{len(localizers)} localizer image(s) left out (ImageType LOCALIZER/SCOUT)")
        images = [image for image in images if not _LOCALIZER_TYPES & set(image.image_type)]
    _check_geometry(images)
    return _Plan(images=tuple(images), notes=tuple(notes))


def _class_names(instances: Sequence[InstanceFacts]) -> str:
    names = []
    for instance in instances:
        name = instance.sop_class_name
        if name == instance.sop_class_uid:  # not in pydicom's dictionary: private or new
            name = f"SOP Class {name}"
        if instance.image_storage and not instance.has_pixel_data:
            name += " without pixel data"
        if name not in names:
            names.append(name)
    return ", ".join(names)


def _check_geometry(images: Sequence[InstanceFacts]) -> None:
    """_Skip when the images cannot lie in one volume (PS3.3 C.7.6.2: one plane, one matrix)."""
    orientations: list[tuple[float, ...]] = []
    for image in images:
        if (image.number_of_frames or 1) > 1 or not image.image_orientation:
            continue
        if not any(
            max(abs(a - b) for a, b in zip(image.image_orientation, known, strict=True))
            <= _ORIENTATION_TOLERANCE
            for known in orientations
        ):
            orientations.append(image.image_orientation)
    if len(orientations) > 1:
        shown = "; ".join("\\".join(f"{v:g}" for v in o) for o in orientations[:3])
        raise _Skip(
            f"inconsistent geometry: ImageOrientationPatient differs between the images "
            f"({len(orientations)} distinct orientations, e.g. {shown}): the series mixes "
            "slice planes, which no single volume can hold"
        )
    matrices = sorted(
        {(image.rows, image.columns) for image in images},
        key=lambda size: (size[0] or 0, size[1] or 0),
    )
    if len(matrices) > 1:
        shown = ", ".join(f"{rows}x{columns}" for rows, columns in matrices[:4])
        raise _Skip(
            f"inconsistent geometry: Rows x Columns differ between the images "
            f"({len(matrices)} distinct sizes: {shown}), which no single volume can hold"
        )


# --- dcm2niix ------------------------------------------------------------------------------


def _link_inputs(images: Sequence[InstanceFacts], folder: Path) -> dict[str, Path]:
    """A folder of symlinks to exactly these files; returns link name -> original path."""
    folder.mkdir()
    links: dict[str, Path] = {}
    for index, image in enumerate(images):
        name = f"{index:06d}"
        os.symlink(os.path.abspath(image.path), folder / name)
        links[name] = image.path
    return links


def _run_dcm2niix(
    binary: Path, images: Sequence[InstanceFacts], scratch: Path
) -> tuple[list[_Volume], list[str]]:
    input_dir = scratch / "in"
    output_dir = scratch / "out"
    links = _link_inputs(images, input_dir)
    output_dir.mkdir()
    command = [
        str(binary),
        "-g", "i",  # ignore ~/.dcm2nii.ini: these flags alone decide
        "-b", "y",
        "-ba", "y",
        "-z", "n",
        "-i", "n",
        "-m", "2",
        "-l", "o",
        "-p", "y",
        "-x", "n",
        "-c", "",  # aux_file empty: dcm2niix copies Image Comments there, which may name anyone
        "-f", f"{_DCM2NIIX_PREFIX}%s",
        "-o", str(output_dir),
        str(input_dir),
    ]  # fmt: skip
    logger.debug("running %s", " ".join(command))
    result = subprocess.run(
        command, capture_output=True, text=True, errors="replace", check=False, cwd=scratch
    )
    messages = _readable(result.stdout + "\n" + result.stderr, input_dir, output_dir, links)
    volumes = _dcm2niix_volumes(output_dir)
    notes = _warnings(messages)
    if result.returncode != 0 or not volumes:
        what = _DCM2NIIX_EXIT_CODES.get(result.returncode, "")
        code = (
            f"exit code {result.returncode}{f': {what}' if what else ''}"
            if result.returncode >= 0
            else f"killed by signal {-result.returncode}"
        )
        if volumes and result.returncode in _DCM2NIIX_PARTIAL_CODES:
            notes.append(f"dcm2niix {code}: {_tail(messages, 2)}")
        else:
            nothing = "wrote no volume" if result.returncode == 0 else f"failed ({code})"
            raise _EngineFailed(
                f"dcm2niix {nothing}: {_tail(messages, _ENGINE_MESSAGE_LINES)}; "
                f"{_TRY_OTHER_ENGINE['dcm2niix']}"
            )
    return volumes, notes


def _dcm2niix_volumes(output_dir: Path) -> list[_Volume]:
    volumes = []
    for nifti in sorted(output_dir.glob("*.nii")):
        base = nifti.name.removesuffix(".nii")
        match = _DCM2NIIX_NAME.fullmatch(base)
        if match is None:  # not named by our -f: keep it all the same, named by its own
            number, postfix = None, base
        else:
            number = int(match.group(1)) if match.group(1) else None
            postfix = match.group(2)
        sidecar = _read_json(nifti.with_suffix(".json"))
        if isinstance(sidecar.get("SeriesNumber"), int):
            number = sidecar["SeriesNumber"]
        echo = sidecar.get("EchoNumber")
        volumes.append(
            _Volume(
                nifti=nifti,
                sidecar=sidecar,
                series_number=number,
                postfix=tuple(part for part in postfix.split("_") if part),
                echo_number=echo if isinstance(echo, int) else None,
                bval=_existing(nifti.with_suffix(".bval")),
                bvec=_existing(nifti.with_suffix(".bvec")),
            )
        )
    return volumes


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        logger.warning("dcm2niix wrote a sidecar that is not JSON (%s): ignored", exc)
        return {}
    return value if isinstance(value, dict) else {}


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _readable(text: str, input_dir: Path, output_dir: Path, links: dict[str, Path]) -> str:
    """The engine's messages with our symlink names turned back into the archive's paths and
    without the scratch folder before output names."""
    pattern = re.compile(re.escape(str(input_dir)) + r"/(\d{6})")
    text = pattern.sub(lambda match: str(links.get(match.group(1), match.group(0))), text)
    return text.replace(f"{output_dir}{os.sep}", "")


def _warnings(messages: str) -> list[str]:
    """dcm2niix's warnings, each once, at most _MAX_NOTES_FROM_ENGINE of them."""
    found: list[str] = []
    for line in messages.splitlines():
        line = line.strip()
        if line.lower().startswith("warning") and line not in found:
            found.append(line)
    return [f"dcm2niix: {line}" for line in found[:_MAX_NOTES_FROM_ENGINE]]


def _tail(text: str, lines: int) -> str:
    """The last `lines` non-empty lines, joined by ' | ' (for a one-line reason)."""
    kept: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line and line not in kept:  # dcm2niix repeats a warning for every file
            kept.append(line)
    return " | ".join(kept[-lines:]) if kept else "(no message)"


# --- dicom2nifti ---------------------------------------------------------------------------


def _run_dicom2nifti(
    images: Sequence[InstanceFacts], scratch: Path
) -> tuple[list[_Volume], list[str]]:
    # Imported here, and pydicom's character set table put back after: importing dicom2nifti
    # rewrites it process-wide (module docstring).
    character_sets = pydicom_character_sets()
    try:
        import dicom2nifti.common as dicom2nifti_common
        import dicom2nifti.convert_dicom as dicom2nifti_convert
        import dicom2nifti.settings as dicom2nifti_settings
        from dicom2nifti.exceptions import ConversionError, ConversionValidationError
    finally:
        restore_pydicom_character_sets(character_sets)

    # Global settings: set every time, whatever an earlier caller set. Its minimum of 4 slices
    # is off: ours (3, counted after conversion) decides.
    dicom2nifti_settings.disable_validate_slicecount()
    dicom2nifti_settings.enable_validate_orientation()
    dicom2nifti_settings.enable_validate_orthogonal()
    dicom2nifti_settings.enable_validate_slice_increment()
    dicom2nifti_settings.disable_validate_instance_number()
    dicom2nifti_settings.enable_validate_multiframe_implicit()
    dicom2nifti_settings.disable_pydicom_read_force()
    dicom2nifti_settings.disable_resampling()

    _refuse_what_dicom2nifti_misplaces(images)
    volumes: list[_Volume] = []
    for index, (number, echo, members) in enumerate(_dicom2nifti_groups(images)):
        where = " and ".join(
            part
            for part in (
                f"SeriesNumber {number}" if number is not None else "",
                f"echo {echo}" if echo is not None else "",
            )
            if part
        )
        where = f" ({where})" if where else ""
        multi_frame = [image for image in members if (image.number_of_frames or 1) > 1]
        if len(multi_frame) > 1:
            # dicom2nifti converts the first multi-frame instance of a series and ignores the
            # rest without a word: refuse rather than write part of the series
            raise _EngineFailed(
                f"dicom2nifti converts only one multi-frame instance per series, and this "
                f"series{where} has {len(multi_frame)}; {_TRY_OTHER_ENGINE['dicom2nifti']}"
            )
        input_dir = scratch / f"in{index}"
        _link_inputs(members, input_dir)
        nifti = scratch / f"volume{index}.nii"
        try:
            # what dicom2nifti reads it alone uses (this module never looks inside)
            read = dicom2nifti_common.read_dicom_directory(str(input_dir))
            # reoriented as dicom2nifti does by default: its b-vectors are made for that
            dicom2nifti_convert.dicom_array_to_nifti(read, str(nifti), reorient_nifti=True)
        except (ConversionValidationError, ConversionError) as exc:
            code = str(exc)
            if code in _DICOM2NIFTI_SKIPS:
                raise _EngineFailed(f"{_DICOM2NIFTI_SKIPS[code]}{where}", skipped=True) from exc
            words = _DICOM2NIFTI_FAILURES.get(code, code)
            raise _EngineFailed(
                f"dicom2nifti cannot convert this series{where}: {words} ({code}); "
                f"{_TRY_OTHER_ENGINE['dicom2nifti']}"
            ) from exc
        except MemoryError:
            raise
        except Exception as exc:  # the engine's boundary: whatever else it raises, it failed
            raise _EngineFailed(
                f"dicom2nifti failed{where}: {type(exc).__name__}: {_tail(str(exc), 2)}; "
                f"{_TRY_OTHER_ENGINE['dicom2nifti']}"
            ) from exc
        volumes.append(
            _Volume(
                nifti=nifti,
                sidecar={},
                series_number=number,
                postfix=(f"e{echo}",) if echo is not None else (),
                bval=_existing(nifti.with_suffix(".bval")),
                bvec=_existing(nifti.with_suffix(".bvec")),
                compact=True,
                echo_number=echo,
            )
        )
    return volumes, []


def _refuse_what_dicom2nifti_misplaces(images: Sequence[InstanceFacts]) -> None:
    """dicom2nifti 2.6 misplaces Siemens mosaics that are not axial: sagittal ones are mirrored
    left-right in the world, coronal ones have their slices in reverse order (the dcm_qa
    orientation series against dcm2niix's references). Fail rather than write those."""
    for image in images:
        normal = _plane_normal(image)
        if "MOSAIC" in image.image_type and normal is not None and np.argmax(np.abs(normal)) != 2:
            raise _EngineFailed(
                "dicom2nifti places Siemens mosaics that are not axial wrongly (sagittal "
                "mirrored, coronal slices reversed); this series is a "
                f"{'sagittal' if np.argmax(np.abs(normal)) == 0 else 'coronal'} mosaic: "
                "convert it with dcm2niix (convert.engine)"
            )


def _dicom2nifti_groups(
    images: Sequence[InstanceFacts],
) -> list[tuple[int | None, int | None, list[InstanceFacts]]]:
    """The images by SeriesNumber and, when the series has several echoes, by echo (as
    dcm2niix splits them): (SeriesNumber, echo or None, images), in number order."""
    several_echoes = len({image.echo_number for image in images}) > 1
    groups: dict[tuple[int | None, int | None], list[InstanceFacts]] = {}
    for image in images:
        echo = image.echo_number if several_echoes else None
        groups.setdefault((image.series_number, echo), []).append(image)

    def order(key: tuple[int | None, int | None]) -> tuple[int, int]:
        return (-1 if key[0] is None else key[0], -1 if key[1] is None else key[1])

    return [(number, echo, groups[number, echo]) for number, echo in sorted(groups, key=order)]


# --- volumes: thin ones, names, sidecars ---------------------------------------------------


def _slices(image: Any) -> int:
    """The images the volume holds: its slices (the smallest of the first three dimensions,
    whichever axis holds them) times its time points or diffusion directions. A 4D series of
    2 slices (a cut-down fMRI or DWI) is data; a 3D stack of 2 is not a volume."""
    shape = tuple(image.shape[:3]) + (1,) * max(0, 3 - len(image.shape))
    return int(min(shape)) * int(np.prod(image.shape[3:], dtype=np.int64))


def _drop_thin(volumes: list[_Volume]) -> tuple[list[_Volume], list[str], int]:
    """The volumes with at least _MIN_SLICES slices, notes on the others, and the most slices
    any had."""
    kept, notes, most = [], [], 0
    for volume in volumes:
        slices = _slices(nib.load(volume.nifti))
        most = max(most, slices)
        if slices >= _MIN_SLICES:
            kept.append(volume)
            continue
        label = "_".join(volume.postfix) or (
            f"SeriesNumber {volume.series_number}" if volume.series_number is not None else ""
        )
        notes.append(
            f"a volume{f' ({label})' if label else ''} with {slices} slice(s) dropped: a volume "
            f"needs at least {_MIN_SLICES}"
        )
    return kept, notes, most


def _name_volumes(volumes: list[_Volume], images: Sequence[InstanceFacts], stem: str) -> None:
    """Set each volume's output name (module docstring: Names)."""
    several_numbers = len({i.series_number for i in images if i.series_number is not None}) > 1
    taken: set[str] = set()
    for volume in volumes:
        parts: list[str] = []
        if len(volumes) > 1:
            if several_numbers and volume.series_number is not None:
                parts.append(f"s{volume.series_number}")
            parts += volume.postfix
        name = "_".join([stem, *parts])
        if name in taken:
            name = next(
                f"{name}_{n}" for n in range(2, len(volumes) + 2) if f"{name}_{n}" not in taken
            )
        taken.add(name)
        volume.name = name


def _fill_sidecars(
    volumes: list[_Volume], images: Sequence[InstanceFacts], engine: str, version: str
) -> None:
    """Set each volume's sidecar (module docstring: Sidecar) and its preview's plane, both
    from the first image of the volume's SeriesNumber (and echo)."""
    has_series_number = any(image.series_number is not None for image in images)
    for volume in volumes:
        sidecar = {k: v for k, v in volume.sidecar.items() if k not in _IDENTIFYING_KEYS}
        if not has_series_number:
            sidecar.pop("SeriesNumber", None)  # dcm2niix's checksum of the UID, not a number
        first = next(
            (
                image
                for image in images
                if image.series_number == volume.series_number
                and volume.echo_number in (None, image.echo_number)
            ),
            images[0],
        )
        for key, value in _bids_fields(first.acquisition).items():
            sidecar.setdefault(key, value)
        sidecar["ConversionSoftware"] = engine
        sidecar["ConversionSoftwareVersion"] = version
        volume.sidecar = sidecar
        volume.plane_normal = _plane_normal(first)


def _bids_fields(acquisition: AcquisitionFacts) -> dict[str, Any]:
    """Sidecar values from the DICOM header, in BIDS units (seconds, degrees, T, mm)."""
    fields: dict[str, Any] = {
        "Modality": acquisition.modality,
        "Manufacturer": acquisition.manufacturer,
        "ManufacturersModelName": acquisition.manufacturers_model_name,
        "MagneticFieldStrength": acquisition.magnetic_field_strength_t,
        # PS3.3 C.8.3.1: Echo Time and Repetition Time are in ms; BIDS wants seconds
        "EchoTime": _seconds(acquisition.echo_time_ms),
        "RepetitionTime": _seconds(acquisition.repetition_time_ms),
        "FlipAngle": acquisition.flip_angle_degrees,
        "SliceThickness": acquisition.slice_thickness_mm,
        "SeriesDescription": acquisition.series_description,
        "ProtocolName": acquisition.protocol_name,
        "SeriesNumber": acquisition.series_number,
        "AcquisitionTime": _bids_time(acquisition.acquisition_time),
        "ImageType": list(acquisition.image_type),
    }
    return {key: value for key, value in fields.items() if value not in (None, "", [])}


def _seconds(milliseconds: float | None) -> float | None:
    return None if milliseconds is None else round(milliseconds / 1000.0, 9)


def _bids_time(dicom_time: str) -> str | None:
    """PS3.5 6.2 TM ("HHMMSS.FFFFFF", later parts optional; "HH:MM:SS" in old files) as BIDS
    writes it: "HH:MM:SS.ffffff"."""
    text = dicom_time.replace(":", "").strip()
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?", text)
    if match is None:
        return None
    hours, minutes, seconds, fraction = match.groups()
    return f"{hours}:{minutes or '00'}:{seconds or '00'}.{(fraction or '').ljust(6, '0')}"


def _plane_normal(image: InstanceFacts) -> np.ndarray | None:
    """The slice normal in RAS (PS3.3 C.7.6.2.1.1: row x column cosines, LPS; x, y negated)."""
    if len(image.image_orientation) != 6:
        return None
    row = np.array(image.image_orientation[:3])
    column = np.array(image.image_orientation[3:])
    normal = np.cross(row, column)
    normal[:2] = -normal[:2]
    return normal


# --- writing -------------------------------------------------------------------------------


def _temp_path(output_dir: Path, name: str) -> Path:
    return output_dir / f"{_TEMP_PREFIX}{name}"


def _write_volume(volume: _Volume, output_dir: Path, preview: bool) -> list[Path]:
    """Write the volume's files under `.tmp-` names; return those paths (as they are made, so
    a failure half-way still lets the caller remove what exists)."""
    written: list[Path] = []
    try:
        target = _temp_path(output_dir, f"{volume.name}.nii.gz")
        written.append(target)
        image = nib.load(volume.nifti, mmap=False)
        with _durable(target) as raw:
            if volume.compact:
                _write_compact(image, volume.nifti, raw, f"{volume.name}.nii")
            else:
                _gzip_copy(volume.nifti, raw, f"{volume.name}.nii")
        target = _temp_path(output_dir, f"{volume.name}.json")
        written.append(target)
        text = json.dumps(volume.sidecar, indent=2, ensure_ascii=False) + "\n"
        with _durable(target) as raw:
            raw.write(text.encode("utf-8"))
        for source, suffix in ((volume.bval, ".bval"), (volume.bvec, ".bvec")):
            if source is not None:
                target = _temp_path(output_dir, f"{volume.name}{suffix}")
                written.append(target)
                with _durable(target) as raw, open(source, "rb") as text_file:
                    shutil.copyfileobj(text_file, raw)
        if preview:
            target = _temp_path(output_dir, f"{volume.name}.png")
            written.append(target)
            with _durable(target) as raw:
                _write_preview(image, volume.plane_normal, raw)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


class _durable:  # lower case: used like open()
    """Open `path` for writing; on a clean exit flush and fsync it (DESIGN: fsync, then
    os.replace)."""

    def __init__(self, path: Path) -> None:
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in __exit__

    def __enter__(self) -> BinaryIO:
        return self._file

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            if exc_type is None:
                self._file.flush()
                os.fsync(self._file.fileno())
        finally:
            self._file.close()


def _gzip_writer(raw: BinaryIO, inner_name: str) -> igzip.IGzipFile:
    # mtime 0: no time in the gzip header, so equal input gives equal bytes; the header names
    # the final file, not the temp name (what `gunzip -N` restores)
    return igzip.IGzipFile(
        filename=inner_name, mode="wb", compresslevel=_GZIP_LEVEL, fileobj=raw, mtime=0
    )


def _gzip_copy(source: Path, raw: BinaryIO, inner_name: str) -> None:
    with open(source, "rb") as data, _gzip_writer(raw, inner_name) as gz:
        shutil.copyfileobj(data, gz, _COPY_CHUNK)


def _slabs(image: Any) -> Iterator[np.ndarray]:
    """The image's values (scaled) in pieces along its last axis: contiguous in the file's
    Fortran order, so they can be written one after another, and never all in memory."""
    proxy = image.dataobj
    for index in range(image.shape[-1]):
        yield np.asarray(proxy[..., index])


def _compact_dtype(image: Any) -> np.dtype | None:
    """The smallest exact data type for the image's values (module docstring), or None to
    keep the file as it is."""
    stored = image.get_data_dtype()
    slope, inter = image.header.get_slope_inter()
    scaled = slope is not None and (slope, inter or 0.0) != (1.0, 0.0)
    if not scaled and stored.kind in "iu" and stored.itemsize <= 2:
        return None
    if not scaled and stored.kind not in "iuf":
        return None  # complex, RGB: as it is
    integral, low, high, float32_exact = True, math.inf, -math.inf, stored == np.float64
    for slab in _slabs(image):
        if slab.size == 0:
            continue
        if slab.dtype.kind == "f":
            if not np.all(np.isfinite(slab)):
                return None
            if integral and not np.array_equal(slab, np.trunc(slab)):
                integral = False
            if float32_exact and not np.array_equal(slab.astype(np.float32), slab):
                float32_exact = False
        low = min(low, float(slab.min()))
        high = max(high, float(slab.max()))
        if not integral and not float32_exact:
            return None
    if integral:
        for candidate in (np.int16, np.uint16, np.int32):
            limits = np.iinfo(candidate)
            if limits.min <= low and high <= limits.max:
                target = np.dtype(candidate)
                return None if target == stored and not scaled else target
    if float32_exact and not scaled:
        return np.dtype(np.float32)
    return None


def _write_compact(image: Any, source: Path, raw: BinaryIO, inner_name: str) -> None:
    target = _compact_dtype(image)
    if target is None:
        _gzip_copy(source, raw, inner_name)
        return
    header = image.header.copy()
    header.set_data_dtype(target)
    header.set_slope_inter(1.0, 0.0)
    disk_dtype = header.get_data_dtype()  # with the header's byte order
    with _gzip_writer(raw, inner_name) as gz:
        header.write_to(gz)
        written = int(header.single_vox_offset) + int(header.extensions.get_sizeondisk())
        gz.write(b"\0" * (int(header["vox_offset"]) - written))
        for slab in _slabs(image):
            gz.write(slab.astype(disk_dtype).tobytes(order="F"))
    logger.debug("%s stored as %s (was %s)", inner_name, target, image.get_data_dtype())


def _commit(written: list[Path], output_dir: Path) -> list[str]:
    """Rename every `.tmp-` output to its final name; return the final names. If a rename
    fails, the ones already made are undone (removed), so no partial set is left."""
    names: list[str] = []
    try:
        for path in written:
            name = path.name.removeprefix(_TEMP_PREFIX)
            os.replace(path, output_dir / name)
            names.append(name)
    except BaseException:
        for name in names:
            (output_dir / name).unlink(missing_ok=True)
        raise
    return names


# --- preview -------------------------------------------------------------------------------


def _first_volume(image: Any) -> np.ndarray:
    index = (slice(None),) * 3 + (0,) * (len(image.shape) - 3)
    return np.asarray(image.dataobj[index], dtype=np.float32)


def _write_preview(image: Any, plane_normal: np.ndarray | None, raw: BinaryIO) -> None:
    volume = _first_volume(image)
    ornt = nib.orientations.io_orientation(image.affine)
    canonical = nib.orientations.apply_orientation(volume, ornt)  # RAS+ axes (views)
    voxel_sizes = np.sqrt((image.affine[:3, :3] ** 2).sum(axis=0))
    zooms = np.empty(3)
    for stored_axis in range(3):
        zooms[int(ornt[stored_axis, 0])] = voxel_sizes[stored_axis]
    # the acquisition plane; without a DICOM orientation, the plane of the stored slices
    axis = int(np.argmax(np.abs(plane_normal))) if plane_normal is not None else int(ornt[2, 0])
    count = canonical.shape[axis]
    shown = min(_PREVIEW_SLICES, count)
    indices = [int((k + 0.5) * count / shown) for k in range(shown)]
    tiles = [_tile(canonical, axis, index) for index in indices]
    row_spacing, column_spacing = {
        2: (zooms[1], zooms[0]),  # axial: anterior up, patient's right on the left
        1: (zooms[2], zooms[0]),  # coronal: head up, patient's right on the left
        0: (zooms[2], zooms[1]),  # sagittal: head up, anterior on the left
    }[axis]
    low, high = _window(tiles)
    grid_columns = math.ceil(math.sqrt(shown))
    grid_rows = math.ceil(shown / grid_columns)
    tile_width = min(_PREVIEW_TILE_WIDTH, _PREVIEW_MAX_WIDTH // grid_columns)
    rows, columns = tiles[0].shape
    aspect = (rows * row_spacing) / max(columns * column_spacing, 1e-6)
    tile_height = max(1, min(4 * tile_width, round(tile_width * aspect)))
    montage = Image.new("L", (grid_columns * tile_width, grid_rows * tile_height))
    scale = 255.0 / (high - low)
    for number, tile in enumerate(tiles):
        grey = np.clip((tile - low) * scale, 0, 255).astype(np.uint8)
        picture = Image.fromarray(np.ascontiguousarray(grey)).resize(
            (tile_width, tile_height), Image.Resampling.BILINEAR
        )
        montage.paste(
            picture, ((number % grid_columns) * tile_width, (number // grid_columns) * tile_height)
        )
    montage.save(raw, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)


def _tile(canonical: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One slice of a RAS+ volume as shown on a console (rows top to bottom)."""
    if axis == 2:
        return canonical[::-1, ::-1, index].T
    if axis == 1:
        return canonical[::-1, index, ::-1].T
    return canonical[index, ::-1, ::-1].T


def _window(tiles: Sequence[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([tile.ravel() for tile in tiles])
    values = values[np.isfinite(values) & (values != 0)]
    if values.size > _PREVIEW_SAMPLE:
        values = values[:: values.size // _PREVIEW_SAMPLE]
    if values.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, _PREVIEW_PERCENTILES))
    if high <= low:
        high = low + 1.0
    return low, high
