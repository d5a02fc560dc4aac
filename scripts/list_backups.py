#!/usr/bin/env python3
"""List the archives in a backup folder: list_backups.py [BACKUP_DIR] [--json]"""
import sys

from ai_stack_backup.cli import list_backups_main

if __name__ == "__main__":
    sys.exit(list_backups_main())
