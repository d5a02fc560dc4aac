#!/usr/bin/env python3
"""Back up one Docker named volume: backup_docker_volume.py VOLUME [BACKUP_DIR | -]"""
import sys

from ai_stack_backup.cli import backup_docker_volume_main

if __name__ == "__main__":
    sys.exit(backup_docker_volume_main())
