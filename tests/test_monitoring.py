"""Metrics file, health-check pings and failure messages, against a local HTTP server."""

import http.server
import os
import re
import subprocess
import sys
import threading
import time

import pytest

import testkit
from ai_stack_backup import metrics, monitor, notify
from ai_stack_backup.cli import backup_all_main, drill_restore_main, report_failure_main
from ai_stack_backup.errors import BackupError
from conftest import SCRIPTS

SECRET = "s3cr3t-t0ken"


class Recorder:
    """An HTTP server on 127.0.0.1 that records every request: (method, path, headers, body)."""

    def __init__(self):
        self.requests = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                recorder.requests.append(("POST", self.path, dict(self.headers),
                                          body.decode()))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.server.server_port, path)

    def paths(self):
        return [path for _, path, _, _ in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder():
    server = Recorder()
    yield server
    server.close()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(notify, "RETRY_DELAY", 0.01)


def closed_port_url(path=""):
    """A URL nobody listens on (a port just released)."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return "http://127.0.0.1:%d%s" % (port, path)


# --- a strict reader of the exposition format, independent of the code under test -----------

SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
                    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*)?)\} (\S+)')


def read_exposition(text):
    """Give ``{name: {labels text: value}}``; fail on anything the format does not allow."""
    assert text.endswith("\n"), "the last line must end"
    families, helped, typed, finished = {}, set(), set(), set()
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in helped and name not in families, "HELP twice or late: " + line
            helped.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("gauge", "counter"), line
            assert name in helped and name not in typed and name not in families, line
            typed.add(name)
            continue
        assert not line.startswith("#") and line.strip(), "unexpected line %r" % line
        match = SAMPLE.fullmatch(line)
        assert match, "not a sample: %r" % line
        name, labels, value = match.groups()
        assert name in typed, "sample before its TYPE: " + line
        if name != current:
            assert name not in finished, "family %s is split" % name
            if current:
                finished.add(current)
            current = name
        float(value)
        assert labels not in families.setdefault(name, {}), "duplicate sample: " + line
        families[name][labels] = float(value)
    return families


def value(families, name, source, **extra):
    labels = ",".join(['source="%s"' % source] + ['%s="%s"' % item
                                                   for item in sorted(extra.items())])
    return families["ai_stack_backup_" + name][labels]


# --- notifications and masking ---------------------------------------------------------------

@pytest.mark.parametrize("url, masked", [
    ("https://hc-ping.com/%s" % SECRET, "https://hc-ping.com/…"),
    ("https://user:%s@ntfy.example:8443/topic?auth=%s" % (SECRET, SECRET),
     "https://***@ntfy.example:8443/…"),
    ("http://[::1]:8080/", "http://[::1]:8080"),
    ("https://example.org", "https://example.org"),
])
def test_urls_are_masked(url, masked):
    assert notify.mask(url) == masked


def test_report_failure_posts_plain_text_with_the_auth_header(recorder, monkeypatch, capsys):
    url = recorder.url("/topic-%s?token=%s" % (SECRET, SECRET))
    for key, setting in {"MONITOR_UNIT": "ai_stack_backup.service",
                         "MONITOR_SERVICE_RESULT": "exit-code", "MONITOR_EXIT_CODE": "exited",
                         "MONITOR_EXIT_STATUS": "1", "MONITOR_INVOCATION_ID": "0123abc",
                         "NOTIFY_URL": url,
                         "NOTIFY_URL_HEADERS": "Authorization: Bearer %s" % SECRET}.items():
        monkeypatch.setenv(key, setting)
    assert report_failure_main([]) == 0
    [(method, path, headers, body)] = recorder.requests
    assert (method, path) == ("POST", "/topic-%s?token=%s" % (SECRET, SECRET))
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["Authorization"] == "Bearer %s" % SECRET
    assert body.startswith("ai_stack backup FAILED on %s: ai_stack_backup.service ended with "
                           "result exit-code (exited 1)" % notify.host())
    captured = capsys.readouterr()
    assert "sent to http://127.0.0.1:%d/…" % recorder.server.server_port in captured.err
    assert SECRET not in captured.out + captured.err


def test_report_failure_says_when_nobody_listens(fast_retries, monkeypatch, capsys):
    monkeypatch.setenv("NOTIFY_URL", closed_port_url("/hook/%s" % SECRET))
    assert report_failure_main([]) == 1
    error = capsys.readouterr().err
    assert re.search(r"could not send to http://127\.0\.0\.1:\d+/… after 3 attempts", error)
    assert SECRET not in error


def test_report_failure_sends_nothing_when_the_run_told_already(recorder, monkeypatch,
                                                                own_backup_dir, capsys):
    (own_backup_dir / monitor.NOTIFIED_NAME).write_text("0123abc\n")
    monkeypatch.setenv("NOTIFY_URL", recorder.url("/hook"))
    monkeypatch.setenv("MONITOR_INVOCATION_ID", "0123abc")
    assert report_failure_main([]) == 0
    assert recorder.requests == []
    assert "the run sent its own failure message" in capsys.readouterr().err
    monkeypatch.setenv("MONITOR_INVOCATION_ID", "another-run")  # killed before it could tell
    assert report_failure_main([]) == 0
    assert len(recorder.requests) == 1


@pytest.mark.parametrize("name, setting, problem", [
    ("NOTIFY_URL", "ftp://x/%s" % SECRET, "NOTIFY_URL must be an http:// or https:// URL"),
    ("HEALTHCHECK_URL", "hc-ping.com/%s" % SECRET, "HEALTHCHECK_URL must be an http://"),
    ("NOTIFY_URL_HEADERS", "Bearer %s" % SECRET, "NOTIFY_URL_HEADERS: each line must be"),
    ("METRICS_FILE", "/var/lib/node_exporter/backup.txt", "METRICS_FILE must end in .prom"),
])
def test_bad_monitoring_settings_are_named_without_their_secrets(name, setting, problem,
                                                                 monkeypatch, capsys):
    monkeypatch.setenv(name, setting)
    assert backup_all_main(["--dry-run"]) == 1
    error = capsys.readouterr().err
    assert problem in error and SECRET not in error


# --- backup_all: pings, message, metrics ------------------------------------------------------

def _configure(monkeypatch, folder, volumes, output_root, recorder=None, metrics_file=None):
    monkeypatch.setenv("BACKUP_DIR", str(folder))
    monkeypatch.setenv("VOLUMES", volumes)
    monkeypatch.setenv("OUTPUT_ROOT", str(output_root))
    if recorder is not None:
        monkeypatch.setenv("HEALTHCHECK_URL", recorder.url("/ping/%s" % SECRET))
        monkeypatch.setenv("NOTIFY_URL", recorder.url("/notify?key=%s" % SECRET))
    if metrics_file is not None:
        monkeypatch.setenv("METRICS_FILE", str(metrics_file))


def test_a_failed_run_pings_fail_and_names_the_failed_source(recorder, tmp_path, monkeypatch,
                                                              capsys):
    output_root = tmp_path / "output"
    output_root.mkdir()
    (output_root / "run.txt").write_text("transcript")
    _configure(monkeypatch, tmp_path / "backups", "owui-data", output_root, recorder)
    monkeypatch.setenv("INVOCATION_ID", "feedc0de")
    monkeypatch.setenv("PATH", str(tmp_path))  # no docker: the volume fails, the path works
    assert backup_all_main(["--quiet"]) == 1
    assert recorder.paths() == ["/ping/%s/start" % SECRET, "/ping/%s/fail" % SECRET,
                                "/notify?key=%s" % SECRET]
    fail_body, message = recorder.requests[1][3], recorder.requests[2][3]
    assert re.search(r"^FAILED  volume owui-data: ", fail_body, re.M)
    assert re.search(r"^ok      path %s: " % re.escape(str(output_root)), fail_body, re.M)
    assert message.startswith("ai_stack backup FAILED on %s: 1 of 2 sources\nFAILED  volume "
                              "owui-data: " % notify.host())
    assert str(output_root) not in message  # only what failed
    assert (tmp_path / "backups" / monitor.NOTIFIED_NAME).read_text() == "feedc0de\n"
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err


def test_unreachable_monitoring_changes_no_exit_code(fast_retries, tmp_path, monkeypatch,
                                                     capsys):
    output_root = tmp_path / "output"
    output_root.mkdir()
    monkeypatch.setenv("HEALTHCHECK_URL", closed_port_url("/ping/%s" % SECRET))
    monkeypatch.setenv("NOTIFY_URL", closed_port_url("/n?token=%s" % SECRET))
    _configure(monkeypatch, tmp_path / "backups", "owui-data", output_root)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert backup_all_main(["--quiet"]) == 1  # the volume failed: 1, as without monitoring
    error = capsys.readouterr().err
    assert re.search(r"health-check ping \(start\) not sent: could not send to "
                     r"http://127\.0\.0\.1:\d+/… after 3 attempts", error)
    assert "health-check ping (fail) not sent" in error
    assert "failure message not sent" in error
    assert SECRET not in error


@pytest.mark.engine
def test_good_and_failed_runs_and_a_drill_in_pings_and_metrics(helper_env, make_volume,
                                                               recorder, tmp_path, monkeypatch,
                                                               capsys):
    volume = make_volume()
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_bytes(b"n" * 5000)
    testkit.fill_volume(volume, data)
    output_root = tmp_path / "output"
    output_root.mkdir()
    (output_root / "run.txt").write_bytes(b"t" * 3000)
    folder, metrics_file = tmp_path / "backups", tmp_path / "metrics" / "ai_stack_backup.prom"
    metrics_file.parent.mkdir()
    _configure(monkeypatch, folder, volume, output_root, recorder, metrics_file)

    seen, stop = [], threading.Event()

    def watch_the_file():  # every version the collector could read must parse
        while not stop.is_set():
            try:
                with open(str(metrics_file)) as file:
                    seen.append(file.read())
            except FileNotFoundError:
                pass
    watcher = threading.Thread(target=watch_the_file)
    watcher.start()
    try:
        before = time.time()
        assert backup_all_main(["--quiet"]) == 0
        after = time.time()
        assert recorder.paths() == ["/ping/%s/start" % SECRET, "/ping/%s" % SECRET]
        assert re.search(r"^ok +volume %s: " % volume, recorder.requests[1][3], re.M)
        good = read_exposition(metrics_file.read_text())
        for source in (volume, str(output_root)):
            assert before <= value(good, "last_run_timestamp_seconds", source) <= after
            assert value(good, "last_success_timestamp_seconds", source) == \
                value(good, "last_run_timestamp_seconds", source)
            assert value(good, "last_run_success", source) == 1
            assert value(good, "archives_kept", source) == 1
            assert value(good, "duration_seconds", source) > 0
        archive = [path for path in testkit.archives_in(folder) if volume in path][0]
        assert value(good, "archive_size_bytes", volume) == os.path.getsize(archive)
        assert value(good, "uncompressed_size_bytes", volume) == 5000
        assert value(good, "members", volume) == 2
        assert value(good, "uncompressed_size_bytes", str(output_root)) == 3000
        assert value(good, "app_pause_seconds", volume) == 0
        assert value(good, "info", volume, consistency="live") == 1
        assert oct(os.stat(str(metrics_file)).st_mode & 0o777) == "0o644"

        # The volume goes away: a failed run keeps the last success and the archive figures.
        testkit.docker("volume", "rm", volume)
        testkit.next_second()
        assert backup_all_main(["--quiet"]) == 1
        failed = read_exposition(metrics_file.read_text())
        assert value(failed, "last_run_success", volume) == 0
        assert value(failed, "last_run_timestamp_seconds", volume) > \
            value(good, "last_run_timestamp_seconds", volume)
        assert value(failed, "last_success_timestamp_seconds", volume) == \
            value(good, "last_success_timestamp_seconds", volume)
        assert value(failed, "archive_size_bytes", volume) == os.path.getsize(archive)
        assert value(failed, "last_run_success", str(output_root)) == 1
        assert recorder.paths()[2:] == ["/ping/%s/start" % SECRET, "/ping/%s/fail" % SECRET,
                                        "/notify?key=%s" % SECRET]
        assert "volume %s does not exist" % volume in recorder.requests[4][3]

        # A drill adds its own figures and keeps backup_all's.
        testkit.docker("volume", "create", volume)
        assert drill_restore_main([volume, "--quiet"]) == 0
        drilled = read_exposition(metrics_file.read_text())
        assert value(drilled, "drill_success", volume) == 1
        assert value(drilled, "drill_duration_seconds", volume) > 0
        assert value(drilled, "drill_timestamp_seconds", volume) >= after
        for name, samples in failed.items():
            assert drilled[name] == samples
    finally:
        stop.set()
        watcher.join()
    for text in seen:
        read_exposition(text)
    assert len(seen) > 3
    assert not [name for name in os.listdir(str(metrics_file.parent))
                if name.endswith(".prom") and name != metrics_file.name]
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err


def test_a_damaged_metrics_file_is_started_afresh(tmp_path):
    path = tmp_path / "m.prom"
    path.write_text("ai_stack_backup_members{source=unquoted} 1\n")
    warnings = []

    class Reporter:
        def warn(self, text):
            warnings.append(text)
    def change(samples):
        samples["ai_stack_backup_drill_success"] = {(("source", 'we"ird\\name'),): 1}
    metrics.update(str(path), change, Reporter())
    families = read_exposition(path.read_text())
    assert families["ai_stack_backup_drill_success"] == {'source="we\\"ird\\\\name"': 1.0}
    assert metrics.parse(path.read_text()) == {
        "ai_stack_backup_drill_success": {(("source", 'we"ird\\name'),): 1.0}}
    assert "could not be read" in warnings[0]


def test_report_failure_script_runs(monkeypatch):
    result = subprocess.run([sys.executable, os.path.join(SCRIPTS, "report_failure.py")],
                            capture_output=True, text=True,
                            env=dict(os.environ, MONITOR_UNIT="x.service"))
    assert result.returncode == 0
    assert "x.service ended with result unknown" in result.stderr


def test_a_run_that_cannot_start_still_pings_fail_and_marks_every_source(
        recorder, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    metrics_file = tmp_path / "ai_stack_backup.prom"
    _configure(monkeypatch, blocker / "backups", "owui-data tm-data", "", recorder,
               metrics_file)
    assert backup_all_main(["--quiet"]) == 1
    assert recorder.paths() == ["/ping/%s/fail" % SECRET, "/notify?key=%s" % SECRET]
    assert recorder.requests[1][3].startswith(
        "ai_stack backup FAILED on %s: backup_all could not run: " % notify.host())
    families = read_exposition(metrics_file.read_text())
    for source in ("owui-data", "tm-data"):
        assert value(families, "last_run_success", source) == 0
    assert SECRET not in "".join(capsys.readouterr())


@pytest.mark.engine
def test_a_metrics_file_that_cannot_be_written_fails_the_run(helper_env, make_volume, tmp_path,
                                                             monkeypatch, capsys):
    volume = make_volume()
    _configure(monkeypatch, tmp_path / "backups", volume, "", None,
               tmp_path / "no-such-folder" / "ai_stack_backup.prom")
    assert backup_all_main(["--quiet"]) == 1
    captured = capsys.readouterr()
    assert re.search(r"^ok +volume %s: " % volume, captured.out, re.M)  # the backup is fine
    assert "cannot write the metrics file %s" % (tmp_path / "no-such-folder" /
                                                 "ai_stack_backup.prom") in captured.err


class _Clock:
    """time for notify: a clock that moves only when an attempt waits or the sender sleeps."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_a_send_gives_all_its_attempts_no_more_than_its_deadline(monkeypatch):
    clock, given = _Clock(), []

    def hanging(url, body, headers, seconds):  # each attempt waits as long as it may
        given.append(seconds)
        clock.now += seconds
        raise TimeoutError("no complete answer within %g s" % seconds)
    monkeypatch.setattr(notify, "time", clock)
    monkeypatch.setattr(notify, "_post", hanging)
    with pytest.raises(BackupError, match=r"could not send to http://monitor\.invalid/… "
                                          r"after 2 attempts: no complete answer within"):
        notify.send("http://monitor.invalid/hook", "body", attempts=10, deadline=15)
    # 10 s (an attempt's own limit), 1 s of waiting, then the 4 s left; no third attempt.
    assert given == [10, 4] and clock.now - 1000.0 == 15
