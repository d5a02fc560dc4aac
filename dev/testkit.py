"""Shared test and tooling kit (tests, dev/demo.py, bench): tricky file trees, exact tree
comparison, the helper image built from the host's busybox, docker shortcuts."""

import hashlib
import io
import os
import stat
import subprocess
import tarfile
import time

# The tests' images carry the tag of their run (tests/conftest.py sets a fresh one, and
# removes those images afterwards), so two runs at once never replace each other's; the
# demo and the bench keep "latest".
IMAGE_TAG = os.environ.get("AISB_TEST_IMAGE_TAG") or "latest"
IMAGE_PREFIX = "ai-stack-backup-test-"
HELPER_IMAGE = IMAGE_PREFIX + "helper:" + IMAGE_TAG
OTHER_UID, OTHER_GID = 1234, 5678
SYMLINK_UID, SYMLINK_GID = 4321, 4322

T0 = 1_600_000_000  # 2020-09-13, a whole second: tar keeps whole seconds


# --- docker -----------------------------------------------------------------

def docker(*arguments, check=True, input=None):
    """Run docker; give stdout as text; raise AssertionError with stderr when it fails."""
    result = subprocess.run(["docker"] + list(arguments), capture_output=True, input=input)
    if check and result.returncode != 0:
        raise AssertionError("docker %s failed: %s" % (" ".join(arguments),
                                                        result.stderr.decode(errors="replace")))
    return result.stdout.decode(errors="replace")


def _busybox_rootfs(replacements=None):
    """A rootfs tar of the host's static busybox; ``replacements`` maps a path to a script."""
    replacements = replacements or {}
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True,
                             check=True).stdout.decode().split()
    rootfs = io.BytesIO()
    with tarfile.open(fileobj=rootfs, mode="w") as archive:
        for folder in ("bin", "tmp", "etc", "volume", "transfer"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if folder == "tmp" else 0o755
            archive.addfile(info)
        archive.add("/bin/busybox", "bin/busybox")
        for applet in applets:
            if applet != "busybox" and "bin/" + applet not in replacements:
                info = tarfile.TarInfo("bin/" + applet)
                info.type, info.linkname = tarfile.SYMTYPE, "busybox"
                archive.addfile(info)
        for path, script in replacements.items():
            info = tarfile.TarInfo(path)
            info.mode, info.size = 0o755, len(script)
            archive.addfile(info, io.BytesIO(script))
    return rootfs.getvalue()


def build_helper_image(workdir=None):
    """Build the helper image from the host's static busybox (no registry needed)."""
    if subprocess.run(["docker", "image", "inspect", HELPER_IMAGE],
                      capture_output=True).returncode == 0:
        return
    docker("import", "-", HELPER_IMAGE, input=_busybox_rootfs())


def build_variant_image(name, tar_function, more_functions=b""):
    """A helper image whose ``tar`` is the shell function body ``tar_function`` (and with the
    shell function definitions ``more_functions``); gives its name.

    busybox's shell runs its own applets without looking at PATH, so ``sh`` is
    a wrapper that defines the function and then runs the tool's script as is.
    Built once per content (a label holds its hash); a replaced image is removed.
    """
    image = "%s%s:%s" % (IMAGE_PREFIX, name, IMAGE_TAG)
    # Called as ``sh -c SCRIPT`` by the tool, and as ``sh -c SCRIPT sh NAME...`` by its xargs:
    # the script's own arguments are what follows its $0.
    wrapper = (b"#!/bin/busybox ash\n"
               b"tar() { %s; }\n"
               b"%s\n"
               b"set -eu\n"
               b'script="$2"; shift 2; if [ $# -gt 0 ]; then shift; fi\n'
               b'eval "$script"\n') % (tar_function, more_functions)
    digest = hashlib.sha256(wrapper).hexdigest()[:16]
    found = subprocess.run(["docker", "image", "inspect", "--format",
                            '{{.Id}} {{index .Config.Labels "ai-stack-backup.variant"}}', image],
                           capture_output=True)
    old_id, _, label = found.stdout.decode().strip().partition(" ")
    if found.returncode == 0 and label == digest:
        return image
    docker("import", "--change", "LABEL ai-stack-backup.variant=%s" % digest, "-", image,
           input=_busybox_rootfs({"bin/sh": wrapper}))
    # A test may have tagged the plain helper image with this name: never remove that one.
    if found.returncode == 0 and old_id != _image_id(HELPER_IMAGE):
        subprocess.run(["docker", "rmi", old_id], capture_output=True)
    return image


def remove_images_of_this_run():
    """Remove the images tagged with this run's IMAGE_TAG, by exact name (never "latest")."""
    if IMAGE_TAG == "latest":
        return
    names = docker("images", "--format", "{{.Repository}}:{{.Tag}}").split()
    for name in names:
        if name.startswith(IMAGE_PREFIX) and name.endswith(":" + IMAGE_TAG):
            subprocess.run(["docker", "rmi", name], capture_output=True)


def _image_id(image):
    return docker("image", "inspect", "--format", "{{.Id}}", image).strip()


FAILING_TAR = b"echo 'tar: simulated failure' >&2; return 2"
HANGING_TAR = b"exec sleep 600"


def mountpoint(volume):
    """The volume's folder on this host (tests run as root and may read it)."""
    return docker("volume", "inspect", "--format", "{{.Mountpoint}}", volume).strip()


def fill_volume(volume, source):
    """Copy a host tree into a volume through docker, keeping owners, modes and mtimes."""
    container = docker("create", "--network", "none", "-v", volume + ":/volume",
                       HELPER_IMAGE, "true").strip()
    try:
        docker("cp", "-a", str(source) + "/.", container + ":/volume")
    finally:
        docker("rm", "-f", container)


def volume_state(volume):
    return tree_state(mountpoint(volume))


def volume_exists(volume):
    return volume in docker("volume", "ls", "--format", "{{.Name}}").split()


# --- trees ------------------------------------------------------------------

def _write(path, data, mode=0o644, owner=None, mtime=T0):
    with open(path, "wb") as file:
        file.write(data)
    if owner:
        os.chown(path, *owner)
    os.chmod(path, mode)  # after chown, which clears setuid
    os.utime(path, (mtime, mtime))


def make_tricky_tree(root, big=3 * 1024 * 1024 + 17):
    """Fill ``root`` with what backups get wrong; give it. Needs root for the owners."""
    root = os.fsencode(str(root))
    join = lambda *parts: os.path.join(root, *parts)  # noqa: E731
    os.makedirs(join(b"app", b"backend", b"data"))
    os.makedirs(join(b".hidden-dir", b"inner"))
    os.makedirs(join(b"empty-dir"))
    os.makedirs(join(b"owned-dir"))
    _write(join(b"app", b"backend", b"data", b"webui.db"), b"SQLite format 3\0" + bytes(5000))
    _write(join(b".env"), b"TOKEN=secret\n", 0o600)
    _write(join(b".hidden-dir", b"inner", b".dotfile"), b"hidden\n")
    _write(join(b"setuid-tool"), b"#!/bin/sh\n", 0o4755, owner=(OTHER_UID, OTHER_GID))
    _write(join(b"setgid-sticky"), b"x", 0o3750)
    _write(join(b"private"), b"only me", 0o600)
    _write(join(b"other-owner"), b"theirs", 0o640, owner=(OTHER_UID, OTHER_GID))
    _write(join(b"big.bin"), os.urandom(big))
    _write(join(b"hard-a"), b"same inode")
    os.link(join(b"hard-a"), join(b"app", b"hard-b"))
    _write(join(b"bad-\xff\xfe-name"), b"not utf-8")
    _write(join(b"new\nline and space"), b"odd")
    _write(join(b" leading space"), b"odd2")
    long_name = b"L" * 150
    _write(join(long_name), b"long")
    deep = join(b"d" * 90, b"e" * 90, b"f" * 90)
    os.makedirs(deep)
    _write(os.path.join(deep, b"g" * 120), b"deep and long")
    os.symlink(b"app/backend/data/webui.db", join(b"link-relative"))
    os.symlink(b"/app/backend/data", join(b"link-absolute"))
    os.symlink(b"does/not/exist", join(b"link-dangling"))
    os.symlink(b"../hard-a", join(b"app", b"link-up"))
    os.lchown(join(b"link-relative"), SYMLINK_UID, SYMLINK_GID)
    os.mkfifo(join(b"fifo"), 0o620)
    os.chown(join(b"owned-dir"), OTHER_UID, OTHER_GID)
    os.chmod(join(b"owned-dir"), 0o2770)
    for index, name in enumerate([b"link-relative", b"link-absolute", b"link-dangling",
                                  os.path.join(b"app", b"link-up")]):
        os.utime(join(name), (T0 + index, T0 + index), follow_symlinks=False)
    os.utime(join(b"fifo"), (T0 - 5, T0 - 5))
    # Folders last, deepest first: creating entries changes a folder's mtime.
    for folder, _, _ in sorted(os.walk(root), key=lambda item: -len(item[0])):
        offset = len(folder)
        os.utime(folder, (T0 - offset, T0 - offset))
    return root


def tree_state(root):
    """Give ``{relative path: (kind, mode, uid, gid, mtime, payload, hard-link group)}``.

    mtime is in whole seconds (what tar keeps). payload is the SHA-256 of a
    file or a symlink's target. The hard-link group lists every path of the
    inode, so link structure is compared too.
    """
    root = os.fsencode(str(root))
    inodes = {}
    entries = {}
    for folder, folders, files in os.walk(root):
        names = [folder] if folder == root else []
        names += [os.path.join(folder, name) for name in folders + files]
        for path in names:
            status = os.lstat(path)
            relative = os.path.relpath(path, root)
            mode = status.st_mode
            if stat.S_ISREG(mode):
                with open(path, "rb") as file:
                    payload = hashlib.sha256(file.read()).hexdigest()
                kind = "file"
                inodes.setdefault(status.st_ino, []).append(relative)
            elif stat.S_ISLNK(mode):
                kind, payload = "symlink", os.readlink(path)
            elif stat.S_ISDIR(mode):
                kind, payload = "dir", None
            elif stat.S_ISFIFO(mode):
                kind, payload = "fifo", None
            else:
                kind, payload = "other", None
            entries[relative] = [kind, oct(stat.S_IMODE(mode)), status.st_uid, status.st_gid,
                                 int(status.st_mtime), payload, status.st_ino]
    for relative, entry in entries.items():
        group = inodes.get(entry[6]) if entry[0] == "file" else None
        entry[6] = tuple(sorted(group)) if group and len(group) > 1 else None
        entries[relative] = tuple(entry)
    return entries


def archive_manifest(path):
    """Give ``{member name: (type, mode, uid, gid, mtime, size, link, SHA-256 of data)}`` of an
    archive, as Python's tarfile reads it."""
    import tarfile
    entries = {}
    with tarfile.open(path) as archive:
        for member in archive:
            data = archive.extractfile(member).read() if member.isfile() else b""
            entries[member.name] = (member.type, member.mode, member.uid, member.gid,
                                    member.mtime, member.size, member.linkname,
                                    hashlib.sha256(data).hexdigest())
    return entries


def without_root_mtime(state):
    """The state without the root folder's mtime (``docker cp`` cannot set it)."""
    state = dict(state)
    kind, mode, uid, gid, _, payload, group = state[b"."]
    state[b"."] = (kind, mode, uid, gid, None, payload, group)
    return state


def start_app_container(volume, name):
    """A running container that mounts ``volume`` and logs each start to /data/starts."""
    docker("run", "-d", "--init", "--name", name, "--network", "none", "-v", volume + ":/data",
           HELPER_IMAGE, "sh", "-c", "echo started >> /data/starts; exec sleep 100000")
    return name


HANG_CEILING = 300  # seconds: only a guard against a hang, never a claim about speed


def wait_for(condition, what, ceiling=HANG_CEILING):
    """Wait until ``condition()`` is true: the event itself (a file, a container state), never a
    fixed sleep standing in for it. The ceiling only turns a hang into a failure."""
    deadline = time.monotonic() + ceiling
    while not condition():
        assert time.monotonic() < deadline, "never happened: " + what
        time.sleep(0.05)


def started_at(name):
    """When the container ``name`` last started (docker's own timestamp)."""
    return docker("container", "inspect", "--format", "{{.State.StartedAt}}", name).strip()


def container_running(name):
    return docker("container", "inspect", "--format", "{{.State.Running}}", name).strip() == "true"


def starts(volume):
    try:
        with open(os.path.join(mountpoint(volume), "starts")) as file:
            return len(file.read().splitlines())
    except FileNotFoundError:  # the app has not written its first line yet
        return 0


def helper_containers(volume):
    """Names of the tool's helper containers that still exist and mount ``volume``.

    Only ever the test's own volume: a real backup may run on the same host.
    """
    return docker("ps", "-a", "--filter", "label=ai-stack-backup.helper",
                  "--filter", "volume=" + volume, "--format", "{{.Names}}").split()


# --- an app that writes SQLite ----------------------------------------------------

APP_IMAGE = IMAGE_PREFIX + "app:" + IMAGE_TAG
# The tests' own cache (dev/build-rootfs.sh): ~/.cache/ai-stack-backup is the tool's work
# folder on an operator's host, which a test run must not fill.
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                     "ai-stack-backup-test")
APP_ROOTFS = os.path.join(CACHE, "app-rootfs.tar")
ACCOUNTS = 3000

# Moves money between two random accounts per transaction, forever: every committed state
# has balances summing to zero, and a copy made of pages from different transactions
# almost never has. The filler makes the file a few MB, so a copy takes long enough for
# transactions to land in the middle of it. synchronous=OFF only makes it write faster;
# it changes nothing for a copy. Once a second it prints the longest a commit took.
WRITER = r'''
import random, sqlite3, sys, time
path, mode, accounts = sys.argv[1], sys.argv[2], int(sys.argv[3])
db = sqlite3.connect(path, isolation_level=None, timeout=60)
db.execute("PRAGMA journal_mode=" + mode)
db.execute("PRAGMA synchronous=OFF")
if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'account'").fetchone():
    db.execute("BEGIN")
    db.execute("CREATE TABLE account (id INTEGER PRIMARY KEY, balance INTEGER, filler BLOB)")
    db.execute("CREATE TABLE meta (commits INTEGER)")
    db.execute("INSERT INTO meta VALUES (0)")
    db.executemany("INSERT INTO account VALUES (?, 0, randomblob(1000))",
                   [(number,) for number in range(accounts)])
    db.execute("COMMIT")
rng = random.Random()
longest, shown = 0.0, time.monotonic()
print("ready", flush=True)
while True:
    one, other, amount = rng.randrange(accounts), rng.randrange(accounts), rng.randrange(1, 999)
    started = time.monotonic()
    db.execute("BEGIN IMMEDIATE")
    db.execute("UPDATE account SET balance = balance - ?, filler = randomblob(1000) "
               "WHERE id = ?", (amount, one))
    db.execute("UPDATE account SET balance = balance + ?, filler = randomblob(1000) "
               "WHERE id = ?", (amount, other))
    db.execute("UPDATE meta SET commits = commits + 1")
    db.execute("COMMIT")
    now = time.monotonic()
    longest = max(longest, now - started)
    if now - shown >= 1:
        print("longest-commit-ms %d" % (longest * 1000), flush=True)
        longest, shown = 0.0, now
'''


def build_app_image():
    """Import the app image (Debian minbase with python3) from the cached rootfs tarball."""
    if subprocess.run(["docker", "image", "inspect", APP_IMAGE],
                      capture_output=True).returncode == 0:
        return APP_IMAGE
    docker("import", rootfs("app", "python3"), APP_IMAGE)
    return APP_IMAGE


def rootfs(name, packages):
    """The cached rootfs tarball ``name`` (a minimal Debian with ``packages``), built if missing."""
    tarball = os.path.join(CACHE, "%s-rootfs.tar" % name)
    if not os.path.exists(tarball):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build-rootfs.sh")
        subprocess.run(["sh", script, name, packages, tarball], check=True,
                       stdout=subprocess.DEVNULL)
    return tarball


def start_sqlite_writer(volume, name, journal_mode, extra=()):
    """Run the writer against ``/data/app.db`` in ``volume``; wait until it writes."""
    docker("run", "-d", "--name", name, "--network", "none", "-v", volume + ":/data",
           *extra, APP_IMAGE, "python3", "-c", WRITER, "/data/app.db", journal_mode,
           str(ACCOUNTS))
    for _ in range(300):
        if "ready" in docker("logs", name):
            return name
        time.sleep(0.1)
    raise AssertionError("the writer in %s did not start: %s" % (name, docker("logs", name)))


def commits(volume):
    """The writer's committed transactions so far, read from the live database."""
    import sqlite3
    uri = "file:%s?mode=ro" % os.path.join(mountpoint(volume), "app.db")
    connection = sqlite3.connect(uri, uri=True, timeout=60)
    try:
        return connection.execute("SELECT commits FROM meta").fetchone()[0]
    finally:
        connection.close()


def commit_times_ms(name):
    """The writer's longest commit of each second so far, in milliseconds, oldest first."""
    return [int(line.split()[1]) for line in docker("logs", name).splitlines()
            if line.startswith("longest-commit-ms ")]


def database_state(folder, name="app.db"):
    """Open a database extracted from an archive as an app would; give (problem, commits).

    ``problem`` is None for a committed state: integrity_check ok and the balances sum
    to zero over every account.
    """
    import sqlite3
    connection = sqlite3.connect(os.path.join(folder, name), timeout=5)
    try:
        check = connection.execute("PRAGMA integrity_check").fetchall()
        if check != [("ok",)]:
            return "integrity_check: %s" % check[:3], None
        total, count = connection.execute("SELECT sum(balance), count(*) FROM account").fetchone()
        done = connection.execute("SELECT commits FROM meta").fetchone()[0]
    except sqlite3.DatabaseError as error:
        return "unreadable: %s" % error, None
    finally:
        connection.close()
    if (total, count) != (0, ACCOUNTS):
        return "torn: balances sum to %s over %s accounts" % (total, count), done
    return None, done


# --- backup folders -----------------------------------------------------------------

def next_second():
    """Sleep into the next whole second: archive names (and ctimes) have whole seconds."""
    time.sleep(1.05 - time.time() % 1)


def archives_in(folder):
    """The archives (``*.tar.gz``) directly in ``folder``, as full paths, oldest name first."""
    return sorted(os.path.join(str(folder), name) for name in os.listdir(str(folder))
                  if name.endswith(".tar.gz"))


def only_archive(folder):
    """The one archive in ``folder``; its ``.sha256`` must be beside it."""
    archives = archives_in(folder)
    assert len(archives) == 1, os.listdir(str(folder))
    assert os.path.isfile(archives[0] + ".sha256"), os.listdir(str(folder))
    return archives[0]
