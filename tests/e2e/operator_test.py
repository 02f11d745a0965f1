"""What an operator meets first, with the real binaries (issue 14): --help, bad flags, SIGTERM with
a Health/Watch stream open, start-up log lines, ports in use, list-accounts states, watch-quota
pointed at a broker, and a wrong OAuth client seen in health."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import unittest

import grpc  # python3-grpcio (Debian)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("TB_BUILD_DIR", os.path.join(ROOT, "build"))
MODEL = "gemini-3-pro-high"

BINARIES = {
    "tokenbroker": (("server", "tokenbroker"), ["server/runtime/flags.cc", "server/runtime/broker_config.cc"]),
    "tokenbroker-monitor": (("server", "tokenbroker-monitor"), ["server/runtime/flags.cc", "server/monitor_main.cc"]),
    "tbctl": (("client", "tbctl"), ["client/tbctl.cc"]),
}


def defined_flags(sources):
    """Flag names defined with ABSL_FLAG in the given source files: the truth --help must show."""
    names = set()
    for src in sources:
        with open(os.path.join(ROOT, src)) as f:
            names |= set(re.findall(r"ABSL_FLAG\(\s*[\w:<>]+\s*,\s*(\w+)\s*,", f.read()))
    return names


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, **kw)


class Help(unittest.TestCase):
    def test_help_lists_every_flag_with_default_and_meaning(self):
        for program, (path, sources) in BINARIES.items():
            with self.subTest(program=program):
                r = run([os.path.join(BUILD, *path), "--help"])
                self.assertEqual(r.returncode, 0, r.stderr)
                self.assertNotIn("No flags matched", r.stdout + r.stderr)
                self.assertTrue(r.stdout.startswith(program), r.stdout[:200])
                matches = re.findall(r"^  --(\w+) \((\w+), default (.*)\)\n {6}(\S.*)$", r.stdout, re.M)
                listed = {m[0]: m for m in matches}
                want = defined_flags(sources)
                self.assertEqual(set(listed), want, "flags in --help vs ABSL_FLAG in " + ", ".join(sources))
                for name, (_, _, default, meaning) in listed.items():
                    self.assertTrue(default, name)
                    self.assertGreater(len(meaning), 10, name)
                self.assertIn("--flagfile", r.stdout)
                # -h means the same.
                self.assertEqual(run([os.path.join(BUILD, *path), "-h"]).stdout, r.stdout)

    def test_help_shows_real_defaults(self):
        out = run([os.path.join(BUILD, "server", "tokenbroker"), "--help"]).stdout
        self.assertIn('--listen (string, default "127.0.0.1:50051")', out)
        self.assertIn("--drain_timeout (duration, default 10s)", out)
        self.assertIn('--policy (string, default "balance")', out)


class BadFlags(unittest.TestCase):
    def check(self, argv, *expected):
        r = run(argv)
        self.assertEqual(r.returncode, 2, (argv, r.stdout, r.stderr))
        lines = r.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, r.stderr)
        for e in expected:
            self.assertIn(e, lines[0])
        self.assertEqual(r.stdout, "")
        return lines[0]

    def test_every_binary_exits_2_with_one_line_naming_the_flag(self):
        broker = os.path.join(BUILD, "server", "tokenbroker")
        monitor = os.path.join(BUILD, "server", "tokenbroker-monitor")
        tbctl = os.path.join(BUILD, "client", "tbctl")
        for binary, program in ((broker, "tokenbroker"), (monitor, "tokenbroker-monitor")):
            with self.subTest(program=program):
                line = self.check([binary, "--acounts_dir=/tmp"], "--acounts_dir", "did you mean --accounts_dir?")
                self.assertTrue(line.startswith(program + ": "), line)
                self.check([binary, "--accounts-dir=/tmp"], "did you mean --accounts_dir?")
                self.check([binary, "--accounts_dir=/tmp", "--listen"], "--listen needs a value")
                self.check([binary, "--accounts_dir=/tmp", "--drain_timeout=ten"], "--drain_timeout", "'ten'",
                           "duration")
                self.check([binary, "--accounts_dir=/tmp", "--refresh_workers=many"], "--refresh_workers",
                           "integer")
                self.check([binary, "--accounts_dir=/tmp", "stray"], "unexpected argument 'stray'")
                self.check([binary, "--flagfile=/nonexistent/flags"], "--flagfile", "/nonexistent/flags")
        self.check([tbctl, "--timout=1s", "health"], "--timout", "did you mean --timeout?")
        self.check([tbctl, "--timeout=soon", "health"], "--timeout", "duration")
        self.check([tbctl, "health", "--target"], "--target needs a value")
        self.check([tbctl, "list-acounts"], "unknown command 'list-acounts'", "did you mean list-accounts?")
        self.check([tbctl], "no command given")

    def test_flagfile_and_space_separated_values_still_work(self):
        c = harness.Cluster(BUILD)
        try:
            flagfile = os.path.join(c.dir, "flags")
            with open(flagfile, "w") as f:
                f.write("# a comment\n\n--policy=nonsense\n")
            r = run([os.path.join(BUILD, "server", "tokenbroker"), "--accounts_dir", c.accounts_dir,
                     f"--flagfile={flagfile}"])
            # The flag file was read: its bad --policy is what fails.
            self.assertEqual(r.returncode, 2)
            self.assertIn("--policy", r.stderr)
        finally:
            c.close()


def watch_health(port):
    """Opens grpc.health.v1.Health/Watch on port; returns (channel, call) once the first answer came."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    watch = channel.unary_stream("/grpc.health.v1.Health/Watch", request_serializer=lambda b: b,
                                 response_deserializer=lambda b: b)
    call = watch(b"")
    first = next(call)
    return channel, call, first


class Lifecycle(unittest.TestCase):
    def setUp(self):
        self.c = harness.Cluster(BUILD)
        self.c.write_account("pro-1", harness.account_json("pro1@example.com", "1//rt-pro-1", "PRO"))
        self.c.start_upstream()

    def tearDown(self):
        self.c.close()

    def test_sigterm_exits_within_drain_timeout_with_a_health_watch_open(self):
        c = self.c
        health_port = harness.free_port()
        drain = 2.0
        broker = c.start_broker(f"--health_listen=127.0.0.1:{health_port}", f"--drain_timeout={drain:g}s")
        channel, call, first = watch_health(health_port)
        self.assertEqual(first, b"\x08\x01")  # SERVING
        api_channel, api_call, _ = watch_health(broker.port)  # one on the API port too
        idle = socket.create_connection(("127.0.0.1", health_port))  # and an idle connection
        try:
            start = time.monotonic()
            broker.proc.send_signal(signal.SIGTERM)
            broker.proc.wait(timeout=drain + 10)
            took = time.monotonic() - start
            self.assertEqual(broker.proc.returncode, 0, broker.read_log())
            self.assertLessEqual(took, drain + 1.0, f"SIGTERM took {took:.2f}s with --drain_timeout={drain}s")
        finally:
            idle.close()
            channel.close()
            api_channel.close()

    def test_start_up_logs_real_ports_and_the_account_count(self):
        c = self.c
        health_port_file = os.path.join(c.dir, "metrics.port")
        broker = c.start_broker("--health_listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                                f"--metrics_port_file={health_port_file}")
        log = broker.read_log()
        self.assertIn(f"serving on 127.0.0.1:{broker.port} ", log)
        with open(health_port_file) as f:
            metrics_port = int(f.read())
        self.assertIn(f"metrics on http://127.0.0.1:{metrics_port}/metrics", log)
        m = re.search(r"health \(grpc.health.v1 only, plaintext\) on 127\.0\.0\.1:(\d+)", log)
        self.assertTrue(m, log)
        self.assertNotEqual(int(m.group(1)), 0)
        channel, _, first = watch_health(int(m.group(1)))  # the logged port is the real one
        channel.close()
        self.assertEqual(first, b"\x08\x01")
        self.assertNotRegex(log, r"127\.0\.0\.1:0\b")
        self.assertIn("loaded 1 accounts", log)

    def test_empty_folder_logs_zero_accounts(self):
        c = harness.Cluster(BUILD)
        try:
            c.start_upstream()
            broker = c.start_broker()
            self.assertIn("loaded 0 accounts from", broker.read_log())
        finally:
            c.close()

    def test_port_in_use_is_one_clear_line(self):
        c = self.c
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = os.path.join(BUILD, "server", "tokenbroker")
        try:
            for flag in ("--listen", "--health_listen", "--metrics_listen"):
                with self.subTest(flag=flag):
                    argv = [broker, "--accounts_dir", c.accounts_dir, f"{flag}=127.0.0.1:{port}"]
                    if flag != "--listen":
                        argv.append("--listen=127.0.0.1:0")
                    r = run(argv)
                    self.assertEqual(r.returncode, 2, r.stderr)
                    lines = [line for line in r.stderr.splitlines() if line.strip()]
                    self.assertEqual(lines, [f"tokenbroker: {flag}: 127.0.0.1:{port} is already in use "
                                             "(another tokenbroker?); stop it or choose another port"])
            # A unix socket a live broker serves on is not silently taken over.
            sock = os.path.join(c.dir, "broker.sock")
            c.start_broker(listen=f"unix:{sock}")
            r = run([broker, "--accounts_dir", c.accounts_dir, f"--listen=unix:{sock}"])
            self.assertEqual(r.returncode, 2, r.stderr)
            self.assertIn(f"--listen: unix:{sock} is already in use", r.stderr)
        finally:
            taken.close()

    def test_wrong_oauth_client_turns_health_not_serving(self):
        c = self.c
        c.upstream_call("/__fake/script", {"path": "/token", "status": 401, "times": 0, "body": json.dumps(
            {"error": "invalid_client", "error_description": "The OAuth client was not found."})})
        broker = c.start_broker("--refresh_scan_interval=200ms")
        harness.wait_for(lambda: c.tbctl("health", check=False).stdout.strip() == "NOT_SERVING",
                         what="health to report the failing refreshes")
        r = c.tbctl("health", "--service", "tokenbroker.v1.TokenRefresh", check=False)
        self.assertEqual(r.stdout.strip(), "NOT_SERVING")
        log = broker.read_log()
        self.assertIn("invalid_client", log)
        self.assertRegex(log, r"health( is now)? NOT_SERVING: no account holds a valid access token and every token "
                              r"refresh since the last success failed")
        # The accounts show why.
        out = c.tbctl("list-accounts").stdout
        self.assertRegex(out, r"pro-1 .* NO_TOKEN .*refresh failing")


class OperatorViews(unittest.TestCase):
    def setUp(self):
        c = self.c = harness.Cluster(BUILD)
        for account_id, tier in (("ultra-1", "ULTRA"), ("pro-1", "PRO"), ("pro-2", "PRO"), ("free-1", "FREE"),
                                 ("free-2", "FREE")):
            c.write_account(account_id, harness.account_json(f"{account_id}@example.com", "1//rt-" + account_id, tier))
        c.start_upstream()
        # free-2's refresh keeps failing.
        c.upstream_call("/__fake/script", {"path": "/token", "match": "1//rt-free-2", "status": 503, "times": 0,
                                           "body": json.dumps({"error": "backend_error"})})
        c.start_broker()

    def tearDown(self):
        self.c.close()

    def test_list_accounts_shows_cooling_validation_and_refresh_failing(self):
        c = self.c
        c.tbctl("report-outcome", "--account", "ultra-1", "--model", MODEL, "--http_status", "429",
                "--error_body", harness.quota_exhausted_body(MODEL, "2h"))
        c.tbctl("report-outcome", "--account", "pro-1", "--model", MODEL, "--http_status", "403", "--error_body",
                json.dumps({"error": {"code": 403, "message": "Verify your account", "details": [
                    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "VALIDATION_REQUIRED",
                     "metadata": {"validation_url": "https://accounts.google.com/v/42"}}]}}))
        c.tbctl("report-outcome", "--account", "pro-2", "--model", MODEL, "--http_status", "403",
                "--error_body", json.dumps({"error": {"code": 403, "message": "The caller does not have permission"}}))

        def table():
            rows = {}
            for line in c.tbctl("list-accounts").stdout.splitlines()[1:]:
                parts = line.split(None, 5)
                rows[parts[0]] = (parts[3], parts[5] if len(parts) > 5 else "")
            return rows
        rows = harness.wait_for(lambda: (lambda t: t if t["free-2"][0] == "NO_TOKEN" and t["free-1"][0] == "ENABLED"
                                         else None)(table()), what="free-2's refresh to fail")
        self.assertEqual(rows["ultra-1"][0], "COOLING_MODEL")
        self.assertIn(f"{MODEL} cooling until", rows["ultra-1"][1])
        self.assertEqual(rows["pro-1"][0], "VALIDATION_REQUIRED")
        self.assertIn("verify the account at https://accounts.google.com/v/42", rows["pro-1"][1])
        self.assertEqual(rows["pro-2"][0], "COOLING")
        self.assertIn("account cooling until", rows["pro-2"][1])
        self.assertIn("refresh failing", rows["free-2"][1])

    def test_watch_quota_against_a_broker_says_where_to_point_it(self):
        r = self.c.tbctl("watch-quota", "--count=1", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("is not a tokenbroker-monitor", r.stderr)
        self.assertIn("point --target at the monitor", r.stderr)
        self.assertNotIn("UNIMPLEMENTED:", r.stderr)


if __name__ == "__main__":
    unittest.main()
