#!/usr/bin/env python3
"""Restore the newest archive of each volume into a scratch volume and compare it."""
import sys

from ai_stack_backup.cli import drill_restore_main

if __name__ == "__main__":
    sys.exit(drill_restore_main())
