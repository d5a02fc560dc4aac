"""backup_all, --stop-containers, PrivateTmp and the systemd units, against the real engine."""

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time

import pytest

import testkit
from ai_stack_backup import cli, files
from ai_stack_backup.names import archive_name, parse_archive_name, safe_name, utc_timestamp
from conftest import REPOSITORY, SCRIPTS

pytestmark = pytest.mark.engine


@pytest.fixture
def two_volumes(make_volume, tmp_path):
    names = []
    for index in range(2):
        volume = make_volume()
        data = tmp_path / ("data%d" % index)
        (data / "app").mkdir(parents=True)
        (data / "app" / "db").write_bytes(os.urandom(100000 + index))
        testkit.fill_volume(volume, data)
        names.append(volume)
    return names


@pytest.fixture
def app_container(make_volume):
    created = []

    def start(volume):
        name = "aisb-app-%s" % os.urandom(4).hex()
        created.append(name)
        return testkit.start_app_container(volume, name)
    yield start
    for name in created:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def archives_in(folder):
    """Our archive names in ``folder``; each must have its checksum file beside it."""
    names = sorted(name for name in os.listdir(str(folder)) if parse_archive_name(name))
    for name in names:
        assert os.path.exists(os.path.join(str(folder), name + ".sha256")), name
    return names


def test_every_source_is_tried_and_failures_are_named(helper_env, two_volumes, make_volume,
                                                      tmp_path, monkeypatch, capsys):
    first, second = two_volumes
    missing = make_volume(create=False)
    output_root = tmp_path / "output"
    (output_root / "run-1").mkdir(parents=True)
    (output_root / "run-1" / "transcript.txt").write_text("hello")
    folder = tmp_path / "backups"
    monkeypatch.setenv("BACKUP_DIR", str(folder))
    monkeypatch.setenv("VOLUMES", "%s,%s %s" % (first, missing, second))
    monkeypatch.setenv("OUTPUT_ROOT", str(output_root))
    assert cli.backup_all_main(["--quiet"]) == 1
    captured = capsys.readouterr()
    names = archives_in(folder)
    assert [parse_archive_name(n)[0] for n in names] == sorted(
        [first, second, safe_name(str(output_root))])
    summary = [line for line in captured.out.splitlines()
               if re.match(r"(ok|FAILED|skipped) +(volume|path) ", line)]
    assert len(summary) == 4
    assert re.match(r"ok +volume %s: %s/%s__\d{8}T\d{6}Z\.tar\.gz, [\d.]+ KiB, [\d.]+ s, "
                    r"consistency live \(auto\): no running container uses it$"
                    % (first, folder, first), summary[0])
    assert summary[1].startswith("FAILED  volume %s: volume %s does not exist" % (missing, missing))
    assert summary[2].startswith("ok      volume %s: " % second)
    assert summary[3].startswith("ok      path %s: " % output_root)
    assert summary[3].endswith(", consistency live")
    assert captured.out.count("Verified: ") == 3
    assert "1 of 4 failed: %s" % missing in captured.err
    assert stat.S_IMODE(os.stat(str(folder)).st_mode) == 0o700
    assert not testkit.volume_exists(missing)


def test_missing_output_root_is_skipped_not_failed(helper_env, two_volumes, tmp_path,
                                                   monkeypatch, capsys):
    monkeypatch.setenv("BACKUP_DIR", str(tmp_path / "b"))
    monkeypatch.setenv("VOLUMES", two_volumes[0])
    monkeypatch.setenv("OUTPUT_ROOT", str(tmp_path / "not-there"))
    assert cli.backup_all_main(["--quiet"]) == 0
    out = capsys.readouterr().out
    assert "WARN: OUTPUT_ROOT not found, skipping: %s\n" % (tmp_path / "not-there") in out
    assert "skipped path %s: not found" % (tmp_path / "not-there") in out


def test_retention_in_a_real_run(helper_env, two_volumes, make_volume, tmp_path, monkeypatch,
                                 capsys):
    volume, _ = two_volumes
    missing = make_volume(create=False)
    folder = tmp_path / "backups"
    folder.mkdir(mode=0o755)
    now = time.time()

    def old(source, days):
        path = folder / archive_name(source, utc_timestamp(now - days * 86400))
        path.write_bytes(b"an old archive")
        (folder / (path.name + ".sha256")).write_text("0  %s\n" % path.name)
        return path.name
    expired = [old(volume, days) for days in (40, 30, 20)]
    kept = [old(volume, days) for days in (16, 15)]  # expired, but 2 of the 3 newest
    fresh = [old(volume, 3)]
    of_failed_source = [old(missing, days) for days in (60, 50, 40, 30)]
    (folder / "sub").mkdir()
    nested = folder / "sub" / archive_name(volume, "20200101T000000Z")
    nested.write_bytes(b"x")
    unrelated = ["notes.txt", "%s__20200101T000000Z.tar.gz.keep" % volume]
    for name in unrelated:
        (folder / name).write_text("mine")
    orphan = folder / (archive_name(volume, "20190101T000000Z") + ".sha256")
    orphan.write_text("0  its archive is gone\n")
    leftover = folder / (files.WORK_PREFIX + "killed.part")
    leftover.write_bytes(b"half an archive")
    monkeypatch.setenv("BACKUP_DIR", str(folder))
    monkeypatch.setenv("VOLUMES", "%s %s" % (volume, missing))
    monkeypatch.setenv("OUTPUT_ROOT", "")
    monkeypatch.setenv("RETENTION_MIN_KEEP", "4")
    assert cli.backup_all_main(["--quiet"]) == 1
    err = capsys.readouterr().err
    remaining = set(os.listdir(str(folder)))
    assert not remaining & set(expired + [name + ".sha256" for name in expired])
    assert set(kept + fresh + of_failed_source + unrelated) <= remaining
    assert {name + ".sha256" for name in kept + fresh + of_failed_source} <= remaining
    assert not orphan.exists()
    assert nested.exists() and not leftover.exists()
    for name in expired:
        assert "retention: deleting %s" % (folder / name) in err
    assert "removed %s, left by an earlier run" % leftover in err
    assert stat.S_IMODE(os.stat(str(folder)).st_mode) == 0o700


def test_stop_containers_gives_a_consistent_copy_and_restarts(helper_env, two_volumes,
                                                              app_container, tmp_path, capsys):
    volume = two_volumes[0]
    app = app_container(volume)
    testkit.wait_for(lambda: testkit.starts(volume) == 1, "the app to start")
    assert cli.backup_docker_volume_main([volume, str(tmp_path), "--stop-containers"]) == 0
    assert "stopping container %s" % app in capsys.readouterr().err
    assert testkit.container_running(app)
    testkit.wait_for(lambda: testkit.starts(volume) >= 2, "the app to start again")
    assert testkit.starts(volume) == 2  # it was stopped and started again exactly once
    with tarfile.open(str(tmp_path / archives_in(tmp_path)[0])) as archive:
        assert archive.extractfile("./starts").read() == b"started\n"  # copied while stopped
    # Without the option nothing is stopped: the container's own start time stays.
    started = testkit.started_at(app)
    assert cli.backup_docker_volume_main([volume, str(tmp_path / "again")]) == 0
    assert testkit.started_at(app) == started
    assert testkit.starts(volume) == 2 and testkit.container_running(app)


def test_stopped_containers_restart_when_the_backup_fails(engine, two_volumes, app_container,
                                                          tmp_path, monkeypatch, capsys):
    volume = two_volumes[0]
    app = app_container(volume)
    monkeypatch.setenv("BACKUP_HELPER_IMAGE",
                       testkit.build_variant_image("failing", testkit.FAILING_TAR))
    backups = tmp_path / "backups"
    assert cli.backup_docker_volume_main([volume, str(backups), "--stop-containers"]) == 1
    error = capsys.readouterr().err
    assert "simulated failure" in error and "starting container %s again" % app in error
    assert testkit.container_running(app)
    assert os.listdir(str(backups)) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_stopped_containers_restart_on_a_signal(engine, two_volumes, app_container, tmp_path,
                                                signum):
    volume = two_volumes[0]
    app = app_container(volume)
    image = testkit.build_variant_image("hanging", testkit.HANGING_TAR)
    process = subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, "backup_docker_volume.py"), volume,
         str(tmp_path / "backups"), "--stop-containers"],
        env=dict(os.environ, BACKUP_HELPER_IMAGE=image),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    testkit.wait_for(lambda: not testkit.container_running(app)
                     and testkit.helper_containers(volume),
                     "the backup to stop the app and start its helper")
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert b"stopped by %s after cleaning up" % signal.Signals(signum).name.encode() in err
    assert testkit.container_running(app)
    assert os.listdir(str(tmp_path / "backups")) == []
    testkit.wait_for(lambda: not testkit.helper_containers(volume),
                     "the helper container to go with the backup")


def test_backup_all_with_stop_containers(helper_env, two_volumes, app_container, tmp_path,
                                         monkeypatch):
    app = app_container(two_volumes[1])
    testkit.wait_for(lambda: testkit.starts(two_volumes[1]) == 1, "the app to start")
    monkeypatch.setenv("BACKUP_DIR", str(tmp_path))
    monkeypatch.setenv("VOLUMES", " ".join(two_volumes))
    monkeypatch.setenv("OUTPUT_ROOT", "")
    monkeypatch.setenv("STOP_CONTAINERS", "1")
    assert cli.backup_all_main(["--quiet"]) == 0
    testkit.wait_for(lambda: testkit.starts(two_volumes[1]) >= 2, "the app to start again")
    assert testkit.container_running(app) and testkit.starts(two_volumes[1]) == 2
    archives = testkit.archives_in(tmp_path)
    assert sorted(os.path.basename(path).split("__")[0] for path in archives) == \
        sorted(two_volumes)
    for path in archives:  # each holds its volume as it was, the app's one while stopped
        volume = os.path.basename(path).split("__")[0]
        with tarfile.open(path) as archive:
            names = {os.path.normpath(member.name) for member in archive.getmembers()}
            if volume == two_volumes[1]:
                assert archive.extractfile("./starts").read() == b"started\n"
        assert names == {os.path.normpath(os.fsdecode(name))
                         for name in testkit.volume_state(volume)}


def test_backup_all_works_with_a_private_tmp_and_no_network(helper_env, two_volumes,
                                                            public_tmp):
    """As under PrivateTmp=yes and PrivateNetwork=yes: the daemon cannot see our /tmp."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare")
    folder = os.path.join(public_tmp, "backups")
    output_root = os.path.join(public_tmp, "output")
    os.makedirs(os.path.join(output_root, "x"))
    # The checkout may itself live under /tmp, which the private tmpfs hides.
    install = os.path.join(public_tmp, "scripts")
    shutil.copytree(SCRIPTS, install, ignore=shutil.ignore_patterns("__pycache__"))
    script = ("mount -t tmpfs tmpfs /tmp && test -z \"$(ls -A /tmp)\" && "
              "exec \"$0\" \"$1\" --quiet")
    result = subprocess.run(
        ["unshare", "--mount", "--net", "sh", "-c", script, sys.executable,
         os.path.join(install, "backup_all.py")],
        env=dict(os.environ, BACKUP_DIR=folder, VOLUMES=" ".join(two_volumes),
                 OUTPUT_ROOT=output_root, TMPDIR="/tmp"),
        capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(archives_in(folder)) == 3
    names = [name for name in os.listdir(folder) if not name.startswith(files.LOCK_NAME)]
    assert sorted(name for name in names if not name.endswith(".listing")) \
        == sorted(archives_in(folder) + [name + ".sha256" for name in archives_in(folder)])
    assert {name[:-len(".listing")] for name in names if name.endswith(".listing")} == \
        set(archives_in(folder))  # every archive has its member record


def render_units(destination):
    result = subprocess.run(["make", "-s", "install-systemd", "DESTDIR=%s" % destination],
                            cwd=REPOSITORY, capture_output=True)
    assert result.returncode == 0, result.stderr
    return os.path.join(destination, "etc", "systemd", "system")


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is missing")
def test_rendered_units_verify_cleanly(tmp_path):
    units = render_units(str(tmp_path))
    service = os.path.join(units, "ai_stack_backup.service")
    text = open(service).read()
    assert "ExecStart=/usr/bin/python3 %s/scripts/backup_all.py --quiet" % REPOSITORY in text
    assert "User=%s" % subprocess.check_output(["stat", "-c", "%U", REPOSITORY]).decode().strip() \
        in text
    result = subprocess.run(["systemd-analyze", "verify", "--recursive-errors=no", service,
                             os.path.join(units, "ai_stack_backup-failure.service"),
                             os.path.join(units, "ai_stack_backup-drill.service"),
                             os.path.join(units, "ai_stack_backup-drill.timer"),
                             os.path.join(units, "ai_stack_backup.timer")], capture_output=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is missing")
def test_the_monitoring_drop_in_opens_only_what_it_names(tmp_path):
    result = subprocess.run(["make", "-s", "install-systemd", "DESTDIR=%s" % tmp_path,
                             "METRICS_DIR=/var/lib/prometheus/node-exporter",
                             "NETWORK_ALLOW=192.0.2.10 127.0.0.53"],
                            cwd=REPOSITORY, capture_output=True)
    assert result.returncode == 0, result.stderr
    units = os.path.join(str(tmp_path), "etc", "systemd", "system")
    backup = open(os.path.join(units, "ai_stack_backup.service.d", "monitoring.conf")).read()
    drill = open(os.path.join(units, "ai_stack_backup-drill.service.d", "monitoring.conf")).read()
    metrics_lines = ["ReadWritePaths=-/var/lib/prometheus/node-exporter",
                     "Environment=METRICS_FILE=/var/lib/prometheus/node-exporter/"
                     "ai_stack_backup.prom"]
    network_lines = ["PrivateNetwork=no", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                     "IPAddressAllow=192.0.2.10 127.0.0.53"]
    settings = lambda text: [line for line in text.splitlines()  # noqa: E731
                             if line and not line.startswith(("#", "["))]
    assert settings(backup) == metrics_lines + network_lines
    assert settings(drill) == metrics_lines  # the drill never pings
    verify = subprocess.run(["systemd-analyze", "verify", "--recursive-errors=no",
                             os.path.join(units, "ai_stack_backup.service"),
                             os.path.join(units, "ai_stack_backup-drill.service")],
                            capture_output=True,
                            env=dict(os.environ, SYSTEMD_UNIT_PATH=units + ":"))
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, b"", b"")
    # Rendering again without the variables removes the drop-in.
    subprocess.run(["make", "-s", "install-systemd", "DESTDIR=%s" % tmp_path], cwd=REPOSITORY,
                   check=True, capture_output=True)
    assert not os.path.exists(os.path.join(units, "ai_stack_backup.service.d", "monitoring.conf"))


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is missing")
def test_service_is_hardened_and_every_option_commented():
    service = os.path.join(REPOSITORY, "systemd", "ai_stack_backup.service")
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", service],
                            capture_output=True)
    level = float(re.search(rb"Overall exposure level for \S+: ([\d.]+)", result.stdout).group(1))
    assert level <= 2.5
    lines = open(service).read().splitlines()
    options = lines[lines.index("[Service]") + 1:]
    hardening = options[next(i for i, line in enumerate(options) if "Hardening" in line):]
    for index, line in enumerate(hardening):
        if line and not line.startswith("#"):
            assert hardening[index - 1].startswith("# "), "no comment above " + line
    text = "\n".join(lines)
    for required in ("Type=oneshot", "User=wasti", "Group=wasti", "NoNewPrivileges=yes",
                     "PrivateTmp=yes", "ProtectSystem=strict", "ProtectHome=read-only",
                     "ReadWritePaths=-/srv/ai-stack/backups",
                     "ExecStartPre=+/usr/bin/install -d -o wasti -g wasti -m 0700 "
                     "/srv/ai-stack/backups", "ReadWritePaths=-/run/lock",
                     "OnFailure=ai_stack_backup-failure.service", "TimeoutStartSec=",
                     "Environment=BACKUP_DIR=/srv/ai-stack/backups",
                     "Environment=RETENTION_DAYS=14", "Environment=BACKUP_CONSISTENCY=auto",
                     "Environment=OUTPUT_ROOT=/home/wasti/ai_stack_data/transcript-miner/output",
                     "EnvironmentFile=-/etc/ai_stack_backup.env",
                     "Environment=BACKUP_SKIP_UNCHANGED=1"):
        assert required in text
    timer = open(os.path.join(REPOSITORY, "scripts", "systemd", "ai_stack_backup.timer")).read()
    for required in ("OnCalendar=daily", "Persistent=true", "RandomizedDelaySec=30m"):
        assert required in timer
