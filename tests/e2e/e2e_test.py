"""End to end: the fake upstream and the real tokenbroker binary on free loopback ports, driven
through tbctl and through `buf curl` with server reflection only (no proto files)."""
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BUILD = os.environ.get("TB_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
BUF = os.environ.get("TB_BUF", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "node_modules", ".bin", "buf"))

MODEL = "gemini-3-pro-high"
INVALID_GRANT = {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}


class BrokerEndToEnd(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        c = cls.cluster = harness.Cluster(BUILD, BUF)
        c.write_account("ultra-1", harness.account_json("ultra1@example.com", "1//rt-ultra-1", "ULTRA",
                                                        protected_models=["only-free-model", "not-on-ultra"]))
        c.write_account("pro-1", harness.account_json("pro1@example.com", "1//rt-pro-1", "PRO",
                                                      protected_models=["only-free-model"]))
        c.write_account("pro-2", harness.account_json("pro2@example.com", "1//rt-pro-2", "g1-pro-tier",
                                                      protected_models=["only-free-model"]))
        c.write_account("free-1", harness.account_json("free1@example.com", "1//rt-free-1", "FREE"))
        # Top tier, so selection would prefer it: its refresh token is revoked upstream.
        cls.revoked_doc = harness.account_json("revoked@example.com", "1//rt-revoked", "ULTRA",
                                               custom_field={"kept": [1, 2, 3]}, last_used=1764000100)
        cls.revoked_path = c.write_account("revoked", cls.revoked_doc)
        cls.bad = {
            "malformed": os.path.join(c.accounts_dir, "malformed.json"),
            "empty": os.path.join(c.accounts_dir, "empty.json"),
            "unreadable": os.path.join(c.accounts_dir, "unreadable.json"),
        }
        with open(cls.bad["malformed"], "w") as f:
            f.write('{"email": "broken@example.com", "token": {')
        open(cls.bad["empty"], "w").close()
        # Unreadable even for root: a link to nothing.
        os.symlink(os.path.join(c.dir, "no-such-file"), cls.bad["unreadable"])

        c.start_upstream()
        c.upstream_call("/__fake/script", {"path": "/token", "match": "1//rt-revoked", "status": 400,
                                           "body": json.dumps(INVALID_GRANT), "times": 0})
        cls.metrics_port_file = os.path.join(c.dir, "metrics.port")
        c.start_broker(*cls.broker_flags())

    @classmethod
    def broker_flags(cls):
        return ["--log_level=debug", "--policy=balance", "--metrics_listen=127.0.0.1:0",
                f"--metrics_port_file={cls.metrics_port_file}"]

    @classmethod
    def tearDownClass(cls):
        cls.cluster.close()

    def wait_revoked_disabled(self):
        def disabled():
            accounts = {a["accountId"]: a for a in self.cluster.tbctl_json("list-accounts")["accounts"]}
            return accounts.get("revoked", {}).get("state") == "ACCOUNT_STATE_DISABLED"
        harness.wait_for(disabled, what="the revoked account to be disabled")

    def test_bad_files_are_reported_by_path_and_skipped(self):
        logs = self.cluster.broker_logs()
        for name, path in self.bad.items():
            self.assertIn(f"skipping account file {path}:", logs, name)
        self.assertRegex(logs, r"malformed\.json: not valid JSON")
        self.assertRegex(logs, r"empty\.json: file is empty")
        self.assertRegex(logs, r"unreadable\.json: cannot open")
        ids = sorted(a["accountId"] for a in self.cluster.tbctl_json("list-accounts")["accounts"])
        self.assertEqual(ids, ["free-1", "pro-1", "pro-2", "revoked", "ultra-1"])

    def test_get_token_through_buf_curl_with_reflection_only(self):
        r = self.cluster.buf_curl("tokenbroker.v1.TokenBrokerService/GetToken", {"model": MODEL})
        self.assertEqual(r.returncode, 0, r.stderr)
        resp = json.loads(r.stdout)
        self.assertTrue(resp["accessToken"].startswith("ya29.fake-"))
        self.assertEqual(resp["tier"], "TIER_ULTRA")
        self.assertEqual(resp["accountId"], "ultra-1")
        self.assertEqual(resp["projectId"], "proj-ultra1")

    def test_health_check_through_buf_curl_with_reflection_only(self):
        r = self.cluster.buf_curl("grpc.health.v1.Health/Check", {})
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout), {"status": "SERVING"})
        r = self.cluster.buf_curl("grpc.health.v1.Health/Check", {"service": "tokenbroker.v1.TokenBrokerService"})
        self.assertEqual(json.loads(r.stdout), {"status": "SERVING"})

    def test_invalid_arguments_name_the_field(self):
        cases = [
            ({"model": ""}, "model"),
            ({"model": MODEL, "sessionId": "s" * 10240}, "session_id"),
            ({"model": "gemini 3 pro"}, "model"),
        ]
        for body, field in cases:
            r = self.cluster.buf_curl("tokenbroker.v1.TokenBrokerService/GetToken", body)
            self.assertNotEqual(r.returncode, 0)
            err = json.loads(r.stderr)
            self.assertEqual(err["code"], "invalid_argument", r.stderr)
            self.assertTrue(err["message"].startswith(field + ":"), err["message"])
            self.assertEqual(err["details"][0]["type"], "google.rpc.BadRequest")

    def test_tiers_in_order_sessions_stick_and_force_rotate_moves(self):
        c = self.cluster
        self.wait_revoked_disabled()
        self.assertEqual(c.tbctl_json("get-token", "--model", MODEL)["accountId"], "ultra-1")
        self.assertIn(c.tbctl_json("get-token", "--model", "not-on-ultra")["accountId"], ("pro-1", "pro-2"))
        self.assertEqual(c.tbctl_json("get-token", "--model", "only-free-model")["accountId"], "free-1")
        first = c.tbctl_json("get-token", "--model", MODEL, "--session", "conv-42")["accountId"]
        for _ in range(5):
            c.tbctl_json("get-token", "--model", MODEL)  # other traffic in between
            self.assertEqual(c.tbctl_json("get-token", "--model", MODEL, "--session", "conv-42")["accountId"], first)
        moved = c.tbctl_json("get-token", "--model", MODEL, "--session", "conv-42", "--force_rotate")["accountId"]
        self.assertNotEqual(moved, first)
        self.assertEqual(c.tbctl_json("get-token", "--model", MODEL, "--session", "conv-42")["accountId"], moved)

    def test_explain_names_every_verdict(self):
        self.wait_revoked_disabled()
        out = self.cluster.tbctl_json("explain", "--model", "only-free-model")
        verdicts = {a["accountId"]: a["verdict"] for a in out["accounts"]}
        self.assertEqual(verdicts, {
            "free-1": "VERDICT_CHOSEN", "ultra-1": "VERDICT_PROTECTED", "pro-1": "VERDICT_PROTECTED",
            "pro-2": "VERDICT_PROTECTED", "revoked": "VERDICT_DISABLED",
        })
        self.assertEqual(out["chosenAccountId"], "free-1")
        details = {a["accountId"]: a["detail"] for a in out["accounts"]}
        self.assertIn("protected_models", details["pro-1"])
        self.assertIn("invalid_grant", details["revoked"])

    def test_invalid_grant_disables_persistently_and_keeps_the_file(self):
        c = self.cluster
        self.wait_revoked_disabled()
        for i in range(20):
            got = c.tbctl_json("get-token", "--model", MODEL, "--session", f"s{i}")["accountId"]
            self.assertNotEqual(got, "revoked")
        with open(self.revoked_path) as f:
            doc = json.load(f)
        self.assertIs(doc["disabled"], True)
        self.assertIn("invalid_grant", doc["disabled_reason"])
        self.assertIn("Token has been expired or revoked.", doc["disabled_reason"])
        for key, value in self.revoked_doc.items():
            if key in ("disabled", "disabled_reason"):
                continue
            self.assertEqual(doc[key], value, key)
        self.assertEqual(oct(os.stat(self.revoked_path).st_mode & 0o777), "0o600")

        # Restart: still disabled, and the revoked token is not tried again.
        calls_before = c.upstream_call("/__fake/stats")["token_calls"]["1//rt-revoked"]
        self.assertEqual(c.broker.stop(), 0)
        c.start_broker(*self.broker_flags())
        accounts = {a["accountId"]: a for a in c.tbctl_json("list-accounts")["accounts"]}
        self.assertEqual(accounts["revoked"]["state"], "ACCOUNT_STATE_DISABLED")
        self.assertIn("invalid_grant", accounts["revoked"]["disabledReason"])
        for i in range(10):
            self.assertNotEqual(c.tbctl_json("get-token", "--model", MODEL, "--session", f"r{i}")["accountId"], "revoked")
        self.assertEqual(c.upstream_call("/__fake/stats")["token_calls"]["1//rt-revoked"], calls_before)

    def test_new_account_file_is_picked_up_without_restart(self):
        c = self.cluster
        c.write_account("late-ultra", harness.account_json("late@example.com", "1//rt-late", "ULTRA",
                                                           protected_models=[]))
        try:
            def seen():
                return any(a["accountId"] == "late-ultra" for a in c.tbctl_json("list-accounts")["accounts"])
            harness.wait_for(seen, what="the new account to load")
        finally:
            os.remove(os.path.join(c.accounts_dir, "late-ultra.json"))
        harness.wait_for(lambda: not any(a["accountId"] == "late-ultra"
                                         for a in c.tbctl_json("list-accounts")["accounts"]),
                         what="the removed account to unload")

    def test_zz_metrics_count_calls_and_carry_no_secret_labels(self):
        """Runs after the others (name order), so the broker has served a real mix of calls."""
        c = self.cluster
        c.tbctl_json("get-token", "--model", MODEL, "--session", "conv-metrics")
        c.buf_curl("tokenbroker.v1.TokenBrokerService/GetToken", {"model": "bad model"})
        with open(self.metrics_port_file) as f:
            port = int(f.read())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        samples = {}
        labels_seen = set()
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, value = line.rsplit(" ", 1)
            samples[name_labels] = float(value)
            labels_seen.update(re.findall(r'="([^"]*)"', name_labels))
        get_ok = 'tokenbroker_rpc_total{code="OK",method="/tokenbroker.v1.TokenBrokerService/GetToken"}'
        self.assertGreater(samples.get(get_ok, 0), 0, text)
        self.assertGreater(samples.get('tokenbroker_rpc_total{code="INVALID_ARGUMENT",method="/tokenbroker.v1.TokenBrokerService/GetToken"}', 0), 0)
        buckets = [v for k, v in samples.items()
                   if k.startswith('tokenbroker_rpc_duration_seconds_bucket{method="/tokenbroker.v1.TokenBrokerService/GetToken"')]
        self.assertGreater(len(buckets), 5)
        self.assertGreater(max(buckets), 0)
        # (The broker scraped is the one restarted in an earlier test: its tokens came from the files.)
        for result in ("ok", "invalid_grant", "error"):
            self.assertIn(f'tokenbroker_token_refreshes_total{{result="{result}"}}', samples)
        self.assertGreater(samples.get('tokenbroker_session_rebinds_total{reason="new"}', 0), 0)
        self.assertEqual(samples.get('tokenbroker_accounts{state="disabled"}'), 1.0)
        # No label value is a session id, an email or a token.
        secrets = set(c.upstream_call("/__fake/stats")["issued_access_tokens"])
        for value in labels_seen:
            self.assertNotIn("@", value)
            self.assertNotIn(value, secrets)
            self.assertFalse(value.startswith(("ya29", "1//", "conv-", "s1", "r1")), value)

    def test_zz_no_token_in_any_log_line(self):
        """Runs last (name order) so it reads the logs of every test above, at debug level."""
        c = self.cluster
        c.tbctl_json("get-token", "--model", MODEL)
        stats = c.upstream_call("/__fake/stats")
        issued = stats["issued_access_tokens"]
        self.assertGreater(len(issued), 3)
        secrets = issued + ["1//rt-ultra-1", "1//rt-pro-1", "1//rt-pro-2", "1//rt-free-1", "1//rt-revoked",
                            "demo-secret"]
        logs = c.broker_logs() + c.upstream.read_log()
        self.assertIn("debug", logs)  # the logs were at debug level
        for secret in secrets:
            self.assertNotIn(secret, logs)
            # Not even a recognisable half of one.
            self.assertNotIn(secret[: len(secret) // 2 + 4], logs)


class BrokerLifecycle(unittest.TestCase):
    def test_sigterm_turns_health_not_serving_at_once_and_lets_in_flight_calls_finish(self):
        import grpc  # Debian's python3-grpcio; raw bytes, no generated code needed
        c = harness.Cluster(BUILD, BUF)
        try:
            # The file's token has 2 minutes left: not due for background renewal (1 min ahead), but
            # below min_token_ttl (5 min), so GetToken itself refreshes it — slowly.
            doc = harness.account_json("a@example.com", "1//rt-a", "PRO")
            doc["token"].update(access_token="ya29.file-token", expiry_timestamp=int(time.time()) + 120)
            c.write_account("a", doc)
            c.start_upstream()
            c.upstream_call("/__fake/script", {"path": "/token", "status": 200, "delay_ms": 2500, "times": 1,
                                               "body": json.dumps({"access_token": "ya29.after-drain", "expires_in": 3599})})
            c.start_broker("--refresh_ahead=1m", "--min_token_ttl=5m", "--drain_timeout=10s")
            channel = grpc.insecure_channel(c.target)
            watch = channel.unary_stream("/grpc.health.v1.Health/Watch")(b"", timeout=30)
            self.assertEqual(next(watch), b"\x08\x01")  # SERVING
            get_token = channel.unary_unary("/tokenbroker.v1.TokenBrokerService/GetToken").future(b"\n\x01m", timeout=30)
            harness.wait_for(lambda: c.upstream_call("/__fake/stats")["in_flight"].get("/token", 0) == 1,
                             what="GetToken's refresh to be in flight")
            self.assertFalse(get_token.done())
            sigterm_at = time.monotonic()
            c.broker.proc.send_signal(signal.SIGTERM)
            self.assertEqual(next(watch), b"\x08\x02")  # NOT_SERVING
            self.assertLess(time.monotonic() - sigterm_at, 1.0)
            self.assertFalse(get_token.done(), "the in-flight call is still running while health says NOT_SERVING")
            reply = get_token.result(timeout=20)  # ...and completes
            self.assertIn(b"ya29.after-drain", reply)
            self.assertEqual(c.broker.proc.wait(timeout=15), 0)
            self.assertLess(time.monotonic() - sigterm_at, 10 + 2)
            self.assertIn("draining", c.broker_logs())
            channel.close()
        finally:
            c.close()

    def test_health_not_serving_without_usable_accounts_then_serving(self):
        c = harness.Cluster(BUILD, BUF)
        try:
            c.start_upstream()
            c.start_broker()
            r = c.tbctl("health", check=False)
            self.assertEqual(r.stdout.strip(), "NOT_SERVING")
            r = c.tbctl("get-token", "--model", MODEL, check=False)
            self.assertIn("UNAVAILABLE", r.stderr)
            c.write_account("a", harness.account_json("a@example.com", "1//rt-a", "PRO"))
            harness.wait_for(lambda: c.tbctl("health", check=False).stdout.strip() == "SERVING",
                             what="health to turn SERVING")
        finally:
            c.close()

    def test_unix_socket_and_json_logs(self):
        c = harness.Cluster(BUILD, BUF)
        try:
            c.write_account("a", harness.account_json("a@example.com", "1//rt-a", "PRO"))
            c.start_upstream()
            sock = os.path.join(c.dir, "broker.sock")
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            health_port = probe.getsockname()[1]
            probe.close()
            c.start_broker("--log_format=json", "--log_level=debug", f"--health_listen=127.0.0.1:{health_port}",
                           listen="unix:" + sock)
            # Kubelet probes reach health on a numeric plaintext port; the token service is not there.
            self.assertEqual(c.tbctl("health", target=f"127.0.0.1:{health_port}").stdout.strip(), "SERVING")
            r = c.tbctl("get-token", "--model", MODEL, target=f"127.0.0.1:{health_port}", check=False)
            self.assertIn("UNIMPLEMENTED", r.stderr)
            r = subprocess.run([c.bin("client", "tbctl"), "--target", "unix:" + sock, "--json", "get-token",
                                "--model", MODEL], capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(json.loads(r.stdout)["accountId"], "a")
            self.assertEqual(c.broker.stop(), 0)
            lines = [line for line in c.broker_logs().splitlines() if line.strip()]
            self.assertGreater(len(lines), 3)
            for line in lines:
                entry = json.loads(line)  # every line is one JSON object
                self.assertEqual(sorted(entry), ["level", "msg", "time"])
            self.assertTrue(any("GetToken" in json.loads(line)["msg"] for line in lines))
        finally:
            c.close()

    def test_read_only_accounts_directory(self):
        """A mounted Secret is read-only: the broker serves from it, keeps what it cannot write in
        memory, and says so once."""
        c = harness.Cluster(BUILD, BUF)
        try:
            good = c.write_account("good", harness.account_json("good@example.com", "1//rt-good", "PRO"))
            revoked = c.write_account("revoked", harness.account_json("revoked@example.com", "1//rt-revoked", "ULTRA"))
            before = {p: open(p).read() for p in (good, revoked)}
            c.start_upstream()
            c.upstream_call("/__fake/script", {"path": "/token", "match": "1//rt-revoked", "status": 400,
                                               "body": json.dumps(INVALID_GRANT), "times": 0})
            # Root ignores file modes, so the broker runs as nobody (from a copy it can read) when we
            # are root; the folder is not writable for it either way.
            os.chmod(c.dir, 0o755)
            run_dir = os.path.join(c.dir, "run")
            os.mkdir(run_dir)
            binary = os.path.join(run_dir, "tokenbroker")
            shutil.copy(c.bin("server", "tokenbroker"), binary)
            runner = ()
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                for p in (good, revoked, run_dir):
                    os.chown(p, nobody.pw_uid, nobody.pw_gid)
                runner = ("runuser", "-u", "nobody", "--")
            os.chmod(c.accounts_dir, 0o555)
            c.start_broker("--log_level=debug", "--refresh_ahead=60m", "--refresh_scan_interval=100ms",
                           binary=binary, runner=runner, run_dir=run_dir)

            def disabled():
                accounts = {a["accountId"]: a for a in c.tbctl_json("list-accounts")["accounts"]}
                return accounts["revoked"]["state"] == "ACCOUNT_STATE_DISABLED"
            harness.wait_for(disabled, what="the revoked account to be disabled")
            for i in range(10):
                self.assertEqual(c.tbctl_json("get-token", "--model", MODEL, "--session", f"s{i}")["accountId"], "good")
            # Tokens expire within refresh_ahead: the background refresher keeps renewing (and failing to write).
            harness.wait_for(lambda: c.upstream_call("/__fake/stats")["token_calls"].get("1//rt-good", 0) >= 3,
                             what="repeated refreshes")
            self.assertTrue(disabled(), "stays disabled for the life of the process")
            logs = c.broker_logs()
            self.assertEqual(logs.count("is read-only"), 1, logs)
            self.assertIn(c.accounts_dir, logs)
            self.assertEqual({p: open(p).read() for p in (good, revoked)}, before)
        finally:
            os.chmod(c.accounts_dir, 0o755)
            c.close()

    def test_bad_flags_exit_with_one_clear_line(self):
        c = harness.Cluster(BUILD, BUF)
        try:
            r = subprocess.run([c.bin("server", "tokenbroker"), "--accounts_dir", c.accounts_dir, "--policy", "random"],
                               capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 2)
            self.assertIn("--policy", r.stderr)
            r = subprocess.run([c.bin("server", "tokenbroker")], capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 2)
            self.assertIn("--accounts_dir is required", r.stderr)
            r = subprocess.run([c.bin("server", "tokenbroker"), "--accounts_dir", "/nonexistent/dir"],
                               capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 2)
            self.assertIn("does not exist", r.stderr)
        finally:
            c.close()


if __name__ == "__main__":
    unittest.main()
