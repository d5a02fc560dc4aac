"""restore_all and the whole drill against the real engine: one recovery point of several
volumes and OUTPUT_ROOT, with running apps; refusals that change nothing; rollback across
volumes; a new host from fetched .age copies."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile

import pytest

import testkit
from ai_stack_backup import cli, metrics
from ai_stack_backup.names import parse_archive_name, parse_timestamp, utc_timestamp
from conftest import SCRIPTS

pytestmark = pytest.mark.engine


@pytest.fixture
def apps():
    """Starts test containers (busybox, a compose project label of their own) that log each
    start to /data/starts of their first volume; removes them."""
    created = []
    project = "aisb-test-%s" % os.urandom(3).hex()

    def start(*volumes):
        name = "aisb-app-%s" % os.urandom(4).hex()
        created.append(name)
        mounts = []
        for index, volume in enumerate(volumes):
            mounts += ["-v", "%s:/data%s" % (volume, index or "")]
        testkit.docker("run", "-d", "--init", "--name", name, "--network", "none",
                       "--label", "com.docker.compose.project=" + project, *mounts,
                       testkit.HELPER_IMAGE, "sh", "-c",
                       "echo started >> /data/starts; exec sleep 100000")
        testkit.wait_for(lambda: testkit.starts(volumes[0]) > 0, "%s to start" % name)
        return name
    start.project = project
    yield start
    for name in created:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def _fill(volume, tmp_path, label, size=20000):
    data = tmp_path / ("fill-%s-%s" % (volume, label))
    (data / "app").mkdir(parents=True)
    (data / "app" / "db").write_bytes(os.urandom(size))
    (data / "app" / "note.txt").write_text(label)
    testkit.fill_volume(volume, data)


def _change(volume, label):
    """Change what a volume holds, as an app would (root may write its folder here)."""
    root = testkit.mountpoint(volume)
    with open(os.path.join(root, "app", "note.txt"), "w") as file:
        file.write(label)
    with open(os.path.join(root, "app", label), "wb") as file:
        file.write(os.urandom(5000))


@pytest.fixture
def stack(helper_env, make_volume, tmp_path, monkeypatch):
    """Two volumes and an OUTPUT_ROOT with data, configured as backup_all's and
    restore_all's sources; gives ``(volumes, output_root, backup folder)``."""
    volumes = [make_volume(), make_volume()]
    for volume in volumes:
        _fill(volume, tmp_path, "night-1")
    output_root = tmp_path / "home" / "output"
    (output_root / "run-1").mkdir(parents=True)
    (output_root / "run-1" / "transcript.txt").write_text("first")
    folder = tmp_path / "backups"
    for name, setting in (("BACKUP_DIR", str(folder)), ("VOLUMES", " ".join(volumes)),
                          ("OUTPUT_ROOT", str(output_root)), ("BACKUP_CONSISTENCY", "live")):
        monkeypatch.setenv(name, setting)
    return volumes, output_root, folder


def state_of(volumes, output_root):
    return [testkit.volume_state(volume) for volume in volumes] + \
        [testkit.tree_state(output_root) if os.path.exists(str(output_root)) else None]


def _night(stack, capsys):
    """Run backup_all; give the state it saved and the time of its archives."""
    volumes, output_root, folder = stack
    testkit.next_second()
    assert cli.backup_all_main(["--quiet"]) == 0
    capsys.readouterr()
    newest = max(parse_archive_name(os.path.basename(path))[1]
                 for path in testkit.archives_in(folder))
    return newest


def test_the_stack_comes_back_to_one_recovery_point_while_its_apps_run(stack, apps, capsys):
    volumes, output_root, folder = stack
    first_app = apps(volumes[0])
    both_app = apps(volumes[1], volumes[0])
    night_1 = _night(stack, capsys)
    saved_1 = state_of(volumes, output_root)
    for volume in volumes:
        _change(volume, "night-2")
    (output_root / "run-2").mkdir()
    (output_root / "run-2" / "transcript.txt").write_text("second")
    night_2 = _night(stack, capsys)
    saved_2 = state_of(volumes, output_root)
    for volume in volumes:
        _change(volume, "today")
    shutil.rmtree(str(output_root / "run-1"))
    today = state_of(volumes, output_root)
    started = {name: testkit.started_at(name) for name in (first_app, both_app)}

    # A dry run shows the plan and checks every archive, and changes nothing.
    assert cli.restore_all_main(["--dry-run"]) == 0
    shown = capsys.readouterr().out
    assert "Recovery point %s" % night_2 in shown
    for volume in volumes:
        assert re.search(r"^  volume %s: %s__%s\.tar\.gz \(0h 0m old, [\d.]+ KiB\)$"
                         % (volume, volume, night_2), shown, re.M)
    assert len(re.findall(r"^Checked: .*, sha256 ok\)$", shown, re.M)) == 3
    assert "Would stop, and start again: %s: " % apps.project in shown
    assert "nothing was changed" in shown
    assert state_of(volumes, output_root) == today
    assert {name: testkit.started_at(name) for name in started} == started

    # --at takes the older night, all sources alike, while the apps run.
    assert cli.restore_all_main(["--at", night_1, "--force", "--quiet"]) == 0
    shown = capsys.readouterr()
    assert "Recovery point %s" % night_1 in shown.out
    assert re.search(r"^Applications were down for [\d.]+ s \(%s: %s, %s\)$"
                     % (apps.project, first_app, both_app), shown.out, re.M)
    for name in started:
        assert testkit.container_running(name) and testkit.started_at(name) != started[name]
    restored = state_of(volumes, output_root)
    # Each app logged its start again into the restored volume: that line is all that differs.
    for index in (0, 1):
        assert restored[index].pop(b"starts")[5] != saved_1[index].pop(b"starts")[5]
    assert restored == saved_1
    # The safety copies are the newest recovery point now: what the stack held before.
    undo = re.search(r"^What the stack held before is itself a recovery point now; to go back "
                     r"to it: restore_all.py --at (\d{8}T\d{6}Z) --force$", shown.out, re.M)
    assert undo and undo.group(1) > night_2
    today[0].pop(b"starts"), today[1].pop(b"starts")
    assert cli.restore_all_main(["--force", "--quiet"]) == 0
    assert "Recovery point %s" % undo.group(1) in capsys.readouterr().out
    restored = state_of(volumes, output_root)
    restored[0].pop(b"starts"), restored[1].pop(b"starts")
    assert restored == today
    assert cli.restore_all_main(["--at", night_2, "--force", "--quiet"]) == 0
    restored = state_of(volumes, output_root)
    for index in (0, 1):
        restored[index].pop(b"starts"), saved_2[index].pop(b"starts")
    assert restored == saved_2


def test_a_set_with_a_missing_source_or_a_damaged_archive_is_refused(stack, make_volume, capsys,
                                                                      monkeypatch):
    volumes, output_root, folder = stack
    night_1 = _night(stack, capsys)
    for volume in volumes:
        _change(volume, "night-2")
    night_2 = _night(stack, capsys)
    for volume in volumes:
        _change(volume, "today")
    today = state_of(volumes, output_root)
    listing = sorted(os.listdir(str(folder)))

    # A flipped byte in the newest archive of the second volume: its last member's CRC-32.
    damaged = os.path.join(str(folder), "%s__%s.tar.gz" % (volumes[1], night_2))
    with open(damaged, "r+b") as file:
        file.seek(os.path.getsize(damaged) - 8)
        byte = file.read(1)
        file.seek(-1, 1)
        file.write(bytes([byte[0] ^ 0xFF]))
    assert cli.restore_all_main(["--force"]) == 1
    error = capsys.readouterr().err
    assert "restore_all.py: error: the archive %s failed its check: " % damaged in error
    assert "gzip CRC-32 mismatch (the data is corrupt) [gzip-crc]" in error  # the rule
    assert "nothing was changed; the next older complete set is %s: restore_all.py --at %s " \
        "--force" % (night_1, night_1) in error
    assert state_of(volumes, output_root) == today
    assert sorted(os.listdir(str(folder))) == listing

    # A source with no archive at all.
    missing = make_volume()
    monkeypatch.setenv("VOLUMES", " ".join(volumes + [missing]))
    assert cli.restore_all_main(["--force"]) == 1
    error = capsys.readouterr().err
    assert "restore_all.py: error: no archive of %s in %s: there is no complete set" \
        % (missing, folder) in error
    assert state_of(volumes, output_root) == today
    assert testkit.volume_state(missing) == {b".": testkit.volume_state(missing)[b"."]}


def test_sources_backed_up_days_apart_are_no_recovery_point(stack, capsys, monkeypatch):
    volumes, output_root, folder = stack
    _night(stack, capsys)
    # The first volume's archive, renamed two days back: as if its later backups had failed.
    [old] = [path for path in testkit.archives_in(folder)
             if os.path.basename(path).startswith(volumes[0])]
    when = parse_archive_name(os.path.basename(old))[1]
    older = os.path.join(str(folder), "%s__%s.tar.gz" % (
        volumes[0], utc_timestamp(parse_timestamp(when) - 2 * 86400)))
    os.rename(old, older)
    os.unlink(old + ".sha256")
    today = state_of(volumes, output_root)
    assert cli.restore_all_main(["--force"]) == 1
    error = capsys.readouterr().err
    assert "are never all within RESTORE_MAX_SPREAD (6h) of each other" in error
    assert state_of(volumes, output_root) == today
    monkeypatch.setenv("RESTORE_MAX_SPREAD", "3d")
    assert cli.restore_all_main(["--dry-run"]) == 0
    assert "(the set spans 2d)" in capsys.readouterr().out


def test_a_later_volume_that_fails_rolls_back_the_earlier_ones(stack, apps, make_volume,
                                                               tmp_path, monkeypatch, capsys):
    volumes, output_root, folder = stack
    small = make_volume(create=False)
    testkit.docker("volume", "create", small)
    _fill(small, tmp_path, "night-1", size=3 << 20)
    monkeypatch.setenv("VOLUMES", " ".join(volumes + [small]))
    app = apps(volumes[0])
    _night(stack, capsys)
    # The last volume is now a tmpfs of 1 MiB: its archive's 3 MiB cannot go in.
    testkit.docker("volume", "rm", small)
    testkit.docker("volume", "create", "--driver", "local", "--opt", "type=tmpfs", "--opt",
                   "device=tmpfs", "--opt", "o=size=1m", small)
    _fill(small, tmp_path, "today", size=1000)
    for volume in volumes:
        _change(volume, "today")
    (output_root / "run-2").mkdir()
    today = state_of(volumes + [small], output_root)
    started = testkit.started_at(app)
    assert cli.restore_all_main(["--force"]) == 1
    captured = capsys.readouterr()
    assert "restore_all.py: error: restoring volume %s failed: " % small in captured.err
    for volume in volumes:
        assert "volume %s was rolled back to its previous contents from the safety backup" \
            % volume in captured.err
    after = state_of(volumes + [small], output_root)
    # The app's start after the rollback is logged in its volume: that line is all that differs.
    assert after[0].pop(b"starts")[5] != today[0].pop(b"starts")[5]
    assert after == today
    assert testkit.container_running(app) and testkit.started_at(app) != started


def test_a_new_host_restores_from_fetched_age_copies(stack, tmp_path, monkeypatch, capsys):
    volumes, output_root, folder = stack
    identity = tmp_path / "key.txt"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    recipient = re.search(r"public key: (age1\w+)", identity.read_text()).group(1)
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    monkeypatch.setenv("OFFSITE_ENCRYPT", "age:" + recipient)
    monkeypatch.setenv("OFFSITE_COMMAND", 'cp "$1" %s/' % fetched)
    _night(stack, capsys)
    saved = state_of(volumes, output_root)
    # The host is lost: its volumes, OUTPUT_ROOT and the backup folder are gone.
    for volume in volumes:
        testkit.docker("volume", "rm", volume)
    shutil.rmtree(str(output_root))
    shutil.rmtree(str(folder))
    monkeypatch.delenv("OFFSITE_ENCRYPT")
    monkeypatch.delenv("OFFSITE_COMMAND")
    monkeypatch.setenv("BACKUP_DIR", str(tmp_path / "new-host-backups"))
    monkeypatch.setenv("OFFSITE_IDENTITY", str(identity))
    result = subprocess.run([sys.executable, os.path.join(SCRIPTS, "restore_all.py"), "--from",
                             str(fetched), "--force", "--quiet"], capture_output=True,
                            env=dict(os.environ))
    assert result.returncode == 0, result.stderr.decode()
    assert state_of(volumes, output_root) == saved
    out = result.stdout.decode()
    assert len(re.findall(r"^Checked: .*\.tar\.gz\.age \(.*, sha256 ok\)$", out, re.M)) == 3
    assert "Applications were down" not in out  # nothing ran, so nothing was stopped
    # The decrypted archives lived in a private folder that is gone again.
    work = str(tmp_path / "new-host-backups")
    assert not [name for name in os.listdir(work) if name.startswith(".ai_stack_backup-")]


def test_the_whole_drill_restores_a_recovery_point_and_records_it(stack, tmp_path, monkeypatch,
                                                                 capsys):
    volumes, output_root, folder = stack
    night = _night(stack, capsys)
    metrics_file = tmp_path / "metrics" / "ai_stack_backup.prom"
    metrics_file.parent.mkdir()
    monkeypatch.setenv("METRICS_FILE", str(metrics_file))
    before = state_of(volumes, output_root)
    assert cli.drill_restore_main(["--all"]) == 0
    out = capsys.readouterr().out
    for volume in volumes:
        assert re.search(r"^DRILL ok %s %s/%s__%s\.tar\.gz \d+ [\d.]+$"
                         % (volume, folder, volume, night), out, re.M)
    assert re.search(r"^DRILL ok %s %s/\S+__%s\.tar\.gz 3 [\d.]+$"
                     % (output_root, folder, night), out, re.M)
    assert re.search(r"^DRILL ok stack %s 3 sources [\d.]+$" % night, out, re.M)
    assert state_of(volumes, output_root) == before  # the real sources are never touched
    samples = metrics.parse(metrics_file.read_text())
    assert samples[metrics.PREFIX + "stack_drill_success"] == {(): 1}
    assert samples[metrics.PREFIX + "stack_drill_duration_seconds"][()] > 0
    assert samples[metrics.PREFIX + "recovery_point_age_seconds"][()] >= 0
    assert set(label[0][1] for label in samples[metrics.PREFIX + "drill_success"]) == \
        set(volumes) | {str(output_root)}
    # Without a complete set there is nothing to drill: that fails the drill, and says so.
    [path_archive] = [path for path in testkit.archives_in(folder)
                      if not any(os.path.basename(path).startswith(v) for v in volumes)]
    os.unlink(path_archive)
    assert cli.drill_restore_main(["--all"]) == 1
    assert "DRILL FAILED stack: no archive of" in capsys.readouterr().out
    samples = metrics.parse(metrics_file.read_text())
    assert samples[metrics.PREFIX + "stack_drill_success"] == {(): 0}


def _paused_at(process, line_start):
    """Read the run's status lines until one starts with ``line_start``; stop the process
    there (SIGSTOP: it holds its locks, and goes on where it was on SIGCONT). Gives the
    lines read."""
    lines = []
    for raw in process.stdout:
        lines.append(raw.decode())
        if lines[-1].startswith(line_start):
            process.send_signal(signal.SIGSTOP)
            return lines
    raise AssertionError("the run ended before %r: %s %s"
                         % (line_start, lines, process.stderr.read().decode()))


def _restore_all(*arguments):
    return subprocess.Popen([sys.executable, os.path.join(SCRIPTS, "restore_all.py")]
                            + list(arguments), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ))


def test_while_it_runs_backups_and_restores_of_its_volumes_get_75(stack, capsys):
    volumes, output_root, folder = stack
    _night(stack, capsys)
    archive = testkit.archives_in(folder)[0]
    process = _restore_all("--force")
    try:
        _paused_at(process, "Restoring volume: %s" % volumes[1])
        assert cli.backup_all_main(["--quiet"]) == 75
        assert "another backup_all run (PID %d) holds the lock" % process.pid \
            in capsys.readouterr().err
        for volume in volumes:
            assert cli.restore_docker_volume_main([volume, archive, "--force"]) == 75
            assert "another backup or restore of volume %s (PID %d) holds the lock" \
                % (volume, process.pid) in capsys.readouterr().err
            assert cli.backup_docker_volume_main([volume, str(folder)]) == 75
            capsys.readouterr()
    finally:
        process.send_signal(signal.SIGCONT)
        out, err = process.communicate(timeout=testkit.HANG_CEILING)
    assert process.returncode == 0, err.decode()
    assert b"Restored the recovery point" in out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_mid_run_rolls_back_what_was_restored(signum, stack, apps, capsys):
    volumes, output_root, folder = stack
    app = apps(volumes[0])
    _night(stack, capsys)
    for volume in volumes:
        _change(volume, "today")
    today = state_of(volumes, output_root)
    started = testkit.started_at(app)
    process = _restore_all("--force")
    try:
        _paused_at(process, "Restoring volume: %s" % volumes[1])
        process.send_signal(signum)
    finally:
        process.send_signal(signal.SIGCONT)
        out, err = process.communicate(timeout=testkit.HANG_CEILING)
    assert process.returncode == 128 + signum, err.decode()
    err = err.decode()
    assert "volume %s was rolled back to its previous contents from the safety backup" \
        % volumes[0] in err
    assert "restore_all.py: stopped by %s after cleaning up" % signal.Signals(signum).name in err
    after = state_of(volumes, output_root)
    assert after[0].pop(b"starts")[5] != today[0].pop(b"starts")[5]  # the app's start again
    assert after == today
    assert testkit.container_running(app) and testkit.started_at(app) != started


def test_a_container_started_with_rm_is_refused_before_anything_stops(stack, capsys):
    volumes, output_root, folder = stack
    _night(stack, capsys)
    _change(volumes[1], "today")
    today = state_of(volumes, output_root)
    name = "aisb-app-%s" % os.urandom(4).hex()
    testkit.docker("run", "-d", "--rm", "--init", "--name", name, "--network", "none", "-v",
                   volumes[1] + ":/data", testkit.HELPER_IMAGE, "sleep", "100000")
    try:
        started = testkit.started_at(name)
        assert cli.restore_all_main(["--force"]) == 1
        error = capsys.readouterr().err
        assert "a volume of the stack is used by container(s) %s, started with --rm" % name \
            in error
        assert testkit.container_running(name) and testkit.started_at(name) == started
        assert state_of(volumes, output_root) == today
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def test_an_output_root_that_backup_all_skips_is_left_out(stack, tmp_path, monkeypatch, capsys):
    volumes, output_root, folder = stack
    absent = tmp_path / "not-on-this-host"
    monkeypatch.setenv("OUTPUT_ROOT", str(absent))  # backup_all says WARN and skips it
    night = _night(stack, capsys)
    assert cli.drill_restore_main(["--all"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"^DRILL ok stack %s 2 sources [\d.]+$" % night, captured.out, re.M)
    assert "OUTPUT_ROOT %s does not exist and has no archive in %s: left out" \
        % (absent, folder) in captured.err
    assert cli.restore_all_main(["--dry-run"]) == 0
    assert "Dry run: every archive checked out" in capsys.readouterr().out
    # Once it has archives, it is part of every recovery point, present or not (a new host).
    monkeypatch.setenv("OUTPUT_ROOT", str(output_root))
    _night(stack, capsys)
    shutil.rmtree(str(output_root))
    assert cli.restore_all_main(["--force", "--quiet"]) == 0
    assert (output_root / "run-1" / "transcript.txt").read_text() == "first"


def test_a_running_sqlite_app_comes_back_to_its_backed_up_database(stack, make_volume, tmp_path,
                                                                    monkeypatch, capsys):
    volumes, output_root, folder = stack
    testkit.build_app_image()
    database_volume = make_volume()
    writer = "aisb-writer-%s" % os.urandom(4).hex()
    try:
        testkit.start_sqlite_writer(database_volume, writer, "wal")
        monkeypatch.setenv("VOLUMES", " ".join(volumes + [database_volume]))
        monkeypatch.setenv("BACKUP_CONSISTENCY", "%s=sqlite live" % database_volume)
        _night(stack, capsys)
        [archive] = [path for path in testkit.archives_in(folder)
                     if os.path.basename(path).startswith(database_volume)]
        extracted = tmp_path / "extracted"
        extracted.mkdir()
        with tarfile.open(archive) as opened:
            opened.extractall(str(extracted), members=[m for m in opened
                                                       if m.name.startswith("./app.db")])
        problem, archived = testkit.database_state(str(extracted))
        assert problem is None
        # The app goes on writing: as many commits again as it made from its start to the
        # backup, so that the few it makes between its restart and the look below (a small
        # part of that time) cannot reach the count it had before the restore.
        testkit.wait_for(lambda: testkit.commits(database_volume) > 2 * archived + 200,
                         "the writer to go on")
        before = testkit.commits(database_volume)
        assert cli.restore_all_main(["--force", "--quiet"]) == 0
        assert "Applications were down for" in capsys.readouterr().out
        assert testkit.container_running(writer)
        problem, now = testkit.database_state(testkit.mountpoint(database_volume))
        assert problem is None and archived <= now < before
    finally:
        subprocess.run(["docker", "rm", "-f", writer], capture_output=True)
