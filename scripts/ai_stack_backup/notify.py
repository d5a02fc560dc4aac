"""Telling a person: failure messages to NOTIFY_URL, health-check pings, masked URLs.

- A failure is POSTed as short plain text (ntfy, Gotify-style and Apprise
  endpoints take it as it is), with NOTIFY_URL_HEADERS (``Name: value``, one
  per line) for an auth header.
- Health-check pings follow healthchecks.io and Uptime Kuma: ``URL/start``,
  ``URL`` on success, ``URL/fail`` on failure, the summary as the body. A ping
  that cannot be sent is logged and never changes a run's result.
- URLs carry secrets (tokens in the path or query, credentials): only
  ``mask(url)`` ever reaches a log line or an error message.
- Every send has a total deadline, retries included (urllib's own timeout is
  per socket read: an endpoint answering a byte every few seconds would hold
  it for ever). A request still running at the deadline is left to its
  daemon thread and given up on.

systemd starts the OnFailure= unit with the failed unit's outcome in
``MONITOR_*`` variables (systemd 251 and later); the command line reads them
and hands them here as a ``Failure``.
"""

import re
import socket
import threading
import time
import urllib.parse

from .errors import BackupError, ConfigError

SEND_TIMEOUT = 10  # one attempt, connect to the last byte of the answer
SEND_DEADLINE = 20  # all attempts of a message together
PING_DEADLINE = 10  # all attempts of a ping: a backup waits for its /start ping at most this
ATTEMPTS = 3
RETRY_DELAY = 1.0  # seconds before the second attempt, doubled before each further one
BODY_LIMIT = 10000  # healthchecks.io keeps the first 10 kB of a ping's body


def mask(url):
    """Give ``url`` without what may be secret: credentials, path, query and fragment."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = ":%d" % parts.port if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    if ":" in host:
        host = "[%s]" % host
    credentials = "***@" if parts.username or parts.password else ""
    rest = "/…" if parts.path.strip("/") or parts.query or parts.fragment else ""
    return "%s://%s%s%s%s" % (parts.scheme, credentials, host, port, rest)


def check_url(url, name):
    """Raise ConfigError (naming ``name``, never the URL) unless ``url`` is http(s)."""
    try:
        parts = urllib.parse.urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError("%s must be an http:// or https:// URL (it is %s)" % (name, mask(url)))
    return url


def parse_headers(text):
    """Give NOTIFY_URL_HEADERS (``Name: value`` lines) as pairs; raises ConfigError."""
    headers = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, colon, value = line.strip().partition(":")
        if not colon or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name) or \
                not value.strip():
            # The line may be a token: the message shows neither it nor a part of it.
            raise ConfigError("NOTIFY_URL_HEADERS: each line must be 'Name: value'; line %d "
                              "is not" % number)
        headers.append((name, value.strip()))
    return headers


def _post(url, body, headers=(), seconds=SEND_TIMEOUT):
    """POST ``body`` (text) to ``url`` once, answer and all within ``seconds``; raises
    OSError (TimeoutError at the deadline) or urllib's errors."""
    outcome = []

    def post():
        try:
            _post_once(url, body, headers, seconds)
            outcome.append(None)
        except BaseException as error:  # handed to the caller's thread
            outcome.append(error)
    thread = threading.Thread(target=post, name="notify", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise TimeoutError("no complete answer within %g s" % seconds)
    if outcome[0] is not None:
        raise outcome[0]


def _post_once(url, body, headers, seconds):
    # Imported here: loading urllib.request (http.client, ssl) costs every run about 15 ms,
    # and only a run that sends anything needs it.
    import urllib.request
    request = urllib.request.Request(url, data=body.encode("utf-8", "replace")[:BODY_LIMIT],
                                     method="POST")
    request.add_header("Content-Type", "text/plain; charset=utf-8")
    for name, value in headers:
        request.add_header(name, value)
    with urllib.request.urlopen(request, timeout=seconds) as response:
        response.read()


def _cause(error):
    import urllib.error  # see _post_once
    if isinstance(error, urllib.error.HTTPError):
        return "HTTP %d %s" % (error.code, error.reason)
    reason = getattr(error, "reason", None) or error
    return str(reason) if not isinstance(reason, OSError) else (reason.strerror or str(reason))


def send(url, body, headers=(), attempts=ATTEMPTS, deadline=SEND_DEADLINE):
    """POST ``body`` to ``url``, retrying, for ``deadline`` seconds at most in all; raises
    BackupError naming the masked URL and the cause."""
    end = time.monotonic() + deadline
    delay = RETRY_DELAY
    tried = 0
    while True:
        tried += 1
        try:
            _post(url, body, headers, min(SEND_TIMEOUT, max(0.1, end - time.monotonic())))
            return
        except (OSError, ValueError) as error:  # urllib's URLError is an OSError
            if tried == attempts or time.monotonic() + delay >= end:
                raise BackupError("could not send to %s after %d attempt%s: %s"
                                  % (mask(url), tried, "" if tried == 1 else "s",
                                     _cause(error)))
        time.sleep(delay)
        delay *= 2


def ping(url, event, body, reporter):
    """Ping a health check: ``event`` is start, success or fail. Failures are only logged;
    a ping takes PING_DEADLINE seconds at most."""
    target = url.rstrip("/") + {"start": "/start", "success": "", "fail": "/fail"}[event]
    try:
        send(target, body, deadline=PING_DEADLINE)
    except BackupError as error:
        reporter.warn("health-check ping (%s) not sent: %s" % (event, error))


def host():
    return socket.gethostname()


class Failure:
    """What the OnFailure= unit knows of a failed run: the unit, systemd's result, exit code
    and status."""

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
            host(), self.unit, how, where)


def run_failed_message(failed_lines, total, error=None):
    """The plain-text message for a backup_all run that failed: host, sources and reasons."""
    if error is not None:
        return "ai_stack backup FAILED on %s: backup_all could not run: %s\n" % (host(), error)
    return "ai_stack backup FAILED on %s: %d of %d sources\n%s\n" % (
        host(), len(failed_lines), total, "\n".join(failed_lines))
