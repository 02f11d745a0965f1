"""Caller budgets across the fleet end to end (issue 16.2, README "Caller policies"): three real
tokenbroker replicas on one real redis-server with caller tokens, a caller policy file and an audit log
each, against the real fake upstream. Two callers with different budgets (max_inflight; max_inflight and
max_accounts) hammer all three replicas at once, each call held ~100 ms and reported to another replica
than the one that issued it: replaying the three audit logs shows neither caller ever over its budget
fleet-wide, and both reaching it. The same load on three replicas without Redis (each counts only its
own leases) goes over the fleet-wide budget: the replay would catch a per-replica ledger. A replica
SIGKILLed while holding a caller's leases: the others give that caller its full budget again after the
lease timeout, not before."""
import json
import os
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
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc  # noqa: E402

TOKENS = {"alpha": "alpha-token-0123456789abcdef", "beta": "beta-token-0123456789abcdefg",
          "gamma": "gamma-token-0123456789abcdef"}
MODEL = "gemini-2.5-flash"
ACCOUNTS = [f"acct-{i}" for i in range(1, 6)]
POLICY = """# caller budgets, counted across the fleet
alpha max_inflight=3 retry_after=50ms max_waiting=32
beta max_inflight=4 max_accounts=2 retry_after=50ms max_waiting=32
gamma max_inflight=2 retry_after=100ms
"""
INFLIGHT = {"alpha": 3, "beta": 4}
MAX_ACCOUNTS = {"beta": 2}
LEASE_TIMEOUT_S = 3
HOLD_S = 0.1  # the upstream call each token is for


def replay(audit_files):
    """Per caller, the most leases and distinct accounts held at once fleet-wide: every replica's
    issuances and reports in time order (a report before an issuance at the same millisecond)."""
    events = []
    for path in audit_files:
        with open(path) as f:
            for line in f:
                if line.endswith("\n"):
                    events.append(json.loads(line))
    order = {"outcome_reported": 0, "token_issued": 1}
    events = [e for e in events if e["event"] in order]
    events.sort(key=lambda e: (e["time"], order[e["event"]]))
    held, peak_leases, peak_accounts = {}, {}, {}
    for e in events:
        leases = held.setdefault(e["caller"], {})
        if e["event"] == "token_issued":
            leases[e["lease_id"]] = e["account_id"]
        elif e.get("result") == "no_cooldown":
            leases.pop(e["lease_id"], None)
        c = e["caller"]
        peak_leases[c] = max(peak_leases.get(c, 0), len(leases))
        peak_accounts[c] = max(peak_accounts.get(c, 0), len(set(leases.values())))
    return peak_leases, peak_accounts, held


class Fleet:
    """Three replicas sharing the accounts and the policy, each with its own audit log."""

    def __init__(self, cluster, name, *flags):
        self.cluster = cluster
        self.audits = []
        self.replicas = []
        for i in range(3):
            self.replicas.append(self.start(f"{name}-{i}", *flags))
        self.channels = [grpc.insecure_channel(f"127.0.0.1:{p.port}") for p in self.replicas]

    def start(self, name, *flags):
        audit = os.path.join(self.cluster.dir, f"audit-{name}.jsonl")
        self.audits.append(audit)
        return self.cluster.start_broker(
            f"--caller_tokens_file={self.cluster.callers_file}", f"--caller_policy_file={self.cluster.policy_file}",
            f"--audit_log={audit}", f"--lease_timeout={LEASE_TIMEOUT_S}s", *flags)

    def close(self):
        for ch in self.channels:
            ch.close()
        for p in self.replicas:
            p.stop()


def get(stub, caller, max_wait=0.0):
    req = broker_pb2.GetTokenRequest(model=MODEL)
    if max_wait:
        req.max_wait.CopyFrom(duration_pb2.Duration(seconds=int(max_wait), nanos=int(max_wait % 1 * 1e9)))
    return stub.GetToken(req, timeout=max_wait + 10, metadata=[("authorization", f"Bearer {TOKENS[caller]}")])


def report(stub, caller, lease_id):
    """ReportOutcome, once the issuing replica's write-behind has filed the lease in Redis."""
    def attempt():
        try:
            return stub.ReportOutcome(broker_pb2.ReportOutcomeRequest(lease_id=lease_id, http_status=200),
                                      timeout=10, metadata=[("authorization", f"Bearer {TOKENS[caller]}")])
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return None
    return harness.wait_for(attempt, timeout=5, what="the lease to be reported")


class CallerFleet(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        c = cls.cluster = harness.Cluster(BUILD)
        for name in ACCOUNTS:
            c.write_account(name, harness.account_json(f"{name}@example.com", f"1//rt-{name}", "PRO"))
        c.start_upstream()
        c.callers_file = harness.write_callers_file(c.dir, TOKENS)
        c.policy_file = os.path.join(c.dir, "policy.txt")
        with open(c.policy_file, "w") as f:
            f.write(POLICY)
        cls.redis = harness.RedisServer(c.dir)
        c.extra.append(cls.redis)
        cls.metrics_port_file = os.path.join(c.dir, "metrics.port")

    @classmethod
    def tearDownClass(cls):
        cls.cluster.close()

    def redis_fleet(self, name):
        fleet = Fleet(self.cluster, name, "--state_backend", self.redis.url, f"--state_prefix={name}:",
                      "--state_timeout=250ms", "--metrics_listen=127.0.0.1:0",
                      f"--metrics_port_file={self.metrics_port_file}")
        self.addCleanup(fleet.close)
        return fleet

    def hammer(self, fleet, report_elsewhere):
        """Six proxies per caller, each a loop of GetToken (max_wait) at one replica, the call held
        ~100 ms, ReportOutcome at the next replica (or the same one without shared state)."""
        errors, issued = [], []
        lock = threading.Lock()

        def proxy(caller, worker):
            channels = [grpc.insecure_channel(f"127.0.0.1:{p.port}") for p in fleet.replicas]
            stubs = [broker_pb2_grpc.TokenBrokerServiceStub(ch) for ch in channels]
            try:
                for k in range(6):
                    replica = (worker + k) % 3
                    try:
                        got = get(stubs[replica], caller, max_wait=20)
                    except grpc.RpcError as e:
                        with lock:
                            errors.append(f"{caller}: {e.code()} {e.details()}")
                        continue
                    with lock:
                        issued.append(got.lease_id)
                    time.sleep(HOLD_S)  # the upstream call
                    report(stubs[(replica + 1) % 3 if report_elsewhere else replica], caller, got.lease_id)
            finally:
                for ch in channels:
                    ch.close()

        threads = [threading.Thread(target=proxy, args=(caller, w)) for caller in INFLIGHT for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        self.assertFalse(any(t.is_alive() for t in threads), "load threads did not finish")
        self.assertEqual(errors, [])
        self.assertEqual(len(issued), 2 * 6 * 6)

        # The audit logs are flushed every second: replay once they hold every issuance and report.
        def complete():
            lines = []
            for path in fleet.audits:
                try:
                    with open(path) as f:
                        lines += [json.loads(line) for line in f if line.endswith("\n")]
                except FileNotFoundError:
                    return None
            got = {l["lease_id"] for l in lines if l["event"] == "token_issued"}
            done = {l["lease_id"] for l in lines if l["event"] == "outcome_reported" and l["result"] == "no_cooldown"}
            return True if set(issued) <= got and set(issued) <= done else None
        harness.wait_for(complete, timeout=15, what="the audit logs to hold every issuance and report")
        return replay(fleet.audits)

    def metric(self, name):
        with open(self.metrics_port_file) as f:
            port = f.read().strip()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return None

    def test_1_budgets_hold_fleet_wide_and_are_reached(self):
        fleet = self.redis_fleet("fleet")
        started = time.monotonic()
        peak_leases, peak_accounts, held = self.hammer(fleet, report_elsewhere=True)
        elapsed = time.monotonic() - started
        for caller, budget in INFLIGHT.items():
            self.assertLessEqual(peak_leases[caller], budget, f"{caller} over its max_inflight: {peak_leases}")
        for caller, budget in MAX_ACCOUNTS.items():
            self.assertLessEqual(peak_accounts[caller], budget, f"{caller} over its max_accounts: {peak_accounts}")
        # The load did reach the budgets (else the checks above prove nothing).
        self.assertEqual({c: peak_leases[c] for c in INFLIGHT}, INFLIGHT)
        self.assertEqual(peak_accounts["beta"], MAX_ACCOUNTS["beta"])
        self.assertGreater(peak_accounts["alpha"], MAX_ACCOUNTS["beta"])  # alpha has no account limit
        self.assertEqual({c: leases for c, leases in held.items() if leases}, {})
        self.assertGreater(self.metric('tokenbroker_fleet_caller_decisions_total{result="fleet"}'), 0)
        self.assertEqual(self.metric('tokenbroker_fleet_caller_decisions_total{result="local"}'), 0)
        print(f"\n72 calls in {elapsed:.2f}s across 3 replicas; peaks: leases {peak_leases}, accounts {peak_accounts}",
              file=sys.stderr)

    def test_2_without_redis_each_replica_counts_alone_and_the_replay_sees_it(self):
        fleet = Fleet(self.cluster, "alone")
        self.addCleanup(fleet.close)
        peak_leases, peak_accounts, _ = self.hammer(fleet, report_elsewhere=False)
        # Each replica holds each caller to its budget, the fleet does not: the check of test_1
        # fails for a per-replica ledger.
        print(f"\nwithout redis, peaks: leases {peak_leases}, accounts {peak_accounts}", file=sys.stderr)
        self.assertTrue(peak_leases["alpha"] > INFLIGHT["alpha"] or peak_leases["beta"] > INFLIGHT["beta"]
                        or peak_accounts["beta"] > MAX_ACCOUNTS["beta"], (peak_leases, peak_accounts))

    def test_3_a_killed_replicas_leases_free_at_the_lease_timeout_not_before(self):
        fleet = self.redis_fleet("kill")
        doomed = fleet.start("kill-doomed", "--state_backend", self.redis.url, "--state_prefix=kill:",
                             "--state_timeout=250ms")
        ch = grpc.insecure_channel(f"127.0.0.1:{doomed.port}")
        try:
            stub = broker_pb2_grpc.TokenBrokerServiceStub(ch)
            held = [get(stub, "gamma") for _ in range(2)]  # gamma's whole budget
            issued = time.monotonic()
        finally:
            ch.close()
        self.assertEqual(len(held), 2)
        doomed.proc.kill()
        doomed.proc.wait()
        doomed.log.close()
        stubs = [broker_pb2_grpc.TokenBrokerServiceStub(c) for c in fleet.channels]
        # The survivors refuse gamma while the dead replica's leases live ...
        for stub in stubs:
            with self.assertRaises(grpc.RpcError) as refused:
                get(stub, "gamma")
            self.assertEqual(refused.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.assertIn("max_inflight", refused.exception.details())
        self.assertLess(time.monotonic() - issued, LEASE_TIMEOUT_S - 0.5)
        # ... and a call that waits is served once they expire, with the full budget again.
        first = get(stubs[0], "gamma", max_wait=LEASE_TIMEOUT_S + 5)
        freed_after = time.monotonic() - issued
        self.assertGreaterEqual(freed_after, LEASE_TIMEOUT_S - 0.5)
        self.assertLess(freed_after, LEASE_TIMEOUT_S + 3)
        second = get(stubs[1], "gamma")
        with self.assertRaises(grpc.RpcError) as full:
            get(stubs[2], "gamma")
        self.assertEqual(full.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        report(stubs[2], "gamma", first.lease_id)
        report(stubs[0], "gamma", second.lease_id)


if __name__ == "__main__":
    unittest.main()
