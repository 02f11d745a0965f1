"""Fleet-wide admission end to end (issue 16.2, README "Fleet-wide admission"): three real tokenbroker
replicas on one real redis-server, --max_inflight_per_account=2. A proxy's loop (GetToken, the call to
the fake upstream held open so calls overlap, ReportOutcome to any replica) never has more than two
calls in flight per account at the upstream, counted by the fake itself; after a cooldown exactly one
half-open probe reaches the upstream for the whole fleet; a replica SIGKILLed with leases out frees
them at the lease timeout; with Redis gone each replica falls back to its own count."""
import concurrent.futures
import json
import os
import sys
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

ACCOUNTS = ["acct-1", "acct-2"]
GENERATE = "/v1internal:generateContent"
CAP = 2
LEASE_TIMEOUT_S = 3
# Only acct-1 serves the probe test's model.
PROBE_MODEL = "gemini-probe"
OK_BODY = json.dumps({"response": {"candidates": [{"content": {"role": "model", "parts": [{"text": "hi"}]}}]}})


def rt(account):
    return f"1//rt-{account}"


class Admission(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        c = cls.cluster = harness.Cluster(BUILD)
        for name in ACCOUNTS:
            extra = {"protected_models": [PROBE_MODEL]} if name == "acct-2" else {}
            c.write_account(name, harness.account_json(f"{name}@example.com", rt(name), "PRO", **extra))
        c.start_upstream()
        cls.redis = harness.RedisServer(c.dir)
        c.extra.append(cls.redis)
        cls.metrics_port_file = os.path.join(c.dir, "metrics.port")
        cls.replicas = [cls.start_replica("--metrics_listen=127.0.0.1:0", f"--metrics_port_file={cls.metrics_port_file}")]
        cls.replicas += [cls.start_replica() for _ in range(2)]
        cls.channels, cls.stubs = [], []
        for p in cls.replicas:
            ch, stub = cls.connect(p)
            cls.channels.append(ch)
            cls.stubs.append(stub)

    @classmethod
    def start_replica(cls, *flags):
        p = cls.cluster.start_broker(
            "--state_backend", cls.redis.url, "--state_prefix", "adm:", "--state_timeout=250ms",
            f"--max_inflight_per_account={CAP}", f"--lease_timeout={LEASE_TIMEOUT_S}s", *flags)
        ch, _ = cls.connect(p)
        harness.wait_for(lambda: cls.state_serving(ch), what="the replica to sync with redis")
        ch.close()
        return p

    @staticmethod
    def connect(p):
        ch = grpc.insecure_channel(f"127.0.0.1:{p.port}")
        return ch, broker_pb2_grpc.TokenBrokerServiceStub(ch)

    @staticmethod
    def state_serving(ch):
        name = b"tokenbroker.v1.StateBackend"
        check = ch.unary_unary("/grpc.health.v1.Health/Check",
                               request_serializer=lambda _: b"\x0a" + bytes([len(name)]) + name,
                               response_deserializer=lambda data: data)
        return check(None, timeout=5) == b"\x08\x01"

    @classmethod
    def tearDownClass(cls):
        for ch in cls.channels:
            ch.close()
        cls.cluster.close()

    def admissions(self, result):
        """tokenbroker_fleet_admissions_total{result=...} of replica 0."""
        with open(self.metrics_port_file) as f:
            port = f.read().strip()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(f'tokenbroker_fleet_admissions_total{{result="{result}"}} '):
                    return float(line.split()[1])
        return None

    def stats(self):
        return self.cluster.upstream_call("/__fake/stats")

    def generate_calls(self, account):
        return self.stats()["calls_by_account"].get(GENERATE, {}).get(rt(account), 0)

    def script_generate(self, delay_ms, times=0, account=""):
        self.cluster.upstream_call("/__fake/script", {"path": GENERATE, "status": 200, "body": OK_BODY,
                                                      "delay_ms": delay_ms, "times": times, "match": account})

    def generate(self, token):
        """The proxy's call to the upstream, with the token GetToken handed out."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.cluster.upstream.port}{GENERATE}",
                                     data=json.dumps({"model": "gemini-3-flash"}).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status

    def get_token(self, replica, model, max_wait_s=0):
        req = broker_pb2.GetTokenRequest(model=model)
        if max_wait_s:
            req.max_wait.CopyFrom(duration_pb2.Duration(seconds=max_wait_s))
        return self.stubs[replica].GetToken(req, timeout=max_wait_s + 10)

    def report(self, replica, lease_id, status, retry_after=""):
        """ReportOutcome to `replica`, once the issuing replica's write-behind has filed the lease."""
        def attempt():
            try:
                return self.stubs[replica].ReportOutcome(broker_pb2.ReportOutcomeRequest(
                    lease_id=lease_id, http_status=status, retry_after=retry_after), timeout=10)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                return None
        return harness.wait_for(attempt, timeout=5, what="the lease to be reported")

    def test_1_after_a_cooldown_exactly_one_probe_reaches_the_upstream(self):
        lease = self.get_token(0, PROBE_MODEL)
        self.assertEqual(lease.account_id, "acct-1")
        self.report(1, lease.lease_id, 429, retry_after="2")
        # Every replica cools acct-1 for the model ...
        for stub in self.stubs:
            harness.wait_for(lambda stub=stub: not stub.ExplainSelection(
                broker_pb2.ExplainSelectionRequest(model=PROBE_MODEL), timeout=5).chosen_account_id,
                what="the cooldown to reach every replica")
        # ... until it ends for all of them at once. The probe's upstream call is held open while
        # every replica is asked.
        self.script_generate(delay_ms=1500, times=1, account=rt("acct-1"))
        before = self.generate_calls("acct-1")
        harness.wait_for(lambda: self.stubs[0].ExplainSelection(
            broker_pb2.ExplainSelectionRequest(model=PROBE_MODEL), timeout=5).chosen_account_id == "acct-1",
            what="the cooldown to end")

        def proxy(i):
            try:
                r = self.get_token(i % 3, PROBE_MODEL)
            except grpc.RpcError as e:
                self.assertEqual(e.code(), grpc.StatusCode.RESOURCE_EXHAUSTED, e.details())
                return None
            self.assertEqual(self.generate(r.access_token), 200)
            return r

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            served = [r for r in pool.map(proxy, range(12)) if r is not None]
        self.assertEqual(len(served), 1, [r.account_id for r in served])
        self.assertEqual(self.generate_calls("acct-1") - before, 1)
        # The probe's success, reported to another replica, opens the account for the fleet.
        self.report(2, served[0].lease_id, 200)
        for i in range(3):
            harness.wait_for(lambda i=i: self.stubs[i].ExplainSelection(
                broker_pb2.ExplainSelectionRequest(model=PROBE_MODEL), timeout=5).chosen_account_id == "acct-1",
                what="the account to open everywhere")
            self.stubs[i].ReportOutcome(broker_pb2.ReportOutcomeRequest(
                lease_id=self.get_token(i, PROBE_MODEL).lease_id, http_status=200), timeout=10)

    def test_2_the_cap_holds_fleet_wide_under_concurrent_load(self):
        self.script_generate(delay_ms=150)  # every later call is held open 150 ms
        started = time.monotonic()
        waits = []

        def proxy(worker):
            done = 0
            for k in range(6):
                replica = (worker + k) % 3
                t0 = time.monotonic()
                r = self.get_token(replica, "gemini-3-flash", max_wait_s=20)
                waits.append(time.monotonic() - t0)
                self.assertEqual(self.generate(r.access_token), 200)
                # Reported to another replica than the one that issued it.
                self.stubs[(replica + 1) % 3].ReportOutcome(
                    broker_pb2.ReportOutcomeRequest(lease_id=r.lease_id, http_status=200), timeout=10)
                done += 1
            return done

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            self.assertEqual(sum(pool.map(proxy, range(12))), 72)
        elapsed = time.monotonic() - started
        most = self.stats()["max_in_flight_by_account"][GENERATE]
        for account in ACCOUNTS:
            self.assertLessEqual(most.get(rt(account), 0), CAP, most)
        # The load did press on the cap: 12 proxies on 2 accounts x 2, each call held 150 ms.
        self.assertEqual(max(most.get(rt(a), 0) for a in ACCOUNTS), CAP, most)
        self.assertGreater(max(waits), 0.1)
        self.assertGreater(self.admissions("admitted"), 0)
        self.assertGreater(self.admissions("at_cap"), 0)
        self.assertEqual(self.admissions("local"), 0)
        print(f"\n72 calls in {elapsed:.2f}s; the most in flight per account at the upstream: {most}; "
              f"GetToken waits max {max(waits) * 1000:.0f} ms", file=sys.stderr)

    def test_3_a_killed_replicas_leases_free_at_the_lease_timeout(self):
        doomed = self.start_replica()
        ch, stub = self.connect(doomed)
        try:
            held = [stub.GetToken(broker_pb2.GetTokenRequest(model="gemini-3-flash"), timeout=10) for _ in range(4)]
            issued = time.monotonic()
        finally:
            ch.close()
        self.assertEqual(sorted(r.account_id for r in held), ["acct-1", "acct-1", "acct-2", "acct-2"])
        doomed.proc.kill()
        doomed.proc.wait()
        # Its four leases fill both accounts fleet-wide: the others refuse, and say why.
        with self.assertRaises(grpc.RpcError) as refused:
            self.get_token(0, "gemini-3-flash")
        self.assertEqual(refused.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("fleet-wide lease cap", refused.exception.details())
        # A caller that waits is served once the dead replica's reservations expire.
        r = self.get_token(1, "gemini-3-flash", max_wait_s=LEASE_TIMEOUT_S + 5)
        freed_after = time.monotonic() - issued
        self.assertGreaterEqual(freed_after, LEASE_TIMEOUT_S - 0.5)
        self.assertLess(freed_after, LEASE_TIMEOUT_S + 3)
        self.stubs[1].ReportOutcome(broker_pb2.ReportOutcomeRequest(lease_id=r.lease_id, http_status=200), timeout=10)

    def test_4_with_redis_down_each_replica_falls_back_to_its_own_count(self):
        self.redis.kill()
        for ch in self.channels:
            harness.wait_for(lambda ch=ch: not self.state_serving(ch), what="the replicas to notice")
        # Each replica alone now holds up to the cap per account: four leases each, none fails, and
        # the metric counts the leases decided locally.
        for i in range(3):
            got = [self.get_token(i, "gemini-3-flash") for _ in range(4)]
            self.assertEqual(sorted(r.account_id for r in got), ["acct-1", "acct-1", "acct-2", "acct-2"])
            with self.assertRaises(grpc.RpcError) as full:
                self.get_token(i, "gemini-3-flash")
            self.assertEqual(full.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.assertNotIn("fleet-wide", full.exception.details())
            for r in got:
                self.stubs[i].ReportOutcome(broker_pb2.ReportOutcomeRequest(lease_id=r.lease_id, http_status=200),
                                            timeout=10)
        self.assertGreaterEqual(self.admissions("local"), 4)


if __name__ == "__main__":
    unittest.main()
