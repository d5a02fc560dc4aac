"""ai_stack backup: back up and restore the AI stack's Docker volumes and host folders.

Standard library only (Python 3.8 to 3.13). The modules, in the order they
build on each other: common (constants, errors, names, atomic files),
gzipstream (parallel gzip, strict gunzip), tarstream (tar parser, safety
rules, header writer), archive (whole-archive checks), docker (the gateway to
the docker CLI and the helper container), volume, pathbackup, backupall, cli.
"""

__version__ = "1.0.0"
