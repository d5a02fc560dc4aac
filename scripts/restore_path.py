#!/usr/bin/env python3
"""Restore a host path from a backup_path archive: restore_path.py ARCHIVE TARGET --force"""
import sys

from ai_stack_backup.cli import restore_path_main

if __name__ == "__main__":
    sys.exit(restore_path_main())
