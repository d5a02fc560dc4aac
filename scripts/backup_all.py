#!/usr/bin/env python3
"""Back up every source, verify, apply retention (what the systemd timer runs)."""
import sys

from ai_stack_backup.cli import backup_all_main

if __name__ == "__main__":
    sys.exit(backup_all_main())
