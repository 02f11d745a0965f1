"""End to end for the status page and the Grafana dashboard (issue 18): the real broker (Redis state
backend, quota polled in process from the fake Cloud Code) serves /status and /status.json on its
metrics port; Debian's chromium, driven by puppeteer-core (status_browser.mjs), checks what renders
and that it follows a ReportOutcome; the dashboard's every query names a metric a live /metrics
scrape holds."""
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import unittest
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("TB_BUILD_DIR", os.path.join(ROOT, "build"))
CHROMIUM = os.environ.get("TB_CHROMIUM", "/usr/bin/chromium")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "tokenbroker-dashboard.json")
MODEL = "claude-sonnet-4-6-thinking"
GEMINI = "gemini-3-pro-high"
ADMIN_TOKEN = "status-admin-token-0123456789abcdef"
SESSIONS = ["sess-status-secret-aaaa1111", "sess-status-secret-bbbb2222", "sess-status-secret-cccc3333"]
# (account id, refresh token, tier written in the file, tier the fake's loadCodeAssist answers, quota fraction)
ACCOUNTS = [
    ("acct-ultra", "1//rt-status-ultra-secret", "ULTRA", "g1-ultra-tier", 0.35),
    ("acct-pro", "1//rt-status-pro-secret", "PRO", "g1-pro-tier", 0.8),
    ("acct-free", "1//rt-status-free-secret", "FREE", "free-tier", 0.6),
]
DISABLED = ("acct-off", "1//rt-status-off-secret", "invalid_grant: refresh token revoked by the user")


def profile(cluster, refresh_token, tier, fraction, project):
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 7200))
    cluster.upstream_call("/__fake/profile", {
        "refresh_token": refresh_token, "project": project, "tier": tier,
        "models": {MODEL: {"quotaInfo": {"remainingFraction": fraction, "resetTime": reset}},
                   GEMINI: {"quotaInfo": {"remainingFraction": 0.5, "resetTime": reset}}}})


class StatusPage(unittest.TestCase):
    """Tests run in name order and share one broker."""

    @classmethod
    def setUpClass(cls):
        c = cls.cluster = harness.Cluster(BUILD)
        cls.redis = harness.RedisServer(c.dir)
        c.extra.append(cls.redis)
        for account_id, rt, tier, _, _ in ACCOUNTS:
            c.write_account(account_id, harness.account_json(account_id + "@example.com", rt, tier))
        c.write_account(DISABLED[0], harness.account_json(DISABLED[0] + "@example.com", DISABLED[1], "PRO",
                                                          disabled=True, disabled_reason=DISABLED[2]))
        c.start_upstream()
        for account_id, rt, _, fake_tier, fraction in ACCOUNTS:
            profile(c, rt, fake_tier, fraction, "proj-" + account_id)
        admin_file = cls.admin_file = os.path.join(c.dir, "admin-token")
        with open(admin_file, "w") as f:
            f.write(ADMIN_TOKEN + "\n")
        cls.metrics_port_file = os.path.join(c.dir, "metrics.port")
        c.start_broker("--metrics_listen=127.0.0.1:0", f"--metrics_port_file={cls.metrics_port_file}",
                       f"--admin_token_file={admin_file}", "--embedded_monitor", "--poll_interval=1s",
                       "--quota_cache_ttl=60s", f"--state_backend={cls.redis.url}")
        cls.base = f"http://127.0.0.1:{int(harness.wait_for(lambda: cls.read_port(), what='the metrics port'))}"
        # Quota polled for every account, so the page has bars to draw.
        harness.wait_for(lambda: all(a["quotas"] for a in cls.snapshot()["accounts"] if a["state"] != "disabled"),
                         timeout=20, what="quota of every enabled account")
        # Tokens handed out on sessions (secrets the page must not show), and a cooldown of an hour.
        cls.access_tokens = []
        for i, session in enumerate(SESSIONS):
            got = c.tbctl_json("get-token", "--model", MODEL if i % 2 == 0 else GEMINI, "--session", session,
                               "--show_token")
            cls.access_tokens.append(got["accessToken"])
        # Naming an account without its lease is the operator's: the admin token.
        c.tbctl("--token_file", admin_file, "report-outcome", "--account", "acct-free", "--model", GEMINI, "--http_status", "429",
                "--error_body", harness.quota_exhausted_body(GEMINI, "3600s"))

    @classmethod
    def tearDownClass(cls):
        cls.cluster.close()

    @classmethod
    def read_port(cls):
        try:
            with open(cls.metrics_port_file) as f:
                return f.read().strip()
        except FileNotFoundError:
            return None

    @classmethod
    def fetch(cls, path, authorization="Bearer " + ADMIN_TOKEN):
        req = urllib.request.Request(cls.base + path, headers={"Authorization": authorization} if authorization else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read().decode()

    @classmethod
    def snapshot(cls, query=""):
        status, _, body = cls.fetch("/status.json" + query)
        assert status == 200, (status, body)
        return json.loads(body)

    def secrets(self):
        return ([rt for _, rt, _, _, _ in ACCOUNTS] + [DISABLED[1], ADMIN_TOKEN] + SESSIONS + self.access_tokens +
                [a + "@example.com" for a, _, _, _, _ in ACCOUNTS])

    def test_1_page_in_a_real_browser(self):
        out_dir = os.path.join(BUILD, "status")
        os.makedirs(out_dir, exist_ok=True)
        screenshot = os.path.join(out_dir, "status-page.png")
        phone = os.path.join(out_dir, "status-page-phone.png")
        for p in (screenshot, phone):
            if os.path.exists(p):
                os.remove(p)
        config = {
            "chromium": CHROMIUM, "url": self.base + "/status", "admin_token": ADMIN_TOKEN, "admin_token_file": self.admin_file,
            "tbctl": self.cluster.bin("client", "tbctl"), "target": self.cluster.target,
            "screenshot": screenshot, "phone_screenshot": phone, "secrets": self.secrets(),
            "expect": {"accounts": 4, "tiers": ["ULTRA", "PRO", "FREE"],
                       "quota_account": "acct-pro", "quota_percent": 80,
                       "cooling_account": "acct-free", "cooling_reason": "QUOTA_EXHAUSTED", "cooling_seconds": 3600,
                       "disabled_account": DISABLED[0], "disabled_reason": DISABLED[2]},
            "report": {"account": "acct-pro", "model": MODEL,
                       "error_body": harness.quota_exhausted_body(MODEL, "1800s")},
        }
        config_path = os.path.join(self.cluster.dir, "browser.json")
        with open(config_path, "w") as f:
            json.dump(config, f)
        started = time.monotonic()
        r = subprocess.run(["node", os.path.join(ROOT, "tests", "e2e", "status_browser.mjs"), config_path],
                           capture_output=True, text=True, timeout=180)
        lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
        self.assertTrue(lines, f"no result from the browser (rc {r.returncode}): {r.stdout}\n{r.stderr}")
        result = json.loads(lines[-1])
        self.assertTrue(result["ok"], f"{result}\n{r.stderr}")
        self.assertEqual(r.returncode, 0, r.stderr)
        print(f"\nbrowser: {time.monotonic() - started:.1f}s in all; {json.dumps(result)}", file=sys.stderr)
        for p in (screenshot, phone):
            with open(p, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n", p)

    def test_2_status_needs_the_admin_token(self):
        for path in ("/status", "/status.json"):
            status, headers, body = self.fetch(path, authorization=None)
            self.assertEqual(status, 401, body)
            self.assertIn("Basic", headers.get("WWW-Authenticate", ""))
            self.assertNotIn(ADMIN_TOKEN, body)
            status, _, body = self.fetch(path, authorization="Bearer not-the-admin-token-at-all")
            self.assertEqual(status, 401, body)
            self.assertIn("authorization", json.loads(body)["error"])
            basic = "Basic " + base64.b64encode(f"anyone:{ADMIN_TOKEN}".encode()).decode()
            status, headers, body = self.fetch(path, authorization=basic)
            self.assertEqual(status, 200, body)
        status, headers, body = self.fetch("/status")
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/html"))
        self.assertIn("default-src 'none'", headers["Content-Security-Policy"])
        # /metrics is still the Exposer's, open as before.
        status, _, body = self.fetch("/metrics", authorization=None)
        self.assertEqual(status, 200)
        self.assertIn("tokenbroker_accounts", body)

    def test_3_json_endpoint_is_bounded_and_names_bad_parameters(self):
        s = self.snapshot("?limit=2&offset=1")
        self.assertEqual(s["page"], {"offset": 1, "limit": 2, "state": "all", "tier": "all", "matching": 4})
        self.assertEqual([a["account_id"] for a in s["accounts"]], ["acct-off", "acct-pro"])  # by tier, then id
        self.assertEqual(s["totals"]["accounts"], 4)
        self.assertEqual(s["totals"]["sessions_bound"], len(SESSIONS))
        self.assertEqual(s["state_backend"]["kind"], "redis")
        self.assertTrue(s["state_backend"]["up"])
        self.assertEqual(s["monitor"]["source"], "embedded")
        self.assertFalse(s["emails_shown"])
        attention = self.snapshot("?state=attention")
        self.assertEqual({a["account_id"] for a in attention["accounts"]}, {"acct-off"})
        self.assertEqual([a["account_id"] for a in self.snapshot("?tier=free")["accounts"]], ["acct-free"])
        for query, field in (("?limit=0", "limit"), ("?limit=501", "limit"), ("?offset=-1", "offset"),
                             ("?state=sleepy", "state"), ("?tier=gold", "tier"), ("?sessions=1", "sessions")):
            status, _, body = self.fetch("/status.json" + query)
            self.assertEqual(status, 400, query)
            self.assertIn(field, json.loads(body)["error"], query)
        status, _, body = self.fetch("/status.json?" + "x" * 5000 + "=1")
        self.assertEqual(status, 400)
        self.assertLess(len(body), 300)

    def test_4_dashboard_queries_name_metrics_the_broker_exports(self):
        with open(DASHBOARD) as f:
            dashboard = json.load(f)
        status, _, scrape = self.fetch("/metrics", authorization=None)
        self.assertEqual(status, 200)
        exported = set()
        for line in scrape.splitlines():
            if line and not line.startswith("#"):
                exported.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
        panels = [p for p in dashboard["panels"] if p["type"] != "row"]
        self.assertGreaterEqual(len(panels), 10)
        ids = [p["id"] for p in dashboard["panels"]]
        self.assertEqual(len(ids), len(set(ids)), "panel ids are unique")
        used = set()
        for p in panels:
            self.assertTrue(p.get("targets"), f"panel {p['title']!r} has no query")
            g = p["gridPos"]
            self.assertLessEqual(g["x"] + g["w"], 24, p["title"])
            for t in p["targets"]:
                names = set(re.findall(r"\b(tokenbroker_[a-z0-9_]+)\b", t["expr"]))
                self.assertTrue(names, f"panel {p['title']!r}: {t['expr']!r} names no tokenbroker metric")
                missing = names - exported
                self.assertFalse(missing, f"panel {p['title']!r} queries {missing}, which /metrics does not export")
                self.assertIn('instance=~"$instance"', t["expr"], p["title"])
                used |= names
        # Every area the issue names has a panel.
        for metric in ("tokenbroker_rpc_total", "tokenbroker_rpc_duration_seconds_bucket", "tokenbroker_accounts",
                       "tokenbroker_cooldowns", "tokenbroker_quota_remaining_fraction",
                       "tokenbroker_token_refreshes_total", "tokenbroker_session_rebinds_total",
                       "tokenbroker_waiting_calls", "tokenbroker_state_backend_up"):
            self.assertIn(metric, used)

    def test_5_emails_only_when_enabled(self):
        self.assertNotIn("@example.com", json.dumps(self.snapshot("?limit=500")))
        c = self.cluster
        port_file = os.path.join(c.dir, "metrics-emails.port")
        c.start_broker("--metrics_listen=127.0.0.1:0", f"--metrics_port_file={port_file}", "--status_show_emails")
        def read_port():
            if not os.path.exists(port_file):
                return None
            with open(port_file) as f:
                return f.read().strip()
        port = int(harness.wait_for(read_port, what="the second broker's metrics port"))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=10) as resp:
            s = json.loads(resp.read().decode())
        self.assertTrue(s["emails_shown"])
        self.assertEqual({a["email"] for a in s["accounts"]},
                         {a + "@example.com" for a, _, _, _, _ in ACCOUNTS} | {DISABLED[0] + "@example.com"})


if __name__ == "__main__":
    unittest.main()
