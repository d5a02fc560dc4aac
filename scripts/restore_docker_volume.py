#!/usr/bin/env python3
"""Restore a Docker named volume: restore_docker_volume.py VOLUME ARCHIVE --force"""
import sys

from ai_stack_backup.cli import restore_docker_volume_main

if __name__ == "__main__":
    sys.exit(restore_docker_volume_main())
