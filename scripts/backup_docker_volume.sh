#!/bin/sh
# The runbook's name for this command; the tool is the Python script beside it.
exec python3 "$(dirname -- "$0")/backup_docker_volume.py" "$@"
