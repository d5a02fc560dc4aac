"""Recovery points: which set of archives restore_all and the whole drill take, and why none."""

import pytest

from ai_stack_backup import catalog, recovery
from ai_stack_backup.config import Config, ConfigError
from ai_stack_backup.names import archive_name, parse_point_in_time, parse_timestamp, \
    utc_timestamp

HOUR = 3600
NIGHT = parse_timestamp("20261204T030000Z")


def found_of(archives):
    """``{source: [(when, path)]}``, newest first, as the catalog gives it."""
    found = {}
    for source, when in archives:
        found.setdefault(source, []).append((when, "%s@%d" % (source, when)))
    for entries in found.values():
        entries.sort(reverse=True)
    return found


def picked(point):
    return [(name, when) for name, when, _ in point.archives]


def test_the_newest_complete_set_is_taken():
    found = found_of([("a", NIGHT - 86400), ("b", NIGHT - 86400 + 60),
                      ("a", NIGHT), ("b", NIGHT + 120), ("c", NIGHT + 300)])
    point = recovery.recovery_point(found, ["a", "b", "c"], NIGHT + 86400, 6 * HOUR)
    assert picked(point) == [("a", NIGHT), ("b", NIGHT + 120), ("c", NIGHT + 300)]
    assert point.time == NIGHT + 300 and point.spread == 300


def test_at_picks_the_set_of_an_older_night():
    found = found_of([("a", NIGHT - 86400), ("b", NIGHT - 86400 + 60),
                      ("a", NIGHT), ("b", NIGHT + 120)])
    point = recovery.recovery_point(found, ["a", "b"], NIGHT + 60, 6 * HOUR)
    assert picked(point) == [("a", NIGHT - 86400), ("b", NIGHT - 86400 + 60)]


def test_at_the_time_of_an_archive_and_a_spread_as_wide_as_allowed_take_that_set():
    # The time list_backups shows for an archive, given as --at, names that archive's set;
    # a set exactly RESTORE_MAX_SPREAD wide is within it.
    found = found_of([("a", NIGHT - 86400), ("b", NIGHT - 86400 + 60),
                      ("a", NIGHT), ("b", NIGHT + 120)])
    point = recovery.recovery_point(found, ["a", "b"], NIGHT + 120, 120)
    assert picked(point) == [("a", NIGHT), ("b", NIGHT + 120)]
    point = recovery.recovery_point(found, ["a", "b"], NIGHT + 120, 119)
    assert picked(point) == [("a", NIGHT - 86400), ("b", NIGHT - 86400 + 60)]


def test_a_source_that_failed_last_night_moves_the_point_to_the_night_before():
    # b's backup failed last night: its newest archive is a day older than a's.
    found = found_of([("a", NIGHT - 86400), ("b", NIGHT - 86400 + 60), ("a", NIGHT)])
    point = recovery.recovery_point(found, ["a", "b"], NIGHT + HOUR, 6 * HOUR)
    assert picked(point) == [("a", NIGHT - 86400), ("b", NIGHT - 86400 + 60)]
    # With a spread of two days, last night's a and the night before's b make a set.
    point = recovery.recovery_point(found, ["a", "b"], NIGHT + HOUR, 2 * 86400)
    assert picked(point) == [("a", NIGHT), ("b", NIGHT - 86400 + 60)]


def test_no_set_when_a_source_has_no_archive_or_they_never_meet():
    found = found_of([("a", NIGHT), ("b", NIGHT - 2 * 86400)])
    assert recovery.recovery_point(found, ["a", "b"], NIGHT + HOUR, 6 * HOUR) is None
    assert recovery.recovery_point(found, ["a", "b", "c"], NIGHT + HOUR, 30 * 86400) is None
    # Nothing at or before --at.
    assert recovery.recovery_point(found, ["a"], NIGHT - 1, 6 * HOUR) is None


def _archive(folder, source, when, suffix=""):
    path = folder / (archive_name(source, utc_timestamp(when)) + suffix)
    path.write_bytes(b"not looked at here")
    return str(path)


def test_choose_says_which_source_has_no_archive(tmp_path):
    _archive(tmp_path, "owui-data", NIGHT)
    with pytest.raises(recovery.NoRecoveryPoint) as refused:
        recovery.choose(str(tmp_path), ["owui-data", "qdrant-data"], NIGHT + HOUR, 6 * HOUR)
    assert str(refused.value).startswith("no archive of qdrant-data in %s" % tmp_path)
    assert "nothing was changed" in str(refused.value)


def test_choose_says_when_the_archives_are_too_far_apart(tmp_path):
    _archive(tmp_path, "owui-data", NIGHT)
    _archive(tmp_path, "qdrant-data", NIGHT - 2 * 86400)
    with pytest.raises(recovery.NoRecoveryPoint) as refused:
        recovery.choose(str(tmp_path), ["owui-data", "qdrant-data"], NIGHT + HOUR, 6 * HOUR)
    message = str(refused.value)
    assert "never all within RESTORE_MAX_SPREAD (6h) of each other" in message
    assert "owui-data 20261204T030000Z, qdrant-data 20261202T030000Z" in message


def test_fetched_copies_count_and_a_plain_archive_wins_over_its_encrypted_copy(tmp_path):
    plain = _archive(tmp_path, "owui-data", NIGHT)
    _archive(tmp_path, "owui-data", NIGHT, ".age")
    age = _archive(tmp_path, "qdrant-data", NIGHT + 60, ".age")
    gpg = _archive(tmp_path, "tm-data", NIGHT + 120, ".gpg")
    _archive(tmp_path, "tm-data", NIGHT + 180, ".age.sha256")  # a checksum is no archive
    point, _ = recovery.choose(str(tmp_path), ["owui-data", "qdrant-data", "tm-data"],
                               NIGHT + HOUR, 6 * HOUR)
    assert [path for _, _, path in point.archives] == [plain, age, gpg]
    # The backup folder's own catalogue still sees plain archives only.
    assert set(catalog.archives_by_source(str(tmp_path))) == {"owui-data"}


@pytest.mark.parametrize("text", ["20261204T031500Z", "2026-12-04 03:15", "2026-12-04T03:15:00Z"])
def test_a_point_in_time_is_read_in_utc(text):
    assert parse_point_in_time(text) == NIGHT + 15 * 60


@pytest.mark.parametrize("text", ["yesterday", "2026-12-04", "2026-13-04 03:15"])
def test_a_point_in_time_must_be_a_time(text):
    with pytest.raises(ValueError):
        parse_point_in_time(text)


@pytest.mark.parametrize("raw, seconds", [("", 6 * HOUR), ("6h", 6 * HOUR), ("90m", 5400),
                                          ("2d", 2 * 86400), ("12", 12 * HOUR), ("30s", 30)])
def test_restore_max_spread_takes_a_unit(raw, seconds):
    config = Config.from_environment({"RESTORE_MAX_SPREAD": raw}, backup_all=True)
    assert config.restore_max_spread == seconds


def test_restore_max_spread_refuses_what_it_cannot_read():
    with pytest.raises(ConfigError) as refused:
        Config.from_environment({"RESTORE_MAX_SPREAD": "six hours"}, backup_all=True)
    assert "RESTORE_MAX_SPREAD must be a whole number with the unit s, m, h or d" \
        in str(refused.value)
