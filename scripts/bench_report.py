"""`make bench`: runs every benchmark once and prints one table of results against the targets
(issue 6 and 7), then the load details. The README's performance section is this output.

    /usr/bin/python3 scripts/bench_report.py --build build [--smoke]
"""
import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_load  # noqa: E402

POLICIES = ["balance", "fill_first", "reset_soonest", "round_robin"]


def machine():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}"


def selection(build, smoke):
    argv = [os.path.join(build, "tests", "bench", "selection_bench"), "--benchmark_format=json",
            f"--benchmark_min_time={0.01 if smoke else 0.2}"]
    if smoke:
        argv.append("--benchmark_filter=accounts:1000/")
    out = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    us = {}
    for b in out["benchmarks"]:
        accounts = int(b["counters"]["accounts"] if "counters" in b else b["accounts"])
        us[(b["label"], accounts)] = b["real_time"]  # microseconds (the benchmark's unit)
    return us


def footprint(build, n):
    text = subprocess.run([os.path.join(build, "tests", "bench", "footprint_bench"), str(n)],
                          capture_output=True, text=True, check=True).stdout
    load_s = float(re.search(r"loaded in ([0-9.]+) s", text).group(1))
    per_account = int(re.search(r"memory: (\d+) bytes resident per loaded account", text).group(1))
    per_session = int(re.search(r"memory: (\d+) bytes resident per bound session", text).group(1))
    return load_s, per_account, per_session


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", default="build")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: only checks that it all runs")
    args = parser.parse_args()
    build = os.path.abspath(args.build)
    n = 2_000 if args.smoke else 100_000
    duration, n_accounts, rounds = (0.3, 5, 1) if args.smoke else (5.0, 200, 3)

    sel = selection(build, args.smoke)
    load_s, per_account, per_session = footprint(build, n)
    load = bench_load.run(build, duration, n_accounts, rounds)

    rows = []

    def row(measure, result, target, met):
        rows.append((measure, result, target, "yes" if met else "**no**"))

    sizes = sorted({a for (_, a) in sel})
    for policy in POLICIES:
        times = [sel[(policy, a)] for a in sizes if (policy, a) in sel]
        if not times:
            continue
        growth = times[-1] / times[0]
        row(f"selection, {policy}, {' / '.join(f'{a // 1000}k' for a in sizes)} accounts",
            " / ".join(f"{t:.2f}" for t in times) + f" µs (growth ×{growth:.2f})",
            "≤ 2 µs at 100k, growth < 3×", times[-1] <= 2.0 and growth < 3.0)
    for transport in ("tcp", "unix"):
        b, e = load[(transport, "broker")], load[(transport, "echo")]
        tput, p99 = b["rps"] / e["rps"], b["p99_ms"] / e["p99_ms"]
        target = "throughput ≥ 0.85×, p99 ≤ 1.5×" if transport == "tcp" else "(no target)"
        row(f"GetToken vs echo server, {'TCP loopback' if transport == 'tcp' else 'unix socket'}, c=64 over 4 channels",
            f"{b['rps']:,.0f} vs {e['rps']:,.0f} RPS (×{tput:.2f}); p99 {b['p99_ms']:.2f} vs {e['p99_ms']:.2f} ms (×{p99:.2f})",
            target, transport != "tcp" or (tput >= 0.85 and p99 <= 1.5))
    m, r = load[("tcp", "broker, memory, 1000 sessions")], load[("tcp", "broker, redis, 1000 sessions")]
    row("GetToken, Redis vs memory state backend, TCP, 1000 sessions",
        f"{r['rps']:,.0f} vs {m['rps']:,.0f} RPS (×{r['rps'] / m['rps']:.2f})", "≥ 0.7×", r["rps"] / m["rps"] >= 0.7)
    row(f"resident memory per loaded account ({n:,} accounts)", f"{per_account} B", "≤ 2 KB", per_account <= 2048)
    row(f"resident memory per bound session ({n:,} sessions)", f"{per_session} B", "≤ 300 B", per_session <= 300)
    row(f"start-up: load {n:,} account files", f"{load_s:.2f} s", "< 3 s", load_s < 3.0)

    print(f"tokenbroker `make bench`, {datetime.date.today().isoformat()}, {machine()}"
          + (" (smoke sizes)" if args.smoke else ""))
    print()
    print("| measure | result | target | met |")
    print("|---|---|---|---|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    print()
    bench_load.print_tables(load, duration, n_accounts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
