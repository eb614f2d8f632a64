"""Filing instances with the real Archiver, a real catalog and real files (no daemon)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from daemon.catalog import Catalog
from daemon.config import SortingConfig
from daemon.ingest import Archiver, FileRead, read_file
from daemon.model import Outcome
from tests.conftest import Volume, dcmdb, fixtures_dir
from tests.factory import SeriesSpec, make_dataset, write_dataset, write_series


@pytest.fixture
def catalog(volume: Volume) -> Iterator[Catalog]:
    catalog = Catalog(volume.state)
    yield catalog
    catalog.close()


def _archiver(catalog: Catalog, volume: Volume, **sorting: object) -> Archiver:
    return Archiver(
        catalog,
        archive=volume.archive,
        quarantine=volume.quarantine,
        incoming=volume.incoming,
        sorting=SortingConfig(**sorting),  # type: ignore[arg-type]
    )


def _file(archiver: Archiver, paths: list[Path]) -> list[Outcome]:
    reads = [read_file(str(p)) for p in paths]
    assert all(r.header is not None for r in reads), [r.rejection for r in reads]
    return [result.outcome for result in archiver.file_batch(reads)]


def _folders(volume: Volume) -> list[str]:
    return sorted(p.name for p in volume.archive.iterdir())


def _into_incoming(volume: Volume, paths: list[Path], prefix: str = "") -> list[Path]:
    moved = []
    for path in paths:
        target = volume.incoming / f"{prefix}{path.parent.name}_{path.name}"
        shutil.copyfile(path, target)
        moved.append(target)
    return moved


def test_spellings_differing_in_case_spaces_and_empty_components_share_one_folder(
    volume: Volume, catalog: Catalog, tmp_path: Path
) -> None:
    archiver = _archiver(catalog, volume)
    for index, name in enumerate(["SMITH^JOHN", "Smith^John", " smith^john^^ "]):
        files = write_series(tmp_path / str(index), SeriesSpec(referring_physician=name))
        assert _file(archiver, _into_incoming(volume, files)) == [Outcome.ARCHIVED] * 5
    assert _folders(volume) == ["SMITH_JOHN"]  # the first spelling seen names the folder
    assert catalog.summary().studies == 3


@pytest.mark.parametrize(
    ("physician", "charset", "folder"),
    [
        ("Smith/Jones^Ann", None, "Smith_Jones_Ann"),
        ("..^x", None, "x"),
        ('Dr<Who>:"X"|Y?*^Z', None, "Dr_Who_X_Y_Z"),
        ("Müller^Jürgen", "ISO_IR 100", "Müller_Jürgen"),
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", "\\ISO 2022 IR 87", "Yamada_Tarou"),
        ("", None, "unknown"),
        (None, None, "unknown"),
    ],
)
def test_each_referring_physician_name_gives_a_safe_expected_folder(
    volume: Volume,
    catalog: Catalog,
    tmp_path: Path,
    physician: str | None,
    charset: str | None,
    folder: str,
) -> None:
    spec = SeriesSpec(referring_physician=physician, specific_character_set=charset, slices=1)
    files = write_series(tmp_path, spec)
    assert _file(_archiver(catalog, volume), _into_incoming(volume, files)) == [Outcome.ARCHIVED]
    assert _folders(volume) == [folder]


def test_aliases_send_several_spellings_to_one_folder(
    volume: Volume, catalog: Catalog, tmp_path: Path
) -> None:
    archiver = _archiver(catalog, volume, aliases={"Smith_John": ("SMITH^J", "Smith^John^^Dr")})
    for index, name in enumerate(["smith^j", "Smith^John^^Dr", "Jones^Ann"]):
        files = write_series(tmp_path / str(index), SeriesSpec(referring_physician=name))
        _file(archiver, _into_incoming(volume, files))
    assert _folders(volume) == ["Jones_Ann", "Smith_John"]
    assert catalog.summary().folders[1].studies == 2


def test_later_instances_of_a_study_follow_its_first_instance_whatever_their_own_name(
    volume: Volume, catalog: Catalog, tmp_path: Path
) -> None:
    archiver = _archiver(catalog, volume)
    spec = SeriesSpec(referring_physician="Smith^John", slices=2)
    first = write_series(tmp_path / "a", spec)
    _file(archiver, _into_incoming(volume, first))
    study_uid = str(pydicom.dcmread(first[0]).StudyInstanceUID)
    later_spec = SeriesSpec(
        referring_physician="Jones^Ann", study_instance_uid=study_uid, series_number=2
    )
    later = write_series(tmp_path / "b", later_spec)
    _file(archiver, _into_incoming(volume, later))
    assert _folders(volume) == ["Smith_John"]
    assert catalog.summary().folders[0].instances == 7


def test_an_identical_duplicate_is_dropped_and_counted_and_a_conflict_is_quarantined(
    volume: Volume, catalog: Catalog, tmp_path: Path
) -> None:
    archiver = _archiver(catalog, volume)
    (original,) = write_series(tmp_path, SeriesSpec(slices=1))
    _file(archiver, _into_incoming(volume, [original], "a"))
    archived = volume.archived_files()

    same = _into_incoming(volume, [original], "b")
    assert _file(archiver, same) == [Outcome.DUPLICATE]
    assert not same[0].exists()
    assert catalog.summary().duplicates == 1

    dataset = pydicom.dcmread(original)
    dataset.SeriesDescription = "edited after sending"
    changed = write_dataset(volume.incoming / "changed.dcm", dataset)
    assert _file(archiver, [changed]) == [Outcome.QUARANTINED]
    reason = (volume.quarantine / "changed.dcm.reason.txt").read_text()
    assert "different content" in reason
    assert dataset.SOPInstanceUID in reason
    assert volume.archived_files() == archived
    assert pydicom.dcmread(archived[0]).SeriesDescription == "T1"  # never overwritten


def test_a_duplicate_written_with_a_different_file_meta_is_still_a_duplicate(
    volume: Volume, catalog: Catalog, tmp_path: Path
) -> None:
    archiver = _archiver(catalog, volume)
    (original,) = write_series(tmp_path, SeriesSpec(slices=1))
    _file(archiver, _into_incoming(volume, [original]))
    dataset = pydicom.dcmread(original)
    dataset.file_meta.SourceApplicationEntityTitle = "OTHER_PACS"
    resent = write_dataset(volume.incoming / "resent.dcm", dataset)
    assert resent.read_bytes() != original.read_bytes()
    assert _file(archiver, [resent]) == [Outcome.DUPLICATE]


def test_two_copies_of_one_instance_in_one_batch_are_filed_once(
    volume: Volume, catalog: Catalog, tmp_path: Path
) -> None:
    archiver = _archiver(catalog, volume)
    (original,) = write_series(tmp_path, SeriesSpec(slices=1))
    copies = _into_incoming(volume, [original], "a") + _into_incoming(volume, [original], "b")
    outcomes = _file(archiver, copies)
    assert sorted(o.value for o in outcomes) == ["archived", "retry"]
    retried = [p for p in copies if p.exists()]
    assert _file(archiver, retried) == [Outcome.DUPLICATE]
    assert len(volume.archived_files()) == 1


def test_instances_with_equal_instance_numbers_are_all_kept(
    volume: Volume, catalog: Catalog, tmp_path: Path
) -> None:
    # Never deduplicate by InstanceNumber: only the SOP Instance UID identifies an instance.
    spec = SeriesSpec(slices=1)
    files = [write_dataset(tmp_path / f"{index}.dcm", make_dataset(spec, 0)) for index in range(3)]
    for index, path in enumerate(files):
        dataset = pydicom.dcmread(path)
        dataset.SOPInstanceUID = f"{dataset.SOPInstanceUID}.{index}"
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        write_dataset(path, dataset)
    outcomes = _file(_archiver(catalog, volume), _into_incoming(volume, files))
    assert outcomes == [Outcome.ARCHIVED] * 3


def test_all_nine_transfer_syntax_files_sharing_one_series_uid_are_kept(
    volume: Volume, catalog: Catalog
) -> None:
    sources = sorted((fixtures_dir() / "dcm_qa_ts" / "In").rglob("*.dcm"))
    assert len(sources) == 9
    outcomes = _file(_archiver(catalog, volume), _into_incoming(volume, sources))
    assert outcomes == [Outcome.ARCHIVED] * 9
    assert catalog.summary().series == 1
    assert len(volume.archived_files()) == 9


def test_every_fixture_file_is_archived_dropped_as_duplicate_or_quarantined(
    volume: Volume,
) -> None:
    folders = sorted(fixtures_dir().glob("*/In"))
    inputs = [p for folder in folders for p in folder.rglob("*") if p.is_file()]
    assert len(inputs) > 200
    result = dcmdb(volume, "ingest", *map(str, folders))
    assert result.returncode == 0, result.stderr
    summary = volume.query("SELECT count(*) FROM instances")[0][0]
    duplicates = volume.query("SELECT coalesce(sum(value), 0) FROM counters")[0][0]
    quarantined = volume.quarantined_files()
    assert summary + duplicates + len(quarantined) == len(inputs)  # type: ignore[operator]
    assert len(volume.archived_files()) == summary
    for path in quarantined:
        reason = path.with_name(path.name + ".reason.txt").read_text()
        assert "reason: " in reason
        assert len(reason) > 60
    # Copying is the default: every input is still where it was.
    assert all(p.exists() for p in inputs)
    assert f"{len(inputs)} files:" in result.stdout


def test_recovery_finishes_a_move_interrupted_between_link_and_unlink(
    volume: Volume, catalog: Catalog, tmp_path: Path
) -> None:
    archiver = _archiver(catalog, volume)
    first, second = _into_incoming(volume, write_series(tmp_path, SeriesSpec(slices=2)))
    reads = [read_file(str(first)), read_file(str(second))]
    _stage_only(archiver, catalog, reads)
    pending = catalog.pending_moves()
    assert len(pending) == 2
    # The crash came after the first file got its archive name, before its incoming name went.
    target = volume.archive / pending[0].folder_name / pending[0].rel_path
    target.parent.mkdir(parents=True)
    os.link(first, target)

    assert archiver.recover() == 2
    assert not first.exists()
    assert target.exists()
    assert second.exists()  # never moved: stays in incoming to be taken again
    assert catalog.pending_moves() == []
    assert catalog.summary().instances == 1
    assert _file(archiver, [second]) == [Outcome.ARCHIVED]


def _stage_only(archiver: Archiver, catalog: Catalog, reads: list[FileRead]) -> None:
    """What file_batch commits before it moves anything: the state a crash leaves."""
    from daemon.layout import file_id_component

    with catalog.transaction():
        for read in reads:
            assert read.header is not None
            assert read.identity is not None
            folder_id, _ = archiver._folder_for(read.header, 0.0)
            catalog.stage_instance(
                read.header,
                folder_id,
                read.identity.size,
                0.0,
                read.path,
                False,
                file_id_component,
                lambda _rel: True,
            )


def test_a_stray_file_at_an_instance_path_is_never_overwritten(
    volume: Volume, catalog: Catalog, tmp_path: Path
) -> None:
    archiver = _archiver(catalog, volume)
    files = _into_incoming(volume, write_series(tmp_path, SeriesSpec(slices=1)))
    _file(archiver, files)
    (archived,) = volume.archived_files()
    # Someone removes the catalog's knowledge of it (e.g. a restored old catalog) ...
    with catalog.transaction():
        row = catalog.find_instance(_uid(archived))
        assert row is not None
        catalog.undo_staged([row.instance_row_id])
    stray = archived.read_bytes()
    # ... and the same instance arrives again: it gets another name beside the stray file.
    again = _into_incoming(volume, [archived], "again")
    assert _file(archiver, again) == [Outcome.ARCHIVED]
    assert archived.read_bytes() == stray
    assert len(volume.archived_files()) == 2


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
