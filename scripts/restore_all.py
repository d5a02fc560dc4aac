#!/usr/bin/env python3
"""Restore the whole stack from one recovery point: restore_all.py [--at TIME] --force"""
import sys

from ai_stack_backup.cli import restore_all_main

if __name__ == "__main__":
    sys.exit(restore_all_main())
