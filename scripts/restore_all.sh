#!/bin/sh
# The runbook's way of naming a command; the tool is the Python script beside it.
exec python3 "$(dirname -- "$0")/restore_all.py" "$@"
