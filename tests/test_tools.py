"""Streaming between hosts and the progress line."""

import gzip
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

import testkit
from ai_stack_backup import files
from conftest import SCRIPTS


def run_on_terminal(command, env=None, timeout=300):
    """Run ``command`` with stderr on a pseudo terminal; give (exit code, what it wrote there)."""
    master, slave = pty.openpty()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=slave, env=env)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            output += data
        elif process.poll() is not None:
            break
        assert time.monotonic() < deadline, "timed out"
    os.close(master)
    return process.wait(), output


@pytest.fixture
def large_tree(tmp_path):
    source = tmp_path / "large"
    source.mkdir()
    # A progress line shows the first piece at once (then at most four times a second), so
    # the test needs data, not time.
    for index in range(3):
        (source / ("blob%d" % index)).write_bytes(os.urandom(2 * 1024 * 1024))
    return source


def test_progress_on_a_terminal_only(large_tree, tmp_path):
    script = os.path.join(SCRIPTS, "backup_path.py")
    env = dict(os.environ, BACKUP_THREADS="1")
    code, output = run_on_terminal([sys.executable, script, str(large_tree), str(tmp_path / "a")],
                                   env)
    assert code == 0
    assert b"\rBacking up %s: " % str(large_tree).encode() in output and b"/s, " in output
    code, quiet = run_on_terminal([sys.executable, script, str(large_tree), str(tmp_path / "b"),
                                   "--quiet"], env)
    assert code == 0 and b"\r" not in quiet and b"Backing up path" not in quiet
    piped = subprocess.run([sys.executable, script, str(large_tree), str(tmp_path / "c")],
                           capture_output=True, env=env, timeout=300)
    assert piped.returncode == 0 and piped.stderr == b""
    assert b"\r" not in piped.stdout and b"\x1b" not in piped.stdout
    # A restore knows the total: percentage and ETA.
    archive = testkit.only_archive(tmp_path / "a")
    code, output = run_on_terminal([sys.executable, os.path.join(SCRIPTS, "restore_path.py"),
                                    archive, str(tmp_path / "restored"), "--force"])
    assert code == 0 and b"%" in output and b"Checking archive" in output


@pytest.mark.engine
def test_volume_streams_between_hosts(helper_env, make_volume, tmp_path):
    source = make_volume()
    testkit.fill_volume(source, testkit.make_tricky_tree(tmp_path / "src").decode())
    backup = os.path.join(SCRIPTS, "backup_docker_volume.py")
    restore = os.path.join(SCRIPTS, "restore_docker_volume.py")
    streamed = subprocess.run([sys.executable, backup, source, "-"], capture_output=True,
                              timeout=300)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stderr.decode().splitlines() == ["Backing up volume: %s" % source,
                                                     "Output: -", "OK"]
    assert subprocess.run([sys.executable, backup, source, str(tmp_path / "file"), "--quiet"],
                          capture_output=True).returncode == 0
    archive = testkit.only_archive(tmp_path / "file")
    with open(archive, "rb") as file:
        assert gzip.decompress(streamed.stdout) == gzip.decompress(file.read())
    target = make_volume(create=False)
    spool = tmp_path / "spool"
    pipeline = subprocess.run(
        "%s %s %s - | %s %s %s - --force" % (sys.executable, backup, source, sys.executable,
                                              restore, target),
        shell=True, capture_output=True, timeout=300, env=dict(os.environ, BACKUP_DIR=str(spool)))
    assert pipeline.returncode == 0, pipeline.stderr
    assert pipeline.stdout.decode().splitlines()[-1] == "OK"
    assert testkit.volume_state(target) == testkit.volume_state(source)
    # The spooled copy of stdin is gone (the volumes' lock files stay).
    assert [name for name in os.listdir(str(spool)) if not name.startswith(files.LOCK_NAME)] == []
    # A damaged stream is refused as a whole and changes nothing.
    before = testkit.volume_state(target)
    damaged = bytearray(streamed.stdout)
    damaged[len(damaged) // 2] ^= 0x10
    refused = subprocess.run([sys.executable, restore, target, "-", "--force"],
                             input=bytes(damaged), capture_output=True, timeout=300,
                             env=dict(os.environ, BACKUP_DIR=str(spool)))
    assert refused.returncode == 1
    assert re.search(rb"is refused \[(gzip-crc|gzip-corrupt)\]", refused.stderr), refused.stderr
    assert testkit.volume_state(target) == before


@pytest.mark.engine
def test_a_failing_stream_never_looks_complete(engine, make_volume, tmp_path):
    volume = make_volume()
    testkit.fill_volume(volume, testkit.make_tricky_tree(tmp_path / "src").decode())
    image = testkit.build_variant_image("failing", testkit.FAILING_TAR)
    result = subprocess.run([sys.executable, os.path.join(SCRIPTS, "backup_docker_volume.py"),
                             volume, "-"], capture_output=True, timeout=300,
                            env=dict(os.environ, BACKUP_HELPER_IMAGE=image))
    assert result.returncode == 1
    with pytest.raises((EOFError, OSError)):
        gzip.decompress(result.stdout)
