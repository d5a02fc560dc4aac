"""Watching the nightly job: metrics file, health-check pings and the failure message.

backup_all: lock taken → ping /start → sources → metrics → ping (success | /fail) → notify

Each is on only when configured (METRICS_FILE, HEALTHCHECK_URL, NOTIFY_URL).
A ping or message that cannot be sent is logged and changes no result; a
metrics file that cannot be written fails the run, as nobody would see the
next failure otherwise. When backup_all sent its own failure message, it
leaves the systemd invocation id in ``BACKUP_DIR/.ai_stack_backup-notified``
so that the OnFailure= unit does not send a second one.
"""

import contextlib
import os
import time

from . import metrics, notify
from .errors import BackupError
from .files import publish_text

NOTIFIED_NAME = ".ai_stack_backup-notified"


def configured_names(config):
    """The names backup_all's sources go by in the metrics: volumes, then OUTPUT_ROOT."""
    return list(config.volumes) + ([config.output_root] if config.output_root else [])


class Watch:
    """The monitoring of one backup_all run; ``clock`` gives Unix time."""

    def __init__(self, config, reporter, clock=time.time):
        self.config, self.reporter, self.clock = config, reporter, clock

    def started(self):
        if self.config.healthcheck_url:
            notify.ping(self.config.healthcheck_url, "start", "backup_all started on %s"
                        % notify.host(), self.reporter)

    def finished(self, outcomes):
        """Record and tell how the run went; give the problems that fail the run (strings)."""
        failed = [outcome for outcome in outcomes if outcome.failed]
        problems = self._write_metrics({outcome.name: outcome for outcome in outcomes
                                        if outcome.source is not None},
                                       {outcome.name: outcome.kept for outcome in outcomes
                                        if outcome.kept is not None})
        lines = [outcome.line() for outcome in outcomes] + problems
        self._tell(not (failed or problems), lines, len(outcomes),
                   notify.run_failed_message([outcome.line() for outcome in failed]
                                             + problems, len(outcomes)))
        return problems

    def failed(self, error):
        """The run failed before any source was tried (the backup folder, say)."""
        self._write_metrics({}, {})
        self._tell(False, [str(error)], 0, notify.run_failed_message([], 0, error))

    def _write_metrics(self, outcomes, kept):
        now, names = self.clock(), configured_names(self.config)
        return _update_metrics(self.config, lambda samples: metrics.backup_run(
            samples, outcomes, names, now, kept), self.reporter)

    def _tell(self, good, lines, total, message):
        config = self.config
        if config.healthcheck_url:
            notify.ping(config.healthcheck_url, "success" if good else "fail",
                        "\n".join(lines) + "\n", self.reporter)
        if good or not config.notify_url:
            return
        try:
            notify.send(config.notify_url, message, config.notify_headers)
        except BackupError as error:
            self.reporter.warn("failure message not sent: %s" % error)
            return
        self.reporter.log("failure message sent to %s" % notify.mask(config.notify_url))
        if config.invocation_id:
            with contextlib.suppress(BackupError):  # without it, OnFailure= says it twice
                publish_text(os.path.join(config.backup_dir, NOTIFIED_NAME),
                             config.invocation_id + "\n", replace=True)


def already_notified(config, invocation):
    """Say whether the run ``invocation`` sent its own failure message (for OnFailure=)."""
    if not invocation:
        return False
    try:
        with open(os.path.join(config.backup_dir, NOTIFIED_NAME)) as file:
            return file.read().strip() == invocation
    except OSError:
        return False


def drill_finished(config, results, reporter, clock=time.time):
    """Record the drills in the metrics file; give the problems that fail the run."""
    now = clock()
    return _update_metrics(config, lambda samples: metrics.drill_run(samples, results, now),
                           reporter)


def stack_drill_finished(config, point_time, results, seconds, success, reporter,
                         clock=time.time):
    """Record a whole recovery point's drill (and each source's) in the metrics file; give
    the problems that fail the run."""
    now = clock()

    def change(samples):
        metrics.drill_run(samples, results, now)
        metrics.stack_drill_run(samples, point_time, seconds, success, now)
    return _update_metrics(config, change, reporter)


def _update_metrics(config, change, reporter):
    """Apply ``change`` to METRICS_FILE, if set; give the problems that fail the run."""
    if not config.metrics_file:
        return []
    try:
        metrics.update(config.metrics_file, change, reporter)
    except BackupError as error:
        reporter.error(str(error))
        return [str(error)]
    return []
