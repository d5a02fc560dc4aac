"""Skip-if-unchanged: an unchanged volume's archive is a hard link; any change is a new one."""

import errno
import glob
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys

import pytest

import testkit
from ai_stack_backup import blocked
from ai_stack_backup.cli import backup_all_main, backup_docker_volume_main, list_backups_main, \
    restore_docker_volume_main, verify_backup_main
from ai_stack_backup.names import parse_archive_name
from conftest import SCRIPTS

pytestmark = pytest.mark.engine

SETUP = """cd /v && echo hello > a && mkdir d && echo inner > d/b && ln -s a link
chown 1000:1000 d/b && chmod 640 d/b
touch -h -d @1000000 a d/b link d ."""


def in_volume(image, volume, script):
    testkit.docker("run", "--rm", "--network", "none", "-v", volume + ":/v", image,
                   "sh", "-euc", script)


@pytest.fixture
def quiet_volume(helper_env, make_volume):
    volume = make_volume()
    in_volume(helper_env, volume, SETUP)
    testkit.next_second()  # nothing may change in the second the first listing begins
    return volume


def backup(volume, folder, *extra):
    assert backup_docker_volume_main([volume, str(folder), "--skip-unchanged", "--quiet"]
                                     + list(extra)) == 0
    return testkit.archives_in(folder)[-1]


def test_an_unchanged_volume_is_linked_and_reads_as_an_ordinary_archive(
        helper_env, quiet_volume, make_volume, tmp_path, capsys):
    folder = tmp_path / "backups"
    first = backup(quiet_volume, folder)
    testkit.next_second()
    second = backup(quiet_volume, folder)
    assert second != first
    assert os.stat(first).st_ino == os.stat(second).st_ino and os.stat(second).st_nlink == 2
    assert "is unchanged since %s: published as a hard link to it" % first \
        in capsys.readouterr().err
    for path in (first, second):
        with open(path + ".sha256") as file:
            assert file.read().split()[1] == os.path.basename(path)
        assert stat.S_IMODE(os.stat(path + ".listing").st_mode) == 0o600
    subprocess.run(["sha256sum", "-c", "--quiet", os.path.basename(first) + ".sha256",
                    os.path.basename(second) + ".sha256"], cwd=str(folder), check=True)
    assert verify_backup_main([second]) == 0
    assert "sha256 ok" in capsys.readouterr().out
    assert list_backups_main([str(folder)]) == 0
    listed = capsys.readouterr().out
    assert "(newest)  (same file as %s: stored once)" % parse_archive_name(
        os.path.basename(first))[1] in listed
    restored = make_volume()
    assert restore_docker_volume_main([restored, second, "--force", "--quiet"]) == 0
    assert testkit.volume_state(restored) == testkit.volume_state(quiet_volume)


def test_backup_all_links_by_default_and_retention_keeps_the_other_names(
        helper_env, quiet_volume, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "backups"
    for name, setting in (("BACKUP_DIR", str(folder)), ("VOLUMES", quiet_volume),
                          ("OUTPUT_ROOT", ""), ("RETENTION_DAYS", "0"),
                          ("RETENTION_MIN_KEEP", "2")):
        monkeypatch.setenv(name, setting)
    assert backup_all_main(["--quiet"]) == 0
    [first] = testkit.archives_in(folder)
    testkit.next_second()
    assert backup_all_main(["--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.match(r"ok +volume %s: \S+, .*, unchanged, linked to %s$"
                    % (quiet_volume, os.path.basename(first)), lines[-1]), lines[-1]
    testkit.next_second()
    assert backup_all_main(["--quiet"]) == 0  # three names, one file; retention keeps two
    archives = testkit.archives_in(folder)
    assert len(archives) == 2 and first not in archives
    assert not os.path.exists(first + ".sha256") and not os.path.exists(first + ".listing")
    for path in archives:
        assert verify_backup_main([path]) == 0
        assert os.stat(path).st_nlink == 2  # the deleted name took no data with it
    monkeypatch.setenv("BACKUP_SKIP_UNCHANGED", "0")
    testkit.next_second()
    assert backup_all_main(["--quiet"]) == 0
    assert os.stat(testkit.archives_in(folder)[-1]).st_nlink == 1


CHANGES = {
    # The same size and mtime: only the ctime (which nobody can set back) tells.
    "content rewritten": "printf 'HELLO\\n' > /v/a && touch -d @1000000 /v/a",
    "chmod": "chmod 600 /v/a",
    "chown": "chown 1001 /v/d/b",
    "new empty file": "touch /v/d/new",
    "removed file": "rm /v/d/b",
    "renamed file": "mv /v/d/b /v/d/c",
    "symlink target": "ln -sfn d/b /v/link && touch -h -d @1000000 /v/link",
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_change_makes_a_new_archive(helper_env, quiet_volume, tmp_path, change):
    folder = tmp_path / "backups"
    first = backup(quiet_volume, folder)
    in_volume(helper_env, quiet_volume, CHANGES[change])
    testkit.next_second()
    second = backup(quiet_volume, folder)
    assert os.stat(second).st_ino != os.stat(first).st_ino
    assert os.stat(first).st_nlink == 1 and os.stat(second).st_nlink == 1
    assert testkit.archive_manifest(second) != testkit.archive_manifest(first)


def test_a_damaged_newest_archive_is_never_linked_to(helper_env, quiet_volume, tmp_path,
                                                     capsys):
    folder = tmp_path / "backups"
    first = backup(quiet_volume, folder)
    before = os.stat(first)
    with open(first, "r+b") as file:  # a flipped byte, size and mtime kept: bit rot
        file.seek(before.st_size // 2)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0xFF]))
    os.utime(first, ns=(before.st_atime_ns, before.st_mtime_ns))
    testkit.next_second()
    capsys.readouterr()
    second = backup(quiet_volume, folder)
    assert os.stat(second).st_ino != before.st_ino
    assert "%s is not the file it was when written" % first in capsys.readouterr().err
    assert verify_backup_main([second]) == 0


@pytest.mark.parametrize("change", ["another inode", "another size", "another .sha256"])
def test_an_archive_that_is_no_longer_its_record_is_never_linked_to(
        helper_env, quiet_volume, tmp_path, capsys, change):
    folder = tmp_path / "backups"
    first = backup(quiet_volume, folder)
    expected = testkit.archive_manifest(first)
    before = os.stat(first)
    if change == "another inode":  # the same bytes, size and mtime, copied over it
        shutil.copy2(first, first + ".copy")
        os.rename(first + ".copy", first)
    elif change == "another size":
        with open(first, "ab") as file:
            file.write(b"\0")
        os.utime(first, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:
        os.chmod(first + ".sha256", 0o600)
        with open(first + ".sha256", "w") as file:
            file.write("%s  %s\n" % ("0" * 64, os.path.basename(first)))
    testkit.next_second()
    capsys.readouterr()
    second = backup(quiet_volume, folder)
    assert os.stat(second).st_ino not in (before.st_ino, os.stat(first).st_ino)
    assert "%s is not the file it was when written" % first in capsys.readouterr().err
    assert testkit.archive_manifest(second) == expected
    assert verify_backup_main([second]) == 0


def test_a_corrupt_or_foreign_listing_record_means_changed(helper_env, quiet_volume, tmp_path):
    folder = tmp_path / "backups"
    first = backup(quiet_volume, folder)
    with open(first + ".listing") as file:
        saved = json.load(file)
    for text in ("{not json", json.dumps(dict(saved, format="ai_stack_backup listing 0"))):
        os.chmod(first + ".listing", 0o600)
        with open(first + ".listing", "w") as file:
            file.write(text)
        testkit.next_second()
        newer = backup(quiet_volume, folder)
        assert os.stat(newer).st_ino != os.stat(first).st_ino
        for path in testkit.archives_in(folder)[1:]:  # start again from the first only
            for suffix in ("", ".sha256", ".listing"):
                os.unlink(path + suffix)


def test_where_no_hard_link_can_be_made_a_full_backup_is_made(helper_env, quiet_volume,
                                                              tmp_path, monkeypatch, capsys):
    folder = tmp_path / "backups"
    first = backup(quiet_volume, folder)
    real_link = os.link

    def link(source, target, *args, **kwargs):
        if source == first:  # the archive is at its link limit
            raise OSError(errno.EMLINK, os.strerror(errno.EMLINK))
        return real_link(source, target, *args, **kwargs)
    monkeypatch.setattr(os, "link", link)
    testkit.next_second()
    capsys.readouterr()
    second = backup(quiet_volume, folder)
    assert os.stat(second).st_ino != os.stat(first).st_ino
    assert "cannot hard-link %s (Too many links); writing a new archive of %s from it" \
        % (first, quiet_volume) in capsys.readouterr().err


def test_a_volume_written_while_it_is_backed_up_is_not_recorded(helper_env, quiet_volume,
                                                                tmp_path, capsys):
    # A writer touches a file all the time: the listing sees a ctime as new as the second
    # the helper began, where a second write in that second would not show.
    writer = "aisb-test-writer-%s" % os.urandom(4).hex()
    testkit.docker("run", "-d", "--name", writer, "--network", "none", "-v",
                   quiet_volume + ":/v", helper_env, "sh", "-c",
                   "while true; do echo x > /v/busy; done")
    try:
        folder = tmp_path / "backups"
        first = backup(quiet_volume, folder)
        with open(first + ".listing") as file:
            assert json.load(file)["listing"] is None  # recorded as never the same
        assert "entries changed while the volume was listed; the next backup will not be " \
            "skipped" in capsys.readouterr().err
    finally:
        subprocess.run(["docker", "rm", "-f", writer], capture_output=True)
    testkit.next_second()
    backup(quiet_volume, folder)
    # Not skipped by its listing: the helper read the volume again. (Where what it read
    # came out byte for byte the first archive, that is a link to it: by content.)
    error = capsys.readouterr().err
    assert "is unchanged since" not in error and "copied from %s" % first in error, error


def test_a_listing_is_racy_when_a_ctime_is_as_new_as_its_start(tmp_path):
    def listing(text, errors=b""):
        path = tmp_path / "listing"
        path.write_bytes(text)
        return blocked.read_listing(b"1000", str(path), errors)
    old = b"999 5 1 6 81a4 0 0 999 ./a\n"
    future_mtime = b"999 7 1 6 81a4 0 0 4000000000 ./m\n"
    new = b"1000 6 1 6 81a4 0 0 1 ./b\n"
    assert not listing(old + future_mtime).racy and listing(old).problem is None
    assert listing(old + new).racy and listing(new + old).racy
    gone = b"stat: can't stat './x': No such file or directory\n" \
        b"find: ./tmp/y: No such file or directory\n"  # a busy volume
    assert listing(old, gone).problem is None and listing(old, gone).racy
    assert listing(old, b"find: ./y: Permission denied\n").problem.startswith(
        "the listing failed")
    assert listing(old, gone + b"find failed\n").problem == "the listing failed: find failed"
    # The helper's line for an entry whose name holds a line break, wherever it comes.
    for text in (b"?\n" + old, old + b"?\n" + future_mtime):
        assert listing(text).problem == "some names hold a line break"
    assert listing(old + b"?x\n").problem.startswith("the listing cannot be read")


def test_skip_unchanged_needs_a_folder(capsys):
    assert backup_docker_volume_main(["owui-data", "-", "--skip-unchanged"]) == 2
    assert "--skip-unchanged needs a backup folder" in capsys.readouterr().err


def test_a_signal_during_a_listed_backup_cleans_up(engine, quiet_volume, tmp_path):
    image = testkit.build_variant_image("hanging", testkit.HANGING_TAR)
    folder = tmp_path / "backups"
    process = subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, "backup_docker_volume.py"), quiet_volume,
         str(folder), "--skip-unchanged", "--quiet"],
        env=dict(os.environ, BACKUP_HELPER_IMAGE=image), stderr=subprocess.PIPE)
    testkit.wait_for(lambda: glob.glob(os.path.join(
        os.environ["BACKUP_DIR"], ".ai_stack_backup-transfer-*", "listing")),
        "the listing to be complete (the tar hangs)")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert b"stopped by SIGTERM after cleaning up" in err
    assert [name for name in os.listdir(str(folder))
            if not name.startswith(".ai_stack_backup-lock")] == []
    testkit.wait_for(lambda: not testkit.helper_containers(quiet_volume),
                     "the helper container to go with the backup")
