"""End to end for egresses (README "Egress", issue 16.3): every call the broker or the monitor makes
for an account — OAuth refresh, loadCodeAssist, quota polls — leaves through that account's own
proxy. Real binaries, the real fake upstream, and small loopback proxies (egress_proxy.py) that
connect out from their own loopback address: the fake upstream records the address each account's
requests came from."""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from egress_proxy import EgressProxy, dead_port  # noqa: E402

BUILD = os.environ.get("TB_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
MODEL = "gemini-3-pro-high"
# The proxies' credentials: they must reach the proxies and appear nowhere else.
SECRETS = ("eu-Pa55word", "us-Pa55word", "dead-Pa55word", "late-Pa55word")
QUOTA_PATHS = ("/v1internal:loadCodeAssist", "/v1internal:fetchAvailableModels",
               "/v1internal:retrieveUserQuotaSummary")
EU_IP, US_IP, LATE_IP, REVIVED_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"


class EgressSetup:
    """One fake upstream, the proxies, the egress file and five accounts: through eu (HTTP CONNECT),
    through us (SOCKS5 with the name resolved by the proxy), direct, through a dead proxy, and
    naming an egress the file does not define."""

    def __init__(self):
        c = self.cluster = harness.Cluster(BUILD)
        self.eu = EgressProxy(EU_IP, "eu-user", SECRETS[0])
        self.us = EgressProxy(US_IP, "us-user", SECRETS[1])
        self.proxies = [self.eu, self.us]
        self.dead_port = dead_port()
        self.egress_file = os.path.join(c.dir, "egress")
        self.write_egresses()
        for name, tier, extra in (("eu", "PRO", {"egress": "eu"}), ("us", "PRO", {"egress": "us"}),
                                  ("direct", "PRO", {}), ("dead", "ULTRA", {"egress": "dead"}),
                                  ("late", "ULTRA", {"egress": "late"})):
            c.write_account(f"acct-{name}", harness.account_json(f"{name}@example.com", f"1//rt-{name}", tier, **extra))
        c.start_upstream()
        for name in ("eu", "us", "direct", "dead", "late"):
            c.upstream_call("/__fake/profile", {
                "refresh_token": f"1//rt-{name}", "project": f"proj-{name}", "tier": "g1-pro-tier",
                "models": {MODEL: {"quotaInfo": {"remainingFraction": 0.7}}}})

    def write_egresses(self, extra=""):
        with open(self.egress_file + ".tmp", "w") as f:
            f.write("# id  proxy url\n"
                    f"eu {self.eu.url('http')}\n"
                    f"us {self.us.url('socks5h')}\n"
                    f"dead http://dead-user:{SECRETS[2]}@127.0.0.1:{self.dead_port}\n" + extra)
        os.chmod(self.egress_file + ".tmp", 0o600)
        os.replace(self.egress_file + ".tmp", self.egress_file)

    def peers(self, name, paths):
        """{path: {address: calls}} for account `name`'s requests to `paths`."""
        stats = self.cluster.upstream_call("/__fake/stats")["peers_by_account"]
        return {p: stats.get(p, {}).get(f"1//rt-{name}", {}) for p in paths}

    def close(self):
        for p in self.proxies:
            p.stop()
        self.cluster.close()


class EgressTestBase(unittest.TestCase):
    def assert_calls_from(self, name, paths, address):
        peers = self.setup.peers(name, paths)
        for path, by_address in peers.items():
            self.assertTrue(by_address, f"no {path} call for acct-{name}")
            self.assertEqual(set(by_address), {address}, f"acct-{name}'s {path} calls came from {by_address}")

    def assert_no_secret(self, text, where):
        for secret in SECRETS:
            self.assertNotIn(secret, text, f"a proxy credential in {where}")

    def accounts(self, target=None):
        return {a["accountId"]: a for a in self.setup.cluster.tbctl_json("list-accounts", target=target)["accounts"]}


class EmbeddedPoller(EgressTestBase):
    """The broker alone: its own refreshes and its embedded quota poller, through each egress."""

    @classmethod
    def setUpClass(cls):
        s = cls.setup = EgressSetup()
        cls.metrics_port_file = os.path.join(s.cluster.dir, "metrics.port")
        s.cluster.start_broker(f"--egress_file={s.egress_file}", "--embedded_monitor", "--poll_interval=1s",
                               "--refresh_scan_interval=200ms", "--log_level=debug", "--metrics_listen=127.0.0.1:0",
                               f"--metrics_port_file={cls.metrics_port_file}")

    @classmethod
    def tearDownClass(cls):
        cls.setup.close()

    def test_1_each_accounts_refresh_and_quota_calls_leave_through_its_egress(self):
        s = self.setup
        paths = ("/token",) + QUOTA_PATHS
        harness.wait_for(lambda: all(all(s.peers(n, paths).values()) for n in ("eu", "us", "direct")),
                         what="every served account's refresh and quota calls")
        self.assert_calls_from("eu", paths, EU_IP)
        self.assert_calls_from("us", paths, US_IP)
        self.assert_calls_from("direct", paths, "127.0.0.1")
        # Through the tunnel the proxy sees only the host, with our credentials.
        target = f"127.0.0.1:{s.cluster.upstream.port}"
        self.assertTrue(s.eu.tunnels and all(t == ("connect", target, True) for t in s.eu.tunnels), s.eu.tunnels)
        self.assertTrue(s.us.tunnels and all(t == ("socks5", target, True) for t in s.us.tunnels), s.us.tunnels)
        # Neither the dead egress's account nor the undefined one reached the upstream, direct or not.
        for name in ("dead", "late"):
            self.assertEqual(s.peers(name, paths), {p: {} for p in paths}, name)

    def test_2_get_token_names_the_egress_and_never_hands_out_an_account_whose_egress_is_down(self):
        c = self.setup.cluster
        harness.wait_for(lambda: "egress dead unreachable" in json.dumps(self.accounts().get("acct-dead", {})),
                         what="acct-dead to be cooled for its egress")
        seen, session_of = {}, {}
        for i in range(12):
            got = c.tbctl_json("get-token", "--model", MODEL, "--session", f"conv-{i}")
            seen[got["accountId"]] = got.get("egressId", "")
            session_of[got["accountId"]] = f"conv-{i}"
        self.assertEqual(set(seen), {"acct-eu", "acct-us", "acct-direct"}, "only accounts whose way out works")
        self.assertEqual(seen, {"acct-eu": "eu", "acct-us": "us", "acct-direct": ""})
        # tbctl's text says it too (the session stays on its account), and nothing for a direct one.
        self.assertIn("\negress   eu\n", c.tbctl("get-token", "--model", MODEL, "--session", session_of["acct-eu"]).stdout)
        self.assertNotIn("egress", c.tbctl("get-token", "--model", MODEL, "--session", session_of["acct-direct"]).stdout)

    def test_3_list_accounts_and_explain_say_why(self):
        c = self.setup.cluster
        # Between two failed retries the hold has ended for a moment (half-open): wait for it to stand.
        def cooling_line():
            line = [x for x in c.tbctl("list-accounts").stdout.splitlines() if x.startswith("acct-dead ")]
            return line and " COOLING " in line[0] and "egress dead unreachable: " in line[0] and line[0]
        self.assertNotIn("Pa55word", harness.wait_for(cooling_line, what="acct-dead COOLING in list-accounts"))
        accounts = self.accounts()
        self.assertEqual(accounts["acct-eu"]["egressId"], "eu")
        self.assertNotIn("egressId", accounts["acct-direct"])
        dead = accounts["acct-dead"]
        self.assertEqual(dead["egressId"], "dead")
        self.assertEqual(dead["state"], "ACCOUNT_STATE_ENABLED", dead)
        self.assertEqual(len(dead["cooldowns"]), 1, dead)
        self.assertNotIn("model", dead["cooldowns"][0], "the whole account cools")
        self.assertRegex(dead["cooldowns"][0]["reason"], r"^egress dead unreachable: ")
        self.assertNotIn("failureStreak", dead, "an egress down is not the account's failure")
        late = accounts["acct-late"]
        self.assertEqual(late["state"], "ACCOUNT_STATE_DISABLED", late)
        self.assertIn("egress late is not defined in --egress_file", late["disabledReason"])
        def explain():
            got = {a["accountId"]: a for a in c.tbctl_json("explain", "--model", MODEL)["accounts"]}
            return got if "egress dead unreachable" in got["acct-dead"].get("detail", "") else None
        explained = harness.wait_for(explain, what="explain to show acct-dead cooling")
        self.assertIn("egress late is not defined in --egress_file", explained["acct-late"]["detail"])
        self.assert_no_secret(json.dumps(accounts) + json.dumps(explained), "ListAccounts / ExplainSelection")

    def test_4_no_credential_in_logs_metrics_or_the_status_page(self):
        c = self.setup.cluster
        with open(self.metrics_port_file) as f:
            port = int(f.read().strip())
        for path in ("/metrics", "/status", "/status.json"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
                page = resp.read().decode(errors="replace")
            self.assert_no_secret(page, path)
            if path == "/metrics":
                failures = re.search(r"^tokenbroker_egress_failures_total (\S+)$", page, re.M)
                self.assertTrue(failures and float(failures.group(1)) >= 1, "the egress failures counted")
        logs = c.broker_logs()
        self.assertIn("egress dead unreachable", logs)
        self.assertIn("3 egresses from", logs)
        self.assert_no_secret(logs, "the broker's log")
        self.assertNotIn(f"127.0.0.1:{self.setup.dead_port}", logs, "the proxy URL in the log")

    def test_5_defining_the_missing_egress_serves_its_account_through_it_without_a_restart(self):
        s = self.setup
        late = EgressProxy(LATE_IP, "late-user", SECRETS[3])
        s.proxies.append(late)
        s.write_egresses(f"late {late.url('socks5')}\n")
        harness.wait_for(lambda: self.accounts()["acct-late"]["state"] != "ACCOUNT_STATE_DISABLED",
                         what="acct-late to be served once its egress is defined")
        harness.wait_for(lambda: all(s.peers("late", ("/token",) + QUOTA_PATHS[:2]).values()),
                         what="acct-late's refresh and quota calls")
        self.assert_calls_from("late", ("/token",) + QUOTA_PATHS[:2], LATE_IP)
        self.assertTrue(all(t[0] == "socks5" and t[2] for t in late.tunnels), late.tunnels)

    def test_6_a_dead_egress_is_retried_through_it_after_its_back_off(self):
        s = self.setup
        # The dead egress comes back (same address, a new proxy connecting from another source).
        revived = EgressProxy(REVIVED_IP, "dead-user", SECRETS[2], port=s.dead_port)
        s.proxies.append(revived)
        harness.wait_for(lambda: s.peers("dead", ("/token",))["/token"], timeout=45,
                         what="acct-dead's refresh to be retried through its egress")
        self.assert_calls_from("dead", ("/token",), REVIVED_IP)


class WithMonitor(EgressTestBase):
    """tokenbroker-monitor polls each account through its egress; the broker refreshes through it."""

    @classmethod
    def setUpClass(cls):
        s = cls.setup = EgressSetup()
        c = s.cluster
        cls.monitor = c.start_monitor(f"--egress_file={s.egress_file}", "--poll_interval=1s", "--log_level=debug")
        c.start_broker(f"--egress_file={s.egress_file}", f"--quota_monitor=127.0.0.1:{cls.monitor.port}")

    @classmethod
    def tearDownClass(cls):
        cls.setup.close()

    def test_1_the_monitors_refreshes_and_polls_leave_through_each_egress(self):
        s = self.setup
        c = s.cluster
        harness.wait_for(lambda: all(all(s.peers(n, QUOTA_PATHS).values()) for n in ("eu", "us", "direct")),
                         what="every served account's quota calls")
        for name, ip in (("eu", EU_IP), ("us", US_IP), ("direct", "127.0.0.1")):
            self.assert_calls_from(name, ("/token",) + QUOTA_PATHS, ip)
        for name in ("dead", "late"):
            self.assertEqual(s.peers(name, ("/token",) + QUOTA_PATHS), {p: {} for p in ("/token",) + QUOTA_PATHS})
        # (The broker refreshes only what the monitor's write-back has not already refreshed in the shared
        # folder; whichever of the two made it, each refresh came from the account's egress.)
        # The broker gets the quota the monitor read through the egress.
        harness.wait_for(lambda: c.tbctl_json("get-token", "--model", MODEL, "--session", "q").get("quotaDecision")
                         == "QUOTA_DECISION_PROCEED", what="quota from the monitor")
        # The dead egress's refresh fails in the monitor on its own schedule: wait for its line.
        harness.wait_for(lambda: "egress dead unreachable" in self.monitor.read_log(),
                         what="the monitor to log the dead egress")
        monitor_log = self.monitor.read_log()
        self.assertIn("egress late is not defined in --egress_file", monitor_log)
        self.assert_no_secret(monitor_log + c.broker_logs(), "the logs")


class BadEgressFile(unittest.TestCase):
    """A bad --egress_file at start: one line naming the flag and the line, exit 2, no credential."""

    def test_both_binaries_refuse_it_in_one_line(self):
        folder = tempfile.mkdtemp(prefix="tokenbroker-egress-")
        try:
            os.mkdir(os.path.join(folder, "accounts"))
            bad = os.path.join(folder, "egress")
            with open(bad, "w") as f:
                f.write(f"eu http://eu-user:{SECRETS[0]}@127.0.0.1:3128\nus ftp://us-user:{SECRETS[1]}@127.0.0.1:21\n")
            for binary in ("tokenbroker", "tokenbroker-monitor"):
                r = subprocess.run([os.path.join(BUILD, "server", binary), f"--accounts_dir={folder}/accounts",
                                    f"--egress_file={bad}", "--listen=127.0.0.1:0"],
                                   capture_output=True, text=True, timeout=30)
                self.assertEqual(r.returncode, 2, r.stderr)
                self.assertIn("--egress_file line 2: egress us: proxy URL scheme must be http, https, socks5 or socks5h",
                              r.stderr)
                self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
                for secret in SECRETS:
                    self.assertNotIn(secret, r.stderr + r.stdout)
                r = subprocess.run([os.path.join(BUILD, "server", binary), f"--accounts_dir={folder}/accounts",
                                    f"--egress_file={folder}/missing", "--listen=127.0.0.1:0"],
                                   capture_output=True, text=True, timeout=30)
                self.assertEqual(r.returncode, 2, r.stderr)
                self.assertIn("--egress_file", r.stderr)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
