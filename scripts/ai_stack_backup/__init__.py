"""ai_stack backup: back up and restore the AI stack's Docker volumes and host folders.

cli (argv, environ) → pipeline.backup|restore → volume|hostpath → capture, transfer, docker → files

Standard library only (Python 3.8 to 3.13). Every module, each importing only
modules before it: errors, names, report, exclusions, notify, locks, files,
catalog, offsite, config, databases, docker, gzipstream, metrics, monitor, retention,
tarstream, archive, hosttree, transfer, capture, unchanged, blocked, pipeline, hostpath,
volume, drill, backupall, recovery, cli. The README's Development section has one line per module.
"""

__version__ = "1.0.0"
