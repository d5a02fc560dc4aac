"""The units under a real systemd (PID 1 in a container, the host's engine), one boot.

The units are rendered by ``make install-systemd`` for a service user in a group
that owns the docker socket, on a host where the backup folder does not exist yet.
The backup folder lives at the same path on the host and in the container, because
the host's engine bind-mounts its transfer folders (see ../shared notes on systemd).
"""

import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import time

import pytest

import testkit
from conftest import REPOSITORY

pytestmark = pytest.mark.engine

USER = "aisbsvc"
CHECKOUT = "/opt/ai_stack"
PROBE = r'''
import mmap, os, socket, subprocess, sys
results = {}
try:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    results["inet"] = "allowed"
except OSError:
    results["inet"] = "refused"
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    results["wx"] = "allowed"
except OSError:
    results["wx"] = "refused"
for name, path in (("etc", "/etc/aisb-probe"), ("home", os.path.expanduser("~/aisb-probe"))):
    try:
        open(path, "w").close()
        results[name] = "writable"
    except OSError:
        results[name] = "read-only"
docker = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                        capture_output=True)
results["docker"] = "reachable" if docker.returncode == 0 else "unreachable"
print("probe " + " ".join("%s=%s" % item for item in sorted(results.items())), flush=True)
'''


RECORDER = r'''
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open(sys.argv[1], "a") as log:
            log.write(self.path + "\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
http.server.HTTPServer(("127.0.0.1", 8099), Handler).serve_forever()
'''


def run(container, *command, check=True):
    result = subprocess.run(["docker", "exec", container] + list(command), capture_output=True)
    if check and result.returncode != 0:
        raise AssertionError("%s failed: %s" % (" ".join(command), result.stderr.decode()))
    return result.stdout.decode()


def show(container, unit, prop):
    return run(container, "systemctl", "show", "-p", prop, "--value", unit).strip()


def journal(container, unit):
    return run(container, "journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False)


def wait_until_inactive(container, unit, timeout=120):
    deadline = time.monotonic() + timeout
    while show(container, unit, "ActiveState") in ("active", "activating", "deactivating"):
        assert time.monotonic() < deadline, "%s did not finish" % unit
        time.sleep(0.5)


@pytest.fixture
def systemd_host(engine, tmp_path):
    """A booted systemd container with the units installed; gives (container, backup folder)."""
    tag = secrets.token_hex(5)
    image = "ai-stack-backup-test-systemd:%s" % tag
    testkit.docker("import", testkit.rootfs("systemd", "systemd,systemd-sysv,dbus,python3"),
                   image)
    shared = "/srv/aisb-test-systemd-%s" % tag  # the same path on the host and inside
    os.makedirs(shared)
    container = "aisb-test-systemd-%s" % tag
    try:
        testkit.docker(
            "run", "-d", "--name", container, "--network", "none",
            "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
            "--security-opt", "seccomp=unconfined", "--cgroupns=host",
            "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "--tmpfs", "/run", "--tmpfs", "/run/lock",
            "--tmpfs", "/tmp", "-v", "/var/run/docker.sock:/var/run/docker.sock",
            "-v", "%s:%s" % (shared, shared), "-e", "container=docker",
            "--stop-signal", "SIGRTMIN+3", image, "/sbin/init")
        deadline = time.monotonic() + 120
        while run(container, "systemctl", "is-system-running", check=False).strip() not in (
                "running", "degraded"):
            assert time.monotonic() < deadline, "systemd did not come up"
            time.sleep(0.5)
        socket_gid = os.stat("/var/run/docker.sock").st_gid
        run(container, "groupadd", "-o", "-g", str(socket_gid), "hostdocker")
        run(container, "useradd", "-m", "-G", "hostdocker", USER)
        run(container, "mkdir", "-p", "/home/%s/output/run-1" % USER)
        run(container, "sh", "-c", "echo hello > /home/%s/output/run-1/transcript.txt" % USER)
        run(container, "chown", "-R", "%s:%s" % (USER, USER), "/home/%s/output" % USER)
        testkit.docker("cp", shutil.which("docker"), container + ":/usr/bin/docker")
        run(container, "mkdir", "-p", CHECKOUT)
        testkit.docker("cp", os.path.join(REPOSITORY, "scripts"), container + ":" + CHECKOUT)
        units = tmp_path / "units"
        subprocess.run(["make", "-s", "-C", REPOSITORY, "install-systemd", "DESTDIR=" + str(units),
                        "CHECKOUT=" + CHECKOUT, "SERVICE_USER=" + USER, "SERVICE_GROUP=" + USER,
                        "BACKUP_DIR=%s/backups" % shared], check=True, capture_output=True)
        for name in os.listdir(str(units / "etc" / "systemd" / "system")):
            testkit.docker("cp", str(units / "etc" / "systemd" / "system" / name),
                           "%s:/etc/systemd/system/%s" % (container, name))
        yield container, shared
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
        subprocess.run(["docker", "rmi", image], capture_output=True)
        shutil.rmtree(shared, ignore_errors=True)


def drop_in(container, unit, lines):
    folder = "/etc/systemd/system/%s.d" % unit
    run(container, "mkdir", "-p", folder)
    body = "[Service]\n" + "".join("%s\n" % line for line in lines)
    subprocess.run(["docker", "exec", "-i", container, "sh", "-c",
                    "cat > %s/test.conf" % folder], input=body.encode(), check=True)
    run(container, "systemctl", "daemon-reload")


def test_the_units_under_a_real_systemd(systemd_host, make_volume, tmp_path):
    container, shared = systemd_host
    backups = os.path.join(shared, "backups")
    assert not os.path.exists(backups)  # a fresh host
    volume = make_volume()
    (tmp_path / "data" / "uploads").mkdir(parents=True)
    (tmp_path / "data" / "uploads" / "notes.txt").write_text("kept by the timer")
    testkit.fill_volume(volume, tmp_path / "data")
    service = "ai_stack_backup.service"
    sources = ["Environment=VOLUMES=%s" % volume,
               "Environment=OUTPUT_ROOT=/home/%s/output" % USER,
               "Environment=BACKUP_HELPER_IMAGE=%s" % testkit.HELPER_IMAGE]
    drop_in(container, service, sources)

    # A run on the fresh host: the folder is made, both sources are backed up.
    run(container, "systemctl", "start", service, check=False)
    assert show(container, service, "Result") == "success", journal(container, service)
    log = journal(container, service)
    assert "configured, but" not in log and "ignoring" not in log, log
    uid = int(run(container, "id", "-u", USER))
    folder = os.stat(backups)
    assert (folder.st_uid, stat.S_IMODE(folder.st_mode)) == (uid, 0o700)
    archives = sorted(name for name in os.listdir(backups) if name.endswith(".tar.gz"))
    assert [name.split("__")[0] for name in archives] == sorted(
        [volume, "home_%s_output" % USER])
    for name in archives:
        status = os.stat(os.path.join(backups, name))
        assert (status.st_uid, stat.S_IMODE(status.st_mode)) == (uid, 0o600)

    # The weekly drill restores that whole recovery point in its own sandbox: the volume into
    # a scratch volume, OUTPUT_ROOT into a scratch folder in the backup folder.
    drill = "ai_stack_backup-drill.service"
    drop_in(container, drill, sources)
    run(container, "systemctl", "start", drill, check=False)
    assert show(container, drill, "Result") == "success", journal(container, drill)
    told = journal(container, drill)
    assert re.search(r"DRILL ok stack \d{8}T\d{6}Z 2 sources [\d.]+", told), told
    assert re.search(r"DRILL ok /home/%s/output " % USER, told), told
    assert sorted(name for name in os.listdir(backups) if name.endswith(".tar.gz")) == archives

    # The sandbox is really in force: a probe with the unit's own options.
    unit = open(os.path.join(REPOSITORY, "systemd", service)).read()
    probe_unit = "\n".join(
        line for line in unit.splitlines()
        if not line.startswith(("ExecStart=", "ExecStartPre=", "OnFailure="))
    ).replace("[Service]", "[Service]\nExecStart=/usr/bin/python3 /usr/local/bin/aisb-probe.py")
    probe_unit = probe_unit.replace("User=wasti", "User=" + USER).replace(
        "Group=wasti", "Group=" + USER).replace("/srv/ai-stack/backups", backups)
    subprocess.run(["docker", "exec", "-i", container, "sh", "-c",
                    "cat > /usr/local/bin/aisb-probe.py"], input=PROBE.encode(), check=True)
    subprocess.run(["docker", "exec", "-i", container, "sh", "-c",
                    "cat > /etc/systemd/system/aisb-probe.service"], input=probe_unit.encode(),
                   check=True)
    run(container, "systemctl", "daemon-reload")
    run(container, "systemctl", "start", "aisb-probe.service")
    assert "probe docker=reachable etc=read-only home=read-only inet=refused wx=refused" in \
        journal(container, "aisb-probe.service")
    exposure = run(container, "systemd-analyze", "security", service, check=False)
    level = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", exposure).group(1))
    assert level <= 1.0
    sys.stderr.write("\nlive systemd-analyze security exposure: %.1f\n" % level)

    # The timer is scheduled.
    run(container, "systemctl", "enable", "--now", "ai_stack_backup.timer")
    assert "ai_stack_backup.timer" in run(container, "systemctl", "list-timers", "--all")

    # A second start while a run holds the lock exits 75, and that counts as success.
    hanging = testkit.build_variant_image("hanging", testkit.HANGING_TAR)
    drop_in(container, service, [
        "Environment=VOLUMES=%s" % volume, "Environment=OUTPUT_ROOT=",
        "Environment=BACKUP_HELPER_IMAGE=%s" % hanging,
        # The volume is unchanged, and its archive could be copied whole: another exclusion
        # list makes every entry new, so the hanging tar is asked for all of it.
        "Environment=BACKUP_SKIP_UNCHANGED=0",
        "Environment=BACKUP_EXCLUDE=%s:no-such-entry" % volume])
    run(container, "systemctl", "start", "--no-block", service)
    deadline = time.monotonic() + 60
    while not testkit.helper_containers(volume):
        assert time.monotonic() < deadline, "the hanging run never started its helper"
        time.sleep(0.5)
    second = "ai_stack_backup-second.service"
    rendered = run(container, "cat", "/etc/systemd/system/" + service)
    subprocess.run(["docker", "exec", "-i", container, "sh", "-c",
                    "cat > /etc/systemd/system/" + second], input=rendered.encode(), check=True)
    run(container, "systemctl", "daemon-reload")
    run(container, "systemctl", "start", second)  # exit 0: the job did not fail
    assert show(container, second, "Result") == "success"
    told = journal(container, second)
    assert "another backup_all run (PID %s) holds the lock" % show(
        container, service, "MainPID") in told and "Deactivated successfully" in told, told
    # The unit and a manual restore of the same volume meet at one host-wide lock, through the
    # unit's sandbox (ReadWritePaths=/run/lock): the restore, by root, gets 75.
    volume_archive = os.path.join(backups, [name for name in archives if name.startswith(
        volume)][0])
    manual = run(container, "sh", "-c", "BACKUP_DIR=%s/manual BACKUP_HELPER_IMAGE=%s python3 "
                 "%s/scripts/restore_docker_volume.py %s %s --force 2>&1; echo exit=$?"
                 % (shared, testkit.HELPER_IMAGE, CHECKOUT, volume, volume_archive))
    assert manual.splitlines()[-1] == "exit=75", manual
    assert "another backup or restore of volume %s (PID %s) holds the lock /run/lock/" % (
        volume, show(container, service, "MainPID")) in manual, manual
    run(container, "systemctl", "stop", service)
    wait_until_inactive(container, service)

    # A failed run (a volume that does not exist) makes the OnFailure= unit speak.
    drop_in(container, service, [
        "Environment=VOLUMES=aisb-test-missing-%s" % secrets.token_hex(4),
        "Environment=OUTPUT_ROOT=", "Environment=BACKUP_HELPER_IMAGE=%s" % testkit.HELPER_IMAGE])
    run(container, "systemctl", "reset-failed", check=False)
    time.sleep(1.1)  # archive names have one-second resolution
    run(container, "systemctl", "start", service, check=False)
    assert show(container, service, "Result") == "exit-code"
    deadline = time.monotonic() + 60
    while "ai_stack backup FAILED" not in journal(container, "ai_stack_backup-failure.service"):
        assert time.monotonic() < deadline, journal(container, "ai_stack_backup-failure.service")
        time.sleep(0.5)
    told = journal(container, "ai_stack_backup-failure.service")
    assert "ai_stack_backup.service ended with result exit-code" in told

    # Monitoring: the drop-in make install-systemd renders opens IP for the pings only (to
    # NETWORK_ALLOW) and the metrics folder; the URL comes from the root-only environment file.
    metrics_dir = os.path.join(shared, "metrics")
    os.makedirs(metrics_dir)
    os.chown(metrics_dir, uid, -1)
    monitoring_units = tmp_path / "monitoring-units"
    subprocess.run(["make", "-s", "-C", REPOSITORY, "install-systemd",
                    "DESTDIR=" + str(monitoring_units), "CHECKOUT=" + CHECKOUT,
                    "SERVICE_USER=" + USER, "SERVICE_GROUP=" + USER,
                    "BACKUP_DIR=%s/backups" % shared, "METRICS_DIR=" + metrics_dir,
                    "NETWORK_ALLOW=127.0.0.1"], check=True, capture_output=True)
    dropin = monitoring_units / "etc" / "systemd" / "system" / (service + ".d")
    run(container, "mkdir", "-p", "/etc/systemd/system/%s.d" % service)
    testkit.docker("cp", str(dropin / "monitoring.conf"),
                   "%s:/etc/systemd/system/%s.d/monitoring.conf" % (container, service))
    subprocess.run(["docker", "exec", "-i", container, "sh", "-c",
                    "umask 077 && cat > /etc/ai_stack_backup.env"],
                   input=b"HEALTHCHECK_URL=http://127.0.0.1:8099/ping/secret-uuid\n", check=True)
    subprocess.run(["docker", "exec", "-i", container, "sh", "-c",
                    "cat > /usr/local/bin/aisb-recorder.py"], input=RECORDER.encode(), check=True)
    run(container, "systemd-run", "--unit", "aisb-recorder", "/usr/bin/python3",
        "/usr/local/bin/aisb-recorder.py", "/run/aisb-pings")
    drop_in(container, service, [
        "Environment=VOLUMES=%s" % volume, "Environment=OUTPUT_ROOT=",
        "Environment=BACKUP_HELPER_IMAGE=%s" % testkit.HELPER_IMAGE])
    run(container, "systemctl", "reset-failed", check=False)
    time.sleep(1.1)
    run(container, "systemctl", "start", service, check=False)
    assert show(container, service, "Result") == "success", journal(container, service)
    assert run(container, "cat", "/run/aisb-pings").split() == [
        "/ping/secret-uuid/start", "/ping/secret-uuid"], journal(container, service)
    assert "secret-uuid" not in journal(container, service)
    prom = os.path.join(metrics_dir, "ai_stack_backup.prom")
    assert stat.S_IMODE(os.stat(prom).st_mode) == 0o644
    assert re.search(r'^ai_stack_backup_last_run_success\{source="%s"\} 1$' % volume,
                     open(prom).read(), re.M)

    # The other way round: a manual run (root) holds the volume's lock; the unit, under its
    # sandbox, meets the same file and does not touch the volume.
    run(container, "systemd-run", "--unit", "aisb-manual-holder", "/usr/bin/python3", "-c",
        "import fcntl, os, time\n"
        "fd = os.open('/run/lock/ai-stack-backup-volume-%s.lock', os.O_RDWR | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'%%d\\n' %% os.getpid())\n"
        "open('/run/aisb-held', 'w').close()\n"
        "time.sleep(600)\n" % volume)
    deadline = time.monotonic() + 60
    while run(container, "sh", "-c", "test -e /run/aisb-held && echo yes", check=False) != "yes\n":
        assert time.monotonic() < deadline, "the manual holder never took the lock"
        time.sleep(0.2)
    holder = show(container, "aisb-manual-holder.service", "MainPID")
    run(container, "systemctl", "reset-failed", check=False)
    time.sleep(1.1)
    run(container, "systemctl", "start", service, check=False)
    assert show(container, service, "Result") == "exit-code"
    told = journal(container, service)
    assert "another backup or restore of volume %s (PID %s) holds the lock" % (
        volume, holder) in told, told
    run(container, "systemctl", "stop", "aisb-manual-holder.service")
