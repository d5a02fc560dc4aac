"""The one gateway to the docker CLI: queries, volume changes, stopped containers, helpers.

Every call goes through ``run_docker`` (argument lists, explicit return-code
checks, the tail of stderr in the error, timeouts) or ``Helper`` (a
short-lived container of the helper image, started with the same rules).
Output is parsed from ``--format '{{json .}}'``. What a helper does with the
data it moves is the transfer protocol, in ``transfer``.
"""

import collections
import contextlib
import csv
import io
import json
import os
import re
import secrets
import subprocess
import threading
import time

from .errors import BackupError, ContainerWouldVanish, DockerError, EngineUnavailable, \
    VolumeMissing

QUERY_TIMEOUT = 60  # seconds for inspect/ls/ps: the engine answers these at once or is broken
CHANGE_TIMEOUT = 180  # docker stop waits up to 10 s per container, start can be slow
PULL_TIMEOUT = 600
STDERR_TAIL_LINES = 20
STDERR_KEEP_LINES = 1000  # enough to judge every line of a helper's stderr, bounded
HELPER_EXIT_GRACE = 10  # seconds for a helper whose stream already ended to report its exit

HELPER_LABEL = "ai-stack-backup.helper"
VOLUME_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # what the engine accepts

# Wraps every helper script. The script runs in the background; the watchdog
# reads the container's stdin, which is our pipe: when our process dies (even
# by SIGKILL) the pipe closes, the watchdog kills the script's processes and
# the container ends, so no helper outlives us. A non-interactive shell gives
# background jobs /dev/null as stdin, hence the copy on fd 3.
_WATCHDOG = """exec 3<&0 0</dev/null
( cat <&3 >/dev/null 2>&1; kill -TERM 0 2>/dev/null ) &
(
{script}
) &
wait $!
"""


def _tail(data):
    lines = data.decode("utf-8", "replace").strip().splitlines()
    return " / ".join(lines[-STDERR_TAIL_LINES:]) or "no error output"


def run_docker(arguments, what, timeout=QUERY_TIMEOUT):
    """Run ``docker <arguments>``; give its stdout as text.

    ``what`` says what failed for the error message. Raises EngineUnavailable
    when docker is missing, DockerError when it times out or exits non-zero
    (``detail``: the tail of its stderr).
    """
    command = ["docker"] + list(arguments)
    try:
        # A session of its own: Ctrl-C reaches only us, and our cleanup decides.
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
    except FileNotFoundError:
        raise EngineUnavailable(what, "the docker command was not found in PATH")
    with process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise DockerError(what, "'docker %s' did not finish within %d seconds"
                              % (arguments[0], timeout))
        except BaseException:
            process.kill()
            raise
    if process.returncode != 0:
        raise DockerError(what, _tail(stderr))
    return stdout.decode("utf-8", "replace")


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def check_volume_name(volume):
    """Raise BackupError unless ``volume`` is a valid Docker volume name.

    Refusing anything else also keeps a host path (``/etc``) from ever being
    handed to ``docker run`` as a bind mount.
    """
    if not VOLUME_NAME_PATTERN.fullmatch(volume):
        raise BackupError("%r is not a valid Docker volume name" % volume)


def volume_exists(volume):
    """Give True when the volume exists; raises BackupError when the engine cannot be asked."""
    listing = run_docker(["volume", "ls", "--filter", "name=" + volume, "--format", "{{json .}}"],
                         "cannot list Docker volumes")
    return any(entry.get("Name") == volume for entry in _json_lines(listing))


def create_volume(volume, labels=None):
    """Create ``volume`` with ``labels`` ({key: value})."""
    arguments = ["volume", "create"]
    for key, value in sorted((labels or {}).items()):
        arguments += ["--label", "%s=%s" % (key, value)]
    run_docker(arguments + [volume], "cannot create volume %s" % volume)


def volumes_labelled(key):
    """Give ``{name: value of label key}`` of the volumes that carry the label ``key``."""
    listing = run_docker(["volume", "ls", "--filter", "label=" + key, "--format", "{{json .}}"],
                         "cannot list Docker volumes")
    found = {}
    for entry in _json_lines(listing):
        labels = dict(pair.partition("=")[::2] for pair in entry.get("Labels", "").split(",")
                      if pair)
        found[entry.get("Name", "")] = labels.get(key, "")
    return found


def remove_volume(volume):
    run_docker(["volume", "rm", volume], "cannot remove volume %s" % volume)


def ensure_image(image, reporter):
    """Make sure the helper image is present, pulling it once if it is not; raises DockerError."""
    try:
        run_docker(["image", "inspect", "--format", "{{json .Id}}", image], "image check")
        return
    except EngineUnavailable:
        raise
    except DockerError:
        pass
    reporter.log("helper image %s is not present; pulling it" % image)
    try:
        run_docker(["pull", image], "pull", timeout=PULL_TIMEOUT)
    except DockerError as error:
        raise DockerError("helper image %s is not available" % image,
                          "it could not be pulled (%s); pull it on a connected host or set "
                          "BACKUP_HELPER_IMAGE to a local image with busybox tar" % error.detail)


COMPOSE_PROJECT_LABEL = "com.docker.compose.project"


class Container:
    """A running container: id, name, the image it runs (id), whether it has ``--rm``, when
    it was started (the engine's RFC 3339 text, which sorts by time) and its compose
    project ("" if none)."""

    def __init__(self, identifier, name, image, auto_remove, started_at="", project=""):
        self.id, self.name, self.image, self.auto_remove = identifier, name, image, auto_remove
        self.started_at, self.project = started_at, project


def containers_using_volume(volume, own_helper=None):
    """Give the running containers that mount the volume, as Container objects (not
    ``own_helper``, the caller's own Helper)."""
    listing = run_docker(["ps", "--filter", "volume=" + volume, "--format", "{{json .}}"],
                         "cannot list containers using volume %s" % volume)
    identifiers = [entry["ID"] for entry in _json_lines(listing)
                   if own_helper is None or entry.get("Names") != own_helper.name]
    if not identifiers:
        return []
    details = run_docker(["container", "inspect", "--format", "{{json .}}"] + identifiers,
                         "cannot inspect containers using volume %s" % volume)
    users = []
    for detail in _json_lines(details):
        # The ps filter also matches mount destinations; keep only real mounts of this volume.
        if any(mount.get("Type") == "volume" and mount.get("Name") == volume
               for mount in detail.get("Mounts") or []):
            labels = (detail.get("Config") or {}).get("Labels") or {}
            users.append(Container(detail["Id"], detail.get("Name", detail["Id"]).lstrip("/"),
                                   detail.get("Image", ""),
                                   bool((detail.get("HostConfig") or {}).get("AutoRemove")),
                                   (detail.get("State") or {}).get("StartedAt", ""),
                                   labels.get(COMPOSE_PROJECT_LABEL, "")))
    return users


def require_volume(volume, what):
    """Raise VolumeMissing unless the volume exists; nothing is ever created by a backup."""
    if not volume_exists(volume):
        raise VolumeMissing("volume %s does not exist; nothing was %s (check the name with "
                            "'docker volume ls')" % (volume, what))


class Pause:
    """The containers a ``containers_stopped`` block stopped and for how long (seconds)."""

    def __init__(self):
        self.names = []
        self.seconds = 0.0

    def describe(self):
        if not self.names:
            return "no running container used it"
        return "stopped %s for %.1f s" % (", ".join(self.names), self.seconds)


def containers_stopped(volume, reporter, containers=None):
    """Stop the running containers that mount ``volume``; start exactly those again on exit
    (``stopped``). ``containers``: those already looked up."""
    if containers is None:
        containers = containers_using_volume(volume)
    return stopped(containers, "volume %s" % volume, reporter)


@contextlib.contextmanager
def stopped(containers, what, reporter):
    """Stop ``containers`` (they use ``what``, in words) in that order; start exactly those
    again on exit, in the reverse order.

    Gives a Pause that holds, on exit, how long the first was down until the
    last was up again. They are started again whatever happens inside, also
    on SIGTERM/SIGINT. A container started with ``--rm`` would be removed by
    the stop, so it is refused (ContainerWouldVanish) before anything stops.
    A container that will not start again is reported; the error is raised
    unless another one is already on its way out.
    """
    removable = [container.name for container in containers if container.auto_remove]
    if removable:
        raise ContainerWouldVanish(
            "%s is used by container(s) %s, started with --rm (AutoRemove): stopping "
            "would remove them, so none was stopped and nothing was done; recreate them without "
            "--rm, or back this volume up with another consistency mode (sqlite or live)"
            % (what, " ".join(removable)), removable)
    pause = Pause()
    stopped = []
    failure = None
    started = time.monotonic()
    try:
        for container in containers:
            reporter.log("stopping container %s (it uses %s)" % (container.name, what))
            run_docker(["stop", container.id], "cannot stop container %s" % container.name,
                       timeout=CHANGE_TIMEOUT)
            stopped.append(container)
            pause.names.append(container.name)
        yield pause
    finally:
        problems = []
        for container in reversed(stopped):
            reporter.log("starting container %s again" % container.name)
            try:
                run_docker(["start", container.id],
                           "cannot start container %s again" % container.name,
                           timeout=CHANGE_TIMEOUT)
            except BackupError as error:
                reporter.error("%s; start it with: docker start %s" % (error, container.name))
                problems.append(str(error))
        pause.seconds = time.monotonic() - started if stopped else 0.0
        if problems:
            failure = DockerError("containers using %s did not start again" % what,
                                  "; ".join(problems))
    if failure is not None:
        raise failure


# --- the helper container -----------------------------------------------------

def _mount_option(**fields):
    """Give a ``--mount`` value; fields are CSV-quoted so commas or colons in paths are safe."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(
        ["%s=%s" % (key, value) if value is not True else key for key, value in fields.items()])
    return buffer.getvalue()


class Helper:
    """A running helper container: ``sh`` with ``script`` under the stdin watchdog.

    The volume is mounted at ``/volume`` (read-only if asked), the folder
    ``transfer_path`` (if given) at ``/transfer``. With ``capture_stdout`` the
    container's stdout is readable at ``stdout_fd``. ``command`` runs another
    program instead of ``sh`` (``["python3", "-c", …]``); it must end by
    itself when its stdin closes, as the watchdog does. Use as a context
    manager: leaving it kills the container if it still runs.
    """

    def __init__(self, image, volume, script=None, read_only=False, transfer_path=None,
                 capture_stdout=False, command=None):
        self.name = "ai-stack-backup-%d-%s" % (os.getpid(), secrets.token_hex(4))
        volume_mount = {"type": "volume", "source": volume, "target": "/volume",
                        # An empty volume would otherwise get the image's /volume copied
                        # into it, its root folder's owner and mode included.
                        "volume-nocopy": True}
        if read_only:
            volume_mount["readonly"] = True
        arguments = ["run", "-i", "--rm", "--name", self.name, "--label", HELPER_LABEL + "=1",
                     "--network", "none", "--log-driver", "none",
                     "--security-opt", "no-new-privileges",
                     "--mount", _mount_option(**volume_mount)]
        if transfer_path is not None:
            arguments += ["--mount", _mount_option(type="bind", source=transfer_path,
                                                   target="/transfer")]
        if command is None:
            command = ["sh", "-euc", _WATCHDOG.replace("{script}", script)]
        # Root inside: it must read every file, whatever user the image defaults to.
        arguments += ["--user", "0:0", "--entrypoint", command[0], image] + list(command[1:])
        self._stderr = collections.deque(maxlen=STDERR_KEEP_LINES)
        self.stderr_lines = 0
        try:
            self.process = subprocess.Popen(
                ["docker"] + arguments, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True)
        except FileNotFoundError:
            raise EngineUnavailable("cannot start the helper container",
                                    "the docker command was not found in PATH")
        self.stdout_fd = self.process.stdout.fileno() if capture_stdout else None
        self._stderr_reader = threading.Thread(target=self._collect_stderr, daemon=True)
        self._stderr_reader.start()

    def _collect_stderr(self):
        for line in self.process.stderr:
            self.stderr_lines += 1
            self._stderr.append(line.decode("utf-8", "replace").rstrip("\n"))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def running(self):
        return self.process.poll() is None

    def read_output(self):
        """Give everything the helper writes to stdout, up to its end (``capture_stdout``)."""
        pieces = []
        while True:
            piece = os.read(self.stdout_fd, 1 << 16)
            if not piece:
                return b"".join(pieces)
            pieces.append(piece)

    def error_output(self):
        """Give the helper's last stderr lines in one string."""
        self._stderr_reader.join(timeout=5)
        return " / ".join(list(self._stderr)[-STDERR_TAIL_LINES:]) or "no error output"

    def warnings(self):
        """Give every stderr line, or None when there were too many to keep them all."""
        self._stderr_reader.join(timeout=5)
        return list(self._stderr) if self.stderr_lines <= STDERR_KEEP_LINES else None

    def wait(self, timeout=None):
        """Wait for the container to end; give its exit code (None if ``timeout`` ran out)."""
        try:
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._stderr_reader.join(timeout=5)
        return returncode

    def failed(self, what, returncode=None):
        """Give the DockerError for a helper that ended with ``returncode`` (default: its own)."""
        if returncode is None:
            returncode = self.wait(timeout=HELPER_EXIT_GRACE)
        return DockerError("%s failed" % what, "the helper exited with %s: %s"
                           % (returncode, self.error_output()))

    def finish(self, what, reporter):
        """Wait for the helper to end; raise DockerError naming ``what`` unless it exited 0.

        What it printed on stderr (busybox's warnings) is passed on as warnings.
        """
        returncode = self.wait()
        if returncode != 0:
            raise self.failed(what, returncode)
        lines = self.warnings()
        for line in [self.error_output()] if lines is None else lines:
            reporter.warn("%s: %s" % (what, line))

    def kill(self):
        """Kill the container now, from any thread; the owner still leaves the block."""
        with contextlib.suppress(BackupError):
            run_docker(["kill", self.name], "cannot kill helper %s" % self.name)

    def stop(self):
        """Kill the container if it still runs and reap the docker client."""
        if self.process.poll() is None:
            with contextlib.suppress(BackupError):
                run_docker(["kill", self.name], "cannot kill helper %s" % self.name)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._stderr_reader.join(timeout=5)
        if self.process.stderr is not None:
            self.process.stderr.close()
