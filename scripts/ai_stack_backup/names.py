"""Archive names: the UTC timestamp, ``<source>__<timestamp>.tar.gz``, the old safe-name rule."""

import calendar
import re
import time

TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
ARCHIVE_SUFFIX = ".tar.gz"
# <source>__<YYYYMMDDTHHMMSSZ>.tar.gz; the source may itself contain "__".
ARCHIVE_NAME_PATTERN = re.compile(r"(?P<source>.+)__(?P<timestamp>\d{8}T\d{6}Z)\.tar\.gz")


def utc_timestamp(when=None):
    """Give the archive timestamp for ``when`` (seconds since the epoch; default now)."""
    return time.strftime(TIMESTAMP_FORMAT, time.gmtime(time.time() if when is None else when))


def parse_timestamp(text):
    """Give the epoch seconds of a ``YYYYMMDDTHHMMSSZ`` timestamp; raises ValueError."""
    return calendar.timegm(time.strptime(text, TIMESTAMP_FORMAT))


_POINT_IN_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2}))?Z?")


def parse_point_in_time(text):
    """Give the epoch seconds of a time given by a person, in UTC: an archive timestamp
    (``20261204T031500Z``) or ``2026-12-04 03:15[:00]`` (``T`` and a final ``Z`` allowed);
    raises ValueError."""
    text = text.strip()
    match = _POINT_IN_TIME.fullmatch(text)
    if match:
        text = "%s%s%sT%s%s%sZ" % (match.group(1), match.group(2), match.group(3),
                                   match.group(4), match.group(5), match.group(6) or "00")
    return parse_timestamp(text)


def safe_name(path):
    """Give the old scripts' archive name for a host path.

    One leading ``/`` is removed and every character outside ``A-Za-z0-9._-``
    becomes ``_``: ``/home/wasti/x y`` gives ``home_wasti_x_y``.
    """
    if path.startswith("/"):
        path = path[1:]
    return re.sub(r"[^A-Za-z0-9._-]", "_", path)


def archive_name(source, timestamp):
    return "%s__%s%s" % (source, timestamp, ARCHIVE_SUFFIX)


FAILED_SUFFIX = ".failed-verification"  # a new archive that did not read back; not a backup


def parse_failed_name(name):
    """Give ``(source, timestamp)`` when ``name`` is one of our archive names plus
    FAILED_SUFFIX, else None."""
    if not name.endswith(FAILED_SUFFIX):
        return None
    return parse_archive_name(name[:-len(FAILED_SUFFIX)])


def parse_archive_name(name):
    """Give ``(source, timestamp)`` when ``name`` is exactly one of our archive names, else None."""
    match = ARCHIVE_NAME_PATTERN.fullmatch(name)
    if not match:
        return None
    try:
        parse_timestamp(match.group("timestamp"))
    except ValueError:  # 20261399T999999Z matches the pattern but is no time
        return None
    return match.group("source"), match.group("timestamp")
