"""Attacks and faults on the newest features (issue 28): each test is one way in that failed
before, plus planted secrets of every shape against every output channel.

Most runs here have no docker on PATH (the volume fails, the path source works), so they need
no engine; those that do are marked ``engine``.
"""

import contextlib
import http.server
import io
import os
import stat
import subprocess
import sys
import tarfile
import threading
import time

import pytest

import testkit
from ai_stack_backup import drill, locks, metrics, notify, offsite
from ai_stack_backup.cli import backup_all_main, drill_restore_main, report_failure_main
from ai_stack_backup.report import Reporter
from conftest import SCRIPTS
from test_engine_hardening import slow_image  # noqa: F401  (the fixture)
from test_monitoring import recorder  # noqa: F401  (the fixture)

SECRETS = {  # one of each shape a secret arrives in
    "assignment": "AKIAassign0001",
    "suffix_token": "tok-suffix-0002",
    "password_word": "pw-word-0003",
    "url_userinfo": "userinfo-0004",
    "url_query": "query-sig-0005",
    "bearer": "bearer-0006",
    "flag": "flag-value-0007",
    "json_key": "json-key-0008",
    "ping_path": "ping-path-0009",
    "ping_query": "ping-query-0010",
    "notify_path": "notify-path-0011",
    "notify_query": "notify-query-0012",
    "notify_header": "notify-header-0013",
}


@pytest.fixture
def no_docker_path(tmp_path):
    """A PATH with sh and a few tools but no docker: volumes fail, paths back up."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("sh", "sleep", "setsid", "cat", "echo", "cp"):
        found = subprocess.run(["sh", "-c", "command -v " + tool], capture_output=True,
                               text=True).stdout.strip()
        os.symlink(found, str(folder / tool))
    return str(folder)


@pytest.fixture
def output_root(tmp_path):
    folder = tmp_path / "output"
    folder.mkdir()
    (folder / "run.txt").write_text("transcript")
    return folder


def test_planted_secrets_of_every_shape_reach_no_output_channel(
        recorder, tmp_path, output_root, no_docker_path, monkeypatch, capsys):
    s = SECRETS
    command = ("AWS_SECRET_ACCESS_KEY=%s API_TOKEN=%s sh -c 'echo \"upload failed: password=%s "
               "https://user:%s@remote.example/x?sig=%s Authorization: Bearer %s "
               "--token %s {\\\"api_key\\\": \\\"%s\\\"}\" >&2; exit 3'" % (
                   s["assignment"], s["suffix_token"], s["password_word"], s["url_userinfo"],
                   s["url_query"], s["bearer"], s["flag"], s["json_key"]))
    metrics_file = tmp_path / "metrics" / "ai_stack_backup.prom"
    metrics_file.parent.mkdir()
    monkeypatch.setenv("BACKUP_DIR", str(tmp_path / "backups"))
    monkeypatch.setenv("VOLUMES", "aisb-test-no-engine-here")
    monkeypatch.setenv("OUTPUT_ROOT", str(output_root))
    monkeypatch.setenv("OFFSITE_COMMAND", command)
    monkeypatch.setenv("OFFSITE_ALLOW_PLAINTEXT", "1")
    monkeypatch.setenv("HEALTHCHECK_URL", recorder.url("/ping/%s?k=%s" % (
        s["ping_path"], s["ping_query"])))
    monkeypatch.setenv("NOTIFY_URL", recorder.url("/notify/%s?token=%s" % (
        s["notify_path"], s["notify_query"])))
    monkeypatch.setenv("NOTIFY_URL_HEADERS", "Authorization: Bearer %s" % s["notify_header"])
    monkeypatch.setenv("METRICS_FILE", str(metrics_file))
    monkeypatch.setenv("PATH", no_docker_path)
    assert backup_all_main([]) == 1
    run = capsys.readouterr()
    monkeypatch.setenv("MONITOR_SERVICE_RESULT", "exit-code")
    monkeypatch.setenv("MONITOR_EXIT_CODE", "exited")
    monkeypatch.setenv("MONITOR_EXIT_STATUS", "1")
    assert report_failure_main([]) == 0
    on_failure = capsys.readouterr()
    assert "offsite FAILED path %s" % output_root in run.out  # the copy did fail, and said so
    assert "the copy command sh (for" in run.out and "exited with 3" in run.out
    assert "password=***" in run.out and "https://***@remote.example/x?***" in run.out
    channels = {"stdout": run.out, "log": run.err, "metrics": metrics_file.read_text(),
                "on-failure output": on_failure.out + on_failure.err}
    for method, path, _, body in recorder.requests:
        channels["%s %s body" % (method, path.split("/")[1])] = body
    assert [path.split("/")[1] for path in recorder.paths()] == [
        "ping", "ping", "notify", "notify"]
    for channel, text in channels.items():
        for shape, secret in s.items():
            assert secret not in text, (channel, shape)


@pytest.mark.parametrize("command, name", [
    ("AWS_SECRET_ACCESS_KEY=x API_TOKEN=y sh -c 'upload'", "sh"),
    ("env -i TOKEN=x rclone copy - remote:backups", "rclone"),
    ("exec /usr/local/bin/upload-to-s3.sh --bucket b", "upload-to-s3.sh"),
    # Whatever is not a plain program name may be a secret: the setting's name stands in.
    ("send:SECRETVALUE --to remote", "OFFSITE_COMMAND"),
    ("ghp_0123456789abcdefghijklmnopqrstuvwxyzABCD --push", "OFFSITE_COMMAND"),
    ("'unbalanced quote", "OFFSITE_COMMAND"),
    ("", "OFFSITE_COMMAND"),
])
def test_an_offsite_command_is_shown_by_its_program_name_only(command, name):
    assert offsite.Settings(command).name == name


def test_an_escaped_child_cannot_outlast_offsite_timeout(tmp_path, output_root, no_docker_path,
                                                         monkeypatch, capsys):
    escaped = tmp_path / "escaped.pid"
    monkeypatch.setenv("BACKUP_DIR", str(tmp_path / "backups"))
    monkeypatch.setenv("VOLUMES", "aisb-test-no-engine-here")
    monkeypatch.setenv("OUTPUT_ROOT", str(output_root))
    monkeypatch.setenv("OFFSITE_ALLOW_PLAINTEXT", "1")
    monkeypatch.setenv("OFFSITE_TIMEOUT", "1")
    # The child leaves the command's process group and session, keeps its stderr, and sleeps.
    monkeypatch.setenv("OFFSITE_COMMAND", "setsid sh -c 'echo $$ > %s; exec sleep 3600' & "
                                          "exec sleep 3600" % escaped)
    monkeypatch.setenv("PATH", no_docker_path)
    assert backup_all_main(["--quiet"]) == 1  # returns: nothing holds the run any more
    out = capsys.readouterr().out
    assert "did not finish in time (OFFSITE_TIMEOUT); stopped it and every process it started" \
        in out
    pid = int(escaped.read_text())
    assert process_state(pid) in (None, "Z"), "the escaped child %d still runs" % pid
    assert testkit.archives_in(tmp_path / "backups")  # the local archive stands


def process_state(pid):
    """The state letter of process ``pid`` (Z: ended, not yet reaped), None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as file:
            return file.read().rsplit(b")", 1)[1].split()[0].decode()
    except FileNotFoundError:
        return None


class TrickleHandler(http.server.BaseHTTPRequestHandler):
    """Answers a byte every 2 s, for ever: each read is quick, the answer never complete."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(2)

    def log_message(self, *args):
        pass


@pytest.fixture
def trickling_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TrickleHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield "http://127.0.0.1:%d/ping/slow" % server.server_port
    server.shutdown()
    server.server_close()


def test_a_trickling_endpoint_cannot_hold_a_ping(trickling_url, monkeypatch):
    monkeypatch.setattr(notify, "PING_DEADLINE", 1)  # the whole ping, retries included
    log = io.StringIO()
    notify.ping(trickling_url, "start", "body", Reporter(log_stream=log))
    assert "health-check ping (start) not sent: could not send to http://127.0.0.1:" in \
        log.getvalue()
    # Whichever ends it first, the deadline or the socket's own timeout between two bytes.
    assert "no complete answer within" in log.getvalue() or "timed out" in log.getvalue()


def test_a_trickling_endpoint_delays_no_backup(trickling_url, tmp_path, output_root,
                                               no_docker_path, monkeypatch, capsys):
    monkeypatch.setattr(notify, "PING_DEADLINE", 1)
    monkeypatch.setenv("BACKUP_DIR", str(tmp_path / "backups"))
    monkeypatch.setenv("VOLUMES", "aisb-test-no-engine-here")
    monkeypatch.setenv("OUTPUT_ROOT", str(output_root))
    monkeypatch.setenv("HEALTHCHECK_URL", trickling_url)
    monkeypatch.setenv("PATH", no_docker_path)
    assert backup_all_main(["--quiet"]) == 1  # the volume (no docker), as without pings
    captured = capsys.readouterr()
    assert "ok      path %s" % output_root in captured.out
    assert "health-check ping (start) not sent" in captured.err
    [archive] = testkit.archives_in(tmp_path / "backups")
    with tarfile.open(archive) as opened:
        assert opened.extractfile("output/run.txt").read() == b"transcript"


# --- the metrics file in a folder others can write ------------------------------------------

@pytest.fixture
def metrics_folder(public_tmp):
    folder = os.path.join(public_tmp, "textfile")
    os.mkdir(folder)
    os.chmod(folder, 0o1777)  # node_exporter's account may write it too
    return folder


def _update(path, log):
    def change(samples):
        samples.setdefault(metrics.PREFIX + "members", {})[metrics.source_labels("v")] = 3
    metrics.update(path, change, Reporter(log_stream=log))


def test_a_symlinked_metrics_file_is_never_read_through(metrics_folder, tmp_path):
    secret = tmp_path / "age-identity.txt"
    secret.write_text("AGE-SECRET-KEY-1PLANTEDSECRET\n")
    os.chmod(str(secret), 0o600)
    path = os.path.join(metrics_folder, "ai_stack_backup.prom")
    os.symlink(str(secret), path)
    log = io.StringIO()
    _update(path, log)
    assert "PLANTEDSECRET" not in log.getvalue()
    assert "not read (it is a symbolic link); starting it afresh" in log.getvalue()
    assert secret.read_text() == "AGE-SECRET-KEY-1PLANTEDSECRET\n"  # not written through
    assert not os.path.islink(path) and 'ai_stack_backup_members{source="v"} 3' in \
        open(path).read()


def test_a_fifo_planted_as_the_metrics_file_feeds_no_samples(metrics_folder):
    """Anyone may write the folder: a FIFO under the file's name, held open with samples
    waiting in it, is never read, and the new file holds none of them."""
    path = os.path.join(metrics_folder, "ai_stack_backup.prom")
    os.mkfifo(path)
    feeder = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(feeder, b'ai_stack_backup_members{source="planted"} 99\n')
        log = io.StringIO()
        _update(path, log)
    finally:
        os.close(feeder)
    assert "not read (not a regular file); starting it afresh" in log.getvalue()
    with open(path) as file:
        text = file.read()
    assert "planted" not in text and 'ai_stack_backup_members{source="v"} 3' in text


def test_a_foreign_metrics_file_is_named_without_its_text(metrics_folder):
    path = os.path.join(metrics_folder, "ai_stack_backup.prom")
    with open(path, "w") as file:
        file.write("AGE-SECRET-KEY-1NOTASAMPLE\n")
    log = io.StringIO()
    _update(path, log)
    assert "could not be read (line 1 is not a sample); starting it afresh" in log.getvalue()
    assert "NOTASAMPLE" not in log.getvalue()


def test_a_symlinked_metrics_lock_plants_nothing(metrics_folder, tmp_path):
    backups = tmp_path / "backups"
    backups.mkdir()
    planted = backups / "vol__20991231T000000Z.tar.gz"
    path = os.path.join(metrics_folder, "ai_stack_backup.prom")
    os.symlink(str(planted), path + ".lock")
    log = io.StringIO()
    _update(path, log)
    assert not os.path.lexists(str(planted)) and os.listdir(str(backups)) == []
    assert "is a symbolic link; refusing to follow it" in log.getvalue()
    assert "is not updated this run" in log.getvalue()


@pytest.mark.skipif(os.geteuid() != 0, reason="another user's process needs root")
def test_another_user_cannot_hold_the_metrics_run(metrics_folder, monkeypatch):
    from test_locks import held_by_other_user
    monkeypatch.setattr(metrics, "LOCK_WAIT", 0.3)
    path = os.path.join(metrics_folder, "ai_stack_backup.prom")
    lock = path + ".lock"
    with open(lock, "w"):
        pass
    os.chmod(lock, 0o644)  # as earlier versions left it: anyone could open and hold it
    with held_by_other_user(lock):
        log = io.StringIO()
        _update(path, log)  # returns, with a warning, instead of blocking for ever
        assert "stayed busy for 0.3 s; the metrics file is not updated this run" in \
            log.getvalue()
    assert stat.S_IMODE(os.stat(lock).st_mode) == 0o600  # nobody else can open it now
    _update(path, io.StringIO())
    assert 'ai_stack_backup_members{source="v"} 3' in open(path).read()
    os.chown(lock, testkit.OTHER_UID, testkit.OTHER_GID)  # another user's lock: not used
    log = io.StringIO()
    _update(path, log)
    assert "belongs to user %d, not this one" % testkit.OTHER_UID in log.getvalue()


# --- engine: skip-if-unchanged and exclusions, killed drills ------------------------------

def _members(archive):
    with tarfile.open(archive) as opened:
        return sorted(member.name for member in opened.getmembers())


@pytest.mark.engine
def test_a_changed_exclusion_is_never_skipped(helper_env, make_volume, tmp_path, monkeypatch,
                                              capsys):
    volume = make_volume()
    data = tmp_path / "data"
    (data / "cache").mkdir(parents=True)
    (data / "cache" / "creds.txt").write_text("secret credentials")
    (data / "app.txt").write_text("app")
    testkit.fill_volume(volume, data)
    testkit.next_second()  # a listing with ctimes of this second is never recorded
    folder = tmp_path / "backups"
    monkeypatch.setenv("BACKUP_DIR", str(folder))
    monkeypatch.setenv("VOLUMES", volume)
    monkeypatch.setenv("OUTPUT_ROOT", "")
    monkeypatch.setenv("RETENTION_SHRINK_GUARD", "0")
    assert backup_all_main(["--quiet"]) == 0
    [first] = testkit.archives_in(folder)
    assert "./cache/creds.txt" in _members(first)
    testkit.next_second()
    assert backup_all_main(["--quiet"]) == 0  # unchanged, same settings: linked
    second = testkit.archives_in(folder)[-1]
    assert os.stat(second).st_ino == os.stat(first).st_ino
    capsys.readouterr()
    testkit.next_second()
    monkeypatch.setenv("BACKUP_EXCLUDE", "%s:cache/" % volume)  # keep the secret out
    assert backup_all_main([]) == 0
    third = testkit.archives_in(folder)[-1]
    assert os.stat(third).st_ino != os.stat(first).st_ino
    assert "./cache/creds.txt" not in _members(third) and "./app.txt" in _members(third)
    assert "made with other settings" in capsys.readouterr().err
    testkit.next_second()
    monkeypatch.delenv("BACKUP_EXCLUDE")  # and back: the data must return
    assert backup_all_main(["--quiet"]) == 0
    fourth = testkit.archives_in(folder)[-1]
    assert os.stat(fourth).st_ino not in (os.stat(first).st_ino, os.stat(third).st_ino)
    assert "./cache/creds.txt" in _members(fourth)


@pytest.mark.engine
def test_a_killed_drill_leaves_no_scratch_copy_behind(helper_env, make_volume, tmp_path,
                                                      own_backup_dir, slow_image, capsys):
    volume = make_volume()
    testkit.fill_volume(volume, testkit.make_tricky_tree(tmp_path / "tricky").decode())
    # The tricky tree's webui.db is not a database; a drill would rightly fail on it.
    os.remove(os.path.join(testkit.mountpoint(volume), "app", "backend", "data", "webui.db"))
    from ai_stack_backup.cli import backup_docker_volume_main
    assert backup_docker_volume_main([volume, str(own_backup_dir), "--quiet"]) == 0
    before = set(testkit.docker("volume", "ls", "-q").split())
    process = subprocess.Popen([sys.executable, os.path.join(SCRIPTS, "drill_restore.py"),
                                volume], env=dict(os.environ, BACKUP_HELPER_IMAGE=slow_image),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scratch = None
    try:
        for _ in range(600):  # a ceiling against a hang, not a speed claim
            scratch = [name for name in set(testkit.docker("volume", "ls", "-q").split())
                       - before if name.startswith(drill.SCRATCH_PREFIX)]
            if scratch and testkit.helper_containers(scratch[0]):
                break
            time.sleep(0.1)
        [scratch] = scratch
        labels = testkit.docker("volume", "inspect", "--format",
                                '{{index .Labels "%s"}}' % drill.OWNER_LABEL, scratch).strip()
        assert labels == str(process.pid)
    finally:
        process.kill()
        process.wait()
    for container in testkit.helper_containers(scratch):  # the killed drill's own helper
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
    assert testkit.volume_exists(scratch)  # a full copy of the data, left behind
    capsys.readouterr()
    assert drill_restore_main([volume]) == 0  # the next drill removes it, and says so
    error = capsys.readouterr().err
    assert "removed the scratch volume %s, left by a drill that was killed (PID %d)" % (
        scratch, process.pid) in error
    assert not testkit.volume_exists(scratch)
    assert not os.path.lexists(locks.host_lock_path(scratch))
    assert not [name for name in testkit.docker("volume", "ls", "-q").split()
                if name.startswith(drill.SCRATCH_PREFIX) and name not in before]


KILLED_WRITER = r'''
import os, sys, time
sys.path.insert(0, sys.argv[2])
from ai_stack_backup import metrics
from ai_stack_backup.report import Reporter
def stuck(*args, **kwargs):  # the new file is written and fsynced; the rename never comes
    print("written", flush=True)
    time.sleep(3600)
metrics.os.replace = stuck
def change(samples):
    samples.setdefault(metrics.PREFIX + "members", {})[metrics.source_labels("v")] = 999
metrics.update(sys.argv[1], change, Reporter())
'''


def test_a_kill_during_a_metrics_write_leaves_the_old_file_whole(metrics_folder):
    path = os.path.join(metrics_folder, "ai_stack_backup.prom")
    _update(path, io.StringIO())
    before = open(path).read()
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, path, SCRIPTS],
                              stdout=subprocess.PIPE)
    assert writer.stdout.readline() == b"written\n"
    writer.kill()
    writer.wait()
    assert open(path).read() == before  # never a half-written file under the name
    assert metrics.parse(before)[metrics.PREFIX + "members"] == {
        metrics.source_labels("v"): 3}
    left = [name for name in os.listdir(metrics_folder) if name.endswith(".prom")]
    assert left == ["ai_stack_backup.prom"]  # the collector reads only *.prom
    log = io.StringIO()
    _update(path, log)  # the killed writer's lock went with it
    assert "not updated" not in log.getvalue()
