"""Retention: which of our archives each rule keeps, and what no rule keeps.

An archive is kept if any rule keeps it; the rules are those of restic's
``forget``, each applied on its own to the archives of one source, judged by
the UTC timestamp in the archive's name (never the file's mtime):

    newest    the RETENTION_MIN_KEEP newest archives (at least 1)
    within    archives less than RETENTION_DAYS days old
    hourly    the newest archive of each of the RETENTION_HOURLY most recent hours
    daily     the newest archive of each of the RETENTION_DAILY most recent days
    weekly    … of each of the RETENTION_WEEKLY most recent ISO weeks
    monthly   … of each of the RETENTION_MONTHLY most recent months

Only hours, days, weeks and months that have archives count: a month without
backups does not use up one of the RETENTION_MONTHLY. Only regular files
directly in the folder whose whole name is ``<source>__<timestamp>.tar.gz``
for one of the given sources are ever considered.
"""

import datetime
import os
import time

from .catalog import archives_by_source
from .names import parse_failed_name, parse_timestamp

DAY = 86400

# (rule, period of a UTC time.struct_time); the period's identity is all that matters.
CALENDAR_RULES = (
    ("hourly", lambda moment: (moment.tm_year, moment.tm_yday, moment.tm_hour)),
    ("daily", lambda moment: (moment.tm_year, moment.tm_yday)),
    ("weekly", lambda moment: _iso_week(moment)),
    ("monthly", lambda moment: (moment.tm_year, moment.tm_mon)),
)


def _iso_week(moment):
    return datetime.date(moment.tm_year, moment.tm_mon, moment.tm_mday).isocalendar()[:2]


class Policy:
    """The retention settings: ``days``, ``min_keep`` and the calendar counts (0 = off)."""

    def __init__(self, days, min_keep, daily=0, weekly=0, monthly=0, hourly=0):
        self.days, self.min_keep = days, min_keep
        self.counts = {"hourly": hourly, "daily": daily, "weekly": weekly, "monthly": monthly}

    def describe(self, rule):
        if rule == "newest":
            return "newest %d" % self.min_keep
        if rule == "within":
            return "within %d days" % self.days
        return "%s %d" % (rule, self.counts[rule])


class Decision:
    """One archive: its ``path``, ``source``, ``when`` (epoch seconds) and the rules that keep
    it (``reasons``, empty when it goes)."""

    def __init__(self, path, source, when):
        self.path, self.source, self.when = path, source, when
        self.reasons = []

    @property
    def kept(self):
        return bool(self.reasons)


def decide(source, archives, policy, now):
    """Give one Decision per archive of ``source`` (``[(when, path), …]``, newest first)."""
    decisions = [Decision(path, source, when) for when, path in archives]
    for decision in decisions[:policy.min_keep]:
        decision.reasons.append(policy.describe("newest"))
    for decision in decisions:
        if now - decision.when <= policy.days * DAY:
            decision.reasons.append(policy.describe("within"))
    for rule, period_of in CALENDAR_RULES:
        count = policy.counts[rule]
        last_period = None
        for decision in decisions:
            if not count:
                break
            period = period_of(time.gmtime(decision.when))
            if period != last_period:  # the newest archive of a period comes first
                last_period = period
                decision.reasons.append(policy.describe(rule))
                count -= 1
    return decisions


def plan(folder, sources, policy, now=None):
    """Give a Decision for every archive of ``sources`` in ``folder``, oldest first."""
    now = time.time() if now is None else now
    decisions = []
    for source, archives in archives_by_source(folder, sources).items():
        decisions += decide(source, archives, policy, now)
    return sorted(decisions, key=lambda decision: (decision.when, decision.path))


def doomed(folder, sources, policy, now=None):
    """Give the archive paths no rule keeps, oldest first."""
    return [decision.path for decision in plan(folder, sources, policy, now)
            if not decision.kept]


def failed_copies(folder, sources, days, now=None):
    """Give the ``….failed-verification`` copies of ``sources`` older than ``days``.

    They were kept for inspection and never count as backups, so no rule
    keeps them; only our exact names directly in ``folder`` qualify.
    """
    now = time.time() if now is None else now
    found = []
    for entry in os.scandir(folder):
        parsed = parse_failed_name(entry.name)
        if parsed is None or parsed[0] not in sources or not entry.is_file(follow_symlinks=False):
            continue
        when = parse_timestamp(parsed[1])
        if now - when > days * DAY:
            found.append((when, entry.path))
    return [path for _, path in sorted(found)]
