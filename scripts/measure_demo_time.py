#!/usr/bin/python3
"""Measures what a newcomer waits for: a fresh clone to the first step of `make demo`.

    /usr/bin/python3 scripts/measure_demo_time.py            # clone HEAD into a temp folder, time `make demo`
    /usr/bin/python3 scripts/measure_demo_time.py --worktree # the working tree as it is (uncommitted changes too)
    /usr/bin/python3 scripts/measure_demo_time.py --cold     # with an empty ccache (a machine's first clone)

The clock starts before the clone and stops when the demo prints its first step ("== 1."); the demo
is then stopped (--full lets it finish). apt packages are assumed installed (scripts/deps.sh is a
no-op then). Prints one line with the time, what was compiled and ccache's hits, and removes the
clone.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def ccache_stats(env):
    r = subprocess.run(["ccache", "--print-stats"], capture_output=True, text=True, env=env)
    stats = {}
    for line in r.stdout.splitlines():
        key, _, value = line.partition("\t")
        if value.strip().isdigit():
            stats[key] = int(value)
    return stats


def copy_worktree(dest):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worktree", action="store_true", help="copy the working tree instead of cloning HEAD")
    parser.add_argument("--cold", action="store_true", help="use an empty ccache")
    parser.add_argument("--full", action="store_true", help="let the demo run to its end")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="tokenbroker-clone-")
    clone = os.path.join(tmp, "tokenbroker")
    env = dict(os.environ)
    if args.cold:
        env["CCACHE_DIR"] = os.path.join(tmp, "ccache")
    before = ccache_stats(env)
    start = time.monotonic()
    try:
        if args.worktree:
            copy_worktree(clone)
        else:
            subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", ROOT, clone], check=True)
        cloned = time.monotonic() - start
        demo = subprocess.Popen(["make", "demo"], cwd=clone, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        compiled = 0
        first_step = None
        log = []
        for line in demo.stdout:
            log.append(line)
            if re.match(r"\[\d+/\d+\] Building", line):
                compiled += 1
            if line.startswith("== 1.") or "== 1. " in line:
                first_step = time.monotonic() - start
                if not args.full:
                    os.killpg(demo.pid, signal.SIGTERM)
                    break
        demo.wait(timeout=120)
        if first_step is None:
            sys.stderr.write("".join(log[-40:]))
            print("measure_demo_time: the demo never reached its first step", file=sys.stderr)
            return 1
        after = ccache_stats(env)
        hits = sum(after.get(k, 0) - before.get(k, 0) for k in ("direct_cache_hit", "preprocessed_cache_hit"))
        misses = after.get("cache_miss", 0) - before.get("cache_miss", 0)
        minutes, seconds = divmod(round(first_step), 60)
        print(f"fresh {'working-tree copy' if args.worktree else 'clone'} -> make demo's first step in "
              f"{minutes} min {seconds} s (clone {cloned:.1f} s; {compiled} files compiled, ccache "
              f"{hits} hits / {misses} misses{', cold cache' if args.cold else ''}; {os.cpu_count()} cores)")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
