"""The polyglot example clients against live brokers: client/python and client/node, each over TCP
and over the unix socket, with the fake upstream on loopback."""
import os
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("TB_BUILD_DIR", os.path.join(REPO, "build"))


class ClientsTest(unittest.TestCase):
    def test_python_client(self):
        env = dict(os.environ, TB_BUILD_DIR=BUILD)
        r = subprocess.run(["/usr/bin/python3", os.path.join(REPO, "client", "python", "test_proxy_example.py"), "-v"],
                           capture_output=True, text=True, timeout=300, env=env)
        sys.stderr.write(r.stderr)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("Ran 3 tests", r.stderr)

    def test_node_client(self):
        c = harness.Cluster(BUILD)
        try:
            c.write_account("ultra", harness.account_json("u@example.com", "1//rt-ultra", "ULTRA"))
            c.write_account("pro", harness.account_json("p@example.com", "1//rt-pro", "PRO"))
            c.start_upstream()
            sock = os.path.join(c.dir, "broker.sock")
            c.start_broker(listen="unix:" + sock)
            c.start_broker()
            env = dict(os.environ, TB_UPSTREAM=f"http://127.0.0.1:{c.upstream.port}", TB_TCP_TARGET=c.target,
                       TB_UNIX_TARGET="unix:" + sock)
            r = subprocess.run(["node", "--test", "test/"], cwd=os.path.join(REPO, "client", "node"),
                               capture_output=True, text=True, timeout=300, env=env)
            sys.stderr.write(r.stdout)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertIn("# pass 3", r.stdout)
            self.assertIn("# fail 0", r.stdout)
        finally:
            c.close()


if __name__ == "__main__":
    unittest.main()
