#!/usr/bin/env python3
"""Check archives completely: verify_backup.py ARCHIVE..."""
import sys

from ai_stack_backup.cli import verify_backup_main

if __name__ == "__main__":
    sys.exit(verify_backup_main())
