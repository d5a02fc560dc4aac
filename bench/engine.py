"""The bench's own Docker engine, its data on a fresh ext4 with a journal (Debian's default).

This machine's root filesystem is ext4 without a journal. There, ext4's inode allocator
passes over every inode freed within the last minute (six, while the inode's table block
is dirty), reading each one's deletion time (``recently_deleted`` in fs/ext4/ialloc.c,
checked only when the filesystem has no journal). Creating 200,000 files within minutes of
removing as many took 18 to 40 s instead of 4.5 s, in whichever run came next: a restore,
a drill's scratch volume, the old procedure's ``tar -x``. The bench's volumes, and the
drills' scratch volumes, therefore live on a filesystem like an operator's, under an
engine of the bench's own: a second dockerd with its own data root, exec root and socket,
reached through DOCKER_HOST. The host's engine and its volumes are never touched.

loop file → mkfs.ext4 → mount → dockerd → DOCKER_HOST for all the bench runs → stop, unmount.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

SIZE = 48 << 30  # sparse: only what the bench writes takes disk
INODES = 4_000_000  # four 200,000-file volumes at once and then some
START_LIMIT = 60.0


def _run(command):
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit("bench: %s failed: %s" % (" ".join(command), result.stderr.strip()))


def run_in_own_engine(prefix, bench):
    """Call ``bench(work, where)`` with a fresh work folder named ``prefix…`` (in BENCH_DIR,
    default /var/tmp) and the bench's own engine running; remove both afterwards."""
    # A SIGTERM (make stopped, a timeout) unwinds like Ctrl-C: the engine is stopped and the
    # filesystem unmounted, never left behind.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    work = tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    try:
        with own_engine(work) as where:
            bench(work, where)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def own_engine(work):
    """Run the block against an engine of the bench's own whose data root is a fresh,
    journaled ext4 in ``work``; give a line that says so."""
    image, mounted = os.path.join(work, "engine.ext4"), os.path.join(work, "engine")
    run_folder = "/run/aisb-bench-engine-%d" % os.getpid()
    socket = "unix://%s/docker.sock" % run_folder
    with open(image, "wb") as file:
        file.truncate(SIZE)
    os.mkdir(mounted)
    _run(["mkfs.ext4", "-q", "-F", "-N", str(INODES), image])
    _run(["mount", "-o", "loop", image, mounted])
    daemon = None
    try:
        os.mkdir(run_folder, 0o700)
        with open(os.path.join(work, "engine.log"), "wb") as log:
            daemon = subprocess.Popen(
                ["dockerd", "--iptables=false", "--bridge=none",
                 "--data-root", os.path.join(mounted, "docker"),
                 "--exec-root", os.path.join(run_folder, "exec"),
                 "--pidfile", os.path.join(run_folder, "dockerd.pid"), "-H", socket],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_until_up(daemon, socket, work)
        previous = os.environ.get("DOCKER_HOST")
        os.environ["DOCKER_HOST"] = socket
        try:
            yield "its own Docker engine on a loop-mounted ext4 with a journal"
        finally:
            if previous is None:
                os.environ.pop("DOCKER_HOST", None)
            else:
                os.environ["DOCKER_HOST"] = previous
    finally:
        if daemon is not None:
            _stop(daemon)
        subprocess.run(["umount", mounted], capture_output=True)
        if os.path.ismount(mounted):  # a shim still on its way out
            time.sleep(2)
            subprocess.run(["umount", "--lazy", mounted], capture_output=True)
        with contextlib.suppress(OSError):
            os.unlink(image)
        subprocess.run(["rm", "-rf", run_folder], capture_output=True)


def _wait_until_up(daemon, socket, work):
    started = time.monotonic()
    while subprocess.run(["docker", "-H", socket, "info"], capture_output=True).returncode:
        if daemon.poll() is not None or time.monotonic() - started > START_LIMIT:
            raise SystemExit("bench: the bench's own dockerd did not start; see %s"
                             % os.path.join(work, "engine.log"))
        time.sleep(0.5)


def _stop(daemon):
    """SIGTERM, as systemd stops dockerd: it ends its containers and its containerd."""
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
