"""Telling a person that a run failed: the journal line, and a JSON POST to NOTIFY_URL.

systemd starts the OnFailure= unit with the failed unit's outcome in
``MONITOR_*`` variables (systemd 251 and later); the command line reads them
and hands them here.
"""

import json
import socket
import urllib.error
import urllib.request

from .errors import BackupError

SEND_TIMEOUT = 15


class Failure:
    """What is known of a failed run: the unit, systemd's result, exit code and status."""

    def __init__(self, unit, result, exit_code, exit_status, invocation):
        self.unit = unit or "ai_stack_backup.service"
        self.result, self.exit_code, self.exit_status = result, exit_code, exit_status
        self.invocation = invocation

    def line(self):
        how = self.result or "unknown"
        if self.exit_code or self.exit_status:
            how += " (%s %s)" % (self.exit_code or "exit", self.exit_status or "?")
        where = "journalctl -u %s" % self.unit
        if self.invocation:
            where += " _SYSTEMD_INVOCATION_ID=%s" % self.invocation
        return "ai_stack backup FAILED on %s: %s ended with result %s; see: %s" % (
            socket.gethostname(), self.unit, how, where)

    def payload(self):
        return {"event": "backup-failed", "host": socket.gethostname(), "unit": self.unit,
                "result": self.result, "exit_code": self.exit_code,
                "exit_status": self.exit_status, "invocation": self.invocation,
                "message": self.line()}


def send(url, failure):
    """POST the failure as JSON to ``url``; raises BackupError naming the cause."""
    request = urllib.request.Request(url, data=json.dumps(failure.payload()).encode(),
                                     headers={"Content-Type": "application/json"},
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=SEND_TIMEOUT) as response:
            response.read()
    except (urllib.error.URLError, OSError) as error:
        raise BackupError("could not send the failure to NOTIFY_URL: %s"
                          % getattr(error, "reason", error))
