"""Cron schedules for the nightly jobs (conversion now; retrieval later): when they fire, and
whether a run was missed while the daemon was down.

APScheduler 3's CronTrigger fires twice when a DST change repeats the scheduled wall-clock
time (in Europe/Berlin, "30 2 * * *" fires at 02:30 CEST and again at 02:30 CET on the last
Sunday of October). `WallClockCronTrigger` fires once per wall-clock time instead; a time that
does not exist (spring forward) fires once, an hour later, as APScheduler does.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger

__all__ = ["WallClockCronTrigger", "run_was_missed"]


class WallClockCronTrigger(BaseTrigger):
    """A crontab schedule in a time zone that fires at most once per local wall-clock time."""

    def __init__(self, crontab: str, timezone: tzinfo) -> None:
        self.crontab = crontab
        self.timezone = timezone
        self._cron = CronTrigger.from_crontab(crontab, timezone=timezone)

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        candidate = self._cron.get_next_fire_time(previous_fire_time, now)
        while (
            candidate is not None
            and previous_fire_time is not None
            and self._wall_clock(candidate) <= self._wall_clock(previous_fire_time)
        ):
            # The repeated hour of a fall-back: the same local time again. Step past it in
            # absolute time (wall-clock arithmetic would land in the first occurrence).
            after = (candidate.astimezone(UTC) + timedelta(seconds=1)).astimezone(self.timezone)
            candidate = self._cron.get_next_fire_time(candidate, after)
        return candidate

    def _wall_clock(self, moment: datetime) -> datetime:
        return moment.astimezone(self.timezone).replace(tzinfo=None, fold=0)

    def __str__(self) -> str:
        return f"cron[{self.crontab!r} {self.timezone}]"

    def __repr__(self) -> str:
        return f"WallClockCronTrigger({self.crontab!r}, {self.timezone!r})"


def run_was_missed(
    trigger: BaseTrigger, last_run_started_at: datetime | None, now: datetime
) -> bool:
    """True when the schedule fired (or should have) since the last run started: the daemon
    was down, or the run never happened. A job never run at all counts as missed."""
    if last_run_started_at is None:
        return True
    # The run that a firing started begins a moment after the fire time; one second later
    # than its start is past that fire time whatever the clock resolution.
    due = trigger.get_next_fire_time(None, last_run_started_at + timedelta(seconds=1))
    return due is not None and due <= now
