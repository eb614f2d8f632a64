"""The catalog: SQLite in state/, the source of truth for what the archive holds.

The only module that speaks SQL. One writer (the ingest worker, or a one-shot CLI command)
holds a read-write connection; readers (status, check) open their own.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.model import (
    DirectoryInstance,
    DirectoryPatient,
    DirectorySeries,
    DirectoryStudy,
    FileSetContents,
    InstanceHeader,
    fold_case,
)

logger = logging.getLogger(__name__)

CATALOG_FILE = "catalog.sqlite"

# Each entry moves the schema from version i to i + 1 (PRAGMA user_version). Never edit a
# shipped entry: append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE folders (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        name_key TEXT NOT NULL UNIQUE,            -- case-insensitive identity (SMB clients)
        created_at REAL NOT NULL,
        file_set_uid TEXT NOT NULL,               -- the DICOMDIR's UID, the same for every rewrite
        content_changed_at REAL,                  -- last time instances were added or removed
        dirty_since REAL,                         -- first change the DICOMDIR does not show yet
        dicomdir_written_at REAL
    );
    CREATE TABLE patients (
        id INTEGER PRIMARY KEY,
        folder_id INTEGER NOT NULL REFERENCES folders(id),
        patient_id TEXT NOT NULL,
        patient_name TEXT NOT NULL,
        dir_name TEXT NOT NULL,
        UNIQUE (folder_id, patient_id, patient_name),
        UNIQUE (folder_id, dir_name)
    );
    CREATE TABLE studies (
        id INTEGER PRIMARY KEY,
        study_instance_uid TEXT NOT NULL UNIQUE,
        folder_id INTEGER NOT NULL REFERENCES folders(id),
        patient_row_id INTEGER NOT NULL REFERENCES patients(id),
        dir_name TEXT NOT NULL,
        study_date TEXT NOT NULL,
        study_time TEXT NOT NULL,
        study_description TEXT NOT NULL,
        study_id TEXT NOT NULL,
        accession_number TEXT NOT NULL,
        referring_physician_name TEXT NOT NULL,
        specific_character_set TEXT NOT NULL,
        first_received_at REAL NOT NULL,
        last_received_at REAL NOT NULL,
        UNIQUE (patient_row_id, dir_name)
    );
    CREATE INDEX studies_by_folder ON studies (folder_id);
    CREATE TABLE series (
        id INTEGER PRIMARY KEY,
        study_row_id INTEGER NOT NULL REFERENCES studies(id),
        series_instance_uid TEXT NOT NULL,
        dir_name TEXT NOT NULL,
        modality TEXT NOT NULL,
        series_number INTEGER,
        series_description TEXT NOT NULL,
        first_received_at REAL NOT NULL,
        last_received_at REAL NOT NULL,            -- "last instance received": series quiet since
        UNIQUE (study_row_id, series_instance_uid),
        UNIQUE (study_row_id, dir_name)
    );
    CREATE TABLE instances (
        id INTEGER PRIMARY KEY,
        sop_instance_uid TEXT NOT NULL UNIQUE,
        series_row_id INTEGER NOT NULL REFERENCES series(id),
        folder_id INTEGER NOT NULL REFERENCES folders(id),
        rel_path TEXT NOT NULL,                    -- PS3.10 File ID below the folder, '/'-separated
        size INTEGER NOT NULL,
        received_at REAL NOT NULL,
        sop_class_uid TEXT NOT NULL,
        transfer_syntax_uid TEXT NOT NULL,
        instance_number INTEGER,
        rows INTEGER,
        columns INTEGER,
        number_of_frames INTEGER,
        directory_record_type TEXT NOT NULL,       -- DICOMDIR leaf record (PS3.3 F.5)
        directory_record_keys BLOB NOT NULL,       -- its keys, Explicit VR LE, if not IMAGE
        UNIQUE (folder_id, rel_path)
    );
    CREATE INDEX instances_by_series ON instances (series_row_id);
    -- An instance row is written (and committed) before its file is moved into place; the
    -- journal row says which move is in flight, so start-up can finish or undo it.
    CREATE TABLE ingest_journal (
        instance_row_id INTEGER PRIMARY KEY REFERENCES instances(id),
        source_path TEXT NOT NULL,
        keep_source INTEGER NOT NULL
    );
    CREATE TABLE quarantine (
        id INTEGER PRIMARY KEY,
        quarantined_at REAL NOT NULL,
        source_path TEXT NOT NULL,
        quarantine_path TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE TABLE counters (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    """,
    # v2: NIfTI conversion. A study's NIfTI folder name is chosen once and kept; a series'
    # row says what its NIfTI files show (series_received_at: the series' last_received_at
    # when it was converted) so a series that grew is converted again.
    """
    CREATE TABLE nifti_studies (
        study_row_id INTEGER PRIMARY KEY REFERENCES studies(id),
        folder_id INTEGER NOT NULL REFERENCES folders(id),
        dir_name TEXT NOT NULL,
        name_key TEXT NOT NULL,                    -- case-insensitive identity (SMB clients)
        UNIQUE (folder_id, name_key)
    );
    CREATE TABLE conversions (
        series_row_id INTEGER PRIMARY KEY REFERENCES series(id),
        study_row_id INTEGER NOT NULL REFERENCES studies(id),
        stem TEXT NOT NULL,
        stem_key TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'converted', 'skipped', 'failed')),
        reason TEXT NOT NULL DEFAULT '',
        engine TEXT NOT NULL DEFAULT '',
        engine_version TEXT NOT NULL DEFAULT '',
        outputs TEXT NOT NULL DEFAULT '[]',       -- JSON list of paths below the folder
        series_received_at REAL,                   -- what the outputs show (see above)
        attempts INTEGER NOT NULL DEFAULT 0,       -- tries for this series_received_at
        started_at REAL,
        finished_at REAL,
        UNIQUE (study_row_id, stem_key)
    );
    CREATE INDEX conversions_by_state ON conversions (state, finished_at);
    CREATE TABLE job_runs (
        name TEXT PRIMARY KEY,
        started_at REAL NOT NULL,
        finished_at REAL,
        result TEXT NOT NULL DEFAULT ''
    );
    """,
    # v3: retention. A study can be protected from pruning; one being pruned is marked first
    # (start-up finishes what a crash interrupted); NIfTI bytes count towards what a prune
    # frees.
    """
    ALTER TABLE studies ADD COLUMN protected INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE studies ADD COLUMN deleting_since REAL;
    ALTER TABLE conversions ADD COLUMN output_bytes INTEGER NOT NULL DEFAULT 0;
    -- The DICOM bytes of each study, kept with its instances: planning a prune then reads
    -- 10,000 study rows, not a million instance rows.
    ALTER TABLE studies ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
    UPDATE studies SET bytes = coalesce((SELECT sum(i.size) FROM instances i
        JOIN series se ON se.id = i.series_row_id WHERE se.study_row_id = studies.id), 0);
    """,
    # v4: query/retrieve from the PACS. A study whose retrieve failed is listed until a later
    # run retrieves it (the next run retries it; `dcmdb status` shows it).
    """
    CREATE TABLE retrieve_failures (
        study_instance_uid TEXT PRIMARY KEY,
        last_error TEXT NOT NULL,
        failed_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 1
    );
    """,
)


class CatalogError(Exception):
    """The catalog cannot be used as it is; the message says what to do."""


class StudyBeingDeletedError(Exception):
    """An instance arrived for a study that retention is deleting right now: try it again
    once the deletion is done (it then starts a new study)."""


@dataclass(frozen=True, slots=True)
class StudyPlacement:
    study_row_id: int
    folder_id: int
    folder_name: str


@dataclass(frozen=True, slots=True)
class ArchivedInstance:
    instance_row_id: int
    folder_name: str
    rel_path: str
    size: int


@dataclass(frozen=True, slots=True)
class PendingMove:
    instance_row_id: int
    source_path: str
    folder_name: str
    rel_path: str
    keep_source: bool


@dataclass(frozen=True, slots=True)
class FolderSummary:
    name: str
    instances: int
    studies: int
    series: int
    bytes: int


@dataclass(frozen=True, slots=True)
class CatalogSummary:
    instances: int
    studies: int
    series: int
    patients: int
    bytes: int
    quarantined: int
    duplicates: int
    moves_in_flight: int
    folders: tuple[FolderSummary, ...]


NameIsFree = Callable[[str], bool]


_STUDY_FIELDS = (
    "PatientID",
    "PatientName",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "StudyID",
    "AccessionNumber",
)
_SERIES_FIELDS = ("SeriesNumber", "SeriesDescription", "Modality")


@dataclass(frozen=True, slots=True)
class SeriesToConvert:
    """A series due for conversion, with what its NIfTI names are made of (DICOM keywords,
    as `[convert]` templates name them)."""

    series_row_id: int
    study_row_id: int
    folder_id: int
    folder_name: str
    series_instance_uid: str
    last_received_at: float
    study_fields: dict[str, str]
    series_fields: dict[str, str | int | None]
    outputs: tuple[str, ...]  # what the last conversion placed, below the folder


@dataclass(frozen=True, slots=True)
class StudyConversion:
    series_number: int | None
    series_description: str
    modality: str
    stem: str
    state: str
    reason: str
    outputs: tuple[str, ...]
    instances: int


@dataclass(frozen=True, slots=True)
class ConversionFailure:
    folder_name: str
    series_instance_uid: str
    stem: str
    reason: str
    finished_at: float


@dataclass(frozen=True, slots=True)
class ConversionSummary:
    counts: dict[str, int]
    latest_failures: tuple[ConversionFailure, ...]


@dataclass(frozen=True, slots=True)
class PrunableStudy:
    """What retention decides a study's fate by."""

    study_row_id: int
    study_instance_uid: str
    folder_name: str
    study_date: str
    study_description: str
    received_at: float  # the last instance's arrival
    bytes: int  # DICOM and NIfTI files: what deleting the study frees
    protected: bool
    waiting_series: int  # series without a current NIfTI


@dataclass(frozen=True, slots=True)
class StudyDeletion:
    """A study marked for deletion and where its files are (below the archive root)."""

    study_row_id: int
    study_instance_uid: str
    folder_id: int
    folder_name: str
    study_date: str
    study_description: str
    dicom_dir: str  # <folder>/DICOM/<patient>/<study>
    nifti_dir: str | None  # <folder>/NIFTI/<study>, if it was ever converted
    bytes: int
    deleting_since: float


@dataclass(frozen=True, slots=True)
class ArchiveTotals:
    instances: int
    studies: int
    series: int
    bytes: int  # DICOM and NIfTI
    quarantined: int
    duplicates: int
    dicomdir_dirty_folders: int


@dataclass(frozen=True, slots=True)
class RetrieveFailure:
    study_instance_uid: str
    last_error: str
    failed_at: float
    attempts: int


@dataclass(frozen=True, slots=True)
class JobRun:
    started_at: float
    finished_at: float | None
    result: str


class Catalog:
    """A connection to the catalog. Not thread-safe: one thread per Catalog object."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / CATALOG_FILE
        # (kind, key) -> (row id, dir name) of patients, studies and series placed in the
        # current transaction; (table, row id) -> latest received_at seen in it.
        self._placed: dict[tuple[str, object], tuple[int, str]] = {}
        self._received: dict[tuple[str, int], float] = {}
        self._study_bytes: dict[int, int] = {}  # study row id -> bytes staged in this transaction
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, isolation_level=None, timeout=30.0, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: a crash of the process loses nothing committed; only a power
            # loss may lose the last transactions, which `dcmdb check` then reports.
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise CatalogError(
                f"cannot open the catalog {self.path}: {exc}. Check that paths.state is on a "
                "local disk, writable by the dcmdb user, and not shared over SMB/NFS."
            ) from exc

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise CatalogError(
                f"the catalog {self.path} has schema version {version}, newer than this dcmdb "
                f"understands ({len(MIGRATIONS)}): upgrade dcmdb, or restore the catalog that "
                "matches this version"
            )
        for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
            logger.info("migrating catalog %s to schema version %d", self.path, target)
            # One script, one transaction: a migration is applied whole or not at all.
            self._db.executescript(
                f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {target}; COMMIT;"
            )

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit: committed when the block ends, rolled back if it raises."""
        self._db.execute("BEGIN IMMEDIATE")
        # Placements are cached for one transaction only: another process (a one-shot
        # `dcmdb ingest`) may change the catalog between two of ours.
        self._placed.clear()
        self._received.clear()
        self._study_bytes.clear()
        try:
            yield
            self._flush_received()
            self._db.execute("COMMIT")
        except BaseException:
            # SQLite has already rolled back after some errors (SQLITE_FULL, SQLITE_IOERR):
            # a second ROLLBACK would raise and hide the error that matters.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._placed.clear()
            self._received.clear()
            self._study_bytes.clear()
            raise

    def _flush_received(self) -> None:
        """Series and studies learn their latest arrival once per transaction, not per file."""
        for (table, row_id), received_at in self._received.items():
            self._db.execute(
                f"UPDATE {table} SET last_received_at = max(last_received_at, ?) WHERE id = ?",
                (received_at, row_id),
            )
        self._received.clear()
        self._db.executemany(
            "UPDATE studies SET bytes = bytes + ? WHERE id = ?",
            [(size, row_id) for row_id, size in self._study_bytes.items()],
        )
        self._study_bytes.clear()

    def _note_received(self, table: str, row_id: int, received_at: float) -> None:
        key = (table, row_id)
        if received_at > self._received.get(key, 0.0):
            self._received[key] = received_at

    # ---- ingest: placing instances -------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> ArchivedInstance | None:
        row = self._db.execute(
            "SELECT i.id, f.name, i.rel_path, i.size FROM instances i "
            "JOIN folders f ON f.id = i.folder_id WHERE i.sop_instance_uid = ?",
            (sop_instance_uid,),
        ).fetchone()
        return ArchivedInstance(*row) if row else None

    def study_placement(self, study_instance_uid: str) -> StudyPlacement | None:
        """Where the study's first instance put it, or None for a new study."""
        row = self._db.execute(
            "SELECT s.id, s.folder_id, f.name FROM studies s"
            " JOIN folders f ON f.id = s.folder_id WHERE s.study_instance_uid = ?",
            (study_instance_uid,),
        ).fetchone()
        return StudyPlacement(*row) if row else None

    def folder_named(self, name: str, name_key: str, now: float) -> tuple[int, str]:
        """The folder whose key is name_key, created as `name` if none has it yet.

        Returns (folder id, the folder's name): the first spelling seen names the folder.
        """
        row = self._db.execute(
            "SELECT id, name FROM folders WHERE name_key = ?", (name_key,)
        ).fetchone()
        if row:
            return row[0], row[1]
        cursor = self._db.execute(
            "INSERT INTO folders (name, name_key, created_at, file_set_uid) VALUES (?, ?, ?, ?)",
            (name, name_key, now, new_uid()),
        )
        return _lastrowid(cursor), name

    def stage_instance(
        self,
        header: InstanceHeader,
        folder_id: int,
        size: int,
        received_at: float,
        source_path: str,
        keep_source: bool,
        dir_name: NameFn,
        name_is_free: NameIsFree,
    ) -> tuple[int, str]:
        """Insert the instance (creating patient, study and series rows as needed) and a
        journal row for its move; return its row id and its File ID below the folder.

        dir_name(uid, attempt) proposes directory and file names; the first attempt that is
        free in its parent wins, so paths are deterministic and collision-free. name_is_free
        is asked about the final File ID too, so a stray file on disk is never overwritten.
        Must run inside transaction().
        """
        patient_row_id, patient_dir = self._patient(header, folder_id, dir_name)
        study_row_id, study_dir = self._study(
            header, folder_id, patient_row_id, received_at, dir_name
        )
        series_row_id, series_dir = self._series(header, study_row_id, received_at, dir_name)
        self._study_bytes[study_row_id] = self._study_bytes.get(study_row_id, 0) + size
        prefix = f"DICOM/{patient_dir}/{study_dir}/{series_dir}/"
        attempt = 0
        while True:
            rel_path = prefix + dir_name(header.sop_instance_uid, attempt)
            taken = self._db.execute(
                "SELECT 1 FROM instances WHERE folder_id = ? AND rel_path = ?",
                (folder_id, rel_path),
            ).fetchone()
            if not taken and name_is_free(rel_path):
                break
            attempt += 1
        cursor = self._db.execute(
            "INSERT INTO instances (sop_instance_uid, series_row_id, folder_id, rel_path, size,"
            " received_at, sop_class_uid, transfer_syntax_uid, instance_number, rows, columns,"
            " number_of_frames, directory_record_type, directory_record_keys)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                header.sop_instance_uid,
                series_row_id,
                folder_id,
                rel_path,
                size,
                received_at,
                header.sop_class_uid,
                header.transfer_syntax_uid,
                header.instance_number,
                header.rows,
                header.columns,
                header.number_of_frames,
                header.directory_record_type,
                header.directory_record_keys,
            ),
        )
        instance_row_id = _lastrowid(cursor)
        self._db.execute(
            "INSERT INTO ingest_journal (instance_row_id, source_path, keep_source) "
            "VALUES (?, ?, ?)",
            (instance_row_id, source_path, keep_source),
        )
        return instance_row_id, rel_path

    def _free_dir_name(
        self, table: str, parent_column: str, parent_id: int, uid: str, dir_name: NameFn
    ) -> str:
        attempt = 0
        while True:
            candidate = dir_name(uid, attempt)
            taken = self._db.execute(
                f"SELECT 1 FROM {table} WHERE {parent_column} = ? AND dir_name = ?",
                (parent_id, candidate),
            ).fetchone()
            if not taken:
                return candidate
            attempt += 1

    def _patient(self, header: InstanceHeader, folder_id: int, dir_name: NameFn) -> tuple[int, str]:
        # A patient is (ID, name) within a folder: anonymised data often shares an empty or
        # constant Patient ID, and merging two people into one DICOMDIR record is worse than
        # listing one person twice.
        values = (folder_id, header.patient_id, header.patient_name)
        key = ("patient", values)
        placed = self._placed_row(
            key,
            "SELECT id, dir_name FROM patients "
            "WHERE folder_id = ? AND patient_id = ? AND patient_name = ?",
            values,
        )
        if placed is not None:
            return placed
        name = self._free_dir_name(
            "patients",
            "folder_id",
            folder_id,
            f"{header.patient_id}\\{header.patient_name}",
            dir_name,
        )
        cursor = self._db.execute(
            "INSERT INTO patients (folder_id, patient_id, patient_name, dir_name) "
            "VALUES (?, ?, ?, ?)",
            (*values, name),
        )
        self._placed[key] = _lastrowid(cursor), name
        return self._placed[key]

    def _placed_row(
        self, key: tuple[str, object], sql: str, params: tuple[object, ...]
    ) -> tuple[int, str] | None:
        """(row id, dir name) of a patient, study or series: from this transaction's cache,
        else from the catalog (then cached); None if it is new."""
        placed = self._placed.get(key)
        if placed is None:
            row = self._db.execute(sql, params).fetchone()
            if row:
                placed = self._placed[key] = row[0], row[1]
        return placed

    def _study(
        self,
        header: InstanceHeader,
        folder_id: int,
        patient_row_id: int,
        received_at: float,
        dir_name: NameFn,
    ) -> tuple[int, str]:
        key = ("study", header.study_instance_uid)
        placed = self._placed_row(
            key,
            "SELECT id, CASE WHEN deleting_since IS NULL THEN dir_name END FROM studies"
            " WHERE study_instance_uid = ?",
            (header.study_instance_uid,),
        )
        if placed is not None and placed[1] is None:
            self._placed.pop(key, None)
            raise StudyBeingDeletedError(header.study_instance_uid)
        if placed is not None:
            self._note_received("studies", placed[0], received_at)
            return placed
        name = self._free_dir_name(
            "studies", "patient_row_id", patient_row_id, header.study_instance_uid, dir_name
        )
        cursor = self._db.execute(
            "INSERT INTO studies (study_instance_uid, folder_id, patient_row_id, dir_name,"
            " study_date, study_time, study_description, study_id, accession_number,"
            " referring_physician_name, specific_character_set, first_received_at,"
            " last_received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                header.study_instance_uid,
                folder_id,
                patient_row_id,
                name,
                header.study_date,
                header.study_time,
                header.study_description,
                header.study_id,
                header.accession_number,
                header.referring_physician_name,
                header.specific_character_set,
                received_at,
                received_at,
            ),
        )
        self._placed[key] = _lastrowid(cursor), name
        return self._placed[key]

    def _series(
        self, header: InstanceHeader, study_row_id: int, received_at: float, dir_name: NameFn
    ) -> tuple[int, str]:
        key = ("series", (study_row_id, header.series_instance_uid))
        placed = self._placed_row(
            key,
            "SELECT id, dir_name FROM series WHERE study_row_id = ? AND series_instance_uid = ?",
            (study_row_id, header.series_instance_uid),
        )
        if placed is not None:
            self._note_received("series", placed[0], received_at)
            return placed
        name = self._free_dir_name(
            "series", "study_row_id", study_row_id, header.series_instance_uid, dir_name
        )
        cursor = self._db.execute(
            "INSERT INTO series (study_row_id, series_instance_uid, dir_name, modality,"
            " series_number, series_description, first_received_at, last_received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                study_row_id,
                header.series_instance_uid,
                name,
                header.modality,
                header.series_number,
                header.series_description,
                received_at,
                received_at,
            ),
        )
        self._placed[key] = _lastrowid(cursor), name
        return self._placed[key]

    def mark_folders_changed(self, folder_ids: set[int], now: float) -> None:
        """Their DICOMDIRs are out of date from now on (until rewritten)."""
        self._db.executemany(
            "UPDATE folders SET content_changed_at = ?, dirty_since = coalesce(dirty_since, ?) "
            "WHERE id = ?",
            [(now, now, folder_id) for folder_id in folder_ids],
        )

    # ---- ingest: the journal of moves in flight ------------------------------------------

    def pending_moves(self) -> list[PendingMove]:
        rows = self._db.execute(
            "SELECT j.instance_row_id, j.source_path, f.name, i.rel_path, j.keep_source "
            "FROM ingest_journal j JOIN instances i ON i.id = j.instance_row_id "
            "JOIN folders f ON f.id = i.folder_id ORDER BY j.instance_row_id"
        ).fetchall()
        return [PendingMove(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def finish_moves(self, instance_row_ids: list[int]) -> None:
        """The files are in place: forget their journal rows."""
        self._db.executemany(
            "DELETE FROM ingest_journal WHERE instance_row_id = ?",
            [(row_id,) for row_id in instance_row_ids],
        )

    def undo_staged(self, instance_row_ids: list[int]) -> None:
        """The files never reached their place: remove their rows, and any series, study or
        patient left without instances."""
        self._placed.clear()  # rows may go
        for row_id in instance_row_ids:
            self._db.execute("DELETE FROM ingest_journal WHERE instance_row_id = ?", (row_id,))
            row = self._db.execute(
                "SELECT i.series_row_id, s.study_row_id, st.patient_row_id, i.size FROM instances i"
                " JOIN series s ON s.id = i.series_row_id JOIN studies st ON st.id = s.study_row_id"
                " WHERE i.id = ?",
                (row_id,),
            ).fetchone()
            if row is None:
                continue
            series_row_id, study_row_id, patient_row_id, size = row
            self._db.execute("DELETE FROM instances WHERE id = ?", (row_id,))
            self._db.execute(
                "UPDATE studies SET bytes = bytes - ? WHERE id = ?", (size, study_row_id)
            )
            self._db.execute(
                "DELETE FROM series WHERE id = ? AND NOT EXISTS "
                "(SELECT 1 FROM instances WHERE series_row_id = ?)",
                (series_row_id, series_row_id),
            )
            self._db.execute(
                "DELETE FROM studies WHERE id = ? AND NOT EXISTS "
                "(SELECT 1 FROM series WHERE study_row_id = ?)",
                (study_row_id, study_row_id),
            )
            self._db.execute(
                "DELETE FROM patients WHERE id = ? AND NOT EXISTS "
                "(SELECT 1 FROM studies WHERE patient_row_id = ?)",
                (patient_row_id, patient_row_id),
            )

    # ---- counters and quarantine ---------------------------------------------------------

    def add_to_counter(self, name: str, amount: int = 1) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (name, amount),
        )

    def record_quarantine(
        self, source_path: str, quarantine_path: str, reason: str, now: float
    ) -> None:
        self._db.execute(
            "INSERT INTO quarantine (quarantined_at, source_path, quarantine_path, reason) "
            "VALUES (?, ?, ?, ?)",
            (now, source_path, quarantine_path, reason),
        )

    # ---- readers -------------------------------------------------------------------------

    def summary(self) -> CatalogSummary:
        def count(sql: str) -> int:
            return int(self._db.execute(sql).fetchone()[0] or 0)

        # One pass per table, grouped by folder: correlated subqueries per folder would read
        # the instances table once per folder.
        per_folder: dict[int, list[int]] = {
            folder_id: [0, 0, 0, 0] for (folder_id,) in self._db.execute("SELECT id FROM folders")
        }
        for folder_id, instances, size in self._db.execute(
            "SELECT folder_id, count(*), sum(size) FROM instances GROUP BY folder_id"
        ):
            per_folder[folder_id][0] = instances
            per_folder[folder_id][3] = size or 0
        for folder_id, studies, series in self._db.execute(
            "SELECT s.folder_id, count(DISTINCT s.id), count(se.id) FROM studies s "
            "LEFT JOIN series se ON se.study_row_id = s.id GROUP BY s.folder_id"
        ):
            per_folder[folder_id][1] = studies
            per_folder[folder_id][2] = series
        names = dict(self._db.execute("SELECT id, name FROM folders"))
        folders = tuple(
            sorted(
                (
                    FolderSummary(names[folder_id], *figures)
                    for folder_id, figures in per_folder.items()
                ),
                key=lambda folder: folder.name,
            )
        )
        duplicates = self._db.execute(
            "SELECT value FROM counters WHERE name = 'duplicates'"
        ).fetchone()
        return CatalogSummary(
            instances=sum(folder.instances for folder in folders),
            studies=sum(folder.studies for folder in folders),
            series=sum(folder.series for folder in folders),
            patients=count("SELECT count(*) FROM patients"),
            bytes=sum(folder.bytes for folder in folders),
            quarantined=count("SELECT count(*) FROM quarantine"),
            duplicates=int(duplicates[0]) if duplicates else 0,
            moves_in_flight=self.moves_in_flight(),
            folders=folders,
        )

    def folder_names(self) -> list[str]:
        return [name for (name,) in self._db.execute("SELECT name FROM folders ORDER BY name")]

    def folder_instances(self) -> dict[str, dict[str, str]]:
        """Folder name -> {File ID: SOP Instance UID} of every instance in place."""
        folders: dict[str, dict[str, str]] = {name: {} for name in self.folder_names()}
        for name, rel_path, uid in self._db.execute(
            "SELECT f.name, i.rel_path, i.sop_instance_uid FROM instances i "
            "JOIN folders f ON f.id = i.folder_id "
            "WHERE NOT EXISTS (SELECT 1 FROM ingest_journal j WHERE j.instance_row_id = i.id)"
        ):
            folders[name][rel_path] = uid
        return folders

    def moves_in_flight(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM ingest_journal").fetchone()[0])

    def archived_files(self) -> Iterator[tuple[str, str, int]]:
        """(folder name, File ID, size) of every instance whose move is complete."""
        yield from self._db.execute(
            "SELECT f.name, i.rel_path, i.size FROM instances i "
            "JOIN folders f ON f.id = i.folder_id "
            "WHERE NOT EXISTS (SELECT 1 FROM ingest_journal j WHERE j.instance_row_id = i.id)"
        )

    # ---- DICOMDIR ----------------------------------------------------------------------------

    def folders_due_for_dicomdir(
        self, now: float, delay_seconds: float, max_delay_seconds: float
    ) -> list[str]:
        """Folders whose DICOMDIR is behind the catalog and that have been quiet for
        delay_seconds, or behind for max_delay_seconds during a long stream; also those that
        never had one."""
        rows = self._db.execute(
            "SELECT name FROM folders WHERE dicomdir_written_at IS NULL OR ("
            " dirty_since IS NOT NULL AND (content_changed_at <= ? OR dirty_since <= ?))"
            " ORDER BY dirty_since",
            (now - delay_seconds, now - max_delay_seconds),
        )
        return [name for (name,) in rows]

    def file_set_contents(self, folder_name: str) -> tuple[FileSetContents, float | None] | None:
        """What the folder's DICOMDIR must list, and the content_changed_at it reflects; None
        if there is no such folder. One read transaction: a consistent snapshot while ingest
        goes on. Instances whose move is still in flight are not listed."""
        self._db.execute("BEGIN")
        try:
            folder = self._db.execute(
                "SELECT id, file_set_uid, content_changed_at FROM folders WHERE name = ?",
                (folder_name,),
            ).fetchone()
            if folder is None:
                return None
            folder_id, file_set_uid, content_changed_at = folder
            # Instances alone, narrow rows: this is the one query that scales with the folder.
            instances = self._db.execute(
                "SELECT series_row_id, rel_path, sop_class_uid, sop_instance_uid,"
                " transfer_syntax_uid, instance_number, directory_record_type,"
                " directory_record_keys, id FROM instances WHERE folder_id = ?",
                (folder_id,),
            ).fetchall()
            in_flight = {
                row_id
                for (row_id,) in self._db.execute("SELECT instance_row_id FROM ingest_journal")
            }
            series = self._db.execute(
                "SELECT se.id, se.study_row_id, se.series_instance_uid, se.modality,"
                " se.series_number, se.series_description FROM series se"
                " JOIN studies st ON st.id = se.study_row_id WHERE st.folder_id = ?"
                " ORDER BY se.id",
                (folder_id,),
            ).fetchall()
            studies = self._db.execute(
                "SELECT id, patient_row_id, study_instance_uid, study_date, study_time,"
                " study_description, study_id, accession_number, first_received_at"
                " FROM studies WHERE folder_id = ? ORDER BY id",
                (folder_id,),
            ).fetchall()
            patients = self._db.execute(
                "SELECT id, patient_id, patient_name FROM patients WHERE folder_id = ? ORDER BY id",
                (folder_id,),
            ).fetchall()
        finally:
            self._db.execute("COMMIT")
        contents = _nest(
            folder_name,
            file_set_uid,
            patients,
            studies,
            series,
            [row for row in instances if row[8] not in in_flight],
        )
        return contents, content_changed_at

    def mark_dicomdir_written(self, folder_name: str, content_at: float | None, now: float) -> None:
        """The folder's DICOMDIR now shows the catalog as of content_at; it stays dirty if
        instances arrived since."""
        self._db.execute(
            "UPDATE folders SET dicomdir_written_at = ?,"
            " dirty_since = CASE WHEN content_changed_at IS ? THEN NULL ELSE dirty_since END"
            " WHERE name = ?",
            (now, content_at, folder_name),
        )

    # ---- NIfTI conversion ----------------------------------------------------------------

    def series_to_convert(
        self,
        now: float,
        settle_seconds: float,
        max_attempts: int,
        *,
        folder_name: str | None = None,
        series_instance_uid: str | None = None,
    ) -> list[SeriesToConvert]:
        """Series whose NIfTI is missing or behind, oldest arrival first.

        The catch-up rule: quiet for settle_seconds, and never converted, or converted from
        fewer instances than it has now, or left pending by a run that was killed, or failed
        fewer than max_attempts times with its current instances. Naming a series converts it
        whatever its state (an admin's retry).
        """
        where = ["st.deleting_since IS NULL"]  # retention is deleting the study
        params: list[object] = []
        if series_instance_uid is not None:
            where.append("se.series_instance_uid = ?")
            params.append(series_instance_uid)
        else:
            where.append("se.last_received_at <= ?")
            params.append(now - settle_seconds)
            where.append(
                "(c.state IS NULL OR c.state = 'pending'"
                " OR c.series_received_at IS NOT se.last_received_at"
                " OR (c.state = 'failed' AND c.attempts < ?))"
            )
            params.append(max_attempts)
        if folder_name is not None:
            where.append("f.name = ?")
            params.append(folder_name)
        rows = self._db.execute(
            "SELECT se.id, st.id, f.id, f.name, se.series_instance_uid, se.last_received_at,"
            " p.patient_id, p.patient_name, st.study_date, st.study_time, st.study_description,"
            " st.study_id, st.accession_number, se.series_number, se.series_description,"
            " se.modality, c.outputs"
            " FROM series se JOIN studies st ON st.id = se.study_row_id"
            " JOIN patients p ON p.id = st.patient_row_id JOIN folders f ON f.id = st.folder_id"
            " LEFT JOIN conversions c ON c.series_row_id = se.id"
            f" WHERE {' AND '.join(where)} ORDER BY se.last_received_at, se.id",
            params,
        ).fetchall()
        return [
            SeriesToConvert(
                series_row_id=row[0],
                study_row_id=row[1],
                folder_id=row[2],
                folder_name=row[3],
                series_instance_uid=row[4],
                last_received_at=row[5],
                study_fields=dict(zip(_STUDY_FIELDS, row[6:13], strict=True)),
                series_fields=dict(zip(_SERIES_FIELDS, row[13:16], strict=True)),
                outputs=tuple(json.loads(row[16])) if row[16] else (),
            )
            for row in rows
        ]

    def series_files(self, series_row_id: int) -> list[str]:
        """File IDs (below the folder) of the series' instances in place, in Instance Number
        order."""
        rows = self._db.execute(
            "SELECT rel_path FROM instances i WHERE series_row_id = ?"
            " AND NOT EXISTS (SELECT 1 FROM ingest_journal j WHERE j.instance_row_id = i.id)"
            " ORDER BY instance_number IS NULL, instance_number, id",
            (series_row_id,),
        )
        return [rel_path for (rel_path,) in rows]

    def nifti_study_dir(
        self, series: SeriesToConvert, name_for: Callable[[int], str]
    ) -> str | None:
        """The study's NIfTI folder name: chosen once (name_for(attempt) until one is free in
        the physician folder, case-insensitively), then kept. None if retention is deleting
        the study, or has deleted it."""
        with self.transaction():
            if not self._study_is_live(series.study_row_id):
                return None
            row = self._db.execute(
                "SELECT dir_name FROM nifti_studies WHERE study_row_id = ?",
                (series.study_row_id,),
            ).fetchone()
            if row:
                return str(row[0])
            attempt = 0
            while True:
                name = name_for(attempt)
                try:
                    self._db.execute(
                        "INSERT INTO nifti_studies (study_row_id, folder_id, dir_name, name_key)"
                        " VALUES (?, ?, ?, ?)",
                        (series.study_row_id, series.folder_id, name, fold_case(name)),
                    )
                except sqlite3.IntegrityError as exc:
                    _raise_unless_name_taken(exc)
                    attempt += 1
                    continue
                return name

    def begin_conversion(
        self, series: SeriesToConvert, stem_for: Callable[[int], str], now: float
    ) -> str | None:
        """Mark the series pending (a killed run leaves it so: converted again next time) and
        return its output name stem, chosen once per series and free in its study; None if
        retention is deleting the study, or has deleted it."""
        with self.transaction():
            if not self._study_is_live(series.study_row_id):
                return None
            row = self._db.execute(
                "SELECT stem FROM conversions WHERE series_row_id = ?", (series.series_row_id,)
            ).fetchone()
            if row:
                self._db.execute(
                    "UPDATE conversions SET state = 'pending', started_at = ?"
                    " WHERE series_row_id = ?",
                    (now, series.series_row_id),
                )
                return str(row[0])
            attempt = 0
            while True:
                stem = stem_for(attempt)
                try:
                    self._db.execute(
                        "INSERT INTO conversions (series_row_id, study_row_id, stem, stem_key,"
                        " state, started_at) VALUES (?, ?, ?, ?, 'pending', ?)",
                        (series.series_row_id, series.study_row_id, stem, fold_case(stem), now),
                    )
                except sqlite3.IntegrityError as exc:
                    _raise_unless_name_taken(exc)
                    attempt += 1
                    continue
                return stem

    def _study_is_live(self, study_row_id: int) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM studies WHERE id = ? AND deleting_since IS NULL", (study_row_id,)
        ).fetchone()
        return row is not None

    def record_outputs(self, series: SeriesToConvert, outputs: list[str]) -> None:
        """The files the series' conversion is about to make visible (with the previous
        ones), before they are."""
        self._db.execute(
            "UPDATE conversions SET outputs = ? WHERE series_row_id = ?",
            (json.dumps(outputs), series.series_row_id),
        )

    def finish_conversion(
        self,
        series: SeriesToConvert,
        state: str,
        reason: str,
        engine: str,
        engine_version: str,
        outputs: list[str],
        output_bytes: int,
        now: float,
    ) -> None:
        """Record what the conversion of the series as of series.last_received_at gave.

        attempts counts failures in a row with the same instances (a series that grew starts
        again at 1); success or a skip resets it.
        """
        self._db.execute(
            "UPDATE conversions SET state = ?, reason = ?, engine = ?, engine_version = ?,"
            " outputs = ?, output_bytes = ?, finished_at = ?,"
            " attempts = CASE WHEN ? != 'failed' THEN 0"
            "  WHEN series_received_at IS ? THEN attempts + 1 ELSE 1 END,"
            " series_received_at = ? WHERE series_row_id = ?",
            (
                state,
                reason,
                engine,
                engine_version,
                json.dumps(sorted(outputs)),
                output_bytes,
                now,
                state,
                series.last_received_at,
                series.last_received_at,
                series.series_row_id,
            ),
        )

    def study_conversions(self, study_row_id: int) -> list[StudyConversion]:
        """Every series of the study with what its conversion gave, in series order."""
        rows = self._db.execute(
            "SELECT se.series_number, se.series_description, se.modality,"
            " coalesce(c.stem, ''), coalesce(c.state, 'pending'), coalesce(c.reason, ''),"
            " coalesce(c.outputs, '[]'), (SELECT count(*) FROM instances i"
            "  WHERE i.series_row_id = se.id)"
            " FROM series se LEFT JOIN conversions c ON c.series_row_id = se.id"
            " WHERE se.study_row_id = ? ORDER BY se.series_number IS NULL, se.series_number,"
            " se.id",
            (study_row_id,),
        )
        return [
            StudyConversion(
                number,
                description,
                modality,
                stem,
                state,
                reason,
                tuple(json.loads(outputs)),
                instances,
            )
            for number, description, modality, stem, state, reason, outputs, instances in rows
        ]

    def conversion_summary(self, latest: int = 5) -> ConversionSummary:
        """Series per conversion state (never tried counts as pending) and the latest
        failures."""
        counts = {"pending": 0, "converted": 0, "skipped": 0, "failed": 0}
        for state, number in self._db.execute(
            "SELECT coalesce(c.state, 'pending'), count(*) FROM series se"
            " LEFT JOIN conversions c ON c.series_row_id = se.id GROUP BY 1"
        ):
            counts[state] = number
        failures = self._db.execute(
            "SELECT f.name, se.series_instance_uid, c.stem, c.reason, c.finished_at"
            " FROM conversions c JOIN series se ON se.id = c.series_row_id"
            " JOIN studies st ON st.id = se.study_row_id JOIN folders f ON f.id = st.folder_id"
            " WHERE c.state = 'failed' ORDER BY c.finished_at DESC LIMIT ?",
            (latest,),
        ).fetchall()
        return ConversionSummary(
            counts=counts, latest_failures=tuple(ConversionFailure(*row) for row in failures)
        )

    # ---- scheduled jobs ------------------------------------------------------------------

    def record_job_run(
        self, name: str, started_at: float, finished_at: float | None, result: str
    ) -> None:
        self._db.execute(
            "INSERT INTO job_runs (name, started_at, finished_at, result) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET started_at = excluded.started_at,"
            " finished_at = excluded.finished_at, result = excluded.result",
            (name, started_at, finished_at, result),
        )

    def last_job_run(self, name: str) -> JobRun | None:
        row = self._db.execute(
            "SELECT started_at, finished_at, result FROM job_runs WHERE name = ?", (name,)
        ).fetchone()
        return JobRun(*row) if row else None

    # ---- retrieve ------------------------------------------------------------------------

    def study_instance_count(self, study_instance_uid: str) -> int:
        """How many instances of the study the archive holds (0 when it holds none)."""
        row = self._db.execute(
            "SELECT count(i.id) FROM studies st JOIN series se ON se.study_row_id = st.id"
            " JOIN instances i ON i.series_row_id = se.id WHERE st.study_instance_uid = ?",
            (study_instance_uid,),
        ).fetchone()
        return int(row[0])

    def record_retrieve_failure(self, study_instance_uid: str, error: str, at: float) -> None:
        self._db.execute(
            "INSERT INTO retrieve_failures (study_instance_uid, last_error, failed_at)"
            " VALUES (?, ?, ?) ON CONFLICT (study_instance_uid) DO UPDATE SET"
            " last_error = excluded.last_error, failed_at = excluded.failed_at,"
            " attempts = attempts + 1",
            (study_instance_uid, error, at),
        )

    def clear_retrieve_failure(self, study_instance_uid: str) -> None:
        self._db.execute(
            "DELETE FROM retrieve_failures WHERE study_instance_uid = ?", (study_instance_uid,)
        )

    def retrieve_failures(self) -> list[RetrieveFailure]:
        """Studies whose latest retrieve failed, the most recent first."""
        rows = self._db.execute(
            "SELECT study_instance_uid, last_error, failed_at, attempts FROM retrieve_failures"
            " ORDER BY failed_at DESC, study_instance_uid"
        ).fetchall()
        return [RetrieveFailure(*row) for row in rows]

    # ---- retention -----------------------------------------------------------------------

    def prunable_studies(self) -> list[PrunableStudy]:
        """Every study not already being deleted, with what retention needs to know."""
        rows = self._db.execute(
            "SELECT st.id, st.study_instance_uid, f.name, st.study_date, st.study_description,"
            " st.last_received_at, st.bytes + coalesce(nifti.bytes, 0),"
            " st.protected, coalesce(waiting.series, 0)"
            " FROM studies st JOIN folders f ON f.id = st.folder_id"
            " LEFT JOIN (SELECT study_row_id, sum(output_bytes) AS bytes FROM conversions"
            "  GROUP BY study_row_id) nifti ON nifti.study_row_id = st.id"
            " LEFT JOIN (SELECT se.study_row_id AS study_row_id, count(*) AS series"
            "  FROM series se LEFT JOIN conversions c ON c.series_row_id = se.id"
            "  WHERE c.state IS NULL OR c.state = 'pending'"
            "  OR c.series_received_at IS NOT se.last_received_at"
            "  GROUP BY se.study_row_id) waiting ON waiting.study_row_id = st.id"
            " WHERE st.deleting_since IS NULL"
        )
        return [
            PrunableStudy(
                row_id, uid, folder, date, description, received, size, bool(protected), waiting
            )
            for row_id, uid, folder, date, description, received, size, protected, waiting in rows
        ]

    def archive_totals(self) -> ArchiveTotals:
        """Whole-archive figures from counts and kept sums: milliseconds at a million
        instances (for metrics scrapes; `summary` groups by folder and costs a full scan)."""
        self._db.execute("BEGIN")
        try:
            row = self._db.execute(
                "SELECT (SELECT count(*) FROM instances), (SELECT count(*) FROM studies),"
                " (SELECT count(*) FROM series),"
                " (SELECT coalesce(sum(bytes), 0) FROM studies)"
                " + (SELECT coalesce(sum(output_bytes), 0) FROM conversions),"
                " (SELECT count(*) FROM quarantine),"
                " coalesce((SELECT value FROM counters WHERE name = 'duplicates'), 0),"
                " (SELECT count(*) FROM folders"
                "  WHERE dicomdir_written_at IS NULL OR dirty_since IS NOT NULL)"
            ).fetchone()
        finally:
            self._db.execute("COMMIT")
        return ArchiveTotals(*(int(value) for value in row))

    def set_study_protected(self, study_instance_uid: str, protected: bool) -> str:
        """Protect a study from pruning (or lift it): "done", "unknown" (no such study) or
        "deleting" (retention is deleting it: too late)."""
        with self.transaction():
            row = self._db.execute(
                "SELECT deleting_since IS NOT NULL FROM studies WHERE study_instance_uid = ?",
                (study_instance_uid,),
            ).fetchone()
            if row is None:
                return "unknown"
            if row[0]:
                return "deleting"
            self._db.execute(
                "UPDATE studies SET protected = ? WHERE study_instance_uid = ?",
                (int(protected), study_instance_uid),
            )
            return "done"

    def mark_study_deleting(
        self, study_row_id: int, planned_received_at: float, now: float
    ) -> StudyDeletion | None:
        """Commit the decision to delete a study, unless it changed since it was planned (new
        instances, protected, or gone): then None. Start-up finishes a marked deletion."""
        with self.transaction():
            changed = self._db.execute(
                "SELECT 1 FROM studies st WHERE st.id = ? AND st.deleting_since IS NULL"
                " AND st.protected = 0 AND st.last_received_at = ?"
                # an instance of it still being moved in by ingest: not now
                " AND NOT EXISTS (SELECT 1 FROM ingest_journal j"
                "  JOIN instances i ON i.id = j.instance_row_id"
                "  JOIN series se ON se.id = i.series_row_id WHERE se.study_row_id = st.id)",
                (study_row_id, planned_received_at),
            ).fetchone()
            if not changed:
                return None
            self._db.execute(
                "UPDATE studies SET deleting_since = ? WHERE id = ?", (now, study_row_id)
            )
            return self._deletion(study_row_id)

    def studies_being_deleted(self) -> list[StudyDeletion]:
        rows = self._db.execute(
            "SELECT id FROM studies WHERE deleting_since IS NOT NULL ORDER BY deleting_since"
        ).fetchall()
        deletions = [self._deletion(row_id) for (row_id,) in rows]
        return [deletion for deletion in deletions if deletion is not None]

    def _deletion(self, study_row_id: int) -> StudyDeletion | None:
        row = self._db.execute(
            "SELECT st.id, st.study_instance_uid, f.id, f.name, st.study_date,"
            " st.study_description, p.dir_name, st.dir_name, ns.dir_name, st.deleting_since,"
            " st.bytes + (SELECT coalesce(sum(output_bytes), 0) FROM conversions"
            "  WHERE study_row_id = st.id)"
            " FROM studies st JOIN folders f ON f.id = st.folder_id"
            " JOIN patients p ON p.id = st.patient_row_id"
            " LEFT JOIN nifti_studies ns ON ns.study_row_id = st.id WHERE st.id = ?",
            (study_row_id,),
        ).fetchone()
        if row is None:
            return None
        (row_id, uid, folder_id, folder, date, description, patient_dir, study_dir, nifti_dir,
         deleting_since, size) = row  # fmt: skip
        return StudyDeletion(
            study_row_id=row_id,
            study_instance_uid=uid,
            folder_id=folder_id,
            folder_name=folder,
            study_date=date,
            study_description=description,
            dicom_dir=f"{folder}/DICOM/{patient_dir}/{study_dir}",
            nifti_dir=f"{folder}/NIFTI/{nifti_dir}" if nifti_dir else None,
            bytes=int(size),
            deleting_since=deleting_since,
        )

    def delete_study(self, study_row_id: int, now: float) -> None:
        """Remove a study's rows (its files are gone) and mark its folder's DICOMDIR dirty."""
        with self.transaction():
            row = self._db.execute(
                "SELECT folder_id, patient_row_id FROM studies WHERE id = ?", (study_row_id,)
            ).fetchone()
            if row is None:
                return
            folder_id, patient_row_id = row
            series = "SELECT id FROM series WHERE study_row_id = ?"
            self._db.execute(
                "DELETE FROM ingest_journal WHERE instance_row_id IN"
                f" (SELECT id FROM instances WHERE series_row_id IN ({series}))",
                (study_row_id,),
            )
            self._db.execute(
                f"DELETE FROM instances WHERE series_row_id IN ({series})", (study_row_id,)
            )
            self._db.execute("DELETE FROM conversions WHERE study_row_id = ?", (study_row_id,))
            self._db.execute("DELETE FROM series WHERE study_row_id = ?", (study_row_id,))
            self._db.execute("DELETE FROM nifti_studies WHERE study_row_id = ?", (study_row_id,))
            self._db.execute("DELETE FROM studies WHERE id = ?", (study_row_id,))
            self._db.execute(
                "DELETE FROM patients WHERE id = ? AND NOT EXISTS "
                "(SELECT 1 FROM studies WHERE patient_row_id = ?)",
                (patient_row_id, patient_row_id),
            )
            self.mark_folders_changed({folder_id}, now)


NameFn = Callable[[str, int], str]


def _raise_unless_name_taken(error: sqlite3.IntegrityError) -> None:
    """A UNIQUE clash means the name is taken: try the next. Anything else (a row it refers
    to is gone) would clash on every name."""
    if getattr(error, "sqlite_errorname", "") != "SQLITE_CONSTRAINT_UNIQUE":
        raise error


def new_uid() -> str:
    """A UID under the UUID-derived root 2.25 (PS3.5 B.2): unique without a registered root."""
    return f"2.25.{uuid.uuid4().int}"


def _lastrowid(cursor: sqlite3.Cursor) -> int:
    row_id = cursor.lastrowid
    if row_id is None:  # only after a statement that inserted nothing: a programming error
        raise CatalogError("INSERT returned no row id")
    return row_id


def _nest(
    folder_name: str,
    file_set_uid: str,
    patients: list[tuple[Any, ...]],
    studies: list[tuple[Any, ...]],
    series: list[tuple[Any, ...]],
    instances: list[tuple[Any, ...]],
) -> FileSetContents:
    """Rows of one folder (see file_set_contents) -> the nested contents, in catalog order;
    instances by Instance Number (unnumbered last), then arrival. Empty levels are left out."""
    by_series: dict[int, list[DirectoryInstance]] = {}
    instances.sort(key=lambda row: (row[5] is None, row[5] or 0, row[8]))
    for row in instances:
        by_series.setdefault(row[0], []).append(DirectoryInstance._make(row[1:8]))
    by_study: dict[int, list[DirectorySeries]] = {}
    for row_id, study_row_id, uid, modality, number, description in series:
        if row_id in by_series:
            by_study.setdefault(study_row_id, []).append(
                DirectorySeries(uid, modality, number, description, tuple(by_series[row_id]))
            )
    by_patient: dict[int, list[DirectoryStudy]] = {}
    for row_id, patient_row_id, *values in studies:
        if row_id in by_study:
            uid, date, time_, description, study_id, accession, first_received_at = values
            by_patient.setdefault(patient_row_id, []).append(
                DirectoryStudy(
                    uid,
                    date,
                    time_,
                    description,
                    study_id,
                    accession,
                    first_received_at,
                    tuple(by_study[row_id]),
                )
            )
    return FileSetContents(
        file_set_id=file_set_id_for(folder_name),
        file_set_uid=file_set_uid,
        patients=tuple(
            DirectoryPatient(patient_id, patient_name, studies=tuple(by_patient[row_id]))
            for row_id, patient_id, patient_name in patients
            if row_id in by_patient
        ),
    )


def file_set_id_for(folder_name: str) -> str:
    """(0004,1130) File-set ID: CS, at most 16 of A-Z 0-9 _ and space (PS3.5 6.2)."""
    cleaned = "".join(c if c.isascii() and c.isalnum() else "_" for c in folder_name.upper())
    return cleaned[:16].strip("_") or "DCMDB"
