"""`make bench`: runs every benchmark once and prints one table of results against the targets
(issues 6, 7 and 15), then the load details. The README's performance section is this output.

GetToken against the echo server is measured two ways: pinned (issue 15, scripts/bench_pinned.py:
each server on one core, h2load on another, median of paired interleaved rounds, server CPU per
call from /proc) and unpinned (scripts/bench_load.py: servers and our C++ load generator share
every core, as before; the client's cost hides the server's).

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
import bench_pinned  # noqa: E402

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


def allocations(build, smoke):
    text = subprocess.run([os.path.join(build, "tests", "bench", "alloc_bench"), "200" if smoke else "20000"],
                          capture_output=True, text=True, check=True).stdout
    m = re.search(r"broker ([0-9.]+), echo ([0-9.]+)", text)
    return float(m.group(1)), float(m.group(2))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", default="build")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: only checks that it all runs")
    args = parser.parse_args()
    build = os.path.abspath(args.build)
    n = 2_000 if args.smoke else 100_000
    duration, n_accounts, rounds = (0.3, 5, 1) if args.smoke else (5.0, 200, 3)

    load_before = os.getloadavg()[0]
    sel = selection(build, args.smoke)
    load_s, per_account, per_session = footprint(build, n)
    allocs_broker, allocs_echo = allocations(build, args.smoke)
    pinned = bench_pinned.run(build, *((1, 0.3) if args.smoke else (15, 2.0)))
    start = bench_pinned.startup(build, n, runs=1 if args.smoke else 3)
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
    pb, pe = pinned["broker"], pinned["echo"]
    where = "server on one core, h2load on another" if pinned["pinned"] else "ONE core: server and h2load share it"
    row(f"GetToken vs echo server, pinned ({where}), TCP, c64 = 4 × 16 streams, median of "
        f"{len(pinned['rounds'])} paired {pinned['seconds']:g} s rounds",
        f"{pb['rps']:,.0f} vs {pe['rps']:,.0f} RPS: ×{pinned['throughput_ratio']:.2f} "
        f"(rounds {pinned['throughput_ratio_range'][0]:.2f}–{pinned['throughput_ratio_range'][1]:.2f}); "
        f"p99 {pb['p99_ms']:.2f} vs {pe['p99_ms']:.2f} ms: ×{pinned['p99_ratio']:.2f}",
        "throughput ≥ 0.90× (goal 0.95×), p99 ≤ 1.2×", pinned["throughput_ratio"] >= 0.90 and pinned["p99_ratio"] <= 1.2)
    rows.append(("server CPU per GetToken, pinned (/proc user + system)",
                 f"{pb['cpu_us_per_call']:.1f} vs {pe['cpu_us_per_call']:.1f} µs (×{pinned['cpu_ratio']:.2f})",
                 "(no target)", "—"))
    rows.append(("heap allocations per warm GetToken, in-process client + server (alloc_bench)",
                 f"{allocs_broker:.1f} vs echo {allocs_echo:.1f}: the broker's own {allocs_broker - allocs_echo:.1f}",
                 "(no target: stated)", "—"))
    for transport in ("tcp", "unix"):
        b, e = load[(transport, "broker")], load[(transport, "echo")]
        tput, p99 = b["rps"] / e["rps"], b["p99_ms"] / e["p99_ms"]
        target = "throughput ≥ 0.85×, p99 ≤ 1.5×" if transport == "tcp" else "(no target)"
        row(f"GetToken vs echo server, unpinned (servers and loadgen share the cores), "
            f"{'TCP loopback' if transport == 'tcp' else 'unix socket'}, c=64 over 4 channels",
            f"{b['rps']:,.0f} vs {e['rps']:,.0f} RPS (×{tput:.2f}); p99 {b['p99_ms']:.2f} vs {e['p99_ms']:.2f} ms (×{p99:.2f})",
            target, transport != "tcp" or (tput >= 0.85 and p99 <= 1.5))
    m, r = load[("tcp", "broker, memory, 1000 sessions")], load[("tcp", "broker, redis, 1000 sessions")]
    row("GetToken, Redis vs memory state backend, TCP, 1000 sessions",
        f"{r['rps']:,.0f} vs {m['rps']:,.0f} RPS (×{r['rps'] / m['rps']:.2f})", "≥ 0.7×", r["rps"] / m["rps"] >= 0.7)
    row(f"resident memory per loaded account ({n:,} accounts)", f"{per_account} B", "≤ 2 KB", per_account <= 2048)
    row(f"resident memory per bound session ({n:,} sessions)", f"{per_session} B", "≤ 300 B", per_session <= 300)
    row(f"start-up: load {n:,} account files into the pool (footprint_bench)", f"{load_s:.2f} s", "< 3 s", load_s < 3.0)
    row(f"start-up: process start to serving, {n:,} account files (median of {len(start['serving_runs'])})",
        f"{start['serving_s']:.2f} s (first token {start['first_token_s']:.2f} s; {start['cpu_s']:.2f} CPU seconds "
        "until serving)", "< 1 s", start["serving_s"] < 1.0)

    print(f"tokenbroker `make bench`, {datetime.date.today().isoformat()}, {machine()}"
          + (" (smoke sizes)" if args.smoke else ""))
    # Other work on the machine skews every figure: say how busy it was.
    print(f"Load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, "
          f"on {os.cpu_count()} cores.")
    print()
    print("| measure | result | target | met |")
    print("|---|---|---|---|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    print()
    bench_pinned.print_rounds(pinned)
    print()
    bench_load.print_tables(load, duration, n_accounts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
