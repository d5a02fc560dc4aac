"""SQLite databases inside an archive: each one extracted to a private file and checked.

A database is found by its 16-byte header, not its name. Its ``-journal``
and ``-wal``, if the archive holds them, are put beside it, so SQLite
recovers exactly as the app would after a restore; then ``PRAGMA
integrity_check`` must answer ``ok``.
"""

import os
import shutil
import tempfile

from .files import WORK_PREFIX

SQLITE_HEADER = b"SQLite format 3\0"
COMPANION_SUFFIXES = (b"-journal", b"-wal")  # -shm is rebuilt from the WAL
PROBLEM_ROWS = 3


class DatabaseResult:
    """One database's check: ``problem`` is None when integrity_check said ok."""

    def __init__(self, name, problem=None, checked=True):
        self.name, self.problem, self.checked = name, problem, checked

    def describe(self):
        if not self.checked:
            return "database %s not checked: %s" % (self.name, self.problem)
        if self.problem:
            return "database %s is damaged: %s" % (self.name, self.problem)
        return "database %s: integrity_check ok" % self.name


def _integrity(path):
    """Give None if the database at ``path`` checks out, else what is wrong."""
    import sqlite3  # here: a minimal Python without it can still do everything else
    try:
        connection = sqlite3.connect(path)
        try:
            rows = connection.execute("PRAGMA integrity_check").fetchall()
        finally:
            connection.close()
    except sqlite3.DatabaseError as error:
        return str(error)
    if rows == [("ok",)]:
        return None
    return "; ".join(str(row[0]) for row in rows[:PROBLEM_ROWS])


class DatabaseCheck:
    """Collects the databases (and their journals) met in one pass over an archive.

    ``offer(path, data)`` takes every file member's path and data pieces;
    ``results()`` checks what was collected. The private folder (0700,
    ``.ai_stack_backup-verify-…`` in ``folder``) goes on ``close()``.
    """

    def __init__(self, folder):
        self.folder = folder
        self.private = None
        self.databases = {}  # member path -> private file
        self.companions = {}  # member path -> private file
        self._count = 0

    def _private_file(self):
        if self.private is None:
            try:
                self.private = tempfile.mkdtemp(prefix=WORK_PREFIX + "verify-", dir=self.folder)
            except OSError:
                self.private = tempfile.mkdtemp(prefix=WORK_PREFIX + "verify-")
        self._count += 1
        return os.path.join(self.private, "%d" % self._count)

    def offer(self, path, data):
        """Look at one file member; keep it if it is a database or may be a journal."""
        pieces = iter(data)
        head = b""
        for piece in pieces:
            head += bytes(piece)
            if len(head) >= len(SQLITE_HEADER):
                break
        is_database = head.startswith(SQLITE_HEADER)
        if not is_database and not path.endswith(COMPANION_SUFFIXES):
            return
        target = self._private_file()
        with open(target, "wb") as file:
            file.write(head)
            for piece in pieces:
                file.write(piece)
        (self.databases if is_database else self.companions)[path] = target

    def results(self):
        """Check every database collected; give a DatabaseResult for each, by name."""
        results = []
        for path, private in sorted(self.databases.items()):
            name = path.decode("utf-8", "replace")
            for suffix in COMPANION_SUFFIXES:
                companion = self.companions.get(path + suffix)
                if companion:
                    shutil.copyfile(companion, private + suffix.decode())
            try:
                problem = _integrity(private)
            except ImportError:
                results.append(DatabaseResult(name, "this Python has no sqlite3 module",
                                              checked=False))
                continue
            results.append(DatabaseResult(name, problem))
        return results

    def close(self):
        if self.private is not None:
            shutil.rmtree(self.private, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
