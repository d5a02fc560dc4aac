#!/usr/bin/env python3
"""Back up a host folder or file: backup_path.py PATH [BACKUP_DIR | -]"""
import sys

from ai_stack_backup.cli import backup_path_main

if __name__ == "__main__":
    sys.exit(backup_path_main())
