"""Live databases (real engine): SQLite snapshotted through SQLite, engines stopped, live copies.

An app image with python3 (Debian minbase, see dev/build-rootfs.sh) runs a
writer that moves money between accounts in an SQLite database, forever:
every committed state sums to zero. Backups are taken while it writes.
"""

import os
import re
import sqlite3
import subprocess
import sys
import tarfile
import time

import pytest

import testkit
from ai_stack_backup import cli
from conftest import REPOSITORY

pytestmark = pytest.mark.engine

RUNS = 3
LIVE_ATTEMPTS = 12


@pytest.fixture(scope="session")
def app_image(engine):
    return testkit.build_app_image()


@pytest.fixture
def writers(app_image, make_volume):
    """Two volumes, each with a running writer: rollback journal (DELETE) and WAL."""
    started = {}
    for mode in ("delete", "wal"):
        volume = make_volume()
        name = "aisb-writer-%s-%s" % (mode, volume[len("aisb-test-"):])
        testkit.start_sqlite_writer(volume, name, mode)
        started[mode] = (volume, name)
    yield started
    for _, name in started.values():
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def unit_environment():
    """The shipped unit's Environment= settings."""
    settings = {}
    with open(os.path.join(REPOSITORY, "systemd", "ai_stack_backup.service")) as unit:
        for line in unit:
            if line.startswith("Environment="):
                key, _, value = line[len("Environment="):].strip().partition("=")
                settings[key] = value
    return settings


def extracted(archive, folder):
    """Extract an archive with tarfile (as a third party would); give the member names."""
    with tarfile.open(archive) as opened:
        names = opened.getnames()
        opened.extractall(folder, filter="tar") if hasattr(tarfile, "data_filter") \
            else opened.extractall(folder)
    return names


def archives_of(folder, volume):
    return sorted(os.path.join(str(folder), name) for name in os.listdir(str(folder))
                  if name.startswith(volume + "__") and name.endswith(".tar.gz"))


def test_auto_gives_committed_states_every_night(writers, helper_env, tmp_path, monkeypatch,
                                                capsys):
    settings = unit_environment()
    assert "BACKUP_CONSISTENCY" not in settings or settings["BACKUP_CONSISTENCY"] == "auto"
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    folder = tmp_path / "backups"
    monkeypatch.setenv("BACKUP_DIR", str(folder))
    monkeypatch.setenv("OUTPUT_ROOT", "")
    monkeypatch.setenv("VOLUMES", " ".join(volume for volume, _ in writers.values()))
    before = {mode: testkit.commits(volume) for mode, (volume, _) in writers.items()}
    time.sleep(3)  # a few seconds of undisturbed writing, to compare the pauses against
    idle = {mode: testkit.commit_times_ms(name) for mode, (_, name) in writers.items()}
    for _ in range(RUNS):
        code = cli.backup_all_main(["--quiet"])
        captured = capsys.readouterr()
        assert code == 0, [line for line in (captured.out + captured.err).splitlines()
                           if "FAILED" in line or "ERROR" in line]
        out = captured.out
        for volume, _ in writers.values():
            line = re.search(r"ok +volume %s: .*, consistency sqlite \(auto\): 1 database "
                             r"snapshotted, longest \d+\.\d\d s" % volume, out)
            assert line, out
            sys.stderr.write("\nsqlite capture: %s\n" % line.group(0))
            assert "1 SQLite database ok" in out
    for mode, (volume, name) in writers.items():
        archives = archives_of(folder, volume)
        assert len(archives) == RUNS
        seen = []
        for index, archive in enumerate(archives):
            into = tmp_path / ("%s-%d" % (mode, index))
            names = extracted(archive, str(into))
            # Looks like a cleanly stopped volume: the database alone, under its own name.
            assert "./app.db" in names
            assert not [n for n in names if n.endswith(("-journal", "-wal", "-shm"))], names
            problem, commits = testkit.database_state(str(into))
            assert problem is None, (mode, archive, problem)
            seen.append(commits)
        assert seen == sorted(seen) and seen[0] >= before[mode]
        assert testkit.container_running(name)
    after = {mode: testkit.commits(volume) for mode, (volume, _) in writers.items()}
    for mode in writers:  # still writing
        assert after[mode] > before[mode]
    for mode, (_, name) in writers.items():
        during = testkit.commit_times_ms(name)[len(idle[mode]):]
        sys.stderr.write("\nsqlite capture, %s: longest commit %d ms idle, %d ms during the "
                         "backups\n" % (mode, max(idle[mode] or [0]), max(during or [0])))


def test_live_copies_are_torn(writers, helper_env, tmp_path, capsys):
    """The same writers copied live: the test that shows why the default is not live."""
    torn = {mode: 0 for mode in writers}
    for attempt in range(LIVE_ATTEMPTS):
        for mode, (volume, _) in writers.items():
            folder = tmp_path / ("%s-%d" % (mode, attempt))
            assert cli.backup_docker_volume_main([volume, str(folder), "--quiet"]) == 0
            into = tmp_path / ("x-%s-%d" % (mode, attempt))
            extracted(archives_of(folder, volume)[0], str(into))
            problem, _ = testkit.database_state(str(into))
            torn[mode] += problem is not None
        if torn["delete"] and attempt >= 2:
            break
    sys.stderr.write("\nlive copies torn after %d attempts: %s\n" % (attempt + 1, torn))
    assert torn["delete"] > 0


def test_qdrant_storage_is_stopped_for_the_copy(helper_env, make_volume, tmp_path, monkeypatch,
                                                capsys):
    volume = make_volume()
    for folder in ("collections/docs/0/wal", "collections/docs/0/segments", "aliases"):
        os.makedirs(os.path.join(testkit.mountpoint(volume), folder))
    with open(os.path.join(testkit.mountpoint(volume), "raft_state.json"), "w") as file:
        file.write("{}")
    app = testkit.start_app_container(volume, "aisb-qdrant-%s" % volume[len("aisb-test-"):])
    testkit.wait_for(lambda: testkit.starts(volume) == 1, "the app to start")
    monkeypatch.setenv("BACKUP_DIR", str(tmp_path / "backups"))
    monkeypatch.setenv("OUTPUT_ROOT", "")
    monkeypatch.setenv("VOLUMES", volume)
    assert cli.backup_all_main(["--quiet"]) == 0
    captured = capsys.readouterr()
    assert "consistency auto chose stop (found Qdrant storage: raft_state.json" in captured.err
    line = re.search(r"ok +volume %s: .*, consistency stop \(auto\): stopped %s for "
                     r"\d+\.\d s" % (volume, app), captured.out)
    assert line, captured.out
    sys.stderr.write("\nstop capture: %s\n" % line.group(0))
    testkit.wait_for(lambda: testkit.starts(volume) >= 2, "the app to start again")
    assert testkit.starts(volume) == 2 and testkit.container_running(app)


def test_a_container_started_with_rm_is_never_stopped(helper_env, make_volume, tmp_path, capsys):
    volume = make_volume()
    name = "aisb-rm-%s" % volume[len("aisb-test-"):]
    testkit.docker("run", "-d", "--rm", "--name", name, "--network", "none",
                   "-v", volume + ":/data", testkit.HELPER_IMAGE, "sleep", "100000")
    folder = tmp_path / "backups"
    assert cli.backup_docker_volume_main([volume, str(folder), "--consistency", "stop"]) == 1
    error = capsys.readouterr().err
    assert "started with --rm (AutoRemove)" in error and name in error
    assert testkit.container_running(name)
    assert not os.path.exists(str(folder)) or os.listdir(str(folder)) == []


def test_without_sqlite_in_the_image_sqlite_falls_back_to_stop(helper_env, make_volume,
                                                                tmp_path, capsys):
    volume = make_volume()
    database = os.path.join(testkit.mountpoint(volume), "notes.db")
    connection = sqlite3.connect(database)
    connection.execute("CREATE TABLE note (text TEXT)")
    connection.execute("INSERT INTO note VALUES ('kept')")
    connection.commit()
    connection.close()
    # The busybox image has no python3: no way to run SQLite in it.
    app = testkit.start_app_container(volume, "aisb-nosqlite-%s" % volume[len("aisb-test-"):])
    testkit.wait_for(lambda: testkit.starts(volume) == 1, "the app to start")
    folder = tmp_path / "backups"
    assert cli.backup_docker_volume_main([volume, str(folder), "--consistency", "sqlite"]) == 0
    error = capsys.readouterr().err
    assert "has no usable SQLite" in error and "stopping its containers for the copy instead" \
        in error
    testkit.wait_for(lambda: testkit.starts(volume) >= 2, "the app to start again")
    assert testkit.starts(volume) == 2 and testkit.container_running(app)
    into = tmp_path / "x"
    extracted(archives_of(folder, volume)[0], str(into))
    check = sqlite3.connect(str(into / "notes.db"))
    assert check.execute("SELECT text FROM note").fetchall() == [("kept",)]
    check.close()


def test_a_file_that_vanishes_mid_copy_is_a_warning(engine, make_volume, tmp_path, monkeypatch,
                                                    capsys):
    volume = make_volume()
    testkit.fill_volume(volume, str(tmp_path))
    # busybox tar's own words when a listed file is gone before it is read; exit 1.
    image = testkit.build_variant_image(
        "vanishing", b'busybox tar "$@"; echo "tar: ./webui.db-journal: No such file or '
                     b'directory" >&2; return 1')
    monkeypatch.setenv("BACKUP_HELPER_IMAGE", image)
    assert cli.backup_docker_volume_main([volume, str(tmp_path / "b")]) == 0
    assert "WARNING: backing up volume %s: ./webui.db-journal vanished while it was backed " \
        "up; skipped" % volume in capsys.readouterr().err
    # Any other tar error still fails the backup.
    monkeypatch.setenv("BACKUP_HELPER_IMAGE", testkit.build_variant_image(
        "vanishing-and-denied", b'busybox tar "$@"; echo "tar: ./gone: No such file or '
                                b'directory" >&2; echo "tar: ./x: Permission denied" >&2; '
                                b'return 1'))
    assert cli.backup_docker_volume_main([volume, str(tmp_path / "c")]) == 1
    assert "Permission denied" in capsys.readouterr().err
    assert os.listdir(str(tmp_path / "c")) == []
