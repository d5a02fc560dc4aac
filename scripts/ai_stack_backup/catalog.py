"""The catalogue of a backup folder: which of our archives are there, by source.

Only regular files directly in the folder whose whole name is ours count:
``<source>__<timestamp>.tar.gz`` (``names``), and for the listing also the
``….failed-verification`` copies. Retention, the drill, skip-if-unchanged,
backup_all and list_backups all ask here; none of them reads the folder itself.
"""

import os
import time

from .errors import BackupError
from .files import CHECKSUM_SUFFIX, SIDECAR_SUFFIXES
from .names import FAILED_SUFFIX, parse_archive_name, parse_failed_name, parse_timestamp


def archives_by_source(folder, sources=None, suffixes=("",)):
    """Give ``{source: [(when, path), …]}`` of our archives directly in ``folder``, newest first.

    With ``sources``, only those sources' archives. ``suffixes``: what may follow
    an archive's name (``.age``, ``.gpg``: fetched off-host copies); where one
    archive is there under several, the first suffix listed wins.
    """
    found = {}
    for entry in os.scandir(folder):
        rank, parsed = _ranked_name(entry.name, suffixes)
        if parsed is None or (sources is not None and parsed[0] not in sources) or \
                not entry.is_file(follow_symlinks=False):
            continue
        archives = found.setdefault(parsed[0], {})
        when = parse_timestamp(parsed[1])
        if when not in archives or rank < archives[when][0]:
            archives[when] = (rank, entry.path)
    return {source: sorted(((when, path) for when, (_, path) in archives.items()),
                           reverse=True)
            for source, archives in found.items()}


def _ranked_name(name, suffixes):
    """Give ``(index of the suffix, (source, timestamp))`` for our archive's name followed by
    one of ``suffixes``, else ``(None, None)``."""
    for rank, suffix in enumerate(suffixes):
        if name.endswith(suffix):
            parsed = parse_archive_name(name[:len(name) - len(suffix)])
            if parsed is not None:
                return rank, parsed
    return None, None


def newest_archive(folder, source):
    """Give the path of the newest archive of ``source`` in ``folder`` (by its name), or None."""
    found = archives_by_source(folder, {source})
    return found[source][0][1] if found else None


def list_archives(folder):
    """Give our archives in ``folder``, grouped by source, newest first within each source."""
    entries = []
    try:
        names = os.listdir(folder)
    except OSError as error:
        raise BackupError("cannot list %s: %s" % (folder, error.strerror))
    now = time.time()
    for name in sorted(names):
        parsed = parse_archive_name(name) or parse_failed_name(name)
        path = os.path.join(folder, name)
        if parsed is None or not os.path.isfile(path) or os.path.islink(path):
            continue
        source, timestamp = parsed
        status = os.stat(path)
        entries.append({"source": source, "timestamp": timestamp, "path": path,
                        "size": status.st_size, "inode": [status.st_dev, status.st_ino],
                        "age_seconds": int(now - parse_timestamp(timestamp)),
                        "failed_verification": name.endswith(FAILED_SUFFIX),
                        "sha256": os.path.isfile(path + CHECKSUM_SUFFIX)})
    entries.sort(key=lambda entry: (entry["source"], entry["timestamp"]), reverse=True)
    entries.sort(key=lambda entry: entry["source"])
    # Skip-if-unchanged links an unchanged volume's new name to its newest archive: those
    # names share one file, and its space once.
    by_inode = {}
    for entry in entries:
        by_inode.setdefault(tuple(entry["inode"]), []).append(entry["path"])
    for entry in entries:
        entry["same_data_as"] = [path for path in by_inode[tuple(entry["inode"])]
                                 if path != entry["path"]]
    seen = set()
    for entry in entries:
        # A copy that failed verification is shown, but it is nobody's newest backup.
        entry["newest"] = entry["source"] not in seen and not entry["failed_verification"]
        if entry["newest"]:
            seen.add(entry["source"])
    return entries


def orphaned_sidecars(folder):
    """Give our ``<archive>.sha256`` and ``<archive>.listing`` files directly in ``folder``
    whose archive is gone."""
    orphans = []
    for entry in os.scandir(folder):
        name = entry.name
        for suffix in SIDECAR_SUFFIXES:
            if name.endswith(suffix) and entry.is_file(follow_symlinks=False) and \
                    parse_archive_name(name[:-len(suffix)]) is not None and \
                    not os.path.lexists(entry.path[:-len(suffix)]):
                orphans.append(entry.path)
    return sorted(orphans)
