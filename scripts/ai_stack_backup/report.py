"""What a person sees: the contract's status lines, log lines, warnings and the progress line.

Operations never print; they are handed a ``Reporter``. Status lines
(``Backing up volume: …``, ``Output: …``, ``OK``) go to stdout, or to stderr
when stdout carries an archive; log lines and warnings always go to stderr
(journald reads it); the progress line appears only on a terminal.
"""

import sys
import time


def human_size(size):
    """Give ``size`` bytes as a short human-readable string (``12.3 MiB``)."""
    if size < 1024:
        return "%d B" % size
    value = size / 1024.0
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return "%.1f %s" % (value, unit)
        value /= 1024
    return "%.1f TiB" % value


def human_age(seconds):
    """Say how old an archive is, by the timestamp in its name (a clock set wrong shows)."""
    if seconds < 0:
        return "in the future"
    days, rest = divmod(int(seconds), 86400)
    if days:
        return "%dd %dh old" % (days, rest // 3600)
    return "%dh %dm old" % (rest // 3600, rest % 3600 // 60)


class Reporter:
    """Shows one run to a person.

    ``status_stream`` gets the status lines (default stdout), ``log_stream``
    everything else (default stderr). ``quiet`` turns the progress line off;
    it never appears unless ``log_stream`` is a terminal anyway.
    """

    def __init__(self, status_stream=None, log_stream=None, quiet=False):
        self._status_stream = status_stream
        self._log_stream = log_stream
        self.quiet = quiet

    @property
    def status_stream(self):
        # Looked up late, so pytest's capsys and a replaced sys.stdout are honoured.
        return self._status_stream or sys.stdout

    @property
    def log_stream(self):
        return self._log_stream or sys.stderr

    def status(self, line):
        """One of the contract's status lines (``OK``, ``Output: …``), or a result line."""
        stream = self.status_stream
        stream.write(line + "\n")
        stream.flush()

    def log(self, message):
        stream = self.log_stream
        stream.write(message + "\n")
        stream.flush()

    def warn(self, message):
        self.log("WARNING: " + message)

    def error(self, message):
        self.log("ERROR: " + message)

    def progress(self, label, total=None):
        return Progress(label, total, enabled=not self.quiet, stream=self.log_stream)

    def status_to_log(self):
        """A reporter for a run whose stdout carries an archive: status lines go to the log."""
        return Reporter(self.log_stream, self._log_stream, self.quiet)

    def silent(self):
        """A reporter for work done on the side (a safety backup): logs, but no progress line."""
        return Reporter(self._status_stream, self._log_stream, quiet=True)

    def without_status(self):
        """A silent reporter whose status lines go nowhere: a restore inside a drill, whose
        lines are not the drill's."""
        return _WithoutStatus(self._status_stream, self._log_stream, quiet=True)


class _WithoutStatus(Reporter):
    def status(self, line):
        pass


class Progress:
    """One updating status line on a terminal; silent anywhere else.

    Shows bytes done, rate and elapsed time, plus percentage and ETA when the
    total is known.
    """

    INTERVAL = 0.25

    def __init__(self, label, total=None, enabled=True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.label = label
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.last_shown = 0.0
        self.width = 0

    def advance(self, count):
        self.done += count
        if self.enabled:
            now = time.monotonic()
            if now - self.last_shown >= self.INTERVAL:
                self.last_shown = now
                self._show(now)

    def _show(self, now):
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        text = "%s: %s, %s/s, %ds" % (self.label, human_size(self.done), human_size(rate), elapsed)
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            text += ", %d%%" % (fraction * 100)
            if rate > 0 and fraction < 1.0:
                text += ", ETA %ds" % ((self.total - self.done) / rate)
        self.width = max(self.width, len(text))
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()

    def finish(self):
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.finish()
