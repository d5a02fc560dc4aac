"""Off-host copies: the operator's own copy command, after encryption with age or gpg.

verified archive → encrypt (age | gpg) into a private folder → .sha256 of that file →
``sh -c "$OFFSITE_COMMAND" offsite FILE SOURCE`` for the file, then for its .sha256 → remove

Besides ``docker``, the only module that starts processes: the operator's
command and the encryption tool, each in a session of its own, stdin closed,
error output into an unnamed file (not a pipe: a child that outlives the
command would hold a pipe open and keep the run waiting). At the deadline
every process the command started is ended: its process group, its session,
its descendants, and those that left all three (we are their subreaper, so
they become our children). Nothing secret reaches a log: the command is shown
by its executable's plain name only (never ``VAR=value`` words), its error
output with ``mask_secrets``, and recipients and identities never.
"""

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time

from .errors import BackupError, ConfigError
from .files import CHECKSUM_SUFFIX, WORK_PREFIX, file_sha256

DEFAULT_TIMEOUT = 3600
TOOLS = {"age": ("age", ".age"), "gpg": ("gnupg", ".gpg")}  # tool: (Debian package, suffix)
ERROR_TAIL = 3
_SECRET_WORD = r"[A-Za-z0-9_.-]*(?:passw(?:or)?d|pass|secret|token|key|credential|auth)" \
               r"[A-Za-z0-9_.-]*"
_MASKS = (
    # URL userinfo: scheme://user:password@host
    (re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@"), r"\1***@"),
    # URL query strings: ?token=…&sig=…
    (re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#]*)\?[^\s#]*"), r"\1?***"),
    # Authorization: Bearer value
    (re.compile(r"(?i)\b(bearer|basic)\s+(?!\*\*\*)[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    # NAME=value, AWS_SECRET_ACCESS_KEY=…, x-api-key: value, "token": "value"
    (re.compile(r"(?i)(%s\"?\s*[=:]\s*)(?!\*\*\*)(\"[^\"]*\"|'[^']*'|[^\s,;&]+)" % _SECRET_WORD),
     r"\1***"),
    # --password value, -token value
    (re.compile(r"(?i)((?:^|\s)--?%s\s+)(?!\*\*\*)\S+" % _SECRET_WORD), r"\1***"),
)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9._+-]{1,40}")
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


class OffsiteFailed(BackupError):
    """The off-host copy of one archive did not get through."""


def mask_secrets(text):
    """Give ``text`` with what may be secret masked: URL credentials and query strings,
    ``…KEY=``/``…_TOKEN=``/``…SECRET…=``/``password=`` values (and ``: `` forms), values after
    ``--password``-like flags, and bearer tokens."""
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text


class Settings:
    """The off-host copy settings of backup_all; ``command`` "" means off."""

    def __init__(self, command="", tool=None, recipients=(), timeout=DEFAULT_TIMEOUT,
                 identity=""):
        self.command, self.tool, self.recipients = command, tool, list(recipients)
        self.timeout, self.identity = timeout, identity

    @property
    def name(self):
        """The command's name, all that logs ever show of it: the executable's base name
        after any ``VAR=value`` words (and ``env``), if it is a plain word; else
        ``OFFSITE_COMMAND``."""
        try:
            words = shlex.split(self.command)
        except ValueError:
            words = self.command.split()
        words = [word for word in words if not _ASSIGNMENT.match(word)]
        while words and words[0] in ("env", "exec", "command"):
            words = [word for word in words[1:] if not word.startswith("-")]
        name = os.path.basename(words[0]) if words else ""
        return name if _PLAIN_NAME.fullmatch(name) else "OFFSITE_COMMAND"

    def describe(self):
        return "encrypted with %s" % self.tool if self.tool else "unencrypted"


def parse_encrypt(text):
    """Give ``(tool, recipients)`` of OFFSITE_ENCRYPT (``age:R[,R…]`` or ``gpg:KEYID``)."""
    tool, colon, rest = text.partition(":")
    recipients = [word for word in re.split(r"[\s,]+", rest) if word] if colon else []
    if tool not in TOOLS or not recipients:
        raise ConfigError("OFFSITE_ENCRYPT must be age:RECIPIENT[,RECIPIENT…] (age public keys "
                          "or a recipients file) or gpg:KEYID")
    if tool == "gpg" and len(recipients) != 1:
        raise ConfigError("OFFSITE_ENCRYPT: gpg takes one KEYID")
    return tool, recipients


def _run(command, what, deadline, work_folder):
    """Run ``command`` (a list) until ``deadline`` (monotonic); raise OffsiteFailed naming
    ``what``, with the masked tail of its error output, unless it exits 0."""
    _become_subreaper()
    before = _children(_process_table())
    with tempfile.TemporaryFile(dir=work_folder) as errors:
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=errors,
                                       start_new_session=True)
        except OSError as error:
            raise OffsiteFailed("%s could not start: %s" % (what, error.strerror))
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _end_everything(process, before)
            raise OffsiteFailed("%s did not finish in time (OFFSITE_TIMEOUT); stopped it and "
                                "every process it started" % what)
        except BaseException:
            _end_everything(process, before)
            raise
        if process.returncode != 0:
            errors.seek(max(0, errors.seek(0, os.SEEK_END) - 8192))
            lines = errors.read().decode("utf-8", "replace").strip().splitlines()[-ERROR_TAIL:]
            raise OffsiteFailed("%s exited with %d: %s" % (
                what, process.returncode, mask_secrets(" / ".join(lines)) or "no error output"))


_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper():
    """Make orphaned descendants our children instead of init's, so that a process that left
    the command's group and session can still be found and ended (best effort)."""
    with contextlib.suppress(Exception):
        import ctypes  # here only: no other command needs it
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _process_table():
    """Give ``{pid: (ppid, process group, session)}`` of the processes we can see."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open("/proc/%s/stat" % name, "rb") as file:
                fields = file.read().rsplit(b")", 1)[1].split()
            if fields[0] != b"Z":
                table[int(name)] = (int(fields[1]), int(fields[2]), int(fields[3]))
    return table


def _children(table):
    return {pid for pid, (parent, _, _) in table.items() if parent == os.getpid()}


def _end_everything(process, before):
    """Kill ``process`` and all it started: its group, its session, its descendants and our
    new children (orphans it left, which came to us as subreaper); wait until they are gone
    (a few seconds at most), reaping those that are ours."""
    for _ in range(5):  # a dying parent may hand on a child between two looks
        table = _process_table()
        doomed = {pid for pid, (_, group, session) in table.items()
                  if process.pid in (group, session)}
        roots = {process.pid} | (_children(table) - before)
        while roots:
            doomed |= roots
            roots = {pid for pid, (parent, _, _) in table.items()
                     if parent in roots and pid not in doomed}
        doomed &= set(table)
        if not doomed:
            break
        for pid in doomed:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(doomed - {process.pid}, time.monotonic() + KILL_GRACE)
        process.wait()
    process.wait()


KILL_GRACE = 5.0  # seconds for killed processes to be gone; a D-state one is left behind


def _wait_gone(pids, deadline):
    """Wait until each of ``pids`` has ended (gone, or a zombie: then reaped if ours)."""
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            with contextlib.suppress(OSError):  # not our child: its own parent reaps it
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    pending.discard(pid)
                    continue
            try:
                with open("/proc/%d/stat" % pid, "rb") as file:
                    ended = file.read().rsplit(b")", 1)[1].split()[0] == b"Z"
            except (OSError, IndexError):
                ended = True
            if ended:
                pending.discard(pid)
        if pending:
            time.sleep(0.01)


def _kill_group(process):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


def _require(tool):
    if shutil.which(tool) is None:
        raise OffsiteFailed("%s is not installed; install the Debian package %s "
                            "(apt install %s)" % (tool, TOOLS[tool][0], TOOLS[tool][0]))


def _encrypt_command(settings, archive, output):
    if settings.tool == "age":
        command = ["age", "--encrypt", "--output", output]
        for recipient in settings.recipients:
            command += ["--recipients-file" if os.path.isfile(recipient) else "--recipient",
                        recipient]
        return command + [archive]
    return ["gpg", "--batch", "--yes", "--no-tty", "--trust-model", "always",
            "--recipient", settings.recipients[0], "--output", output, "--encrypt", archive]


@contextlib.contextmanager
def private_folder(work_folder):
    """A fresh 0700 folder in ``work_folder`` for an encrypted copy or decrypted archives,
    flocked so no cleanup takes it meanwhile; removed on exit."""
    path = tempfile.mkdtemp(prefix=WORK_PREFIX + "offsite-", dir=work_folder)
    lock = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(lock)


def send(archive, source, settings, work_folder):
    """Copy ``archive`` of ``source`` off the host; give what was sent, in words.

    Encrypted (``settings.tool``), the command gets ``<archive name>.age`` (or
    ``.gpg``) from a private folder and then its ``.sha256`` (the checksum of
    the encrypted file); unencrypted, the archive and its own ``.sha256``.
    Raises OffsiteFailed.
    """
    deadline = time.monotonic() + settings.timeout
    name = settings.name
    with contextlib.ExitStack() as stack:
        if settings.tool:
            _require(settings.tool)
            folder = stack.enter_context(private_folder(work_folder))
            sent = os.path.join(folder, os.path.basename(archive) + TOOLS[settings.tool][1])
            _run(_encrypt_command(settings, archive, sent),
                 "encrypting %s with %s" % (os.path.basename(archive), settings.tool), deadline,
                 folder)
            with open(sent + CHECKSUM_SUFFIX, "w") as file:
                file.write("%s  %s\n" % (file_sha256(sent), os.path.basename(sent)))
        else:
            sent = archive
        files = [sent] + ([sent + CHECKSUM_SUFFIX] if os.path.exists(sent + CHECKSUM_SUFFIX)
                          else [])
        for path in files:
            _run(["sh", "-c", settings.command, "offsite", path, source],
                 "the copy command %s (for %s)" % (name, os.path.basename(path)), deadline,
                 work_folder)
    return "%s sent by %s (%s)" % (" and ".join(os.path.basename(path) for path in files), name,
                                   settings.describe())


def is_encrypted(path):
    return path.endswith(tuple(suffix for _, suffix in TOOLS.values()))


@contextlib.contextmanager
def decrypted(path, identity):
    """Give a binary stream of the archive inside the encrypted file ``path``.

    age needs ``identity`` (OFFSITE_IDENTITY, an age identity file); gpg asks
    its agent. Raises OffsiteFailed when the tool is missing or fails.
    """
    tool = "age" if path.endswith(".age") else "gpg"
    _require(tool)
    if tool == "age":
        if not identity:
            raise OffsiteFailed("set OFFSITE_IDENTITY to the age identity file that can "
                                "decrypt %s" % path)
        command = ["age", "--decrypt", "--identity", identity, path]
    else:
        command = ["gpg", "--batch", "--no-tty", "--decrypt", path]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)

    def failure():
        """The tool's own complaint, if it failed: it explains a stream that ended early."""
        stderr = process.stderr.read()
        if process.wait() == 0:
            return None
        lines = stderr.decode("utf-8", "replace").strip().splitlines()[-ERROR_TAIL:]
        return OffsiteFailed("decrypting %s with %s failed: %s" % (
            path, tool, mask_secrets(" / ".join(lines)) or "no error output"))
    try:
        try:
            yield process.stdout
        except BackupError:
            problem = failure()
            if problem is not None:
                raise problem
            raise
        process.stdout.read()  # whatever the reader left, so the tool can finish
        problem = failure()
        if problem is not None:
            raise problem
    finally:
        if process.poll() is None:
            _kill_group(process)
        process.stdout.close()
        process.stderr.close()


def decrypt_into(path, identity, destination):
    """Decrypt the off-host copy ``path`` into the new file ``destination`` (mode 0600, in a
    private folder); raises OffsiteFailed, or BackupError when it cannot be written."""
    try:
        descriptor = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600)
    except OSError as error:
        raise BackupError("cannot create %s: %s" % (destination, error.strerror))
    try:
        # An OSError leaves ``decrypted`` as it is, which ends the tool rather than wait
        # for it to finish writing into a pipe nobody reads any more.
        with os.fdopen(descriptor, "wb") as output, decrypted(path, identity) as plain:
            shutil.copyfileobj(plain, output, 1 << 20)
            output.flush()
            os.fsync(output.fileno())
    except OSError as error:
        raise BackupError("cannot write the decrypted %s into %s: %s"
                          % (os.path.basename(path), os.path.dirname(destination),
                             error.strerror))
