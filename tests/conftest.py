"""Shared fixtures: the package on sys.path, and the real Docker engine for engine tests.

Engine tests use the ``engine`` fixture. Without an engine they are skipped,
unless AI_STACK_REQUIRE_DOCKER=1 (set by CI and ``make test``), which turns
every skip into a failure.
"""

import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPOSITORY, "scripts")
sys.path.insert(0, SCRIPTS)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPOSITORY, "dev"))

# This run's own image tag, before testkit reads it (see testkit.IMAGE_TAG).
os.environ.setdefault("AISB_TEST_IMAGE_TAG", "run-%d-%s" % (os.getpid(), secrets.token_hex(3)))
import testkit  # noqa: E402  (needs the path above)
from ai_stack_backup import locks  # noqa: E402

REQUIRE_DOCKER = os.environ.get("AI_STACK_REQUIRE_DOCKER") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_DOCKER and report.skipped:
        report.outcome = "failed"
        report.longrepr = "skipped although AI_STACK_REQUIRE_DOCKER=1: %s" % (report.longrepr,)


def _engine_problem():
    try:
        result = subprocess.run(["docker", "info", "--format", "{{json .ServerVersion}}"],
                                capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return "docker is not usable: %s" % error
    if result.returncode != 0:
        return "no Docker engine: %s" % result.stderr.decode(errors="replace").strip()
    if not os.path.exists("/bin/busybox"):
        return "/bin/busybox (busybox-static) is needed to build the helper image"
    return None


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    """A reachable Docker engine with the test helper image built; gives the image name."""
    problem = _engine_problem()
    if problem:
        if REQUIRE_DOCKER:
            pytest.fail(problem)
        pytest.skip(problem)
    testkit.build_helper_image(tmp_path_factory.mktemp("helper-image"))
    yield testkit.HELPER_IMAGE
    testkit.remove_images_of_this_run()


@pytest.fixture(autouse=True)
def own_home(monkeypatch, tmp_path_factory):
    """Every test has a HOME of its own: what the tool keeps in ~/.cache/ai-stack-backup (its
    fallback work folder) never lands in the real one of the user running the tests."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def own_backup_dir(monkeypatch, tmp_path_factory):
    """Every test gets a backup folder of its own: work files and safety copies never go to
    the host's real /srv/ai-stack/backups (operators run the tests on their servers)."""
    folder = tmp_path_factory.mktemp("backup-dir")
    monkeypatch.setenv("BACKUP_DIR", str(folder))
    return folder


@pytest.fixture
def helper_env(engine, monkeypatch):
    """Point the tool at the test helper image; never at a registry."""
    monkeypatch.setenv("BACKUP_HELPER_IMAGE", engine)
    return engine


def _removed(volume):
    """Remove the test's ``volume`` and the containers using it; say whether it is gone."""
    for container in testkit.docker("ps", "-aq", "--filter", "volume=" + volume).split():
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
    subprocess.run(["docker", "volume", "rm", "-f", volume], capture_output=True)
    return not testkit.volume_exists(volume)


@pytest.fixture
def make_volume(engine):
    """Factory for uniquely named volumes (``create=False`` only reserves a name); removes them."""
    names = []

    def make(create=True):
        name = "aisb-test-%s" % secrets.token_hex(5)
        names.append(name)
        if create:
            testkit.docker("volume", "create", name)
        return name
    yield make
    for name in names:
        # A killed tool's helper may still be going away (its --rm removal in progress), and
        # the volume cannot go before it: try again until it is gone.
        testkit.wait_for(lambda name=name: _removed(name), "volume %s to be removed" % name,
                         ceiling=120)
        # A backup or restore the test killed outright leaves the volume's host-wide lock file.
        locks.remove_unheld(locks.host_lock_path(name))


@pytest.fixture
def public_tmp():
    """A fresh folder outside /tmp, removed afterwards.

    For the few tests where another user must reach files (pytest's own temp
    root is 0700) or where /tmp is replaced by a private tmpfs (PrivateTmp).
    """
    path = tempfile.mkdtemp(prefix="aisb-test-", dir="/var/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def operator(public_tmp):
    """A non-root user of this test in the docker group, with a home under ``public_tmp``;
    removed again. Gives its pwd entry."""
    if os.geteuid() != 0:
        pytest.skip("creating the non-root operator needs root")
    name = "aisb-op-%s" % secrets.token_hex(4)
    home = os.path.join(public_tmp, name)
    subprocess.run(["useradd", "--no-create-home", "--home-dir", home, "--shell",
                    "/usr/sbin/nologin", "--groups", "docker", name], check=True)
    try:
        entry = pwd.getpwnam(name)
        os.mkdir(home, 0o700)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        yield entry
    finally:
        subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture
def xfs_folder(engine, tmp_path):
    """A fresh XFS filesystem (a sparse file, loop-mounted) under the test's own folder, where
    ``copy_file_range`` shares blocks; unmounted and removed afterwards. Needs root."""
    if os.geteuid() != 0:
        pytest.skip("mounting an XFS filesystem needs root")
    image = tmp_path / "xfs.img"
    with open(str(image), "wb") as file:
        file.truncate(700 << 20)
    subprocess.run(["mkfs.xfs", "-q", str(image)], check=True)
    mountpoint = tmp_path / "xfs"
    mountpoint.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
        os.unlink(str(image))
