"""ai_stack backup: back up and restore the AI stack's Docker volumes and host folders.

cli (argv, environ) → pipeline.backup|restore → volume|hostpath → capture, transfer, docker → files

Standard library only (Python 3.8 to 3.13). The modules, each building only
on those before it: errors, names, report, config, files, gzipstream,
tarstream, databases, archive, docker, transfer, capture, pipeline, volume,
hostpath, notify, drill, backupall, cli. The README's Development section has one line per module.
"""

__version__ = "1.0.0"
