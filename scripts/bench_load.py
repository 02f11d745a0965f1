"""Closed-loop gRPC load: the broker's GetToken against the echo server (the gRPC floor: same
method, same-size answer), over TCP loopback and a unix socket, with the broker/echo ratios; and
the broker with the Redis state backend against the memory backend (calls cycling over 1000
sessions), with their ratio.

    /usr/bin/python3 scripts/bench_load.py --build build [--duration 5] [--smoke]
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))
import harness  # noqa: E402


def run(build, duration, n_accounts, rounds=1):
    """Runs every load `rounds` times and returns {(transport, server): the median round's result}."""
    c = harness.Cluster(build)
    try:
        for i in range(n_accounts):
            tier = "ULTRA" if i % 10 == 0 else "PRO" if i % 10 < 4 else "FREE"
            c.write_account(f"acct-{i:04d}", harness.account_json(f"user{i:04d}@example.com", f"1//rt-{i:04d}", tier))
        c.start_upstream()
        sock = os.path.join(c.dir, "broker.sock")
        echo_sock = os.path.join(c.dir, "echo.sock")
        targets = {}
        c.start_broker("--log_level=warn", listen="unix:" + sock)
        targets[("unix", "broker")] = "unix:" + sock
        c.start_broker("--log_level=warn")
        targets[("tcp", "broker")] = c.target
        # The backends side by side, each on a fresh broker: memory, and a real redis-server on loopback.
        c.start_broker("--log_level=warn")
        memory_target = c.target
        redis = harness.RedisServer(c.dir)
        c.extra.append(redis)
        c.start_broker("--log_level=warn", "--state_backend", redis.url)
        redis_target = c.target
        harness.wait_for(lambda: c.tbctl("health", "--service", "tokenbroker.v1.StateBackend", check=False,
                                         target=redis_target).returncode == 0, what="the broker to sync with redis")
        for transport, listen in (("tcp", "127.0.0.1:0"), ("unix", "unix:" + echo_sock)):
            port_file = os.path.join(c.dir, f"echo-{transport}.port")
            echo = harness.Process(f"echo-{transport}", [c.bin("tests", "bench", "echo_server"), "--listen", listen,
                                                         "--port_file", port_file],
                                   os.path.join(c.dir, f"echo-{transport}.log"), port_file)
            c.extra.append(echo)
            targets[(transport, "echo")] = f"127.0.0.1:{echo.port}" if transport == "tcp" else "unix:" + echo_sock
        # Every account has its token before measuring (the background refresher fetches them).
        harness.wait_for(lambda: c.upstream_call("/__fake/stats")["token_calls"].__len__() >= n_accounts,
                         timeout=60, what="every account's first token")

        def load(target, duration, sessions=0):
            r = subprocess.run([c.bin("tests", "bench", "loadgen"), "--target", target, "--concurrency", "64",
                                "--channels", "4", "--duration", f"{duration}s", "--sessions", str(sessions)],
                               capture_output=True, text=True, timeout=duration + 60)
            if r.returncode != 0:
                raise RuntimeError(f"loadgen against {target} failed: {r.stderr}")
            return json.loads(r.stdout)

        results = {}
        runs = [(key, target, 0) for key, target in targets.items()]
        runs += [(("tcp", "broker, memory, 1000 sessions"), memory_target, 1000),
                 (("tcp", "broker, redis, 1000 sessions"), redis_target, 1000)]
        for key, target, sessions in runs:
            load(target, min(1.0, duration), sessions)  # warm up connections and caches
        # Rounds interleave the servers, so a slow spell of this shared machine hits all of them
        # alike; each server's median round (by RPS) is its result.
        samples = {key: [] for key, _, _ in runs}
        for _ in range(rounds):
            for key, target, sessions in runs:
                r = load(target, duration, sessions)
                if r["errors"]:
                    raise RuntimeError(f"{key}: {r['errors']} calls failed")
                samples[key].append(r)
        for key, rs in samples.items():
            results[key] = sorted(rs, key=lambda r: r["rps"])[len(rs) // 2]

        return results
    finally:
        c.close()


def print_tables(results, duration, n_accounts):
    print(f"GetToken, closed loop, concurrency 64 over 4 channels, {duration:g} s a round, median of the rounds, "
          f"{n_accounts} accounts")
    print("| transport | server | RPS | p50 ms | p90 ms | p99 ms | p99.9 ms |")
    print("|---|---|---|---|---|---|---|")
    for (transport, server), r in sorted(results.items()):
        print(f"| {transport} | {server} | {r['rps']:.0f} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | "
              f"{r['p99_ms']:.3f} | {r['p999_ms']:.3f} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", default="build")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a short run that only checks it works")
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.accounts, args.rounds = 0.3, 5, 1
    results = run(args.build, args.duration, args.accounts, args.rounds)
    print_tables(results, args.duration, args.accounts)
    for transport in ("tcp", "unix"):
        b, e = results[(transport, "broker")], results[(transport, "echo")]
        print(f"{transport}: broker/echo throughput {b['rps'] / e['rps']:.2f}, p99 {b['p99_ms'] / e['p99_ms']:.2f}")
    m, r = results[("tcp", "broker, memory, 1000 sessions")], results[("tcp", "broker, redis, 1000 sessions")]
    print(f"tcp: redis/memory backend throughput {r['rps'] / m['rps']:.2f}, p99 {r['p99_ms'] / m['p99_ms']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
