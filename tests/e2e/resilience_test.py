"""End to end, issue 11 "Done when": the crash-consistency loop and the OAuth fault matrix.

- Crash consistency: the real broker rewrites account files all the time (tokens that expire within
  the refresh window, a fast refresh scan) and is SIGKILLed at random moments, 30+ times. After every
  kill each account file still parses and keeps the fields the broker does not know, and after every
  restart no temp file of an earlier process is left.
- OAuth fault matrix: one account's refresh meets each failure Google's token endpoint (or the
  network) can produce — 500, connection reset, connection refused, garbage JSON, 200 without
  access_token, a hang, a slow answer — while two accounts hold valid tokens. Ten concurrent callers
  with a 5 s deadline must all get a token, fast, and the failing account's refresh is not retried
  on every call.
"""
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
import unittest

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from hostile_test import Broker, BUILD  # noqa: E402

UNKNOWN = {"custom_field": {"nested": [1, 2, 3]}, "device_profile": "kept-as-is"}


class CrashConsistency(unittest.TestCase):
    KILLS = 32

    def test_sigkill_during_write_back_never_corrupts_the_folder(self):
        c = harness.Cluster(BUILD)
        try:
            ids = [f"acct-{i}" for i in range(6)]
            for i, account_id in enumerate(ids):
                c.write_account(account_id, harness.account_json(f"{account_id}@example.com", f"1//rt-{i}", "PRO",
                                                                  **UNKNOWN))
            c.start_upstream()
            # Every token lasts 400 s: inside the 15 min refresh window, so each scan rewrites every file.
            c.upstream_call("/__fake/expires_in", {"seconds": 400})
            rng = random.Random(11)
            temp_seen = 0
            for run in range(self.KILLS):
                broker = c.start_broker("--refresh_scan_interval=10ms", "--refresh_workers=4")
                old_pid = broker.proc.pid
                # After a restart, no temp file of an earlier process is left.
                for name in os.listdir(c.accounts_dir):
                    if ".json.tmp." in name:
                        self.assertEqual(name.rsplit(".", 1)[1], str(old_pid), f"run {run}: {name} left behind")
                before = c.upstream_call("/__fake/stats")["calls"].get("/token", 0)
                harness.wait_for(lambda: c.upstream_call("/__fake/stats")["calls"].get("/token", 0) >= before + 6,
                                 what="write-backs to start")
                time.sleep(rng.uniform(0.0, 0.25))  # a random moment in the middle of the writes
                broker.proc.send_signal(signal.SIGKILL)
                broker.proc.wait()
                broker.log.close()
                temp_seen += sum(".json.tmp." in n for n in os.listdir(c.accounts_dir))
                for account_id in ids:
                    with open(os.path.join(c.accounts_dir, account_id + ".json")) as f:
                        doc = json.load(f)  # parses: never a torn file
                    for key, value in UNKNOWN.items():
                        self.assertEqual(doc.get(key), value, f"run {run}: {account_id} lost {key}")
                    self.assertEqual(doc["email"], f"{account_id}@example.com")
            # The last restart cleans up too.
            broker = c.start_broker("--refresh_scan_interval=1h")
            leftovers = [n for n in os.listdir(c.accounts_dir) if ".json.tmp." in n and not n.endswith(str(broker.proc.pid))]
            self.assertEqual(leftovers, [])
            print(f"\n{self.KILLS} SIGKILLs during write-back; temp files found after a kill: {temp_seen}",
                  file=sys.stderr)
        finally:
            c.close()


class ResettingServer:
    """A TCP server that answers every connection with a reset (RST), as a broken network would."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.recv(1024)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self):
        self.sock.close()


class OAuthFaultMatrix(unittest.TestCase):
    CALLERS = 10
    DEADLINE = 5.0

    def run_fault(self, name, script=None, token_url=None, counter=None):
        c = harness.Cluster(BUILD)
        brokers = []
        try:
            expiry = int(time.time()) + 3600
            c.write_account("acct-a", harness.account_json("a@example.com", "1//rt-a", "ULTRA"))
            for x in ("b", "c"):
                doc = harness.account_json(f"{x}@example.com", f"1//rt-{x}", "PRO")
                doc["token"]["access_token"] = f"ya29.seeded-{x}"
                doc["token"]["expiry_timestamp"] = expiry
                c.write_account(f"acct-{x}", doc)
            c.start_upstream()
            if script:
                c.upstream_call("/__fake/script", dict(path="/token", times=0, match="1//rt-a", **script))
            flags = ["--refresh_scan_interval=1h"]
            if token_url:
                flags.append(f"--oauth_token_url={token_url}")
            c.start_broker(*flags)
            b = Broker(c.target)
            brokers.append(b)
            results = []

            def caller():
                start = time.monotonic()
                try:
                    t = b.get_token(timeout=self.DEADLINE)
                    results.append(("OK", t.account_id, t.access_token, time.monotonic() - start))
                except grpc.RpcError as e:
                    results.append((e.code().name, "", "", time.monotonic() - start))
            for wave in range(2):  # a second wave: the failing account is remembered
                threads = [threading.Thread(target=caller) for _ in range(self.CALLERS)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            outcomes = [r[0] for r in results]
            self.assertEqual(outcomes, ["OK"] * (2 * self.CALLERS), f"{name}: {results}")
            worst = max(r[3] for r in results)
            self.assertLess(worst, 2.5, f"{name}: slowest caller {worst:.2f}s: {results}")
            for r in results:
                if r[1] == "acct-a":
                    self.assertNotIn(r[2], ("", "ya29.garbage"), name)
            attempts = counter() if counter else c.upstream_call("/__fake/stats")["token_calls"].get("1//rt-a", 0)
            # One refresh (the OAuth client tries it up to 3 times), then the account is remembered as
            # failing for its back-off: never a refresh per call.
            self.assertLessEqual(attempts, 3, f"{name}: {attempts} token endpoint calls for 20 callers")
            print(f"\n{name}: 20 callers OK, slowest {worst:.2f}s, {attempts} token calls for the failing account",
                  file=sys.stderr)
        finally:
            for b in brokers:
                b.close()
            c.close()

    def test_500(self):
        self.run_fault("500", script={"status": 500, "body": '{"error":"backend_error"}'})

    def test_connection_reset(self):
        server = ResettingServer()
        try:
            self.run_fault("reset", token_url=f"http://127.0.0.1:{server.port}/token", counter=lambda: server.connections)
        finally:
            server.close()

    def test_connection_refused(self):
        port = harness.free_port()  # nobody listens there
        self.run_fault("refused", token_url=f"http://127.0.0.1:{port}/token", counter=lambda: 0)

    def test_garbage_json(self):
        self.run_fault("garbage", script={"status": 200, "body": '{"access_token": "ya29.garbage", "expires_in": '})

    def test_200_without_access_token(self):
        self.run_fault("no access_token", script={"status": 200, "body": '{"expires_in": 3599, "token_type": "Bearer"}'})

    def test_hang(self):
        self.run_fault("hang", script={"status": 200, "body": '{"access_token":"ya29.never","expires_in":3599}',
                                       "delay_ms": 12000})

    def test_slow(self):
        self.run_fault("slow", script={"status": 200, "body": '{"access_token":"ya29.slow","expires_in":3599}',
                                       "delay_ms": 3000})


if __name__ == "__main__":
    unittest.main()
