"""End to end for issue 13 (quota as Google counts it since 2026), through the real binaries against the fake
Cloud Code, once with tokenbroker-monitor streaming quota and once with the broker's embedded poller:
- a weekly bucket at 0 keeps an account from its family while its 5-hour bucket is positive, not from others;
- a weekly 429 on claude-sonnet cools claude-opus on that account (the family), not gemini;
- an account Google suspended (Terms of Service 403) is never handed out again, also after a restart."""
import json
import os
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BUILD = os.environ.get("TB_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
BUF = os.environ.get("TB_BUF", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "node_modules", ".bin", "buf"))
SERVICE = "tokenbroker.v1.TokenBrokerService/"
GEMINI, SONNET, OPUS = "gemini-3-pro-high", "claude-sonnet-4-6", "claude-opus-4-6"


def stamp(seconds_from_now):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds_from_now))


def summary(gemini_5h, gemini_weekly, p3_5h, p3_weekly):
    """retrieveUserQuotaSummary's answer, in the nested shape some hosts send."""
    def bucket(bucket_id, window, fraction, reset_s):
        return {"bucketId": bucket_id, "window": window, "remainingFraction": fraction, "resetTime": stamp(reset_s)}
    return {"quotaSummary": {"groups": [
        {"groupId": "gemini", "buckets": [bucket("gemini-5h", "5h", gemini_5h, 3 * 3600),
                                          bucket("gemini-weekly", "168h", gemini_weekly, 3 * 86400)]},
        {"groupId": "3p", "buckets": [bucket("3p-5h", "5h", p3_5h, 3 * 3600),
                                      bucket("3p-weekly", "168h", p3_weekly, 4 * 86400)]}]}}


# fetchAvailableModels: ≈ 1.0 for Claude whatever is left (the known lie).
MODELS = {GEMINI: {"quotaInfo": {"remainingFraction": 0.6}}, SONNET: {"quotaInfo": {"remainingFraction": 1.0}},
          OPUS: {"quotaInfo": {"remainingFraction": 1.0}}}

WEEKLY_429 = json.dumps({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
                                   "message": "Individual quota reached for claude models. Resets in 108h48m29s.",
                                   "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                                "reason": "QUOTA_EXHAUSTED", "domain": "cloudcode-pa.googleapis.com",
                                                "metadata": {"model": SONNET, "quotaResetDelay": "108h48m29s",
                                                             "uiMessage": "true"}}]}})


class Scenario:
    """acct-a ULTRA: gemini weekly at 0, 5-hour at 0.6. acct-b FREE: everything left.
    acct-s ULTRA: Google suspended it."""

    def __init__(self, test, monitor):
        self.t = test
        self.monitor = monitor
        c = self.c = harness.Cluster(BUILD, BUF)
        c.write_account("acct-a", harness.account_json("a@example.com", "1//rt-a", "ULTRA"))
        c.write_account("acct-b", harness.account_json("b@example.com", "1//rt-b", "FREE"))
        c.write_account("acct-s", harness.account_json("s@example.com", "1//rt-s", "ULTRA"))
        c.start_upstream()
        self.profile("1//rt-a", "g1-ultra-tier", summary(0.6, 0.0, 0.9, 0.8))
        self.profile("1//rt-b", "free-tier", summary(0.9, 0.9, 0.9, 0.9))
        self.profile("1//rt-s", "g1-ultra-tier", summary(0.9, 0.9, 0.9, 0.9), suspended=True)
        self.flags = ["--log_level=debug"]
        if monitor:
            m = c.start_monitor("--poll_interval=1s")
            self.flags.append(f"--quota_monitor=127.0.0.1:{m.port}")
        else:
            self.flags += ["--embedded_monitor", "--poll_interval=1s"]
        c.start_broker(*self.flags)

    def profile(self, rt, tier, quota_summary, suspended=False):
        self.c.upstream_call("/__fake/profile", {"refresh_token": rt, "project": "proj-" + rt[-1], "tier": tier,
                                                 "models": MODELS, "summary": quota_summary, "suspended": suspended})

    def call(self, method, body):
        r = self.c.buf_curl(SERVICE + method, body)
        self.t.assertEqual(r.returncode, 0, r.stderr)
        return json.loads(r.stdout or "{}")

    def accounts(self):
        return {a["accountId"]: a for a in self.call("ListAccounts", {}).get("accounts", [])}

    def get(self, model):
        return self.call("GetToken", {"model": model})

    def verdicts(self, model):
        return {v["accountId"]: v for v in self.call("ExplainSelection", {"model": model})["accounts"]}

    def run(self):
        t = self.t
        # The poll has reached the broker: buckets listed, the suspension seen.
        harness.wait_for(lambda: len(self.accounts()["acct-a"].get("buckets", [])) == 4
                         and self.accounts()["acct-s"].get("state") == "ACCOUNT_STATE_SUSPENDED",
                         timeout=30, what="the first polls (buckets of acct-a, acct-s suspended)")

        # 1. gemini-weekly at 0 with gemini-5h at 0.6: never for gemini; for claude (it is the best).
        for _ in range(5):
            t.assertEqual(self.get(GEMINI)["accountId"], "acct-b")
            sonnet = self.get(SONNET)
            t.assertEqual(sonnet["accountId"], "acct-a")
            t.assertEqual(sonnet["modelFamily"], "3p")
        v = self.verdicts(GEMINI)["acct-a"]
        t.assertEqual(v["verdict"], "VERDICT_EXHAUSTED")
        t.assertIn("gemini-weekly", v["detail"])
        t.assertEqual(v.get("bindingQuota"), "gemini-weekly")
        buckets = {b["bucketId"]: b for b in self.accounts()["acct-a"]["buckets"]}
        t.assertEqual(buckets["gemini-weekly"]["family"], "gemini")
        t.assertEqual(buckets["gemini-weekly"].get("remainingFraction", 0), 0)

        # 2. The weekly bucket resets (Google shows it full): acct-a serves gemini again. Then a weekly
        #    429 on claude-sonnet cools claude-opus on acct-a, and not gemini.
        self.profile("1//rt-a", "g1-ultra-tier", summary(0.6, 0.9, 0.9, 0.8))
        harness.wait_for(lambda: self.get(GEMINI)["accountId"] == "acct-a", timeout=30,
                         what="acct-a back for gemini after its weekly reset")
        lease = self.get(SONNET)
        t.assertEqual(lease["accountId"], "acct-a")
        # As Google would: the 3p-weekly bucket reads 0 from now on (the poll must not clear the cooldown;
        # fetchAvailableModels still says 1.0 for claude).
        self.profile("1//rt-a", "g1-ultra-tier", summary(0.6, 0.9, 0.9, 0.0))
        r = self.call("ReportOutcome", {"leaseId": lease["leaseId"], "httpStatus": 429, "errorBody": WEEKLY_429})
        t.assertEqual(r["scope"], "COOLDOWN_SCOPE_FAMILY")
        t.assertEqual(r["family"], "3p")
        for _ in range(5):
            t.assertEqual(self.get(OPUS)["accountId"], "acct-b")
            t.assertEqual(self.get(SONNET)["accountId"], "acct-b")
            t.assertEqual(self.get(GEMINI)["accountId"], "acct-a")
        # Still so after more polls have come in.
        mark = self.polls_of("1//rt-a")
        harness.wait_for(lambda: self.polls_of("1//rt-a") >= mark + 2, timeout=30, what="two more polls of acct-a")
        t.assertEqual(self.get(OPUS)["accountId"], "acct-b")
        t.assertEqual(self.get(GEMINI)["accountId"], "acct-a")
        v = self.verdicts(OPUS)["acct-a"]
        t.assertEqual(v["verdict"], "VERDICT_COOLDOWN")
        t.assertIn("model family 3p", v["detail"])
        cooldowns = self.accounts()["acct-a"]["cooldowns"]
        t.assertEqual([c.get("family") for c in cooldowns], ["3p"])

        # 3. acct-s (ULTRA, the best ranked) is never handed out; the file says so, with Google's words.
        for model in (GEMINI, SONNET, OPUS):
            t.assertNotEqual(self.get(model)["accountId"], "acct-s")
        s = self.accounts()["acct-s"]
        t.assertIn("Terms of Service", s["suspensionMessage"])
        t.assertEqual(self.verdicts(GEMINI)["acct-s"]["verdict"], "VERDICT_SUSPENDED")
        with open(os.path.join(self.c.accounts_dir, "acct-s.json")) as f:
            doc = json.load(f)
        t.assertTrue(doc["suspended"])
        t.assertTrue(doc["disabled"])
        t.assertIn("Terms of Service", doc["disabled_reason"])
        t.assertEqual(self.c.broker_logs().count("acct-s suspended by Google"), 1, "logged once")
        # After a restart, with Google's answer for it back to normal: still suspended (never retried
        # automatically), before and after the first polls.
        self.profile("1//rt-s", "g1-ultra-tier", summary(0.9, 0.9, 0.9, 0.9), suspended=False)
        self.c.broker.stop()
        self.c.start_broker(*self.flags)
        t.assertEqual(self.accounts()["acct-s"]["state"], "ACCOUNT_STATE_SUSPENDED")
        mark = self.polls_of("1//rt-a")
        harness.wait_for(lambda: self.polls_of("1//rt-a") >= mark + 2, timeout=30, what="two more polls")
        for model in (GEMINI, SONNET, OPUS):
            t.assertNotEqual(self.get(model)["accountId"], "acct-s")
        t.assertEqual(self.accounts()["acct-s"]["state"], "ACCOUNT_STATE_SUSPENDED")
        # The operator brings it back.
        self.c.tbctl("reset-account", "--account=acct-s", "--enable")
        t.assertEqual(self.accounts()["acct-s"]["state"], "ACCOUNT_STATE_ENABLED")
        with open(os.path.join(self.c.accounts_dir, "acct-s.json")) as f:
            t.assertNotIn("suspended", json.load(f))

    def polls_of(self, rt):
        stats = self.c.upstream_call("/__fake/stats")
        return stats.get("calls_by_account", {}).get("/v1internal:retrieveUserQuotaSummary", {}).get(rt, 0)

    def close(self):
        self.c.close()


class FamiliesWithTheMonitor(unittest.TestCase):
    def test_buckets_family_cooldowns_and_suspension(self):
        s = Scenario(self, monitor=True)
        try:
            s.run()
        finally:
            s.close()


class FamiliesWithTheEmbeddedPoller(unittest.TestCase):
    def test_buckets_family_cooldowns_and_suspension(self):
        s = Scenario(self, monitor=False)
        try:
            s.run()
        finally:
            s.close()


class FamilyMapFile(unittest.TestCase):
    def test_an_operators_map_overrides_and_a_bad_one_is_refused_naming_the_line(self):
        c = harness.Cluster(BUILD, BUF)
        try:
            c.write_account("acct-a", harness.account_json("a@example.com", "1//rt-a", "ULTRA"))
            c.start_upstream()
            path = os.path.join(c.dir, "families")
            with open(path, "w") as f:
                f.write("# ours\ngemini-*-flash* flash\n")
            c.start_broker(f"--model_families_file={path}")
            r = c.buf_curl(SERVICE + "GetToken", {"model": "gemini-3-flash"})
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(json.loads(r.stdout)["modelFamily"], "flash")
            r = c.buf_curl(SERVICE + "GetToken", {"model": "gemini-3-pro-high"})
            self.assertEqual(json.loads(r.stdout)["modelFamily"], "gemini")
            with open(path, "w") as f:
                f.write("gemini-*-flash* flash\nclaude* Bad Family\n")
            import subprocess
            r = subprocess.run([c.bin("server", "tokenbroker"), "--accounts_dir", c.accounts_dir,
                                f"--model_families_file={path}"], capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 2, r.stderr)
            self.assertIn("--model_families_file", r.stderr)
            self.assertIn("line 2", r.stderr)
        finally:
            c.close()


if __name__ == "__main__":
    unittest.main()
