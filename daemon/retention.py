"""Retention: when space runs low, delete the oldest studies, and never the wrong ones.

`plan_prune` is pure: from the catalog's studies, the disk figures and `[retention]` it lists
the studies to delete, oldest first, with the bytes each frees (from the catalog, never by
re-reading free space: a file another process holds open frees nothing at unlink, and a loop
on the free-space reading would then delete study after study) and why each candidate it
passed over was kept. `apply_prune` deletes exactly what a plan lists, each study as one
recoverable step:

1. the decision is committed in the catalog (the study is marked deleting) and recorded in
   `state/pruned.jsonl` and the folder's `PRUNED.txt`;
2. its DICOM folder and NIfTI folder are renamed into `archive/.trash/<n>/` (same
   filesystem, hidden, vetoed by Samba): they vanish from the share at once;
3. the trash is deleted, then the study's catalog rows, and the folder's DICOMDIR is marked
   for a rewrite.

Before step 1, an optional `verify` callable may keep a planned study (with
`retention.require_pacs_copy`, the PACS is asked whether it holds the whole study); what it keeps
is reported with its reason, and the next check plans again.

A crash anywhere after 1 leaves the study marked; `finish_interrupted_prunes` (at start-up)
completes it. Nothing is deleted that was not planned, and a study that received instances
since it was planned is left alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.catalog import Catalog, PrunableStudy, StudyDeletion
from daemon.config import RetentionConfig
from daemon.fsops import LockBusyError, exclusive_lock, write_bytes_atomically
from daemon.model import format_size

logger = logging.getLogger(__name__)

RETENTION_JOB = "retention"
TRASH_DIR = ".trash"
LOCK_FILE = "retention.lock"
PRUNED_LOG = "pruned.jsonl"
PRUNED_NOTE = "PRUNED.txt"
_DAY = 86400.0


@dataclass(frozen=True, slots=True)
class DiskFigures:
    """The archive filesystem as statvfs sees it, and what the catalog holds on it."""

    total_bytes: int
    free_bytes: int
    archive_bytes: int


@dataclass(frozen=True, slots=True)
class PruneDecision:
    study: PrunableStudy
    reason: str  # why it is deleted, or why it is kept


@dataclass(frozen=True)
class PrunePlan:
    now: float
    disk: DiskFigures
    low_free_bytes: int
    target_free_bytes: int
    max_archive_bytes: int | None
    trigger: str  # why space must be freed; "" when it need not
    needed_bytes: int
    deletions: tuple[PruneDecision, ...] = ()
    kept: tuple[PruneDecision, ...] = ()
    limited: bool = False  # max_studies_per_run stopped it: the next check goes on

    @property
    def freed_bytes(self) -> int:
        return sum(decision.study.bytes for decision in self.deletions)

    @property
    def shortfall_bytes(self) -> int:
        """What is still missing after the plan, when nothing more may be pruned."""
        if self.limited:
            return 0
        return max(0, self.needed_bytes - self.freed_bytes)

    def as_dict(self) -> dict[str, Any]:
        def decision(item: PruneDecision) -> dict[str, Any]:
            return {**asdict(item.study), "reason": item.reason}

        return {
            "now": self.now,
            "disk": asdict(self.disk),
            "low_free_bytes": self.low_free_bytes,
            "target_free_bytes": self.target_free_bytes,
            "max_archive_bytes": self.max_archive_bytes,
            "trigger": self.trigger,
            "needed_bytes": self.needed_bytes,
            "freed_bytes": self.freed_bytes,
            "shortfall_bytes": self.shortfall_bytes,
            "limited": self.limited,
            "deletions": [decision(item) for item in self.deletions],
            "kept": [decision(item) for item in self.kept],
        }


def plan_prune(
    studies: Sequence[PrunableStudy], disk: DiskFigures, policy: RetentionConfig, now: float
) -> PrunePlan:
    """The studies to delete, oldest first, until the target is met (see the module
    docstring). Pure: the same inputs give the same plan."""
    low = policy.low_free_threshold
    target = policy.target_free_threshold
    low_free = low.bytes_of(disk.total_bytes) if low else 0
    # A target below the trigger (possible when one is a percentage and the other a size)
    # would stop before the trigger is cleared: prune to the higher of the two.
    target_free = max(target.bytes_of(disk.total_bytes) if target else 0, low_free)
    triggers: list[str] = []
    needed = 0
    if low is not None and disk.free_bytes < low_free:
        triggers.append(
            f"free space {format_size(disk.free_bytes)} is below retention.low_free = "
            f"{policy.low_free} ({format_size(low_free)})"
        )
        needed = max(needed, target_free - disk.free_bytes)
    if policy.max_archive_bytes is not None and disk.archive_bytes > policy.max_archive_bytes:
        triggers.append(
            f"the archive holds {format_size(disk.archive_bytes)}, more than "
            f"retention.max_archive_size = {policy.max_archive_size}"
        )
        needed = max(needed, disk.archive_bytes - policy.max_archive_bytes)
    plan = PrunePlan(
        now=now,
        disk=disk,
        low_free_bytes=low_free,
        target_free_bytes=target_free,
        max_archive_bytes=policy.max_archive_bytes,
        trigger="; ".join(triggers),
        needed_bytes=needed,
    )
    if needed <= 0:
        return plan
    min_age = policy.min_age_days * _DAY
    deletions: list[PruneDecision] = []
    kept: list[PruneDecision] = []
    freed = 0
    limited = False
    for study in sorted(studies, key=_order_key(policy.order)):
        if freed >= needed:
            break
        if len(deletions) >= policy.max_studies_per_run:
            limited = True
            break
        age_days = (now - study.received_at) / _DAY
        if policy.is_protected(study.folder_name):
            reason = f"its folder {study.folder_name!r} is in retention.protect"
        elif study.protected:
            reason = "protected (dcmdb protect)"
        elif now - study.received_at < min_age:
            reason = (
                f"received {age_days:.1f} days ago, within retention.min_age_days = "
                f"{policy.min_age_days:g}"
            )
        elif policy.keep_unconverted and study.waiting_series:
            reason = (
                f"{study.waiting_series} series not converted to NIfTI yet "
                "(retention.keep_unconverted)"
            )
        else:
            deletions.append(
                PruneDecision(study, f"the oldest unprotected study ({age_days:.0f} days old)")
            )
            freed += study.bytes
            continue
        kept.append(PruneDecision(study, reason))
    return PrunePlan(
        now=plan.now,
        disk=disk,
        low_free_bytes=low_free,
        target_free_bytes=target_free,
        max_archive_bytes=policy.max_archive_bytes,
        trigger=plan.trigger,
        needed_bytes=needed,
        deletions=tuple(deletions),
        kept=tuple(kept),
        limited=limited,
    )


def _order_key(order: str) -> Callable[[PrunableStudy], tuple[Any, ...]]:
    if order == "study_date":
        # A study without a date sorts by the day it was received.
        return lambda study: (
            study.study_date or datetime.fromtimestamp(study.received_at).strftime("%Y%m%d"),
            study.received_at,
            study.study_row_id,
        )
    return lambda study: (study.received_at, study.study_row_id)


def describe_outcome(plan: PrunePlan, result: PruneResult) -> str:
    """One line for `dcmdb status`: what the last check found and did."""
    if not plan.trigger:
        return f"space OK ({format_size(plan.disk.free_bytes)} free)"
    text = (
        f"{plan.trigger}: deleted {len(result.deleted)} studies, {format_size(result.freed_bytes)}"
    )
    if result.verified_kept:
        text += f"; kept {len(result.verified_kept)}: {result.verified_kept[0].reason}"
    if plan.shortfall_bytes:
        text += (
            f"; STILL SHORT by {format_size(plan.shortfall_bytes)}: nothing more may be pruned "
            "(see `dcmdb prune --dry-run`)"
        )
    return text


def effective_policy(policy: RetentionConfig, conversion_enabled: bool) -> RetentionConfig:
    """keep_unconverted protects studies waiting for the conversion job; with the job off,
    nothing is waiting, and it would protect every study forever."""
    if policy.keep_unconverted and not conversion_enabled:
        return dataclasses.replace(policy, keep_unconverted=False)
    return policy


class PruneBusyError(Exception):
    """Another prune (the daemon's check or a `dcmdb prune`) is running."""


def prune_now(
    catalog: Catalog,
    policy: RetentionConfig,
    archive: Path,
    state_dir: Path,
    *,
    dry_run: bool,
    now: Callable[[], float],
    verify: Callable[[PrunableStudy], str | None] | None = None,
) -> tuple[PrunePlan, PruneResult]:
    """What the daemon's check and `dcmdb prune` do: finish interrupted deletions, plan on
    the current figures, apply the plan. One at a time per archive."""
    try:
        with exclusive_lock(state_dir / LOCK_FILE):
            if not dry_run:
                _finish_interrupted_prunes(catalog, archive, state_dir, now())
            studies = catalog.prunable_studies()
            usage = shutil.disk_usage(archive)
            # No study is being deleted now, so the studies' bytes are the archive's.
            disk = DiskFigures(usage.total, usage.free, sum(study.bytes for study in studies))
            plan = plan_prune(studies, disk, policy, now())
            result = apply_prune(
                plan, catalog, archive, state_dir, dry_run=dry_run, now=now, verify=verify
            )
    except LockBusyError as exc:
        raise PruneBusyError(
            "another prune is running (the daemon's retention check or a `dcmdb prune`); "
            "try again when it is done"
        ) from exc
    return plan, result


# ---- applying a plan ---------------------------------------------------------------------


@dataclass
class PruneResult:
    deleted: list[StudyDeletion] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # planned, but changed since: kept
    # planned, but kept by the `verify` check (e.g. the PACS does not hold it), with its reason
    verified_kept: list[PruneDecision] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        return sum(deletion.bytes for deletion in self.deleted)


def apply_prune(
    plan: PrunePlan,
    catalog: Catalog,
    archive: Path,
    state_dir: Path,
    *,
    dry_run: bool,
    now: Callable[[], float],
    verify: Callable[[PrunableStudy], str | None] | None = None,
) -> PruneResult:
    """Delete exactly the studies the plan lists (see the module docstring), except those
    `verify` returns a reason to keep for (None: it may go)."""
    result = PruneResult()
    if plan.trigger:
        logger.warning(
            "retention%s: %s; %d studies to delete (%s)",
            " (dry run)" if dry_run else "",
            plan.trigger,
            len(plan.deletions),
            format_size(plan.freed_bytes),
        )
    for decision in plan.deletions:
        study = decision.study
        keep_reason = verify(study) if verify is not None else None
        if keep_reason is not None:
            logger.warning(
                "retention%s: study %s in %s kept: %s",
                " (dry run)" if dry_run else "",
                study.study_instance_uid,
                study.folder_name,
                keep_reason,
            )
            result.verified_kept.append(PruneDecision(study, keep_reason))
            continue
        if dry_run:
            logger.info(
                "(dry run) would delete study %s in %s (%s): %s",
                study.study_instance_uid,
                study.folder_name,
                format_size(study.bytes),
                decision.reason,
            )
            continue
        deletion = catalog.mark_study_deleting(study.study_row_id, study.received_at, now())
        if deletion is None:
            logger.info(
                "study %s changed since it was planned (new instances or protected): kept",
                study.study_instance_uid,
            )
            result.skipped.append(study.study_instance_uid)
            continue
        _record(deletion, archive, state_dir, plan.trigger or decision.reason)
        _finish_deletion(deletion, catalog, archive, now())
        result.deleted.append(deletion)
    if plan.shortfall_bytes:
        logger.warning(
            "retention: space is still low and nothing more may be pruned: %s short of the "
            "target. The studies kept and why: `dcmdb prune --dry-run`. Free space, protect "
            "less, or lower retention.min_age_days",
            format_size(plan.shortfall_bytes),
        )
    return result


def finish_interrupted_prunes(catalog: Catalog, archive: Path, state_dir: Path, now: float) -> int:
    """Complete the deletions a crash interrupted, then empty the trash; returns how many
    studies were finished. Takes the prune lock: a prune in progress is left alone (0)."""
    try:
        with exclusive_lock(state_dir / LOCK_FILE):
            return _finish_interrupted_prunes(catalog, archive, state_dir, now)
    except LockBusyError:
        logger.info("a prune is in progress; it finishes its own deletions")
        return 0


def _finish_interrupted_prunes(catalog: Catalog, archive: Path, state_dir: Path, now: float) -> int:
    deletions = catalog.studies_being_deleted()
    recorded = _recorded_studies(state_dir) if deletions else set()
    for deletion in deletions:
        logger.info(
            "finishing the deletion of study %s in %s, interrupted by a crash",
            deletion.study_instance_uid,
            deletion.folder_name,
        )
        if deletion.study_instance_uid not in recorded:  # killed between marking and recording
            _record(deletion, archive, state_dir, "interrupted deletion finished at start-up")
        _finish_deletion(deletion, catalog, archive, now)
    trash = archive / TRASH_DIR
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    return len(deletions)


def _finish_deletion(deletion: StudyDeletion, catalog: Catalog, archive: Path, now: float) -> None:
    """Steps 2 and 3; each is idempotent, so a crash anywhere is finished by running it
    again."""
    trash = archive / TRASH_DIR / str(deletion.study_row_id)
    trash.mkdir(parents=True, exist_ok=True)
    for name, relative in (("DICOM", deletion.dicom_dir), ("NIFTI", deletion.nifti_dir)):
        if relative is None:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.replace(archive / relative, trash / name)
    shutil.rmtree(trash)
    catalog.delete_study(deletion.study_row_id, now)
    # The patient folder, emptied by its last study, goes too (the DICOMDIR lists it no more).
    with contextlib.suppress(FileNotFoundError, OSError):
        (archive / deletion.dicom_dir).parent.rmdir()


def _record(deletion: StudyDeletion, archive: Path, state_dir: Path, reason: str) -> None:
    """One JSON line in state/pruned.jsonl for the admin, one text line in the physician
    folder for the researcher who misses the study."""
    when = datetime.fromtimestamp(deletion.deleting_since).astimezone()
    entry = {
        "time": when.isoformat(timespec="seconds"),
        "folder": deletion.folder_name,
        "study_instance_uid": deletion.study_instance_uid,
        "study_date": deletion.study_date,
        "study_description": deletion.study_description,
        "bytes": deletion.bytes,
        "reason": reason,
    }
    described = " ".join(
        part for part in (_display_date(deletion.study_date), deletion.study_description) if part
    )
    note = archive / deletion.folder_name / PRUNED_NOTE
    try:
        previous = note.read_bytes()
    except FileNotFoundError:
        previous = b""
    line = (
        f"{when:%Y-%m-%d %H:%M}  deleted study {described or '(no date, no description)'}"
        f" ({format_size(deletion.bytes)}, StudyInstanceUID {deletion.study_instance_uid}):"
        f" {reason}. Ask your admin if you still need it; the PACS may hold a copy.\n"
    )
    # The note is on the share: replaced whole, so a reader never sees half a line. It is
    # written first: a study in pruned.jsonl (what recovery checks) has its note too.
    write_bytes_atomically(note, previous + line.encode("utf-8"))
    _append_line(state_dir / PRUNED_LOG, json.dumps(entry, ensure_ascii=False))


def _recorded_studies(state_dir: Path) -> set[str]:
    """Study UIDs state/pruned.jsonl already records."""
    recorded: set[str] = set()
    try:
        with open(state_dir / PRUNED_LOG, encoding="utf-8") as log:
            for line in log:
                with contextlib.suppress(ValueError, AttributeError):
                    recorded.add(json.loads(line).get("study_instance_uid", ""))
    except FileNotFoundError:
        pass
    return recorded


def _append_line(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as out:
        out.write(line + "\n")
        out.flush()
        os.fsync(out.fileno())


def _display_date(study_date: str) -> str:
    if len(study_date) == 8 and study_date.isdigit():
        return f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:]}"
    return study_date
