"""Configuration: the environment read once, at the edge, into one ``Config`` passed down.

Only ``Config.from_environment`` looks at the environment; nothing below the
command line reads ``os.environ``. backup_all's own variables (VOLUMES,
RETENTION_DAYS, …) are read only for backup_all, so a typo there never
stops a single backup or restore.
"""

import os
import re

from . import notify
from .errors import ConfigError
from .exclusions import Exclusions
from .names import safe_name
from .offsite import DEFAULT_TIMEOUT as DEFAULT_OFFSITE_TIMEOUT, Settings, parse_encrypt

DEFAULT_BACKUP_DIR = "/srv/ai-stack/backups"
DEFAULT_HELPER_IMAGE = "alpine:3.20"
DEFAULT_GZIP_LEVEL = 6
DEFAULT_OUTPUT_ROOT = "/home/wasti/ai_stack_data/transcript-miner/output"
DEFAULT_RETENTION_DAYS = 14
DEFAULT_MIN_KEEP = 3
DEFAULT_SHRINK_GUARD = 50  # percent of the previous archive's bytes or members
DEFAULT_RESTORE_MAX_SPREAD = 6 * 3600  # seconds between the archives of one recovery point
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# The runbook's five volumes; the first two keep their old variables.
OTHER_DEFAULT_VOLUMES = ("context6-data", "context6-cache", "qdrant-data")
# How a volume is captured: see volume.VolumeSource and the README's "Live databases".
CONSISTENCY_MODES = ("auto", "sqlite", "stop", "live")
TRUE_WORDS = ("1", "yes", "true", "on")
FALSE_WORDS = ("", "0", "no", "false", "off")


def default_threads():
    """Give the number of CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _setting(environ, name, default=""):
    return environ.get(name, "").strip() or default


def _whole_number(environ, name, default, minimum, maximum=None):
    raw = _setting(environ, name)
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < minimum or (maximum is not None and int(raw) > maximum):
        allowed = "from %d to %d" % (minimum, maximum) if maximum is not None \
            else "of at least %d" % minimum
        raise ConfigError("%s must be a whole number %s, not %r" % (name, allowed, raw))
    return int(raw)


def _duration(environ, name, default):
    """Read a duration in seconds: a whole number with the unit s, m, h or d (``6h``); a
    number alone means hours."""
    raw = _setting(environ, name).lower()
    if not raw:
        return default
    match = re.fullmatch(r"(\d+)\s*([smhd]?)", raw)
    if not match:
        raise ConfigError("%s must be a whole number with the unit s, m, h or d (like 6h or "
                          "90m), not %r" % (name, raw))
    return int(match.group(1)) * DURATION_UNITS[match.group(2) or "h"]


def consistency_mode(word, where):
    """Give ``word`` as a consistency mode; raises ConfigError naming ``where`` it came from."""
    if word not in CONSISTENCY_MODES:
        raise ConfigError("%s: %r is not a consistency mode (one of %s)"
                          % (where, word, ", ".join(CONSISTENCY_MODES)))
    return word


def _consistency(environ, stop_containers):
    """Parse BACKUP_CONSISTENCY: ``VOLUME=MODE`` entries and at most one bare default MODE.

    Gives ``(default, {volume: mode})``. STOP_CONTAINERS=1 makes ``stop`` the
    default unless BACKUP_CONSISTENCY names one.
    """
    default = "stop" if stop_containers else "auto"
    per_volume = {}
    bare = []
    for word in re.split(r"[\s,]+", _setting(environ, "BACKUP_CONSISTENCY")):
        if not word:
            continue
        volume, equals, mode = word.rpartition("=")
        if equals and not volume:
            raise ConfigError("BACKUP_CONSISTENCY: %r names no volume" % word)
        mode = consistency_mode(mode, "BACKUP_CONSISTENCY")
        if equals:
            per_volume[volume] = mode
        else:
            bare.append(mode)
    if len(bare) > 1:
        raise ConfigError("BACKUP_CONSISTENCY names more than one default mode: %s"
                          % " ".join(bare))
    return (bare[0] if bare else default), per_volume


def _exclusions(environ, sources):
    """Parse BACKUP_EXCLUDE: ``SOURCE:PATTERN`` entries; give ``{source: Exclusions}``.

    SOURCE is a configured volume, or OUTPUT_ROOT as a path or as its archive
    name; a source nobody backs up is an error, not a silent no-op.
    """
    patterns = {}
    for word in re.split(r"[\s,]+", _setting(environ, "BACKUP_EXCLUDE")):
        if not word:
            continue
        source, colon, pattern = word.partition(":")
        if not colon or not source or not pattern:
            raise ConfigError("BACKUP_EXCLUDE: %r is not SOURCE:PATTERN (e.g. owui-data:cache/)"
                              % word)
        if source not in sources:
            raise ConfigError("BACKUP_EXCLUDE: %r names %s, which backup_all does not back up "
                              "(sources: %s)" % (word, source, " ".join(sorted(sources))))
        patterns.setdefault(sources[source], []).append(pattern)
    try:
        return {source: Exclusions(found) for source, found in patterns.items()}
    except ConfigError as error:
        raise ConfigError("BACKUP_EXCLUDE: %s" % error)


def _offsite(environ):
    """Read OFFSITE_COMMAND and its settings; an unencrypted copy must be asked for."""
    command = _setting(environ, "OFFSITE_COMMAND")
    encrypt = _setting(environ, "OFFSITE_ENCRYPT")
    tool, recipients = parse_encrypt(encrypt) if encrypt else (None, [])
    if command and not tool and not _switch(environ, "OFFSITE_ALLOW_PLAINTEXT"):
        raise ConfigError("OFFSITE_COMMAND would send archives (tokens, databases) off the host "
                          "unencrypted: set OFFSITE_ENCRYPT=age:RECIPIENT or gpg:KEYID, or "
                          "OFFSITE_ALLOW_PLAINTEXT=1 if the target is trusted")
    return Settings(command, tool if command else None, recipients,
                    _whole_number(environ, "OFFSITE_TIMEOUT", DEFAULT_OFFSITE_TIMEOUT, 1),
                    _setting(environ, "OFFSITE_IDENTITY"))


def _monitoring(environ):
    metrics_file = _setting(environ, "METRICS_FILE")
    if metrics_file and not metrics_file.endswith(".prom"):
        raise ConfigError("METRICS_FILE must end in .prom (node_exporter's textfile collector "
                          "reads only those), not %r" % metrics_file)
    urls = {}
    for name in ("HEALTHCHECK_URL", "NOTIFY_URL"):
        url = _setting(environ, name)
        urls[name] = notify.check_url(url, name) if url else ""
    return dict(metrics_file=os.path.abspath(metrics_file) if metrics_file else "",
                healthcheck_url=urls["HEALTHCHECK_URL"], notify_url=urls["NOTIFY_URL"],
                notify_headers=notify.parse_headers(environ.get("NOTIFY_URL_HEADERS", "")),
                invocation_id=_setting(environ, "INVOCATION_ID"))


def _switch(environ, name, default=False):
    raw = _setting(environ, name).lower()
    if not raw:
        return default
    if raw not in TRUE_WORDS + FALSE_WORDS:
        raise ConfigError("%s must be 1 or 0, not %r" % (name, raw))
    return raw in TRUE_WORDS


class Config:
    """Everything the operations need to know about their surroundings.

    ``backup_dir`` is absolute (the working folder of a run may change); None
    means BACKUP_DIR was not set: the default then, and ``backup_dir_configured``
    False, as a command creates no folder it was not given
    (``pipeline.work_folder_for``). The backup_all fields stay None for the
    other commands.
    """

    def __init__(self, backup_dir=None,
                 helper_image=DEFAULT_HELPER_IMAGE, gzip_level=DEFAULT_GZIP_LEVEL, threads=None,
                 volumes=None, output_root=None, retention_days=None, min_keep=None,
                 consistency="live", consistency_by_volume=None,
                 retention_daily=0, retention_weekly=0, retention_monthly=0, retention_hourly=0,
                 shrink_guard=DEFAULT_SHRINK_GUARD, exclusions=None, metrics_file="",
                 healthcheck_url="", notify_url="", notify_headers=(), invocation_id="",
                 skip_unchanged=False, offsite=None,
                 restore_max_spread=DEFAULT_RESTORE_MAX_SPREAD):
        self.backup_dir = os.path.abspath(backup_dir or DEFAULT_BACKUP_DIR)
        self.backup_dir_configured = bool(backup_dir)
        self.helper_image = helper_image
        self.gzip_level = gzip_level
        self.threads = threads or default_threads()
        self.volumes = volumes
        self.output_root = output_root
        self.retention_days = retention_days
        self.min_keep = min_keep
        self.consistency = consistency
        self.consistency_by_volume = consistency_by_volume or {}
        self.retention_daily = retention_daily
        self.retention_weekly = retention_weekly
        self.retention_monthly = retention_monthly
        self.retention_hourly = retention_hourly
        self.shrink_guard = shrink_guard
        # {volume or OUTPUT_ROOT path: Exclusions}
        self.exclusions = exclusions or {}
        # Monitoring (read for backup_all, drill_restore and report_failure): "" is off.
        self.metrics_file = metrics_file
        self.healthcheck_url = healthcheck_url
        self.notify_url = notify_url
        self.notify_headers = notify_headers
        self.invocation_id = invocation_id  # systemd's INVOCATION_ID of this run, if any
        self.skip_unchanged = skip_unchanged  # backup_all: link unchanged volumes
        self.offsite = offsite or Settings()  # off-host copies; identity for verify too
        # restore_all: how far apart in time the archives of one recovery point may be
        self.restore_max_spread = restore_max_spread

    def consistency_for(self, volume):
        """Give the consistency mode for ``volume``: its own entry, else the default."""
        return self.consistency_by_volume.get(volume, self.consistency)

    @classmethod
    def from_environment(cls, environ, backup_all=False, monitoring=False):
        """Read the settings from ``environ``; raises ConfigError naming a bad variable.

        backup_all's own settings only with ``backup_all``; the monitoring ones
        (METRICS_FILE, HEALTHCHECK_URL, NOTIFY_URL…) with either flag.
        """
        fields = dict(
            backup_dir=_setting(environ, "BACKUP_DIR") or None,
            offsite=Settings(identity=_setting(environ, "OFFSITE_IDENTITY")),
            helper_image=_setting(environ, "BACKUP_HELPER_IMAGE", DEFAULT_HELPER_IMAGE),
            gzip_level=_whole_number(environ, "BACKUP_GZIP_LEVEL", DEFAULT_GZIP_LEVEL, 1, 9),
            threads=_whole_number(environ, "BACKUP_THREADS", None, 1))
        if backup_all:
            raw_volumes = _setting(environ, "VOLUMES")
            if raw_volumes:
                volumes = [name for name in re.split(r"[\s,]+", raw_volumes) if name]
            else:
                volumes = [_setting(environ, "OPEN_WEBUI_VOLUME", "owui-data"),
                           _setting(environ, "TOOL_TM_VOLUME", "tm-data")]
                volumes += list(OTHER_DEFAULT_VOLUMES)
            stop_containers = _switch(environ, "STOP_CONTAINERS")
            consistency, consistency_by_volume = _consistency(environ, stop_containers)
            # Set but empty means: no path source (the old script's behaviour).
            output_root = environ.get("OUTPUT_ROOT", DEFAULT_OUTPUT_ROOT).strip()
            sources = {volume: volume for volume in volumes}
            if output_root:
                sources[output_root] = sources[safe_name(output_root)] = output_root
            fields.update(
                volumes=volumes, output_root=output_root,
                retention_days=_whole_number(environ, "RETENTION_DAYS",
                                             DEFAULT_RETENTION_DAYS, 0),
                min_keep=_whole_number(environ, "RETENTION_MIN_KEEP", DEFAULT_MIN_KEEP, 1),
                consistency=consistency,
                consistency_by_volume=consistency_by_volume,
                retention_daily=_whole_number(environ, "RETENTION_DAILY", 0, 0),
                retention_weekly=_whole_number(environ, "RETENTION_WEEKLY", 0, 0),
                retention_monthly=_whole_number(environ, "RETENTION_MONTHLY", 0, 0),
                retention_hourly=_whole_number(environ, "RETENTION_HOURLY", 0, 0),
                shrink_guard=_whole_number(environ, "RETENTION_SHRINK_GUARD",
                                           DEFAULT_SHRINK_GUARD, 0, 100),
                exclusions=_exclusions(environ, sources),
                skip_unchanged=_switch(environ, "BACKUP_SKIP_UNCHANGED", default=True),
                offsite=_offsite(environ),
                restore_max_spread=_duration(environ, "RESTORE_MAX_SPREAD",
                                             DEFAULT_RESTORE_MAX_SPREAD))
        if backup_all or monitoring:
            fields.update(_monitoring(environ))
        return cls(**fields)
