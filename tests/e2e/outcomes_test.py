"""End to end, issue by issue of docs/ARCHITECTURE.md §5: outcomes reported to the real broker cool accounts down,
GetToken skips them, RESOURCE_EXHAUSTED carries the exact RetryInfo, and max_wait waits for the
earliest account. The broker runs as a real binary against the fake upstream on loopback."""
import base64
import datetime
import json
import os
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BUILD = os.environ.get("TB_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
BUF = os.environ.get("TB_BUF", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "node_modules", ".bin", "buf"))
GET_TOKEN = "tokenbroker.v1.TokenBrokerService/GetToken"
REPORT = "tokenbroker.v1.TokenBrokerService/ReportOutcome"


def rfc3339_to_epoch(text):
    """"2026-11-29T01:20:44.687321530Z" -> seconds since the epoch (protobuf JSON timestamps)."""
    base, _, frac = text.rstrip("Z").partition(".")
    whole = datetime.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    return whole.timestamp() + (float("0." + frac) if frac else 0.0)


proto_fields = harness.proto_fields


def b64(text):
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_" if "-" in text or "_" in text else None)


class OutcomesEndToEnd(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        c = cls.cluster = harness.Cluster(BUILD, BUF)
        c.write_account("acct-a", harness.account_json("a@example.com", "1//rt-a", "ULTRA"))
        c.write_account("acct-b", harness.account_json("b@example.com", "1//rt-b", "PRO"))
        c.write_account("acct-c", harness.account_json("c@example.com", "1//rt-c", "FREE",
                                                       protected_models=["model-explain"]))
        c.start_upstream()
        c.start_broker("--log_level=debug")

    @classmethod
    def tearDownClass(cls):
        cls.cluster.close()

    def call(self, method, body):
        r = self.cluster.buf_curl(method, body)
        if r.returncode != 0:
            return None, json.loads(r.stderr)
        return json.loads(r.stdout), None

    def get_token(self, model, **extra):
        resp, err = self.call(GET_TOKEN, dict({"model": model}, **extra))
        self.assertIsNone(err, err)
        return resp

    def report(self, **fields):
        resp, err = self.call(REPORT, fields)
        self.assertIsNone(err, err)
        return resp

    def test_quota_exhausted_skips_the_account_for_that_model_until_the_delay_passes(self):
        model, other = "model-quota", "model-other"
        first = self.get_token(model)
        self.assertEqual(first["accountId"], "acct-a")
        r = self.report(leaseId=first["leaseId"], httpStatus=429, errorBody=harness.quota_exhausted_body(model, "6s"))
        self.assertEqual(r["scope"], "COOLDOWN_SCOPE_MODEL")
        self.assertEqual(r["accountId"], "acct-a")
        self.assertIn("QUOTA_EXHAUSTED", r["reason"])
        until = rfc3339_to_epoch(r["cooldownUntil"])
        checked = 0
        for _ in range(4):
            got = self.get_token(model)
            if time.time() < until - 0.5:  # the whole call ran inside the cooldown
                self.assertEqual(got["accountId"], "acct-b")
                checked += 1
            self.report(leaseId=got["leaseId"], httpStatus=200)
        self.assertGreater(checked, 0, "the machine was too slow to observe the cooldown")
        # A still serves another model.
        self.assertEqual(self.get_token(other)["accountId"], "acct-a")
        # Once the delay has passed, A serves the model again.
        harness.wait_for(lambda: self.get_token(model)["accountId"] == "acct-a", timeout=30,
                         what="acct-a to serve the model again")
        self.assertGreaterEqual(time.time(), until - 0.1)

    def test_every_account_cooling_gives_resource_exhausted_with_exact_retry_info(self):
        model = "model-all-cooling"
        # Reports by account and model, through tbctl and through buf curl.
        self.cluster.tbctl("report-outcome", "--account", "acct-a", "--model", model, "--http_status", "429",
                           "--retry_after", "120")
        self.report(accountId="acct-b", model=model, httpStatus=429, retryAfter="45")
        self.report(accountId="acct-c", model=model, httpStatus=429,
                    errorBody=harness.quota_exhausted_body(model, "1h16m0.667s"))
        asked = time.time()
        resp, err = self.call(GET_TOKEN, {"model": model})
        self.assertIsNone(resp)
        self.assertEqual(err["code"], "resource_exhausted", err)
        self.assertIn(model, err["message"])
        details = {d["type"]: proto_fields(b64(d["value"])) for d in err["details"]}
        retry = proto_fields(details["google.rpc.RetryInfo"][1][0])
        delay = retry.get(1, [0])[0] + retry.get(2, [0])[0] / 1e9
        elapsed = time.time() - asked
        self.assertAlmostEqual(delay, 45, delta=1.0 + elapsed)
        violation = proto_fields(details["google.rpc.QuotaFailure"][1][0])
        self.assertEqual(violation[1][0].decode(), "model:" + model)

    def test_max_wait_longer_than_the_earliest_cooldown_succeeds(self):
        model = "model-wait"
        self.report(accountId="acct-a", model=model, httpStatus=429, retryAfter="600")
        self.report(accountId="acct-b", model=model, httpStatus=429, retryAfter="2")
        self.report(accountId="acct-c", model=model, httpStatus=503,
                    errorBody='{"error":{"code":503,"details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"MODEL_CAPACITY_EXHAUSTED"}]}}',
                    retryAfter="600")
        resp, err = self.call(GET_TOKEN, {"model": model})
        self.assertEqual(err["code"], "resource_exhausted")
        start = time.monotonic()
        got = self.get_token(model, maxWait="10s")
        self.assertEqual(got["accountId"], "acct-b")
        self.assertLess(time.monotonic() - start, 8)

    def test_explain_names_the_reason_for_every_skipped_account(self):
        model = "model-explain"
        self.report(accountId="acct-a", model=model, httpStatus=429, errorBody=harness.quota_exhausted_body(model, "2h"))
        out = self.cluster.tbctl_json("explain", "--model", model)
        verdicts = {a["accountId"]: a for a in out["accounts"]}
        self.assertEqual(out["chosenAccountId"], "acct-b")
        self.assertEqual(verdicts["acct-a"]["verdict"], "VERDICT_COOLDOWN")
        self.assertIn("QUOTA_EXHAUSTED", verdicts["acct-a"]["detail"])
        self.assertIn("availableTime", verdicts["acct-a"])
        self.assertEqual(verdicts["acct-c"]["verdict"], "VERDICT_PROTECTED")
        for a in out["accounts"]:
            self.assertTrue(a.get("detail"), a)
        table = self.cluster.tbctl("explain", "--model", model).stdout
        self.assertRegex(table, r"COOLDOWN\s+acct-a\s+ULTRA\s+model cooling down until")
        self.assertRegex(table, r"PROTECTED\s+acct-c\s+FREE\s+model model-explain is in its protected_models")
        accounts = {a["accountId"]: a for a in self.cluster.tbctl_json("list-accounts")["accounts"]}
        self.assertTrue(any(c.get("model") == model for c in accounts["acct-a"]["cooldowns"]))


if __name__ == "__main__":
    unittest.main()
