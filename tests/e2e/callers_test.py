"""Caller policies end to end (issue 16.1): the real broker with caller tokens, a caller policy file and
the audit log, against the real fake upstream. Two callers with different budgets and priorities share
a small pool under load: the audit log shows neither ever over its budget, and the high-priority
caller waits less. A caller over its budget gets RESOURCE_EXHAUSTED with QuotaFailure "caller:<name>"
and RetryInfo; a caller without an entry gets the `default` one; a reload changes a budget, a broken
file keeps the last good one; without a policy file nothing changes."""
import json
import os
import statistics
import sys
import threading
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BUILD = os.environ.get("TB_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
sys.path.insert(0, os.path.join(os.path.abspath(BUILD), "python"))
import grpc  # noqa: E402
from google.protobuf import duration_pb2  # noqa: E402
from google.rpc import error_details_pb2, status_pb2  # noqa: E402
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc  # noqa: E402

TOKENS = {"gold": "gold-token-0123456789abcdef", "bulk": "bulk-token-0123456789abcdef",
          "hold": "hold-token-0123456789abcdef", "stranger": "stranger-token-0123456789ab"}
MODEL = "gemini-2.5-flash"
ACCOUNTS = ["acct-1", "acct-2"]
POLICY = """# caller policies of the end-to-end test
gold max_inflight=2 priority=high
bulk max_inflight=1 priority=low max_waiting=4 retry_after=200ms
hold max_inflight=2
default max_inflight=1 models=family:gemini
"""
BUDGET = {"gold": 2, "bulk": 1}


def details(error):
    """The google.rpc detail messages of a gRPC error, by type name."""
    out = {}
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            st = status_pb2.Status.FromString(value)
            for any_ in st.details:
                for cls in (error_details_pb2.QuotaFailure, error_details_pb2.RetryInfo):
                    if any_.Is(cls.DESCRIPTOR):
                        msg = cls()
                        any_.Unpack(msg)
                        out[cls.DESCRIPTOR.name] = msg
    return out


class Callers(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        c = cls.cluster = harness.Cluster(BUILD)
        for name in ACCOUNTS:
            c.write_account(name, harness.account_json(f"{name}@example.com", f"1//rt-{name}", "PRO"))
        c.start_upstream()
        cls.callers_file = harness.write_callers_file(c.dir, TOKENS)
        cls.policy_file = os.path.join(c.dir, "policy.txt")
        with open(cls.policy_file, "w") as f:
            f.write(POLICY)
        cls.audit = os.path.join(c.dir, "audit.jsonl")
        cls.metrics_port_file = os.path.join(c.dir, "metrics.port")
        # One lease per account at a time: two slots, fewer than the callers' budgets together.
        c.start_broker(f"--caller_tokens_file={cls.callers_file}", f"--caller_policy_file={cls.policy_file}",
                       f"--audit_log={cls.audit}", "--max_inflight_per_account=1",
                       "--metrics_listen=127.0.0.1:0", f"--metrics_port_file={cls.metrics_port_file}")
        cls.channel = grpc.insecure_channel(c.target)
        cls.stub = broker_pb2_grpc.TokenBrokerServiceStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        cls.cluster.close()

    def get(self, caller, max_wait=0.0, model=MODEL, stub=None):
        req = broker_pb2.GetTokenRequest(model=model)
        if max_wait:
            req.max_wait.CopyFrom(duration_pb2.Duration(seconds=int(max_wait), nanos=int(max_wait % 1 * 1e9)))
        return (stub or self.stub).GetToken(req, timeout=30, metadata=[("authorization", f"Bearer {TOKENS[caller]}")])

    def report(self, caller, lease_id, stub=None):
        (stub or self.stub).ReportOutcome(broker_pb2.ReportOutcomeRequest(lease_id=lease_id, http_status=200),
                                          timeout=30, metadata=[("authorization", f"Bearer {TOKENS[caller]}")])

    def metrics(self):
        with open(self.metrics_port_file) as f:
            port = int(f.read().strip())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, line_prefix):
        for line in self.metrics().splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.split()[-1])
        return None

    def set_policy(self, text):
        with open(self.policy_file, "w") as f:
            f.write(text)

    def test_budgets_hold_under_load_and_the_high_priority_caller_waits_less(self):
        waits = {"gold": [], "bulk": []}
        leases = set()
        errors = []
        lock = threading.Lock()
        # A new channel per thread: calls of one caller do not queue behind each other in one HTTP/2 stream.
        def worker(caller, rounds):
            channel = grpc.insecure_channel(self.cluster.target)
            stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
            try:
                for _ in range(rounds):
                    start = time.monotonic()
                    try:
                        got = self.get(caller, max_wait=20, stub=stub)
                    except grpc.RpcError as e:
                        with lock:
                            errors.append(f"{caller}: {e.code()} {e.details()}")
                        continue
                    with lock:
                        waits[caller].append(time.monotonic() - start)
                        leases.add(got.lease_id)
                    time.sleep(0.02)  # the upstream call the token is for
                    self.report(caller, got.lease_id, stub=stub)
            finally:
                channel.close()

        # gold: 2 threads within its budget of 2; bulk: 3 threads on a budget of 1. Budgets of 3 together
        # on two slots: bulk waits for its own budget and, with gold, for an account.
        threads = [threading.Thread(target=worker, args=("gold", 25)) for _ in range(2)]
        threads += [threading.Thread(target=worker, args=("bulk", 12)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        self.assertFalse(any(t.is_alive() for t in threads), "load threads did not finish")
        self.assertEqual(errors, [])
        self.assertEqual(len(waits["gold"]), 50)
        self.assertEqual(len(waits["bulk"]), 36)

        # The audit log (flushed every second): replay issuances and reports in order, once it holds
        # both lines of every lease the load took.
        def complete():
            try:
                with open(self.audit) as f:
                    # Only whole lines: the log is flushed every second, not line by line.
                    lines = [json.loads(line) for line in f if line.endswith("\n")]
            except FileNotFoundError:
                return None
            issued = {l["lease_id"] for l in lines if l["event"] == "token_issued"}
            reported = {l["lease_id"] for l in lines if l["event"] == "outcome_reported"}
            return lines if leases <= issued and leases <= reported else None
        lines = harness.wait_for(complete, timeout=15, what="the audit log to hold every issuance and report")
        held = {"gold": set(), "bulk": set()}
        peak = {"gold": 0, "bulk": 0}
        for l in lines:
            caller = l["caller"]
            if caller not in BUDGET:
                continue
            if l["event"] == "token_issued":
                held[caller].add(l["lease_id"])
                peak[caller] = max(peak[caller], len(held[caller]))
                self.assertLessEqual(len(held[caller]), BUDGET[caller], f"{caller} over its budget at {l['time']}")
            elif l["event"] == "outcome_reported" and l["result"] == "no_cooldown":
                held[caller].discard(l["lease_id"])
        # The load did reach the budgets (else the check above proves nothing).
        self.assertEqual(peak, BUDGET)
        self.assertEqual(held, {"gold": set(), "bulk": set()})

        gold, bulk = statistics.median(waits["gold"]), statistics.median(waits["bulk"])
        self.assertLess(gold, bulk, f"median waits: gold {gold:.4f}s, bulk {bulk:.4f}s")
        m = self.metrics()
        self.assertIn('tokenbroker_caller_issued_total{caller="gold"}', m)
        self.assertIn('tokenbroker_caller_leases_in_flight{caller="bulk"} 0', m)

    def test_a_waiting_high_priority_call_is_served_before_an_older_low_priority_one(self):
        held = [self.get("hold") for _ in ACCOUNTS]  # every slot taken
        results = {}

        def wait(caller):
            try:
                results[caller] = self.get(caller, max_wait=20)
            except grpc.RpcError as e:
                results[caller] = e

        low = threading.Thread(target=wait, args=("bulk",))
        low.start()
        harness.wait_for(lambda: self.metric('tokenbroker_caller_waiting_calls{caller="bulk"}') == 1,
                         what="bulk to wait")
        high = threading.Thread(target=wait, args=("gold",))
        high.start()
        harness.wait_for(lambda: self.metric('tokenbroker_caller_waiting_calls{caller="gold"}') == 1,
                         what="gold to wait")
        self.report("hold", held[0].lease_id)  # one slot frees
        high.join(timeout=30)
        self.assertIsInstance(results.get("gold"), broker_pb2.GetTokenResponse)
        self.assertNotIn("bulk", results)  # the older, lower-priority call still waits
        self.report("hold", held[1].lease_id)
        low.join(timeout=30)
        self.assertIsInstance(results.get("bulk"), broker_pb2.GetTokenResponse)
        for caller in ("gold", "bulk"):
            self.report(caller, results[caller].lease_id)

    def test_a_caller_over_its_budget_gets_resource_exhausted_naming_the_limit(self):
        first = self.get("bulk")
        self.assertEqual(first.caller_policy, "bulk")
        self.assertTrue(first.HasField("caller_leases_left"))
        self.assertEqual(first.caller_leases_left, 0)
        try:
            with self.assertRaises(grpc.RpcError) as ctx:
                self.get("bulk")
            e = ctx.exception
            self.assertEqual(e.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.assertIn("max_inflight", e.details())
            d = details(e)
            self.assertEqual(d["QuotaFailure"].violations[0].subject, "caller:bulk")
            self.assertIn("max_inflight", d["QuotaFailure"].violations[0].description)
            delay = d["RetryInfo"].retry_delay
            self.assertAlmostEqual(delay.seconds + delay.nanos / 1e9, 0.2, delta=0.05)
            # Its refusal took no slot: gold gets the other account.
            g = self.get("gold")
            self.report("gold", g.lease_id)
        finally:
            self.report("bulk", first.lease_id)
        self.assertGreaterEqual(self.metric('tokenbroker_caller_refused_total{caller="bulk",limit="max_inflight"}'), 1)

    def test_a_caller_without_an_entry_gets_the_default_one(self):
        first = self.get("stranger")  # default: one lease, gemini models only
        self.assertEqual(first.caller_policy, "default")
        try:
            with self.assertRaises(grpc.RpcError) as ctx:
                self.get("stranger")
            self.assertEqual(ctx.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.assertEqual(details(ctx.exception)["QuotaFailure"].violations[0].subject, "caller:default")
        finally:
            self.report("stranger", first.lease_id)
        with self.assertRaises(grpc.RpcError) as ctx:
            self.get("stranger", model="claude-sonnet-4-5")
        self.assertEqual(ctx.exception.code(), grpc.StatusCode.PERMISSION_DENIED)
        self.assertIn("family:gemini", ctx.exception.details())
        # The caller metrics name the entry, never the caller that used it.
        caller_lines = [l for l in self.metrics().splitlines() if l.startswith("tokenbroker_caller_")]
        self.assertIn('tokenbroker_caller_issued_total{caller="default"} 1', caller_lines)
        self.assertFalse([l for l in caller_lines if 'caller="stranger"' in l])

    def test_zz_reload_changes_a_budget_and_a_broken_file_keeps_the_last_good_one(self):
        held = [self.get("bulk")]
        try:
            self.set_policy(POLICY.replace("bulk max_inflight=1", "bulk max_inflight=2"))

            def second():
                try:
                    held.append(self.get("bulk"))
                    return True
                except grpc.RpcError as e:
                    self.assertEqual(e.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
                    return False
            harness.wait_for(second, what="the reloaded budget of 2")
            # Broken: the budget of 2 stays, and the log says why.
            self.set_policy(POLICY + "bulk max_inflight=lots\n")
            harness.wait_for(lambda: "caller policy file changed but cannot be used" in self.cluster.broker_logs(),
                             what="the broken file to be logged")
            self.assertIn("line 6: name: caller bulk appears twice", self.cluster.broker_logs())
            with self.assertRaises(grpc.RpcError) as ctx:
                self.get("bulk")
            self.assertIn("its max_inflight is 2", ctx.exception.details())
        finally:
            for x in held:
                self.report("bulk", x.lease_id)
            self.set_policy(POLICY)


class NoPolicyFile(unittest.TestCase):
    """The default flags: callers are authenticated, nothing more."""

    def test_without_a_policy_file_callers_are_not_limited(self):
        c = harness.Cluster(BUILD)
        try:
            for name in ACCOUNTS:
                c.write_account(name, harness.account_json(f"{name}@example.com", f"1//rt-{name}", "PRO"))
            c.start_upstream()
            callers = harness.write_callers_file(c.dir, {"bulk": TOKENS["bulk"]})
            port_file = os.path.join(c.dir, "metrics.port")
            c.start_broker(f"--caller_tokens_file={callers}", "--metrics_listen=127.0.0.1:0",
                           f"--metrics_port_file={port_file}")
            with grpc.insecure_channel(c.target) as channel:
                stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
                md = [("authorization", f"Bearer {TOKENS['bulk']}")]
                got = [stub.GetToken(broker_pb2.GetTokenRequest(model="claude-sonnet-4-5"), timeout=30, metadata=md)
                       for _ in range(5)]  # more than any budget above, any model
                self.assertEqual(len({g.lease_id for g in got}), 5)
                self.assertFalse(any(g.HasField("caller_leases_left") or g.caller_policy for g in got))
                for g in got:
                    stub.ReportOutcome(broker_pb2.ReportOutcomeRequest(lease_id=g.lease_id, http_status=200),
                                       timeout=30, metadata=md)
            with open(port_file) as f:
                port = int(f.read().strip())
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                self.assertNotIn("tokenbroker_caller_", r.read().decode())
        finally:
            c.close()


class CallersByCertificate(unittest.TestCase):
    """Mutual TLS without caller tokens: the client certificate's subject CN names the caller."""

    def test_the_client_certificate_names_the_caller_of_a_policy(self):
        c = harness.Cluster(BUILD)
        try:
            for name in ACCOUNTS:
                c.write_account(name, harness.account_json(f"{name}@example.com", f"1//rt-{name}", "PRO"))
            c.start_upstream()
            harness.make_pki(c.dir)
            pki = lambda name: os.path.join(c.dir, name)  # noqa: E731
            with open(pki("policy.txt"), "w") as f:
                f.write("client max_inflight=1\n")  # make_pki's client certificate is CN=client; no default
            audit = pki("audit.jsonl")
            c.start_broker(f"--caller_policy_file={pki('policy.txt')}", f"--tls_cert_file={pki('server.pem')}",
                           f"--tls_key_file={pki('server.key')}", f"--tls_client_ca_file={pki('ca.pem')}",
                           f"--audit_log={audit}")
            def read(name):
                with open(pki(name), "rb") as f:
                    return f.read()
            creds = grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
            with grpc.secure_channel(c.target, creds) as channel:
                stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
                first = stub.GetToken(broker_pb2.GetTokenRequest(model=MODEL), timeout=30)
                with self.assertRaises(grpc.RpcError) as ctx:
                    stub.GetToken(broker_pb2.GetTokenRequest(model=MODEL), timeout=30)
                self.assertEqual(ctx.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
                self.assertEqual(details(ctx.exception)["QuotaFailure"].violations[0].subject, "caller:client")
                stub.ReportOutcome(broker_pb2.ReportOutcomeRequest(lease_id=first.lease_id, http_status=200),
                                   timeout=30)
                stub.GetToken(broker_pb2.GetTokenRequest(model=MODEL), timeout=30)  # its budget is free again

            def issued_by():
                try:
                    with open(audit) as f:
                        names = [json.loads(l)["caller"] for l in f if l.endswith("\n") and "token_issued" in l]
                except FileNotFoundError:
                    return None
                return names if len(names) >= 2 else None
            self.assertEqual(harness.wait_for(issued_by, what="the audit log"), ["client", "client"])
        finally:
            c.close()


if __name__ == "__main__":
    unittest.main()
