"""Off-host copies with the real age: encrypted only, byte-identical, restorable; failures
keep every local archive; nothing secret in any output."""

import os
import re
import subprocess
import sys

import pytest

import testkit
from ai_stack_backup import offsite
from ai_stack_backup.cli import backup_all_main, verify_backup_main
from conftest import SCRIPTS

pytestmark = pytest.mark.engine

SECRET = "hunter2-secret"


@pytest.fixture
def age_key(tmp_path):
    identity = tmp_path / "key.txt"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    recipient = re.search(r"public key: (age1\w+)", identity.read_text()).group(1)
    secret = re.search(r"AGE-SECRET-KEY-\w+", identity.read_text()).group(0)
    return str(identity), recipient, secret


@pytest.fixture
def stack(helper_env, make_volume, tmp_path, monkeypatch):
    """A volume and an OUTPUT_ROOT with data, and backup_all configured for them."""
    volume = make_volume()
    data = tmp_path / "data"
    (data / "uploads").mkdir(parents=True)
    (data / "uploads" / "notes.txt").write_bytes(os.urandom(30000))
    testkit.fill_volume(volume, data)
    output_root = tmp_path / "output"
    output_root.mkdir()
    (output_root / "run.txt").write_text("transcript")
    folder = tmp_path / "backups"
    for name, setting in (("BACKUP_DIR", str(folder)), ("VOLUMES", volume),
                          ("OUTPUT_ROOT", str(output_root)), ("RETENTION_DAYS", "0"),
                          ("RETENTION_MIN_KEEP", "1")):
        monkeypatch.setenv(name, setting)
    return volume, folder


def test_only_encrypted_copies_leave_and_they_restore_exactly(stack, age_key, tmp_path,
                                                              monkeypatch, make_volume, capsys):
    volume, folder = stack
    identity, recipient, secret = age_key
    remote = tmp_path / ("remote-%s" % SECRET)  # the command's arguments are never shown
    remote.mkdir()
    monkeypatch.setenv("OFFSITE_ENCRYPT", "age:" + recipient)
    monkeypatch.setenv("OFFSITE_COMMAND", 'cp "$1" %s/ && echo "$2" >> %s/sources'
                       % (remote, remote))
    assert backup_all_main(["--quiet"]) == 0
    run = capsys.readouterr()
    assert "sent by cp (encrypted with age)" in run.err  # the real output is looked at
    assert SECRET not in run.out + run.err and secret not in run.out + run.err
    archives = testkit.archives_in(folder)
    sent = sorted(os.listdir(str(remote)))
    assert sent == sorted([os.path.basename(path) + ".age" for path in archives]
                          + [os.path.basename(path) + ".age.sha256" for path in archives]
                          + ["sources"])
    for name in sent:
        if name.endswith(".age"):
            with open(str(remote / name), "rb") as file:
                assert file.read(21) == b"age-encryption.org/v1"
    subprocess.run(["sha256sum", "-c", "--quiet"] + [name for name in sent
                                                     if name.endswith(".sha256")],
                   cwd=str(remote), check=True)  # checks on the remote need no key
    for path in archives:
        plain = subprocess.run(["age", "-d", "-i", identity,
                                str(remote / (os.path.basename(path) + ".age"))],
                               check=True, capture_output=True).stdout
        with open(path, "rb") as file:
            assert plain == file.read()
    assert set((remote / "sources").read_text().split()) == \
        {os.path.basename(path).split("__")[0] for path in archives}
    # The way back: fetch, decrypt into restore; and verify takes the .age as it is.
    [volume_archive] = [path for path in archives if os.path.basename(path).startswith(volume)]
    encrypted = str(remote / (os.path.basename(volume_archive) + ".age"))
    restored = make_volume()
    subprocess.run("age -d -i %s %s | %s %s %s - --force --quiet" % (
        identity, encrypted, sys.executable, os.path.join(SCRIPTS, "restore_docker_volume.py"),
        restored), shell=True, check=True, capture_output=True)
    assert testkit.volume_state(restored) == testkit.volume_state(volume)
    monkeypatch.setenv("OFFSITE_IDENTITY", identity)
    assert verify_backup_main([encrypted]) == 0
    captured = capsys.readouterr()  # read once: a second read would give an empty string
    assert re.search(r"^OK %s: 3 members, .*, sha256 ok$" % re.escape(encrypted), captured.out,
                     re.M)
    # verify names the file it was given (whose folder the test named after SECRET), but
    # never the identity's secret key.
    assert secret not in captured.out + captured.err


def test_plaintext_is_refused_unless_the_target_is_trusted(stack, tmp_path, monkeypatch, capsys):
    volume, folder = stack
    remote = tmp_path / "nas"
    remote.mkdir()
    monkeypatch.setenv("OFFSITE_COMMAND", 'cp "$1" %s/' % remote)
    assert backup_all_main(["--quiet"]) == 1
    assert "OFFSITE_COMMAND would send archives (tokens, databases) off the host unencrypted" \
        in capsys.readouterr().err
    assert not folder.exists() and os.listdir(str(remote)) == []
    monkeypatch.setenv("OFFSITE_ALLOW_PLAINTEXT", "1")
    assert backup_all_main(["--quiet"]) == 0
    archives = testkit.archives_in(folder)
    assert sorted(os.listdir(str(remote))) == sorted(
        [os.path.basename(path) for path in archives]
        + [os.path.basename(path) + ".sha256" for path in archives])


@pytest.mark.parametrize("command, timeout, reason", [
    ("echo 'upload to https://backup:%s@remote.example/x refused' >&2; exit 3" % SECRET, "60",
     r"the copy command echo \(for \S+\.age\) exited with 3: upload to "
     r"https://\*\*\*@remote\.example/x refused"),
    ("sleep 30", "1", r"the copy command sleep \(for \S+\.age\) did not finish in time"),
])
def test_a_failing_copy_fails_the_source_and_keeps_every_local_archive(
        stack, age_key, monkeypatch, capsys, command, timeout, reason):
    volume, folder = stack
    assert backup_all_main(["--quiet"]) == 0  # before off-host copies were configured
    before = testkit.archives_in(folder)
    monkeypatch.setenv("OFFSITE_ENCRYPT", "age:" + age_key[1])
    monkeypatch.setenv("OFFSITE_COMMAND", command)
    monkeypatch.setenv("OFFSITE_TIMEOUT", timeout)
    monkeypatch.setenv("BACKUP_SKIP_UNCHANGED", "0")
    testkit.docker("run", "--rm", "--network", "none", "-v", volume + ":/v", testkit.HELPER_IMAGE,
                   "sh", "-c", "echo more > /v/more")
    testkit.next_second()
    capsys.readouterr()
    assert backup_all_main(["--quiet"]) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("offsite FAILED")]
    assert len(lines) == 2  # the volume and the path
    for line in lines:
        assert re.search(reason, line), line
    after = testkit.archives_in(folder)
    assert set(before) < set(after) and len(after) == 4  # RETENTION_MIN_KEEP=1 pruned nothing
    assert not [name for name in os.listdir(str(folder)) if "offsite" in name]
    assert SECRET not in captured.out + captured.err


def test_a_missing_tool_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(offsite.shutil, "which", lambda name: None)
    settings = offsite.Settings('cp "$1" /nowhere/', "age", ["age1xyz"])
    with pytest.raises(offsite.OffsiteFailed, match=r"age is not installed; install the Debian "
                                                    r"package age \(apt install age\)"):
        offsite.send(str(tmp_path / "x.tar.gz"), "x", settings, str(tmp_path))


def test_a_wrong_key_is_a_clear_verify_failure(stack, age_key, tmp_path, monkeypatch, capsys):
    volume, folder = stack
    remote = tmp_path / "remote"
    remote.mkdir()
    monkeypatch.setenv("OFFSITE_ENCRYPT", "age:" + age_key[1])
    monkeypatch.setenv("OFFSITE_COMMAND", 'cp "$1" %s/' % remote)
    assert backup_all_main(["--quiet"]) == 0
    other = tmp_path / "other-key.txt"
    subprocess.run(["age-keygen", "-o", str(other)], check=True, capture_output=True)
    encrypted = [str(remote / name) for name in os.listdir(str(remote))
                 if name.endswith(".age")][0]
    capsys.readouterr()
    assert verify_backup_main([encrypted]) == 1
    assert "set OFFSITE_IDENTITY to the age identity file" in capsys.readouterr().out
    monkeypatch.setenv("OFFSITE_IDENTITY", str(other))
    assert verify_backup_main([encrypted]) == 1
    assert re.search(r"FAILED %s: decrypting .* with age failed: .*no identity matched"
                     % re.escape(encrypted), capsys.readouterr().out)


@pytest.mark.parametrize("text, masked", [
    ("https://user:pw@host/x", "https://***@host/x"),
    ("rclone: password=abc123 token=xyz", "rclone: password=*** token=***"),
])
def test_secrets_are_masked_in_error_output(text, masked):
    assert offsite.mask_secrets(text) == masked


def test_gpg_encrypts_for_a_key_id_and_verify_reads_it_back(stack, tmp_path, monkeypatch,
                                                           capsys):
    volume, folder = stack
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("GNUPGHOME", str(home))
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key",
                    "backup@example.invalid", "default", "default", "never"],
                   check=True, capture_output=True)
    remote = tmp_path / "remote"
    remote.mkdir()
    monkeypatch.setenv("OFFSITE_ENCRYPT", "gpg:backup@example.invalid")
    monkeypatch.setenv("OFFSITE_COMMAND", 'cp "$1" %s/' % remote)
    monkeypatch.setenv("OUTPUT_ROOT", "")
    assert backup_all_main(["--quiet"]) == 0
    [archive] = testkit.archives_in(folder)
    encrypted = str(remote / (os.path.basename(archive) + ".gpg"))
    assert sorted(os.listdir(str(remote))) == [os.path.basename(encrypted),
                                               os.path.basename(encrypted) + ".sha256"]
    plain = subprocess.run(["gpg", "--batch", "--decrypt", encrypted], check=True,
                           capture_output=True).stdout
    with open(archive, "rb") as file:
        assert plain == file.read()
    capsys.readouterr()
    assert verify_backup_main([encrypted]) == 0
    assert "sha256 ok" in capsys.readouterr().out
