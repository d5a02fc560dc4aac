#!/usr/bin/env python3
"""Run a script as __main__ and write the peak RSS (KiB) of this Python process to a file.

`make bench` uses it because the RSS that wait4() reports includes children
(the docker CLI alone is bigger than our process), and getrusage's maximum is
inherited from the parent across fork and exec. VmHWM belongs to this process only.
"""
import atexit
import os
import runpy
import sys

report, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))


@atexit.register
def write_peak():
    with open(report, "w") as file:
        with open("/proc/self/status") as status:
            peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
        file.write("%s\n" % peak)


runpy.run_path(script, run_name="__main__")
