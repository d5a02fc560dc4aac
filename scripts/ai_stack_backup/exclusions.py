"""Exclusions: paths a backup leaves out, by patterns relative to the source's root.

A pattern is matched with ``fnmatch`` rules against the whole path below the
root (``cache/models/x.bin``), case-sensitively; ``*`` also matches ``/``, so
``*.log`` matches log files at any depth. A trailing ``/`` makes a pattern
match folders only (``cache/``: the folder ``cache`` and everything under it).
Whatever a pattern matches is left out with everything below it. A leading
``/`` or ``./`` changes nothing: every pattern is anchored at the root.
"""

import fnmatch
import os
import re

from .errors import ConfigError


class Exclusions:
    """A compiled set of patterns; false when there are none."""

    def __init__(self, patterns=()):
        self.patterns = []
        any_entry, folders_only = [], []
        for raw in patterns:
            pattern = raw.strip()
            while pattern.startswith("./"):
                pattern = pattern[2:]
            pattern = pattern.lstrip("/")
            folder = pattern.endswith("/")
            pattern = pattern.rstrip("/")
            if not pattern or pattern in (".", ".."):
                raise ConfigError("the exclusion pattern %r names no path below the root "
                                  "(patterns are relative to the source, e.g. cache/)" % raw)
            self.patterns.append(pattern + ("/" if folder else ""))
            (folders_only if folder else any_entry).append(fnmatch.translate(pattern))
        self._any = re.compile("|".join(any_entry)) if any_entry else None
        self._folders = re.compile("|".join(folders_only)) if folders_only else None

    def __bool__(self):
        return bool(self.patterns)

    def matches(self, path, is_folder):
        """Say whether ``path`` itself (str or bytes, relative to the root) is excluded."""
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if self._any is not None and self._any.match(path):
            return True
        return is_folder and self._folders is not None and bool(self._folders.match(path))

    def excludes(self, path, is_folder):
        """Say whether ``path`` or any folder above it is excluded."""
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        parts = path.split("/")
        for depth in range(1, len(parts)):
            if self.matches("/".join(parts[:depth]), True):
                return True
        return self.matches(path, is_folder)


NONE = Exclusions()
