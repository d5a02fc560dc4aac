"""Calendar retention over synthetic archive names spread across two years.

Every expected set below is written out by hand from the calendar, not
computed by the code under test.
"""

import os

import pytest

from ai_stack_backup import retention
from ai_stack_backup.cli import backup_all_main
from ai_stack_backup.names import archive_name, parse_timestamp

NOW = parse_timestamp("20261201T150000Z")  # a Tuesday

MONTHLY = ["2025%02d01T020000Z" % month for month in (1, 2, 3, 4, 5, 8, 9, 10, 11, 12)] + \
    ["2026%02d01T020000Z" % month for month in range(1, 10)] + ["20260315T020000Z"]
WEEKLY = ["20261004T020000Z", "20261011T020000Z", "20261018T020000Z", "20261025T020000Z",
          "20261101T020000Z", "20261108T020000Z", "20261115T020000Z"]  # Sundays
DAILY = ["202611%02dT020000Z" % day for day in range(22, 31)] + \
    ["20261201T020000Z", "20261201T140000Z"]
HISTORY = MONTHLY + WEEKLY + DAILY


def _kept(folder, policy, source="owui-data"):
    decisions = retention.plan(str(folder), {source}, policy, NOW)
    return {os.path.basename(decision.path).split("__")[1][:-len(".tar.gz")]: decision.reasons
            for decision in decisions if decision.kept}


@pytest.fixture
def history(tmp_path):
    for stamp in HISTORY:
        (tmp_path / archive_name("owui-data", stamp)).write_bytes(b"x")
    return tmp_path


@pytest.mark.parametrize("policy, expected", [
    pytest.param(retention.Policy(0, 1, daily=7), [
        "20261201T140000Z", "20261130T020000Z", "20261129T020000Z", "20261128T020000Z",
        "20261127T020000Z", "20261126T020000Z", "20261125T020000Z"], id="daily"),
    pytest.param(retention.Policy(0, 1, weekly=4), [
        # ISO weeks start on Monday: 30 Nov-6 Dec, 23-29 Nov, 16-22 Nov, 9-15 Nov.
        "20261201T140000Z", "20261129T020000Z", "20261122T020000Z", "20261115T020000Z"],
        id="weekly"),
    pytest.param(retention.Policy(0, 1, monthly=6), [
        "20261201T140000Z", "20261130T020000Z", "20261025T020000Z", "20260901T020000Z",
        "20260801T020000Z", "20260701T020000Z"], id="monthly"),
    pytest.param(retention.Policy(0, 1, monthly=18), [
        "20261201T140000Z", "20261130T020000Z", "20261025T020000Z"]
        + ["2026%02d01T020000Z" % month for month in (9, 8, 7, 6, 5, 4, 2, 1)]
        + ["20260315T020000Z"]  # the newest of March, not the 1st
        # June and July 2025 have no archives and do not use up a month.
        + ["2025%02d01T020000Z" % month for month in (12, 11, 10, 9, 8, 5)],
        id="monthly-skips-empty-months"),
    pytest.param(retention.Policy(0, 1, monthly=100), [
        "20261201T140000Z", "20261130T020000Z", "20261025T020000Z"]
        + [stamp for stamp in MONTHLY if stamp != "20260301T020000Z"],
        id="monthly-more-than-there-are"),
    pytest.param(retention.Policy(3, 2, daily=2, weekly=2, monthly=2), [
        "20261201T140000Z", "20261201T020000Z", "20261130T020000Z", "20261129T020000Z"],
        id="combined"),
    pytest.param(retention.Policy(0, 3), [
        "20261201T140000Z", "20261201T020000Z", "20261130T020000Z"], id="min-keep-only"),
    pytest.param(retention.Policy(40, 1), [
        stamp for stamp in HISTORY if stamp >= "20261022T150000Z"], id="days-only"),
])
def test_which_archives_each_policy_keeps(history, policy, expected):
    assert sorted(_kept(history, policy)) == sorted(expected)


def test_every_rule_that_keeps_an_archive_is_named(history):
    kept = _kept(history, retention.Policy(3, 2, daily=2, weekly=2, monthly=2))
    assert kept == {
        "20261201T140000Z": ["newest 2", "within 3 days", "daily 2", "weekly 2", "monthly 2"],
        "20261201T020000Z": ["newest 2", "within 3 days"],
        "20261130T020000Z": ["within 3 days", "daily 2", "monthly 2"],
        "20261129T020000Z": ["within 3 days", "weekly 2"],
    }


def test_iso_weeks_cross_the_new_year(tmp_path):
    # 28 Dec 2025 is in ISO week 52 of 2025; 30 Dec 2025 and 1 Jan 2026 are both in week 1 of
    # 2026, so only the newer of them is that week's archive.
    for stamp in ("20251228T020000Z", "20251230T020000Z", "20260101T020000Z"):
        (tmp_path / archive_name("tm-data", stamp)).write_bytes(b"x")
    kept = _kept(tmp_path, retention.Policy(0, 1, weekly=2), "tm-data")
    assert sorted(kept) == ["20251228T020000Z", "20260101T020000Z"]


def test_the_periods_are_utc_days(tmp_path):
    # 23:30 and 00:30 UTC are two days, whatever the host's time zone says.
    for stamp in ("20261130T233000Z", "20261201T003000Z"):
        (tmp_path / archive_name("tm-data", stamp)).write_bytes(b"x")
    assert sorted(_kept(tmp_path, retention.Policy(0, 1, daily=2), "tm-data")) == \
        ["20261130T233000Z", "20261201T003000Z"]


def test_dry_run_says_which_rule_keeps_each_archive(history, monkeypatch, capsys):
    monkeypatch.setenv("BACKUP_DIR", str(history))
    monkeypatch.setenv("VOLUMES", "owui-data")
    monkeypatch.setenv("OUTPUT_ROOT", "")
    monkeypatch.setenv("RETENTION_DAYS", "0")
    monkeypatch.setenv("RETENTION_MIN_KEEP", "1")
    monkeypatch.setenv("RETENTION_MONTHLY", "100")
    before = sorted(os.listdir(str(history)))
    assert backup_all_main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    newest = str(history / archive_name("owui-data", "20261201T140000Z"))
    assert "would keep %s (newest 1, monthly 100)" % newest in out
    assert "would keep %s (monthly 100)" % (history / archive_name("owui-data",
                                                                     "20250101T020000Z")) in out
    assert "would delete %s (no rule keeps it)" % (history / archive_name(
        "owui-data", "20260301T020000Z")) in out
    assert sorted(name for name in os.listdir(str(history))
                  if not name.startswith(".")) == before  # nothing deleted


def test_calendar_settings_are_whole_numbers(monkeypatch, capsys):
    monkeypatch.setenv("RETENTION_WEEKLY", "four")
    assert backup_all_main(["--dry-run"]) == 1
    assert "RETENTION_WEEKLY must be a whole number" in capsys.readouterr().err


def test_hourly_keeps_the_newest_of_each_recent_hour_that_has_archives(tmp_path):
    """Archives every 20 minutes on 1 Dec from 09:00 to 14:40, none in the 12:00 hour."""
    stamps = ["20261201T%02d%02d00Z" % (hour, minute) for hour in (9, 10, 11, 13, 14)
              for minute in (0, 20, 40)]
    for stamp in stamps:
        (tmp_path / archive_name("owui-data", stamp)).write_bytes(b"x")
    kept = _kept(tmp_path, retention.Policy(0, 1, hourly=4))
    # 14:40 (also the newest), 13:40, then 11:40 and 10:40: the empty 12:00 hour is skipped.
    assert sorted(kept) == ["20261201T104000Z", "20261201T114000Z", "20261201T134000Z",
                            "20261201T144000Z"]
    assert kept["20261201T134000Z"] == ["hourly 4"]
    assert kept["20261201T144000Z"] == ["newest 1", "hourly 4"]
    both = _kept(tmp_path, retention.Policy(0, 1, hourly=2, daily=1))
    assert sorted(both) == ["20261201T134000Z", "20261201T144000Z"]


def test_backup_all_reads_retention_hourly(monkeypatch):
    from ai_stack_backup.backupall import retention_policy
    from ai_stack_backup.config import Config
    from ai_stack_backup.errors import ConfigError
    monkeypatch.setenv("RETENTION_HOURLY", "24")
    config = Config.from_environment(os.environ, backup_all=True)
    assert retention_policy(config).counts["hourly"] == 24
    monkeypatch.setenv("RETENTION_HOURLY", "-1")
    with pytest.raises(ConfigError) as refused:
        Config.from_environment(os.environ, backup_all=True)
    assert "RETENTION_HOURLY" in str(refused.value)


def test_within_n_days_means_at_most_n_days_old(tmp_path):
    # As the README says: an archive exactly N days old is kept, one a second older is not.
    for stamp in ("20261201T140000Z", "20261117T150000Z", "20261117T145959Z"):
        (tmp_path / archive_name("tm-data", stamp)).write_bytes(b"x")
    assert _kept(tmp_path, retention.Policy(14, 1), "tm-data") == {
        "20261201T140000Z": ["newest 1", "within 14 days"],
        "20261117T150000Z": ["within 14 days"]}
