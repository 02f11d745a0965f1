"""The client libraries in the proxies' own languages (issue 17), Python and Node.js, each with its own
tests against live brokers (TCP, unix socket, TLS with a bearer token) and the fake upstream; and the
README's "Calling it from a proxy" section showing exactly the example programs those tests run. The
Go library has its own ctest entry (go_client_test)."""
import os
import re
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.path.abspath(os.environ.get("TB_BUILD_DIR", os.path.join(REPO, "build")))
QUOTA_429 = ('{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"You have exhausted your capacity on this '
             'model.","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"QUOTA_EXHAUSTED",'
             '"metadata":{"quotaResetDelay":"1h"}}]}}')
CALLER_TOKEN = "node-caller-token-0123456789abcdef"


make_pki = harness.make_pki


class ClientsTest(unittest.TestCase):
    def test_python_client(self):
        env = dict(os.environ, TB_BUILD_DIR=BUILD)
        r = subprocess.run(["/usr/bin/python3", os.path.join(REPO, "client", "python", "test_tokenbroker.py"), "-v"],
                           capture_output=True, text=True, timeout=300, env=env)
        sys.stderr.write(r.stderr)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertRegex(r.stderr, r"Ran 1[0-9] tests")
        self.assertNotIn("skipped", r.stderr)

    def test_node_client(self):
        c = harness.Cluster(BUILD)
        try:
            c.write_account("ultra", harness.account_json("u@example.com", "1//rt-ultra", "ULTRA"))
            c.write_account("pro", harness.account_json("p@example.com", "1//rt-pro", "PRO"))
            c.start_upstream()
            sock = os.path.join(c.dir, "broker.sock")
            c.start_broker(listen="unix:" + sock)
            make_pki(c.dir)
            callers = harness.write_callers_file(c.dir, {"proxy-node": CALLER_TOKEN})
            c.start_broker(f"--caller_tokens_file={callers}", f"--tls_cert_file={c.dir}/server.pem",
                           f"--tls_key_file={c.dir}/server.key", f"--tls_client_ca_file={c.dir}/ca.pem")
            tls_target = f"localhost:{c.broker.port}"  # a name: TLS sends no IP address as SNI
            c.start_broker()
            env = dict(os.environ, TB_UPSTREAM=f"http://127.0.0.1:{c.upstream.port}", TB_TCP_TARGET=c.target,
                       TB_UNIX_TARGET="unix:" + sock, TB_TLS_TARGET=tls_target, TB_PKI_DIR=c.dir,
                       TB_CALLER_TOKEN=CALLER_TOKEN)
            r = subprocess.run(["node", "--test", "test/"], cwd=os.path.join(REPO, "client", "node"),
                               capture_output=True, text=True, timeout=300, env=env)
            sys.stderr.write(r.stdout)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertIn("# pass 12", r.stdout)
            self.assertIn("# fail 0", r.stdout)
        finally:
            c.close()

    def test_readme_shows_the_tested_examples(self):
        with open(os.path.join(REPO, "README.md")) as f:
            readme = f.read()
        m = re.search(r"^## Calling it from a proxy: Go, Python, Node\.js\n(.*?)(?=^## )", readme, re.M | re.S)
        self.assertIsNotNone(m, "README has no 'Calling it from a proxy' section")
        blocks = dict(re.findall(r"```(go|python|js)\n(.*?)```", m.group(1), re.S))
        for lang, path in (("go", "client/go/serve_example/main.go"), ("python", "client/python/serve_example.py"),
                           ("js", "client/node/serve_example.js")):
            with open(os.path.join(REPO, path)) as f:
                self.assertEqual(blocks.get(lang), f.read(), f"the README's {lang} example is not {path} as tested")


if __name__ == "__main__":
    unittest.main()
