"""Security end to end (docs/ARCHITECTURE.md §8): the real broker with mutual TLS on its API port, caller bearer
tokens, an admin token and the audit log; the plaintext health port for probes. Certificates are
made for the test by openssl in a temp folder."""
import json
import os
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BUILD = os.environ.get("TB_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
CALLER_TOKEN = "caller-token-0123456789abcdef"
OTHER_TOKEN = "other-token-fedcba9876543210"
ADMIN_TOKEN = "admin-token-0a1b2c3d4e5f6a7b8c9d"


make_pki = harness.make_pki


class Security(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        c = cls.cluster = harness.Cluster(BUILD)
        c.write_account("acct-a", harness.account_json("a@example.com", "1//rt-a", "PRO"))
        c.start_upstream()
        make_pki(c.dir)
        with open(cls.pki("callers.txt"), "w") as f:
            f.write(f"# name token\nproxy-a {CALLER_TOKEN}\n\nproxy-b {OTHER_TOKEN}\n")
        with open(cls.pki("admin.txt"), "w") as f:
            f.write(ADMIN_TOKEN + "\n")
        cls.audit = cls.pki("audit.jsonl")
        cls.health_port = harness.free_port()
        c.start_broker("--log_level=debug", f"--caller_tokens_file={cls.pki('callers.txt')}",
                       f"--admin_token_file={cls.pki('admin.txt')}", f"--tls_cert_file={cls.pki('server.pem')}",
                       f"--tls_key_file={cls.pki('server.key')}", f"--tls_client_ca_file={cls.pki('ca.pem')}",
                       f"--audit_log={cls.audit}", f"--health_listen=127.0.0.1:{cls.health_port}")

    @classmethod
    def pki(cls, name):
        return os.path.join(cls.cluster.dir, name)

    @classmethod
    def tearDownClass(cls):
        cls.cluster.close()

    def tbctl(self, *args, token=None, tls=True, client_cert=True):
        argv = [self.cluster.bin("client", "tbctl"), "--target", self.cluster.target, "--json", "--timeout=5s"]
        if tls:
            argv.append(f"--tls_ca_file={self.pki('ca.pem')}")
            if client_cert:
                argv += [f"--tls_cert_file={self.pki('client.pem')}", f"--tls_key_file={self.pki('client.key')}"]
        env = {k: v for k, v in os.environ.items() if k != "TOKENBROKER_TOKEN"}
        if token:
            env["TOKENBROKER_TOKEN"] = token
        return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=30, env=env)

    def test_a_caller_token_gets_a_token_over_mutual_tls(self):
        r = self.tbctl("get-token", "--model=gemini-3-pro-high", "--session=conv-secret-1", "--show_token",
                       token=CALLER_TOKEN)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["accountId"], "acct-a")

    def test_b_missing_or_unknown_token_is_unauthenticated(self):
        for token in (None, "not-a-known-token-at-all-0000"):
            r = self.tbctl("get-token", "--model=gemini-3-pro-high", token=token)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("UNAUTHENTICATED", r.stderr)
            if token:
                self.assertNotIn(token, r.stderr)

    def test_c_admin_methods_need_the_admin_token(self):
        r = self.tbctl("list-accounts", token=CALLER_TOKEN)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("PERMISSION_DENIED", r.stderr)
        self.assertIn("proxy-a", r.stderr)
        r = self.tbctl("explain", "--model=gemini-3-pro-high", token=OTHER_TOKEN)
        self.assertIn("PERMISSION_DENIED", r.stderr)
        r = self.tbctl("list-accounts", token=ADMIN_TOKEN)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual([a["accountId"] for a in json.loads(r.stdout)["accounts"]], ["acct-a"])
        # The admin token also works for caller methods.
        self.assertEqual(self.tbctl("get-token", "--model=m-admin", token=ADMIN_TOKEN).returncode, 0)

    def test_d_plaintext_or_certificateless_clients_cannot_connect(self):
        r = self.tbctl("get-token", "--model=gemini-3-pro-high", token=CALLER_TOKEN, tls=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("UNAVAILABLE", r.stderr)
        r = self.tbctl("get-token", "--model=gemini-3-pro-high", token=CALLER_TOKEN, client_cert=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("UNAVAILABLE", r.stderr)

    def test_e_health_stays_on_the_plaintext_port_for_probes(self):
        r = self.cluster.tbctl("health", target=f"127.0.0.1:{self.health_port}")
        self.assertEqual(r.stdout.strip(), "SERVING")
        # Health needs no token on the API port either (probes and load balancers carry none).
        r = self.tbctl("health")
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_f_the_python_example_proxy_works_against_the_secured_broker(self):
        repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
        env = dict(os.environ, PYTHONPATH=os.path.join(os.path.abspath(BUILD), "python"),
                   TOKENBROKER_TOKEN=CALLER_TOKEN)
        r = subprocess.run(["/usr/bin/python3", os.path.join(repo, "client", "python", "proxy_example.py"),
                            "--broker", self.cluster.target, "--upstream",
                            f"http://127.0.0.1:{self.cluster.upstream.port}", "--model", "model-python",
                            "--tls-ca", self.pki("ca.pem"), "--tls-cert", self.pki("client.pem"),
                            "--tls-key", self.pki("client.key")], capture_output=True, text=True, timeout=60, env=env)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("served by acct-a", r.stdout)

    def test_g_the_node_example_proxy_works_against_the_secured_broker(self):
        repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
        env = dict(os.environ, TOKENBROKER_TOKEN=CALLER_TOKEN)
        r = subprocess.run(["node", "proxy_example.js", "--broker", self.cluster.target, "--upstream",
                            f"http://127.0.0.1:{self.cluster.upstream.port}", "--model", "model-node",
                            "--tls-ca", self.pki("ca.pem"), "--tls-cert", self.pki("client.pem"),
                            "--tls-key", self.pki("client.key")],
                           cwd=os.path.join(repo, "client", "node"), capture_output=True, text=True, timeout=60, env=env)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("served by acct-a", r.stdout)

    def test_x_rotated_token_files_take_effect_without_a_restart(self):
        rotated = "caller-token-rotated-0011223344"
        with open(self.pki("callers.txt.new"), "w") as f:
            f.write(f"proxy-a {rotated}\nproxy-b {OTHER_TOKEN}\n")
        os.replace(self.pki("callers.txt.new"), self.pki("callers.txt"))  # as a Secret update swaps the file
        harness.wait_for(lambda: self.tbctl("get-token", "--model=m-rot", token=rotated).returncode == 0,
                         what="the rotated token to be accepted")
        r = self.tbctl("get-token", "--model=m-rot", token=CALLER_TOKEN)
        self.assertIn("UNAUTHENTICATED", r.stderr)
        # A broken file is refused; the tokens in use stay.
        with open(self.pki("callers.txt.new"), "w") as f:
            f.write("proxy-a\n")
        os.replace(self.pki("callers.txt.new"), self.pki("callers.txt"))
        harness.wait_for(lambda: "cannot be used" in self.cluster.broker_logs(), what="the refusal in the log")
        self.assertEqual(self.tbctl("get-token", "--model=m-rot", token=rotated).returncode, 0)
        self.assertNotIn(rotated, self.cluster.broker_logs())

    def test_z_audit_log_has_one_line_per_issuance_and_no_secret(self):
        ok = self.tbctl("get-token", "--model=model-audit", "--session=conv-secret-2", token=OTHER_TOKEN)
        self.assertEqual(ok.returncode, 0, ok.stderr)
        lease = json.loads(ok.stdout)["leaseId"]
        # The log is flushed every second: poll for the line.
        def line_for_lease():
            try:
                with open(self.audit) as f:
                    lines = [json.loads(x) for x in f if x.strip()]
            except FileNotFoundError:
                return None
            return next((x for x in lines if x.get("lease_id") == lease and x["event"] == "token_issued"), None)
        entry = harness.wait_for(line_for_lease, timeout=10, what="the audit line")
        self.assertEqual(entry["caller"], "proxy-b")
        self.assertEqual(entry["account_id"], "acct-a")
        self.assertEqual(entry["model"], "model-audit")
        self.assertEqual(entry["event"], "token_issued")
        self.assertRegex(entry["session"], r"^[0-9a-f]{16}$")  # HMAC-SHA256, keyed, truncated (issue 11)
        self.assertEqual(os.stat(self.audit).st_mode & 0o777, 0o600)
        with open(self.audit) as f:
            audit = f.read()
        logs = self.cluster.broker_logs()
        issued = self.cluster.upstream_call("/__fake/stats")["issued_access_tokens"]
        for secret in [CALLER_TOKEN, OTHER_TOKEN, ADMIN_TOKEN, "conv-secret-1", "conv-secret-2", "1//rt-a"] + issued:
            self.assertNotIn(secret, audit)
            self.assertNotIn(secret, logs)
        self.assertIn("over mutual TLS", logs)


if __name__ == "__main__":
    unittest.main()
