"""Peak memory of a command, split into what the process allocates and what it maps from files.

    python benchmarks/peak_memory.py [--interval 0.02] -- instsearch index build --shards S --out I ...

``ru_maxrss`` (what ``/usr/bin/time`` reports) counts every resident page, including the pages of
memory-mapped files: region shards read through ``np.load(mmap_mode="r")``, inverted lists that
faiss's ``merge_ondisk`` writes through a map. Those are page cache: the kernel writes them back
and drops them when memory is short, so they do not need to fit a memory budget. This script
samples ``/proc/<pid>/status`` every ``--interval`` seconds and prints the peak of

* ``RssAnon``: the process's own allocations (arrays, faiss's codes and lists, Python objects),
  the figure a memory budget bounds;
* ``RssFile``: resident pages of mapped files and shared libraries;
* ``ru_maxrss`` of the finished command, for comparison.

A sampled peak can miss an allocation that lives shorter than the interval; large arrays take
longer than that to fault in. Measurements: ``docs/scale.md``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Optional


def _status(pid: int) -> dict[str, int]:
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmRSS"):
                    fields[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return fields


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interval", type=float, default=0.02, help="seconds between samples")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to measure after --")
    t0 = time.perf_counter()
    child = subprocess.Popen(command)
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    while True:
        for key, value in _status(child.pid).items():
            peak[key] = max(peak[key], value)
        try:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            break
        time.sleep(args.interval)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    mib = 1 << 20
    print(f"peak RssAnon {peak['RssAnon'] / mib:.0f} MiB, peak RssFile {peak['RssFile'] / mib:.0f} MiB "
          f"(sampled every {args.interval:g} s), ru_maxrss {usage.ru_maxrss / 1024:.0f} MiB, {seconds:.1f} s, "
          f"exit code {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
