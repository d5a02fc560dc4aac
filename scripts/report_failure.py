#!/usr/bin/env python3
"""Tell a person that a backup run failed (systemd's OnFailure= unit runs this)."""
import sys

from ai_stack_backup.cli import report_failure_main

if __name__ == "__main__":
    sys.exit(report_failure_main())
