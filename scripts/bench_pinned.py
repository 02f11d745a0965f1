"""The pinned method (issue 15): the broker's own cost per GetToken, where the client cannot hide it.

Each server (the broker, and the echo server: the gRPC floor, answering the same request bytes at
once with a canned answer of a real one's size) runs pinned to one core (`taskset`), and h2load (a
light C client, Debian's nghttp2-client) drives it from another core: 4 connections × 16 streams,
POSTing one gRPC-framed GetTokenRequest. Rounds interleave the servers (A B, B A, ...), so a slow
spell of this shared machine hits both alike; each round gives a pair, and the result is the median
of the paired ratios. Each server's CPU per call comes from /proc/<pid>/stat (user + system) over a
round. Start-up: from the broker's process start to its port file (serving), and to a first token,
with N account files; and the CPU time it took until serving (user + system, all threads: what a
busy machine cannot inflate the way it inflates the wall-clock time).

    /usr/bin/python3 scripts/bench_pinned.py --build build [--rounds 15] [--seconds 2] [--smoke]
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))
import harness  # noqa: E402

METHOD = "/tokenbroker.v1.TokenBrokerService/GetToken"
MODEL = "gemini-3-pro-high"
CONNECTIONS, STREAMS = 4, 16
# A gRPC answer with a body carries at least this much DATA (length prefix + a token); an error is
# trailers only, no DATA: this is how a run tells answered calls from refused ones.
MIN_ANSWER_BYTES = 100


def grpc_request_bytes(model):
    """A GetTokenRequest{model} (field 1, length-delimited), in gRPC's 5-byte length-prefixed frame."""
    m = model.encode()
    assert len(m) < 128
    message = b"\x0a" + bytes([len(m)]) + m
    return b"\x00" + len(message).to_bytes(4, "big") + message


def cpu_seconds(pid):
    """User + system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cores():
    """(server core, client core, pinned?): two distinct cores when this process may use two."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) >= 2:
        return allowed[0], allowed[1], True
    return allowed[0], allowed[0], False


def h2load(port, seconds, request_file, log_file, client_core, requests=None):
    """One h2load run; returns rps, calls, answer bytes per call, p50/p99 (ms, from every call's latency)."""
    argv = ["taskset", "-c", str(client_core), "h2load", "-t", "1",
            "-c", str(CONNECTIONS if requests is None else 1), "-m", str(STREAMS if requests is None else 1),
            "-d", request_file, "-H", "content-type: application/grpc", "-H", "te: trailers",
            "--log-file", log_file]
    argv += ["-D", f"{round(seconds * 1000)}ms"] if requests is None else ["-n", str(requests)]
    argv.append(f"http://127.0.0.1:{port}{METHOD}")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if r.returncode != 0:
        raise RuntimeError(f"h2load failed ({r.returncode}): {r.stderr or r.stdout}")
    out = r.stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                     out)
    finished = re.search(r"finished in ([0-9.]+)(m?s), ([0-9.]+) req/s", out)
    data = re.search(r"traffic: .*\((\d+)\) data", out)
    if not (done and finished and data):
        raise RuntimeError(f"cannot read h2load's output:\n{out}")
    succeeded, failed, errored = int(done.group(2)), int(done.group(3)), int(done.group(4))
    if succeeded == 0 or failed or errored:
        raise RuntimeError(f"h2load: {succeeded} succeeded, {failed} failed, {errored} errored")
    latencies = []
    with open(log_file) as f:
        for line in f:
            cols = line.split("\t")
            if len(cols) >= 3 and cols[1] == "200":
                latencies.append(int(cols[2]))
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] / 1000.0

    return {"rps": float(finished.group(3)), "calls": succeeded, "answer_bytes": int(data.group(1)) / succeeded,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def load_round(server, seconds, request_file, log_file, client_core):
    before = cpu_seconds(server.proc.pid)
    r = h2load(server.port, seconds, request_file, log_file, client_core)
    r["cpu_us_per_call"] = (cpu_seconds(server.proc.pid) - before) * 1e6 / r["calls"]
    if r["answer_bytes"] < MIN_ANSWER_BYTES:
        raise RuntimeError(f"{server.name}: {r['answer_bytes']:.0f} answer bytes per call: calls are being refused")
    return r


def run(build, rounds=7, seconds=4.0, n_accounts=200):
    """Paired rounds of the broker and the echo server, each pinned. Returns the rounds and a summary."""
    server_core, client_core, pinned = cores()
    pin = ("taskset", "-c", str(server_core))
    c = harness.Cluster(build)
    try:
        for i in range(n_accounts):
            tier = "ULTRA" if i % 10 == 0 else "PRO" if i % 10 < 4 else "FREE"
            c.write_account(f"acct-{i:04d}", harness.account_json(f"user{i:04d}@example.com", f"1//rt-{i:04d}", tier))
        c.start_upstream()
        broker = c.start_broker("--log_level=warn", runner=pin)
        harness.wait_for(lambda: len(c.upstream_call("/__fake/stats")["token_calls"]) >= n_accounts,
                         timeout=60, what="every account's first token")
        request_file = os.path.join(c.dir, "get_token.bin")
        with open(request_file, "wb") as f:
            f.write(grpc_request_bytes(MODEL))
        log_file = os.path.join(c.dir, "h2load.log")
        # Warms up connections, caches and the broker's rank index; and measures its answers, so
        # the echo server's canned answer is exactly as long.
        answer_bytes = load_round(broker, min(1.0, seconds), request_file, log_file, client_core)["answer_bytes"]
        port_file = os.path.join(c.dir, "echo.port")
        echo = harness.Process("echo_server", list(pin) + [c.bin("tests", "bench", "echo_server"), "--listen",
                                                           "127.0.0.1:0", "--port_file", port_file,
                                                           "--answer_bytes", str(round(answer_bytes))],
                               os.path.join(c.dir, "echo.log"), port_file)
        c.extra.append(echo)
        servers = {"broker": broker, "echo": echo}
        load_round(echo, min(1.0, seconds), request_file, log_file, client_core)
        samples = []
        for i in range(rounds):
            order = ["broker", "echo"] if i % 2 == 0 else ["echo", "broker"]
            samples.append({name: load_round(servers[name], seconds, request_file, log_file, client_core)
                            for name in order})
    finally:
        c.close()

    def ratios(key):
        return [s["broker"][key] / s["echo"][key] for s in samples]

    def median(name, key):
        return statistics.median(s[name][key] for s in samples)

    tput, p99, cpu = ratios("rps"), ratios("p99_ms"), ratios("cpu_us_per_call")
    return {
        "pinned": pinned, "server_core": server_core, "client_core": client_core, "rounds": samples,
        "seconds": seconds, "n_accounts": n_accounts,
        "throughput_ratio": statistics.median(tput), "throughput_ratio_range": (min(tput), max(tput)),
        "p99_ratio": statistics.median(p99), "p99_ratio_range": (min(p99), max(p99)),
        "cpu_ratio": statistics.median(cpu),
        "broker": {k: median("broker", k) for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_call", "answer_bytes")},
        "echo": {k: median("echo", k) for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_call", "answer_bytes")},
    }


def write_account_files(folder, n):
    """n account files in Antigravity-Manager's format, each with an access token valid for a day."""
    expiry = int(time.time()) + 86400
    for i in range(n):
        tier = "ULTRA" if i % 10 == 0 else "PRO" if i % 10 < 4 else "FREE"
        with open(os.path.join(folder, f"acct-{i:06d}.json"), "w") as f:
            f.write(
                f'{{"id":"acct-{i:06d}","email":"user{i:06d}@example.com","name":"User {i}",'
                f'"token":{{"access_token":"ya29.a0AfB_byC{i:040d}","refresh_token":"1//0gExample{i:040d}",'
                f'"expires_in":3599,"expiry_timestamp":{expiry},"token_type":"Bearer","project_id":"vivid-river-{i:06d}"}},'
                f'"quota":{{"models":[{{"name":"gemini-3-pro-high","percentage":62,"reset_time":"2026-11-29T04:00:00Z"}},'
                f'{{"name":"claude-sonnet-4-6-thinking","percentage":10,"reset_time":"2026-11-29T01:12:30Z"}}],'
                f'"last_updated":1795914000,"subscription_tier":"{tier}"}},"disabled":false,"proxy_disabled":false,'
                f'"protected_models":[],"created_at":1764000000,"last_used":1795913000}}')


def startup(build, n, runs=3):
    """Median over `runs` starts of the broker (unpinned) with n account files: seconds from process
    start to the port file (it writes it once serving) and to a first GetToken answered."""
    _, client_core, _ = cores()
    folder = tempfile.mkdtemp(prefix="tokenbroker-startup-")
    try:
        accounts = os.path.join(folder, "accounts")
        os.mkdir(accounts)
        write_account_files(accounts, n)
        request_file = os.path.join(folder, "get_token.bin")
        with open(request_file, "wb") as f:
            f.write(grpc_request_bytes(MODEL))
        env = dict(os.environ, TOKENBROKER_OAUTH_CLIENT_ID="bench-client", TOKENBROKER_OAUTH_CLIENT_SECRET="bench")
        serving, first_token, cpu = [], [], []
        for run_no in range(runs):
            port_file = os.path.join(folder, f"broker-{run_no}.port")
            # Nothing listens on port 1: the tokens in the files are valid, none is refreshed.
            argv = [os.path.join(build, "server", "tokenbroker"), "--accounts_dir", accounts,
                    "--listen", "127.0.0.1:0", "--port_file", port_file, "--log_level=warn",
                    "--oauth_token_url", "http://127.0.0.1:1/token", "--cloudcode_base_url", "http://127.0.0.1:1"]
            with open(os.path.join(folder, f"broker-{run_no}.log"), "wb") as log:
                started = time.monotonic()
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
                try:
                    while not os.path.exists(port_file):
                        if proc.poll() is not None or time.monotonic() - started > 60:
                            raise RuntimeError(f"the broker did not start with {n} accounts (exit {proc.returncode})")
                        time.sleep(0.001)
                    serving.append(time.monotonic() - started)
                    cpu.append(cpu_seconds(proc.pid))
                    with open(port_file) as f:
                        port = int(f.read().strip())
                    r = h2load(port, 30, request_file, os.path.join(folder, "h2load.log"), client_core, requests=1)
                    if r["answer_bytes"] < MIN_ANSWER_BYTES:
                        raise RuntimeError("the first GetToken after start-up was refused")
                    first_token.append(time.monotonic() - started)
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
        return {"accounts": n, "serving_s": statistics.median(serving), "first_token_s": statistics.median(first_token),
                "cpu_s": statistics.median(cpu), "serving_runs": serving}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def print_rounds(result):
    where = (f"servers on core {result['server_core']}, h2load on core {result['client_core']}" if result["pinned"]
             else f"one core only: servers and h2load share core {result['server_core']}")
    print(f"GetToken, pinned ({where}), h2load c{CONNECTIONS * STREAMS} = {CONNECTIONS} connections × {STREAMS} "
          f"streams, {result['seconds']:g} s rounds, {result['n_accounts']} accounts")
    print("| round | broker RPS | echo RPS | ratio | broker p99 ms | echo p99 ms | p99 ratio | broker CPU µs/call | "
          "echo CPU µs/call |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, s in enumerate(result["rounds"], 1):
        b, e = s["broker"], s["echo"]
        print(f"| {i} | {b['rps']:.0f} | {e['rps']:.0f} | {b['rps'] / e['rps']:.2f} | {b['p99_ms']:.2f} | "
              f"{e['p99_ms']:.2f} | {b['p99_ms'] / e['p99_ms']:.2f} | {b['cpu_us_per_call']:.1f} | "
              f"{e['cpu_us_per_call']:.1f} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", default="build")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--startup_accounts", type=int, default=100_000)
    parser.add_argument("--smoke", action="store_true", help="a short run that only checks it works")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.seconds, args.startup_accounts = 1, 0.3, 1000
    build = os.path.abspath(args.build)
    result = run(build, args.rounds, args.seconds)
    print_rounds(result)
    print(f"median of paired ratios: throughput ×{result['throughput_ratio']:.2f} "
          f"(range {result['throughput_ratio_range'][0]:.2f}–{result['throughput_ratio_range'][1]:.2f}), "
          f"p99 ×{result['p99_ratio']:.2f}, CPU per call ×{result['cpu_ratio']:.2f}")
    s = startup(build, args.startup_accounts, runs=1 if args.smoke else 3)
    print(f"start-up with {s['accounts']:,} accounts: serving {s['serving_s']:.2f} s, first token {s['first_token_s']:.2f} s "
          f"after process start; {s['cpu_s']:.2f} CPU seconds until serving")
    return 0


if __name__ == "__main__":
    sys.exit(main())
