"""End to end for issue 13's onboarding and credits: accounts without a Cloud Code project are
onboarded (onboardUser, its long-running operation polled) by the real tokenbroker-monitor and by
the broker's embedded poller, and served with the project once they have one, never before; a
failing or hanging onboardUser keeps the account out with the reason; an
INSUFFICIENT_G1_CREDITS_BALANCE answer marks only the reporting caller's leased account's credits
exhausted, which GetToken then says, without cooling the account, on every replica sharing a Redis."""
import calendar
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from hostile_test import Broker, first, pb_fields  # noqa: E402

BUILD = os.environ.get("TB_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
MODEL = "gemini-3-pro-high"
ADMIN_TOKEN = "admin-token-0123456789abcdef"


def account_without_project(email, refresh_token, tier):
    doc = harness.account_json(email, refresh_token, tier)
    del doc["token"]["project_id"]
    return doc


def stats(cluster):
    return cluster.upstream_call("/__fake/stats")


def calls_for(cluster, path, refresh_token):
    return stats(cluster)["calls_by_account"].get(path, {}).get(refresh_token, 0)


def seconds(timestamp_bytes):
    t = pb_fields(timestamp_bytes)
    return first(t, 1, 0)


class OnboardingWithMonitor(unittest.TestCase):
    """The monitor onboards; a broker streams from it. Tests run in name order on one cluster."""

    @classmethod
    def setUpClass(cls):
        c = cls.cluster = harness.Cluster(BUILD)
        c.write_account("acct-new", account_without_project("new@example.com", "1//rt-new", "PRO"))
        # ULTRA: were it served, it would always be chosen first.
        c.write_account("acct-fail", account_without_project("fail@example.com", "1//rt-fail", "ULTRA"))
        c.start_upstream()
        c.upstream_call("/__fake/profile", {"refresh_token": "1//rt-new", "tier": "g1-pro-tier",
                                             "onboard_project": "proj-onboarded", "onboard_polls": 2})
        c.upstream_call("/__fake/profile", {"refresh_token": "1//rt-fail", "tier": "g1-ultra-tier",
                                             "onboard_error": "Precondition check failed: tier not available"})
        monitor = c.start_monitor("--poll_interval=1s", "--onboard_timeout=20s", "--onboard_retry=1h")
        c.start_broker(f"--quota_monitor=127.0.0.1:{monitor.port}")
        cls.broker = Broker(c.target)

    @classmethod
    def tearDownClass(cls):
        cls.broker.close()
        cls.cluster.close()

    def test_1_the_new_account_is_onboarded_then_served_with_its_project(self):
        c = self.cluster

        def served():
            return lease_of(self.broker, "acct-new")
        got = harness.wait_for(served, timeout=30, what="the onboarded account to be served")
        self.assertEqual(first(got, 2).decode(), "acct-new")
        self.assertEqual(first(got, 4).decode(), "proj-onboarded")
        # The operation was polled until done; onboardUser asked once.
        self.assertEqual(calls_for(c, "/v1internal:onboardUser", "1//rt-new"), 1)
        self.assertGreaterEqual(calls_for(c, "/v1internal/operations", "1//rt-new"), 2)
        # The monitor wrote the project into the account's file, keeping everything else.
        with open(os.path.join(c.accounts_dir, "acct-new.json")) as f:
            doc = json.load(f)
        self.assertEqual(doc["token"]["project_id"], "proj-onboarded")
        self.assertEqual(doc["token"]["refresh_token"], "1//rt-new")

    def test_2_a_failed_onboarding_keeps_the_account_out_with_the_reason_and_backs_off(self):
        c = self.cluster
        for _ in range(5):
            self.assertEqual(first(pb_fields(self.broker.call("GetToken", harness_get_token())), 2).decode(),
                             "acct-new")
        verdicts = {a["accountId"]: a for a in c.tbctl_json("explain", "--model", MODEL)["accounts"]}
        fail = verdicts["acct-fail"]
        self.assertEqual(fail["verdict"], "VERDICT_COOLDOWN")
        self.assertIn("no Cloud Code project: onboarding failed", fail["detail"])
        self.assertIn("tier not available", fail["detail"])
        accounts = {a["accountId"]: a for a in c.tbctl_json("list-accounts")["accounts"]}
        self.assertNotIn("projectId", accounts["acct-fail"])  # never a made-up project
        # Several polls later (acct-new's quota is read every second), still one onboardUser.
        base = calls_for(c, "/v1internal:fetchAvailableModels", "1//rt-new")
        harness.wait_for(lambda: calls_for(c, "/v1internal:fetchAvailableModels", "1//rt-new") >= base + 3,
                         what="three more polls")
        self.assertEqual(calls_for(c, "/v1internal:onboardUser", "1//rt-fail"), 1)
        with open(os.path.join(c.accounts_dir, "acct-fail.json")) as f:
            self.assertNotIn("project_id", json.load(f)["token"])

    def test_3_no_secret_in_the_logs(self):
        assert_no_secret(self, self.cluster.monitor.read_log(), self.cluster.broker_logs())


def lease_of(broker, account_id):
    """GetToken's answer when it lands on `account_id` with a project; otherwise None (the lease is
    given back as a success: before the poller has first looked at an account, nothing is known of
    its project, and it is served as before, with none)."""
    try:
        got = pb_fields(broker.call("GetToken", harness_get_token()))
    except grpc.RpcError:
        return None
    if first(got, 2).decode() == account_id and first(got, 4, b""):
        return got
    broker.report(lease=first(got, 7).decode(), status=200)
    return None


def assert_no_secret(test, *logs):
    for log in logs:
        for secret in ("1//rt-", "ya29.fake", "alice-token-", "mallory-token-", "admin-token-"):
            test.assertNotIn(secret, log)


def harness_get_token(model=MODEL):
    from hostile_test import get_token_request
    return get_token_request(model=model)


class EmbeddedPollerAndCredits(unittest.TestCase):
    """The broker's embedded poller onboards; callers are identified for the credits reports."""

    @classmethod
    def setUpClass(cls):
        c = cls.cluster = harness.Cluster(BUILD)
        c.write_account("acct-new", account_without_project("new@example.com", "1//rt-new", "PRO"))
        c.write_account("acct-hang", account_without_project("hang@example.com", "1//rt-hang", "ULTRA"))
        c.start_upstream()
        c.upstream_call("/__fake/profile", {"refresh_token": "1//rt-new", "tier": "g1-pro-tier",
                                             "onboard_project": "proj-embedded", "onboard_polls": 1,
                                             "credits_exhausted": True, "credits_reset_s": 3600})
        c.upstream_call("/__fake/profile", {"refresh_token": "1//rt-hang", "tier": "g1-ultra-tier"})
        # acct-hang's onboardUser never answers in time.
        c.upstream_call("/__fake/script", {"path": "/v1internal:onboardUser", "match": "1//rt-hang",
                                            "status": 200, "body": "{}", "delay_ms": 5000, "times": 0})
        tokens = os.path.join(c.dir, "callers")
        with open(tokens, "w") as f:
            f.write("alice alice-token-0123456789abcdef\nmallory mallory-token-0123456789abcdef\n")
        admin = os.path.join(c.dir, "admin")
        with open(admin, "w") as f:
            f.write(ADMIN_TOKEN + "\n")
        c.start_broker("--embedded_monitor", "--poll_interval=1s", "--onboard_timeout=2s", "--onboard_retry=1h",
                       f"--caller_tokens_file={tokens}", f"--admin_token_file={admin}", "--credits_exhausted_ttl=2h")
        cls.alice = Broker(c.target, "alice-token-0123456789abcdef")
        cls.mallory = Broker(c.target, "mallory-token-0123456789abcdef")

    @classmethod
    def tearDownClass(cls):
        cls.alice.close()
        cls.mallory.close()
        cls.cluster.close()

    def tbctl_json(self, *args):
        env = dict(os.environ, TOKENBROKER_TOKEN=ADMIN_TOKEN)
        r = subprocess.run([self.cluster.bin("client", "tbctl"), "--target", self.cluster.target, "--json"] + list(args),
                           capture_output=True, text=True, timeout=30, env=env)
        self.assertEqual(r.returncode, 0, r.stderr)
        return json.loads(r.stdout) if r.stdout.strip() else {}

    def get(self, broker):
        return pb_fields(broker.call("GetToken", harness_get_token()))

    def test_1_onboarded_by_the_embedded_poller_and_served(self):
        def served():
            return lease_of(self.alice, "acct-new")
        got = harness.wait_for(served, timeout=30, what="the onboarded account to be served")
        self.assertEqual(first(got, 2).decode(), "acct-new")
        self.assertEqual(first(got, 4).decode(), "proj-embedded")
        self.assertFalse(first(got, 11, 0))  # credits not known to be exhausted
        self.alice.report(lease=first(got, 7).decode(), status=200)

    def test_2_a_hanging_onboard_user_fails_at_the_timeout_with_the_reason(self):
        def hang_detail():
            verdicts = {a["accountId"]: a for a in self.tbctl_json("explain", "--model", MODEL)["accounts"]}
            detail = verdicts["acct-hang"].get("detail", "")
            return detail if "onboarding failed" in detail else None
        detail = harness.wait_for(hang_detail, timeout=30, what="acct-hang's onboarding to fail")
        self.assertIn("not done within --onboard_timeout 2s", detail)
        for _ in range(3):
            self.assertEqual(first(self.get(self.alice), 2).decode(), "acct-new")

    def test_3_credits_exhausted_marks_only_the_reporters_leased_account(self):
        c = self.cluster
        lease = self.get(self.alice)
        self.assertEqual(first(lease, 2).decode(), "acct-new")
        # What the upstream answers a request that asks for credits on this account.
        req = urllib.request.Request(
            f"http://127.0.0.1:{c.upstream.port}/v1internal:generateContent",
            data=json.dumps({"model": MODEL, "enabledCreditTypes": ["GOOGLE_ONE_AI"]}).encode(),
            headers={"Authorization": "Bearer " + first(lease, 1).decode()}, method="POST")
        with self.assertRaises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(req, timeout=10)
        self.assertEqual(answer.exception.code, 429)
        body = answer.exception.read().decode()
        self.assertIn("INSUFFICIENT_G1_CREDITS_BALANCE", body)
        lease_id = first(lease, 7).decode()
        # Hostile: another caller cannot report alice's lease, nor name the account without one.
        for kw in ({"lease": lease_id}, {"account": "acct-new", "model": MODEL}):
            with self.assertRaises(grpc.RpcError) as denied:
                self.mallory.report(status=429, body=body, **kw)
            self.assertEqual(denied.exception.code(), grpc.StatusCode.PERMISSION_DENIED)
        self.assertFalse(first(self.get(self.alice), 11, 0))
        # The lease's own caller can.
        before = time.time()
        r = self.alice.report(lease=lease_id, status=429, body=body)
        self.assertFalse(first(r, 2, 0))  # no cooldown scope
        until = seconds(first(r, 8))
        self.assertAlmostEqual(until, before + 3600, delta=60)  # the reset the answer named, not the 2h TTL
        # GetToken still serves the account (normal use), and says its credits are out.
        again = self.get(self.alice)
        self.assertEqual(first(again, 2).decode(), "acct-new")
        self.assertTrue(first(again, 11, 0))
        self.assertEqual(seconds(first(again, 12)), until)
        accounts = {a["accountId"]: a for a in self.tbctl_json("list-accounts")["accounts"]}
        listed = accounts["acct-new"]
        self.assertNotIn("cooldowns", listed)
        self.assertEqual(calendar.timegm(time.strptime(listed["creditsExhaustedUntil"][:19], "%Y-%m-%dT%H:%M:%S")),
                         until)
        # An operator's reset lifts it.
        self.tbctl_json("reset-account", "--account=acct-new")
        self.assertFalse(first(self.get(self.alice), 11, 0))

    def test_4_no_secret_in_the_logs(self):
        assert_no_secret(self, self.cluster.broker_logs())


CREDITS_BODY = json.dumps({"error": {
    "code": 429, "status": "RESOURCE_EXHAUSTED", "message": "Insufficient Google One AI credits.",
    "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "INSUFFICIENT_G1_CREDITS_BALANCE",
                 "domain": "cloudcode-pa.googleapis.com", "metadata": {"quotaResetDelay": "1800s"}}]}})


class CreditsOverRedis(unittest.TestCase):
    """Two replicas on one real redis-server: credits reported to one are known to the other."""

    @classmethod
    def setUpClass(cls):
        c = cls.cluster = harness.Cluster(BUILD)
        c.write_account("acct-a", harness.account_json("a@example.com", "1//rt-a", "PRO"))
        c.start_upstream()
        port = harness.free_port()
        cls.redis_log = open(os.path.join(c.dir, "redis.log"), "ab")
        cls.redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", c.dir,
                                      "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                                     stdout=cls.redis_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def pong():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    return conn.recv(16).startswith(b"+PONG")
            except OSError:
                return False
        harness.wait_for(pong, what="redis-server to answer PING")
        flags = ("--state_backend", f"redis://127.0.0.1:{port}", "--state_prefix", "onboard-e2e:")
        c.start_broker(*flags)
        cls.b1 = Broker(c.target)
        c.start_broker(*flags)
        cls.b2 = Broker(c.target)

    @classmethod
    def tearDownClass(cls):
        cls.b1.close()
        cls.b2.close()
        try:
            cls.cluster.close()
        finally:
            cls.redis.kill()
            cls.redis.wait()
            cls.redis_log.close()

    def test_a_credits_report_reaches_the_other_replica(self):
        got = pb_fields(self.b1.call("GetToken", harness_get_token()))
        self.assertFalse(first(got, 11, 0))
        r = self.b1.report(lease=first(got, 7).decode(), status=429, body=CREDITS_BODY)
        until = seconds(first(r, 8))

        def flagged_on_b2():
            t = pb_fields(self.b2.call("GetToken", harness_get_token()))
            self.b2.report(lease=first(t, 7).decode(), status=200)
            return t if first(t, 11, 0) else None
        t = harness.wait_for(flagged_on_b2, what="replica 2 to know the credits are exhausted")
        self.assertEqual(first(t, 2).decode(), "acct-a")  # served: credits are not a cooldown
        self.assertEqual(seconds(first(t, 12)), until)


class BadFlags(unittest.TestCase):
    """Bad values of the new flags: one line naming the flag, exit 2, before anything starts."""

    def run_binary(self, binary, *flags):
        folder = tempfile.mkdtemp(prefix="tokenbroker-e2e-flags-")
        try:
            return subprocess.run([os.path.join(BUILD, "server", binary), "--accounts_dir", folder,
                                   "--listen", "127.0.0.1:0"] + list(flags),
                                  capture_output=True, text=True, timeout=30)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def test_bad_values_are_refused_naming_the_flag(self):
        for binary, flag, value in (("tokenbroker", "--credits_exhausted_ttl", "0s"),
                                    ("tokenbroker", "--credits_exhausted_ttl", "200h"),
                                    ("tokenbroker", "--onboard_timeout", "0s"),
                                    ("tokenbroker-monitor", "--onboard_retry", "-1m"),
                                    ("tokenbroker-monitor", "--onboard_retry", "7h")):
            r = self.run_binary(binary, f"{flag}={value}")
            self.assertEqual(r.returncode, 2, (binary, flag, value, r.stderr))
            self.assertIn(flag, r.stderr)
            self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)


if __name__ == "__main__":
    unittest.main()
