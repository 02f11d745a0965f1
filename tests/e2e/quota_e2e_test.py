"""End to end for proactive quota (docs/ARCHITECTURE.md §6): the real tokenbroker-monitor polls the fake Cloud Code
and streams quota to real brokers, which skip exhausted accounts before any 429."""
import json
import os
import tempfile
import subprocess
import sys
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BUILD = os.environ.get("TB_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
BUF = os.environ.get("TB_BUF", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "node_modules", ".bin", "buf"))
MODEL = "claude-sonnet-4-6-thinking"
GET_TOKEN = "tokenbroker.v1.TokenBrokerService/GetToken"
SET_QUOTA = "tokenbroker.v1.TokenBrokerService/SetQuotaManager"


def profile(cluster, refresh_token, tier, fraction, project):
    # The quota resets two hours from now (a fixed date would turn the test into a time bomb: past
    # the reset, an exhausted account counts as unknown).
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 7200))
    cluster.upstream_call("/__fake/profile", {
        "refresh_token": refresh_token, "project": project, "tier": tier,
        "models": {MODEL: {"quotaInfo": {"remainingFraction": fraction, "resetTime": reset}},
                   "gemini-3-pro-high": {"quotaInfo": {"remainingFraction": 0.5}}}})


class QuotaEndToEnd(unittest.TestCase):
    """Tests run in name order and share one monitor and two brokers."""

    @classmethod
    def setUpClass(cls):
        c = cls.cluster = harness.Cluster(BUILD, BUF)
        c.write_account("acct-a", harness.account_json("a@example.com", "1//rt-a", "ULTRA"))
        c.write_account("acct-b", harness.account_json("b@example.com", "1//rt-b", "PRO"))
        c.start_upstream()
        profile(c, "1//rt-a", "g1-ultra-tier", 0.02, "proj-a")
        profile(c, "1//rt-b", "g1-pro-tier", 0.8, "proj-b")
        cls.monitor_metrics_port_file = os.path.join(c.dir, "monitor-metrics.port")
        cls.monitor = c.start_monitor("--poll_interval=1s", "--poll_concurrency=2", "--log_level=debug",
                                      "--metrics_listen=127.0.0.1:0",
                                      f"--metrics_port_file={cls.monitor_metrics_port_file}")
        cls.monitor_target = f"127.0.0.1:{cls.monitor.port}"
        # Broker 1 starts without quota validation; broker 2 is attached to the monitor from start,
        # with a short cache TTL.
        cls.b1 = c.start_broker("--log_level=debug")
        cls.b1_target = c.target
        cls.b2 = c.start_broker("--log_level=debug", f"--quota_monitor={cls.monitor_target}", "--quota_cache_ttl=3s")
        cls.b2_target = c.target
        cls.started = time.monotonic()

    @classmethod
    def tearDownClass(cls):
        cls.cluster.close()

    def get(self, target, model=MODEL):
        r = self.cluster.buf_curl(GET_TOKEN, {"model": model}, target=target)
        self.assertEqual(r.returncode, 0, r.stderr)
        return json.loads(r.stdout)

    def test_1_quota_manager_set_skips_the_exhausted_account_and_unset_restores_it(self):
        c = self.cluster
        # Validation off: tiers alone, so the ULTRA account at 2 % is chosen.
        self.assertEqual(self.get(self.b1_target)["accountId"], "acct-a")
        r = c.buf_curl(SET_QUOTA, {"enabled": True, "monitorTarget": self.monitor_target}, target=self.b1_target)
        self.assertEqual(r.returncode, 0, r.stderr)
        effective = json.loads(r.stdout)
        self.assertEqual(effective["monitorTarget"], self.monitor_target)
        self.assertEqual(effective["exhaustedThreshold"], 0.05)
        harness.wait_for(lambda: self.get(self.b1_target).get("quotaDecision") == "QUOTA_DECISION_PROCEED",
                         what="broker 1 to receive quota")
        for _ in range(10):
            got = self.get(self.b1_target)
            self.assertEqual(got["accountId"], "acct-b")
            # Predictive admission: the observed 0.8 less the leases issued since the last poll.
            self.assertLessEqual(got["remainingFraction"], 0.8)
            self.assertGreater(got["remainingFraction"], 0.05)
        out = c.tbctl_json("explain", "--model", MODEL, target=self.b1_target)
        skipped = {a["accountId"]: a for a in out["accounts"]}["acct-a"]
        self.assertEqual(skipped["verdict"], "VERDICT_EXHAUSTED")
        # The proxy never saw a 429 for acct-a: nothing was reported.
        self.assertEqual({a["accountId"]: a.get("failureStreak", 0)
                          for a in c.tbctl_json("list-accounts", target=self.b1_target)["accounts"]},
                         {"acct-a": 0, "acct-b": 0})
        # Unset: acct-a is eligible again.
        c.tbctl("set-quota-manager", target=self.b1_target)
        self.assertEqual(self.get(self.b1_target)["accountId"], "acct-a")
        # And set again through tbctl for the tests that follow.
        c.tbctl("set-quota-manager", "--enabled", "--monitor", self.monitor_target, target=self.b1_target)
        harness.wait_for(lambda: self.get(self.b1_target)["accountId"] == "acct-b", what="broker 1 to skip acct-a again")

    def test_2_two_brokers_both_see_every_change(self):
        c = self.cluster
        harness.wait_for(lambda: self.get(self.b2_target).get("quotaDecision") == "QUOTA_DECISION_PROCEED",
                         what="broker 2 to receive quota")
        profile(c, "1//rt-a", "g1-ultra-tier", 0.9, "proj-a")

        def sees(target):
            accounts = {a["accountId"]: a for a in c.tbctl_json("list-accounts", target=target)["accounts"]}
            return any(q["model"] == MODEL and abs(q["remainingFraction"] - 0.9) < 1e-9
                       for q in accounts["acct-a"].get("quotas", []))
        harness.wait_for(lambda: sees(self.b1_target) and sees(self.b2_target), what="both brokers to see 0.9")
        self.assertEqual(self.get(self.b1_target)["accountId"], "acct-a")
        self.assertEqual(self.get(self.b2_target)["accountId"], "acct-a")
        self.assertEqual(self.get(self.b2_target)["projectId"], "proj-a")
        profile(c, "1//rt-a", "g1-ultra-tier", 0.02, "proj-a")
        harness.wait_for(lambda: self.get(self.b1_target)["accountId"] == "acct-b"
                         and self.get(self.b2_target)["accountId"] == "acct-b", what="both brokers to skip acct-a")

    def test_2b_the_monitor_has_metrics_of_its_own(self):
        with open(self.monitor_metrics_port_file) as f:
            port = f.read().strip()

        def scrape():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                text = resp.read().decode()
            return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                    if line and not line.startswith("#")}
        m = harness.wait_for(lambda: (lambda m: m if m.get("tokenbroker_monitor_subscribers", 0) >= 1 else None)(scrape()),
                             what="a WatchQuota subscriber on the monitor's metrics")
        self.assertGreater(m["tokenbroker_monitor_polls_total"], 0)
        self.assertEqual(m['tokenbroker_accounts{state="enabled"}'], 2)
        self.assertGreaterEqual(m['tokenbroker_token_refreshes_total{result="ok"}'], 2)
        self.assertGreaterEqual(m["tokenbroker_monitor_quota_entries"], 2)
        self.assertTrue(any(k.startswith('tokenbroker_rpc_total{code="OK",method="/tokenbroker.v1.QuotaMonitorService')
                            or k.startswith("tokenbroker_rpc_duration_seconds_count") for k in m), list(m)[:20])

    def test_3_bounded_concurrency_and_one_poll_per_interval(self):
        stats = self.cluster.upstream_call("/__fake/stats")
        self.assertLessEqual(stats["max_in_flight"]["/v1internal:fetchAvailableModels"], 2)
        per_account = stats["calls_by_account"]["/v1internal:fetchAvailableModels"]
        calls_a, calls_b = per_account["1//rt-a"], per_account["1//rt-b"]
        elapsed = time.monotonic() - self.started
        self.assertGreaterEqual(min(calls_a, calls_b), 2)
        # About one poll per second each (±10 % jitter), never a burst.
        self.assertLessEqual(max(calls_a, calls_b), elapsed / 0.9 + 2)
        self.assertLessEqual(abs(calls_a - calls_b), 2)
        self.assertEqual(stats["calls"]["/v1internal:loadCodeAssist"], 2)  # cached per account

    def test_4_monitor_down_cache_serves_then_goes_stale_then_reconnects(self):
        c = self.cluster
        harness.wait_for(lambda: self.get(self.b2_target).get("quotaDecision") == "QUOTA_DECISION_PROCEED",
                         what="fresh quota on broker 2")
        port = self.monitor.port
        self.assertEqual(self.monitor.stop(), 0)
        # The cache keeps serving right after the stream is lost.
        got = self.get(self.b2_target)
        self.assertEqual(got["accountId"], "acct-b")
        self.assertEqual(got["quotaDecision"], "QUOTA_DECISION_PROCEED")
        # After cache_ttl (3 s) the entries read unknown: acct-a is no longer known to be exhausted.
        # (Each account's data goes stale on its own schedule; once both have, tiers alone decide.)
        harness.wait_for(lambda: (lambda g: "quotaDecision" not in g and g["accountId"] == "acct-a")(
            self.get(self.b2_target)), timeout=20, what="broker 2's quota to go stale")
        explain = {a["accountId"]: a for a in c.tbctl_json("explain", "--model", MODEL, target=self.b2_target)["accounts"]}
        self.assertNotEqual(explain["acct-a"]["verdict"], "VERDICT_EXHAUSTED")
        # The monitor comes back on the same address: broker 2 reconnects by itself.
        type(self).monitor = c.start_monitor("--poll_interval=1s", "--poll_concurrency=2", listen=f"127.0.0.1:{port}")
        harness.wait_for(lambda: self.get(self.b2_target).get("quotaDecision") == "QUOTA_DECISION_PROCEED",
                         timeout=30, what="broker 2 to reconnect and get fresh quota")
        self.assertEqual(self.get(self.b2_target)["accountId"], "acct-b")
        logs = c.broker_logs()
        self.assertIn("keeping the cache and reconnecting", logs)
        self.assertGreaterEqual(logs.count(f"quota stream from {self.monitor_target} connected"), 3)

    def test_5_watch_quota_with_tbctl(self):
        r = self.cluster.tbctl("watch-quota", "--count", "1", target=f"127.0.0.1:{self.monitor.port}")
        self.assertIn("snapshot", r.stdout)
        self.assertIn(MODEL, r.stdout)
        self.assertIn("acct-b", r.stdout)


class QuotaDefaultsEndToEnd(unittest.TestCase):
    """The defaults keep the promise: data outlives the wait for the next poll."""

    def run_broker(self, *flags):
        argv = [os.path.join(BUILD, "server", "tokenbroker"), "--accounts_dir", tempfile.gettempdir(),
                "--listen", "127.0.0.1:0"] + list(flags)
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)

    def test_a_poll_interval_that_could_outlast_the_cache_is_refused_naming_both_flags(self):
        r = self.run_broker("--embedded_monitor", "--poll_interval=14m")
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("--poll_interval", r.stderr)
        self.assertIn("--quota_cache_ttl", r.stderr)
        r = self.run_broker("--embedded_monitor", "--poll_interval=1m", "--quota_cache_ttl=1m")
        self.assertEqual(r.returncode, 2, r.stderr)

    def test_bad_predictive_settings_name_the_flag(self):
        r = self.run_broker("--quota_call_cost_prior=0")
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("--quota_call_cost_prior", r.stderr)
        r = self.run_broker("--quota_max_lag=-1s")
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("--quota_max_lag", r.stderr)


class EmbeddedMonitorEndToEnd(unittest.TestCase):
    def test_embedded_poller_skips_the_exhausted_account(self):
        c = harness.Cluster(BUILD, BUF)
        try:
            c.write_account("acct-a", harness.account_json("a@example.com", "1//rt-a", "ULTRA"))
            c.write_account("acct-b", harness.account_json("b@example.com", "1//rt-b", "PRO"))
            c.start_upstream()
            profile(c, "1//rt-a", "g1-ultra-tier", 0.01, "proj-a")
            profile(c, "1//rt-b", "g1-pro-tier", 0.7, "proj-b")
            c.start_broker("--embedded_monitor", "--poll_interval=1s")
            harness.wait_for(lambda: c.tbctl_json("get-token", "--model", MODEL).get("quotaDecision")
                             == "QUOTA_DECISION_PROCEED", what="the embedded poller's first observations")
            for _ in range(5):
                self.assertEqual(c.tbctl_json("get-token", "--model", MODEL)["accountId"], "acct-b")
            self.assertEqual(c.tbctl_json("get-token", "--model", "gemini-3-pro-high")["accountId"], "acct-a")
        finally:
            c.close()


if __name__ == "__main__":
    unittest.main()
