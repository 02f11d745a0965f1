"""End to end, issue 11: the pool survives whatever a caller reports and whatever Google does.

Each test plays a hostile caller or a broken upstream against the real binaries (tokenbroker, the
fake upstream over HTTP, tbctl) and checks the rule that issue's item states. Raw gRPC calls go
through Debian's python3-grpcio with hand-encoded protobuf (no generated stubs needed).
"""
import concurrent.futures
import hashlib
import hmac
import json
import os
import re
import stat
import sys
import threading
import time
import unittest
import urllib.request

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BUILD = os.environ.get("TB_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
SERVICE = "/tokenbroker.v1.TokenBrokerService/"
MODEL = "gemini-3-pro-high"


# --- protobuf wire format, just what these tests send and read --------------------------------

def _varint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_str(field, text):
    data = text.encode() if isinstance(text, str) else text
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def pb_int(field, value):
    return _varint(field << 3) + _varint(value)


def pb_msg(field, body):
    return pb_str(field, body)


pb_fields = harness.proto_fields


def first(fields, n, default=None):
    return fields.get(n, [default])[0]


def get_token_request(model=MODEL, session="", max_wait_s=0):
    body = pb_str(1, model)
    if session:
        body += pb_str(2, session)
    if max_wait_s:
        body += pb_msg(5, pb_int(1, max_wait_s))
    return body


def report_request(lease="", account="", model="", status=0, retry_after="", body=""):
    out = b""
    if lease:
        out += pb_str(1, lease)
    if account:
        out += pb_str(2, account)
    if model:
        out += pb_str(3, model)
    out += pb_int(4, status)
    if retry_after:
        out += pb_str(5, retry_after)
    if body:
        out += pb_str(6, body)
    return out


class Token:
    """A decoded GetTokenResponse."""

    def __init__(self, data):
        f = pb_fields(data)
        self.access_token = first(f, 1, b"").decode()
        self.account_id = first(f, 2, b"").decode()
        self.lease_id = first(f, 7, b"").decode()
        expire = pb_fields(first(f, 5, b""))
        self.expire_seconds = first(expire, 1, 0)
        self.below_min_token_ttl = bool(first(f, 10, 0))


def retry_delay(error):
    """The google.rpc.RetryInfo delay (seconds) of a gRPC error, or None."""
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        for detail in pb_fields(value).get(3, []):
            d = pb_fields(detail)
            if first(d, 1, b"").decode().endswith("google.rpc.RetryInfo"):
                delay = pb_fields(first(pb_fields(first(d, 2, b"")), 1, b""))
                return first(delay, 1, 0) + first(delay, 2, 0) / 1e9
    return None


class Broker:
    """gRPC access to one running broker, with an optional bearer token."""

    def __init__(self, target, token=None):
        self.channel = grpc.insecure_channel(target)
        self.token = token

    def call(self, method, body, timeout=10, token=None):
        token = token if token is not None else self.token
        metadata = [("authorization", f"Bearer {token}")] if token else None
        return self.channel.unary_unary(SERVICE + method)(body, timeout=timeout, metadata=metadata)

    def get_token(self, timeout=10, token=None, **kw):
        return Token(self.call("GetToken", get_token_request(**kw), timeout=timeout, token=token))

    def report(self, token=None, **kw):
        return pb_fields(self.call("ReportOutcome", report_request(**kw), token=token))

    def close(self):
        self.channel.close()


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def metric(text, name, **labels):
    total = None
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total = (total or 0) + float(line.rsplit(" ", 1)[1])
    return total


class HostileCase(unittest.TestCase):
    """A cluster per test: a fake upstream, account files, and brokers started by the test."""

    ACCOUNTS = (("acct-a", "ULTRA"), ("acct-b", "PRO"))

    def setUp(self):
        self.c = harness.Cluster(BUILD)
        for account_id, tier in self.ACCOUNTS:
            self.c.write_account(account_id, harness.account_json(f"{account_id}@example.com", f"1//rt-{account_id}", tier))
        self.c.start_upstream()
        self.brokers = []

    def tearDown(self):
        for b in self.brokers:
            b.close()
        self.c.close()

    def start(self, *flags, token=None):
        self.c.start_broker(*flags)
        b = Broker(self.c.target, token)
        self.brokers.append(b)
        return b

    def account_file(self, account_id):
        with open(os.path.join(self.c.accounts_dir, account_id + ".json")) as f:
            return json.load(f)

    def accounts(self, token=None):
        args = ["list-accounts"]
        env_token = token
        r = self.tbctl_env(env_token, "--json", *args)
        return {a["accountId"]: a for a in json.loads(r.stdout).get("accounts", [])}

    def tbctl_env(self, token, *args, check=True):
        import subprocess
        env = dict(os.environ)
        env.pop("TOKENBROKER_TOKEN", None)
        if token:
            env["TOKENBROKER_TOKEN"] = token
        r = subprocess.run([self.c.bin("client", "tbctl"), "--target", self.c.target] + list(args),
                           capture_output=True, text=True, timeout=30, env=env)
        if check and r.returncode != 0:
            raise RuntimeError(f"tbctl {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r

    def script(self, **reply):
        self.c.upstream_call("/__fake/script", reply)

    def token_calls(self, refresh_token):
        return self.c.upstream_call("/__fake/stats")["token_calls"].get(refresh_token, 0)

    def lease_on(self, broker, account_id, **kw):
        """GetToken until it lands on `account_id` (other leases are reported as successes)."""
        for _ in range(20):
            t = broker.get_token(**kw)
            if t.account_id == account_id:
                return t
            broker.report(lease=t.lease_id, status=200)
        self.fail(f"GetToken never chose {account_id}")


class TrustBoundary(HostileCase):
    """Items 1, 2, 14, 8: what a report can and cannot do."""

    ACCOUNTS = (("acct-a", "ULTRA"),)

    def test_item1_a_report_never_disables_only_the_brokers_own_refresh_does(self):
        b = self.start()
        # A 400 whose body merely names "invalid_grant" (a request's fault) — the reproduction.
        t = b.get_token()
        body = ('{"error":{"code":400,"message":"Invalid JSON payload received. Unknown name \\"invalid_grant\\" '
                'at \'request\': Cannot find field.","status":"INVALID_ARGUMENT"}}')
        r = b.report(lease=t.lease_id, status=400, body=body)
        self.assertFalse(first(r, 6, 0), "a report said it disabled the account")
        # An OAuth-shaped invalid_grant, as a proxy would relay it: at most a cooldown.
        t = b.get_token()
        r = b.report(lease=t.lease_id, status=400,
                     body='{"error":"invalid_grant","error_description":"Token has been expired or revoked."}')
        self.assertFalse(first(r, 6, 0))
        self.assertEqual(first(r, 2), 2, "an OAuth-shaped invalid_grant should cool the account")
        account = self.accounts()["acct-a"]
        self.assertNotEqual(account.get("state"), "ACCOUNT_STATE_DISABLED")
        self.assertFalse(self.account_file("acct-a").get("disabled"))
        # Only the broker's own refresh answering invalid_grant disables: the report dropped the
        # token, so the next use refreshes, and Google (the fake) says the grant is revoked.
        self.script(path="/token", status=400, times=0, match="1//rt-acct-a",
                    body='{"error":"invalid_grant","error_description":"Token has been expired or revoked."}')
        r = b.call("ResetAccount", pb_str(1, "acct-a"))  # lift the report's cooldown so it is used again
        with self.assertRaises(grpc.RpcError):
            b.get_token()
        harness.wait_for(lambda: self.account_file("acct-a").get("disabled"), what="the refresh to disable")
        self.assertIn("invalid_grant", self.account_file("acct-a").get("disabled_reason", ""))

    def test_item2_a_success_never_ends_a_live_cooldown(self):
        b = self.start()
        first_lease = b.get_token()
        second_lease = b.get_token()
        self.assertEqual(first_lease.account_id, second_lease.account_id)
        b.report(lease=first_lease.lease_id, status=429, retry_after="3600")
        r = b.report(lease=second_lease.lease_id, status=200)
        self.assertIn(b"never ends a live cooldown", first(r, 3, b""))
        with self.assertRaises(grpc.RpcError) as err:
            b.get_token()
        self.assertEqual(err.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertGreater(retry_delay(err.exception), 3500)

    def test_item14_a_past_http_date_retry_after_gets_the_streak_backoff(self):
        b = self.start()
        t = b.get_token()
        r = b.report(lease=t.lease_id, status=429, retry_after="Sun, 06 Nov 1994 08:49:37 GMT")
        self.assertEqual(first(r, 2), 1, "a 429 with a past Retry-After date caused no cooldown")
        self.assertIn(b"in the past", first(r, 3, b""))
        until = first(pb_fields(first(r, 1, b"")), 1, 0)
        self.assertAlmostEqual(until - time.time(), 60, delta=5)  # the first backoff step

    def test_item8_upstream_text_is_never_logged_or_returned_raw(self):
        secret = "ya29.a0AfB_hostileSECRETtoken"
        forged = "2026-11-29T01:00:00.000 error FORGED LINE"
        body = json.dumps({"error": {"code": 403, "message": "verify", "details": [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": f"VALIDATION_REQUIRED\n{forged} {secret}",
             "metadata": {"validation_url": f"https://accounts.google.com/v\r\n{forged} {secret}"}}]}})
        for log_format in ("text", "json"):
            b = self.start(f"--log_format={log_format}", "--log_level=debug")
            t = b.get_token()
            r = b.report(lease=t.lease_id, status=403, body=body)
            reason = first(r, 3, b"").decode()
            self.assertNotIn("\n", reason)
            self.assertNotIn(secret, reason)
            self.assertIn("ya29.<redacted>", reason)
            account = self.accounts()["acct-a"]
            self.assertNotIn(secret, json.dumps(account))
            self.assertNotIn("\n", account.get("validationUrl", ""))
            b.call("ResetAccount", pb_str(1, "acct-a"))
            self.c.broker.stop()
            log = self.c.broker_logs()
            self.assertNotIn(secret, log)
            for line in log.splitlines():
                self.assertFalse(line.startswith(forged[:10]) and "FORGED" in line, f"forged log line: {line!r}")
                if log_format == "json" and line.startswith("{"):
                    json.loads(line)
            self.assertIn("FORGED", log)  # it is there, escaped, inside the real line


class Metrics(HostileCase):
    def test_item7_unknown_methods_share_one_label(self):
        port_file = os.path.join(self.c.dir, "metrics.port")
        self.start("--metrics_listen=127.0.0.1:0", f"--metrics_port_file={port_file}")
        port = harness.wait_for(lambda: open(port_file).read().strip() if os.path.exists(port_file) else None)
        channel = grpc.insecure_channel(self.c.target)
        for i in range(2000):
            with self.assertRaises(grpc.RpcError) as err:
                channel.unary_unary(f"/evil.Service{i}/Method{i}")(b"", timeout=5)
            self.assertEqual(err.exception.code(), grpc.StatusCode.UNIMPLEMENTED)
        channel.close()
        text = scrape(port)
        methods = set(re.findall(r'tokenbroker_rpc_total\{[^}]*method="([^"]*)"', text))
        self.assertTrue("unknown" in methods, f"{len(methods)} method labels, e.g. {sorted(methods)[:5]}")
        self.assertLess(len(methods), 10, sorted(methods)[:5])
        self.assertLess(len(text), 200_000)
        self.assertEqual(metric(text, "tokenbroker_rpc_total", method="unknown"), 2000)


class LeaseTableBound(HostileCase):
    """Leases come from callers who need not report them: --max_leases bounds the table, and a
    flooding caller pushes out only its own oldest leases, never another caller's."""

    def setUp(self):
        super().setUp()
        self.tokens = {"flood": "tok-flood-0123456789abcdef", "good": "tok-good-0123456789abcdef"}
        callers = harness.write_callers_file(self.c.dir, self.tokens)
        self.metrics_port_file = os.path.join(self.c.dir, "metrics.port")
        self.b = self.start(f"--caller_tokens_file={callers}", "--max_leases=50", "--metrics_listen=127.0.0.1:0",
                            f"--metrics_port_file={self.metrics_port_file}")

    def test_a_flood_of_unreported_leases_stays_bounded_and_spares_other_callers(self):
        b, flood, good = self.b, self.tokens["flood"], self.tokens["good"]
        held = [b.get_token(token=good) for _ in range(5)]
        first_flood = b.get_token(token=flood)
        pool = concurrent.futures.ThreadPoolExecutor(8)
        list(pool.map(lambda _: b.get_token(token=flood), range(3000)))
        pool.shutdown()
        with open(self.metrics_port_file) as f:
            text = scrape(int(f.read().strip()))
        self.assertEqual(metric(text, "tokenbroker_inflight_leases"), 50)
        self.assertEqual(metric(text, "tokenbroker_leases_evicted_total"), 5 + 3001 - 50)
        # The other caller's leases were never pushed out: each is reported normally.
        for t in held:
            r = b.report(token=good, lease=t.lease_id, status=200)
            self.assertEqual(first(r, 4, b"").decode(), t.account_id)
        # The flood's oldest lease is gone, like a timed-out one.
        with self.assertRaises(grpc.RpcError) as err:
            b.report(token=flood, lease=first_flood.lease_id, status=200)
        self.assertEqual(err.exception.code(), grpc.StatusCode.NOT_FOUND)

    def test_max_leases_out_of_range_is_refused_naming_the_flag(self):
        import subprocess
        for bad in ("0", "-5", "10000001"):
            r = subprocess.run([self.c.bin("server", "tokenbroker"), "--accounts_dir", self.c.accounts_dir,
                                "--listen", "127.0.0.1:0", f"--max_leases={bad}"],
                               capture_output=True, text=True, timeout=30)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("--max_leases must be between 1 and 10000000", r.stderr + r.stdout)


class Waiters(HostileCase):
    ACCOUNTS = (("acct-a", "ULTRA"),)

    def test_item12_abandoned_waiters_leave_at_once_and_never_take_a_lease(self):
        port_file = os.path.join(self.c.dir, "metrics.port")
        audit = os.path.join(self.c.dir, "audit.jsonl")
        b = self.start("--metrics_listen=127.0.0.1:0", f"--metrics_port_file={port_file}", f"--audit_log={audit}",
                       "--probe_timeout=60s")
        port = harness.wait_for(lambda: open(port_file).read().strip() if os.path.exists(port_file) else None)
        t = b.get_token()
        r = b.report(lease=t.lease_id, status=429, retry_after="4")
        cooldown_end = first(pb_fields(first(r, 1, b"")), 1, 0)
        # 300 callers wait (max_wait 600 s) with a 1 s deadline, and go away.
        futures = [b.channel.unary_unary(SERVICE + "GetToken").future(get_token_request(max_wait_s=600), timeout=1)
                   for _ in range(300)]
        harness.wait_for(lambda: metric(scrape(port), "tokenbroker_waiting_calls") >= 250, timeout=10,
                         what="the callers to park")
        for f in futures:
            with self.assertRaises(grpc.RpcError):
                f.result()
        # They left the queue at once (not when the account frees).
        harness.wait_for(lambda: metric(scrape(port), "tokenbroker_waiting_calls") == 0, timeout=2,
                         what="the abandoned waiters to leave the queue")
        self.assertLess(time.time(), cooldown_end, "the test was too slow to prove anything")
        # A live waiter gets the account (and the single half-open probe) when it frees.
        live = b.get_token(max_wait_s=30, timeout=30)
        self.assertEqual(live.account_id, "acct-a")
        self.assertEqual(metric(scrape(port), "tokenbroker_inflight_leases"), 1)
        self.c.broker.stop()
        issued = [json.loads(line) for line in open(audit) if '"token_issued"' in line]
        self.assertEqual(len(issued), 2, "leases were issued to abandoned callers")


class Callers(HostileCase):
    """Items 3 and 4: reports bound to the lease's caller, audited and counted."""

    def setUp(self):
        super().setUp()
        self.tokens = {"proxy-a": "tok-a-0123456789abcdef", "proxy-b": "tok-b-0123456789abcdef"}
        callers = harness.write_callers_file(self.c.dir, self.tokens)
        self.admin = "admin-0123456789abcdef"
        admin = os.path.join(self.c.dir, "admin.txt")
        with open(admin, "w") as f:
            f.write(self.admin + "\n")
        self.audit = os.path.join(self.c.dir, "audit.jsonl")
        self.metrics_port_file = os.path.join(self.c.dir, "metrics.port")
        self.b = self.start(f"--caller_tokens_file={callers}", f"--admin_token_file={admin}", f"--audit_log={self.audit}",
                            "--metrics_listen=127.0.0.1:0", f"--metrics_port_file={self.metrics_port_file}")

    def test_item3_reports_are_bound_to_the_callers_lease(self):
        b, a_tok, b_tok = self.b, self.tokens["proxy-a"], self.tokens["proxy-b"]
        lease = b.get_token(token=a_tok)
        # B reports A's lease: refused, and nothing changes.
        with self.assertRaises(grpc.RpcError) as err:
            b.report(token=b_tok, lease=lease.lease_id, status=429, retry_after="3600")
        self.assertEqual(err.exception.code(), grpc.StatusCode.PERMISSION_DENIED)
        self.assertEqual(self.accounts(self.admin)[lease.account_id].get("cooldowns", []), [])
        # Naming the account without a lease needs the admin token.
        with self.assertRaises(grpc.RpcError) as err:
            b.report(token=b_tok, account=lease.account_id, model=MODEL, status=429, retry_after="3600")
        self.assertEqual(err.exception.code(), grpc.StatusCode.PERMISSION_DENIED)
        with self.assertRaises(grpc.RpcError) as err:  # an unknown lease does not fall back to the account
            b.report(token=b_tok, lease="l-" + "0" * 48, account=lease.account_id, model=MODEL, status=429)
        self.assertEqual(err.exception.code(), grpc.StatusCode.PERMISSION_DENIED)
        self.assertEqual(self.accounts(self.admin)[lease.account_id].get("cooldowns", []), [])
        # The owner may; the admin may name the account.
        r = b.report(token=a_tok, lease=lease.lease_id, status=200)
        self.assertEqual(first(r, 4, b"").decode(), lease.account_id)
        r = b.report(token=self.admin, account=lease.account_id, model=MODEL, status=429, retry_after="60")
        self.assertEqual(first(r, 2), 1)
        # Lease ids are unguessable: two in a row share only their table and caller parts.
        one, two = b.get_token(token=a_tok).lease_id, b.get_token(token=a_tok).lease_id
        self.assertGreaterEqual(len(one), 50)
        tail_one, tail_two = one[26:], two[26:]
        self.assertGreater(sum(x != y for x, y in zip(tail_one, tail_two)), 12)
        self.assertNotEqual(int(tail_one, 16) + 1, int(tail_two, 16))

    def test_item4_every_report_is_audited_and_counted(self):
        b, a_tok, b_tok = self.b, self.tokens["proxy-a"], self.tokens["proxy-b"]
        lease = b.get_token(token=a_tok)
        with self.assertRaises(grpc.RpcError):
            b.report(token=b_tok, lease=lease.lease_id, status=429)
        b.report(token=a_tok, lease=lease.lease_id, status=429, retry_after="120")
        with self.assertRaises(grpc.RpcError):
            b.report(token="not-a-token-at-all-xx", lease=lease.lease_id, status=200)
        self.c.broker.stop()  # flushes the audit log
        lines = [json.loads(line) for line in open(self.audit)]
        reports = [line for line in lines if line["event"] == "outcome_reported"]
        self.assertEqual(len(reports), 2, reports)
        denied, applied = reports
        self.assertEqual((denied["caller"], denied["result"]), ("proxy-b", "permission_denied"))
        self.assertEqual((applied["caller"], applied["result"], applied["scope"]), ("proxy-a", "model_cooldown", "model"))
        self.assertEqual(applied["account_id"], lease.account_id)
        self.assertEqual(applied["http_status"], 429)
        self.assertIn("until", applied)
        self.assertEqual(stat.S_IMODE(os.stat(self.audit).st_mode), 0o600)

    def test_item4_report_metric_by_caller_and_result(self):
        b, a_tok, b_tok = self.b, self.tokens["proxy-a"], self.tokens["proxy-b"]
        port = harness.wait_for(lambda: open(self.metrics_port_file).read().strip())
        lease = b.get_token(token=a_tok)
        with self.assertRaises(grpc.RpcError):
            b.report(token=b_tok, lease=lease.lease_id, status=429)
        b.report(token=a_tok, lease=lease.lease_id, status=200)
        text = scrape(port)
        self.assertEqual(metric(text, "tokenbroker_reports_total", caller="proxy-b", result="permission_denied"), 1)
        self.assertEqual(metric(text, "tokenbroker_reports_total", caller="proxy-a", result="no_cooldown"), 1)


class BoundedState(HostileCase):
    ACCOUNTS = (("acct-a", "ULTRA"),)

    def test_item6_made_up_models_do_not_grow_state_without_bound(self):
        b = self.start()
        pool = concurrent.futures.ThreadPoolExecutor(8)

        def one(i):
            b.report(account="acct-a", model=f"made-up-model-{i}", status=429, retry_after=str(600 + i))
        list(pool.map(one, range(3000)))
        pool.shutdown()
        account = self.accounts()["acct-a"]  # tbctl list-accounts still works
        self.assertLessEqual(len(account.get("cooldowns", [])), 64)
        # The longest-lived cooldowns are the ones kept.
        self.assertIn("made-up-model-2999", {c.get("model") for c in account["cooldowns"]})


class TokenFailures(HostileCase):
    """Items 9, 10, 11, 13: the request path around failing, slow and short-lived refreshes."""

    # acct-a ranks first (ULTRA): every caller tries it first unless the broker knows better.
    ACCOUNTS = (("acct-a", "ULTRA"), ("acct-b", "PRO"), ("acct-c", "PRO"))

    def test_item9_a_hung_refresh_never_fails_callers_while_healthy_accounts_exist(self):
        # a's refresh hangs (20 s); b and c refresh normally at start.
        self.script(path="/token", status=200, body='{"access_token":"ya29.late","expires_in":3599}',
                    delay_ms=20000, times=0, match="1//rt-acct-a")
        b = self.start("--refresh_scan_interval=1h")
        harness.wait_for(lambda: self.token_calls("1//rt-acct-b") and self.token_calls("1//rt-acct-c"),
                         what="b and c to be refreshed")
        results = []

        def caller():
            start = time.monotonic()
            try:
                t = b.get_token(timeout=5)
                results.append(("ok", t.account_id, time.monotonic() - start))
            except grpc.RpcError as e:
                results.append((e.code().name, "", time.monotonic() - start))
        threads = [threading.Thread(target=caller) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual([r[0] for r in results], ["ok"] * 10, results)
        self.assertLess(max(r[2] for r in results), 4.0, results)

    def test_item10_a_failing_account_is_remembered(self):
        self.script(path="/token", status=500, body='{"error":"backend_error"}', times=0, match="1//rt-acct-a")
        b = self.start("--refresh_scan_interval=1h")
        harness.wait_for(lambda: self.token_calls("1//rt-acct-a"), what="a's first refresh")
        before = self.token_calls("1//rt-acct-a")
        start = time.monotonic()
        for _ in range(15):
            t = b.get_token()
            self.assertNotEqual(t.account_id, "acct-a")
            b.report(lease=t.lease_id, status=200)
        self.assertLess(time.monotonic() - start, 5)
        # One refresh (with its own retries) at most, not one per call.
        self.assertLessEqual(self.token_calls("1//rt-acct-a") - before, 3)

    def test_item11_no_token_shorter_than_promised_while_others_can_do_better(self):
        self.script(path="/token", status=200, body='{"access_token":"ya29.short","expires_in":120}', times=0,
                    match="1//rt-acct-a")
        b = self.start("--refresh_scan_interval=1h")
        for _ in range(12):
            t = b.get_token()
            self.assertNotEqual(t.account_id, "acct-a")
            self.assertFalse(t.below_min_token_ttl)
            self.assertGreater(t.expire_seconds - time.time(), 300)
            b.report(lease=t.lease_id, status=200)
        # When no other account is eligible, the short token is served, and it says so.
        for acct in ("acct-b", "acct-c"):
            b.report(token=None, account=acct, model=MODEL, status=429, retry_after="600")
        t = b.get_token()
        self.assertEqual(t.account_id, "acct-a")
        self.assertTrue(t.below_min_token_ttl)
        self.assertLess(t.expire_seconds - time.time(), 121)
        # expires_in 0 is a failed refresh, never a token that is already dead.
        self.script(path="/token", status=200, body='{"access_token":"ya29.dead","expires_in":0}', times=0,
                    match="1//rt-acct-c")
        b.call("ResetAccount", pb_str(1, "acct-c"))
        for _ in range(5):
            try:
                t = b.get_token()
            except grpc.RpcError:
                continue
            self.assertNotEqual(t.access_token, "ya29.dead")

    def test_item13_resource_exhausted_with_retry_info_after_a_token_failure(self):
        self.script(path="/token", status=500, body='{"error":"backend_error"}', times=0, match="1//rt-acct-a")
        b = self.start("--refresh_scan_interval=1h")
        for acct in ("acct-b", "acct-c"):
            b.report(account=acct, model=MODEL, status=429, retry_after="90")
        with self.assertRaises(grpc.RpcError) as err:
            b.get_token()
        self.assertEqual(err.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED, err.exception.details())
        self.assertAlmostEqual(retry_delay(err.exception), 90, delta=3)


class Undo(HostileCase):
    def test_item5_reset_account_lifts_cooldowns_and_disables_audited(self):
        audit = os.path.join(self.c.dir, "audit.jsonl")
        b = self.start(f"--audit_log={audit}")
        t = self.lease_on(b, "acct-a")
        b.report(lease=t.lease_id, status=429, retry_after="3600")
        self.assertNotEqual(b.get_token().account_id, "acct-a")
        r = self.tbctl_env(None, "reset-account", "--account=acct-a", f"--model={MODEL}")
        self.assertIn("lifted", r.stdout)
        t = self.lease_on(b, "acct-a")
        b.report(lease=t.lease_id, status=429, retry_after="3600")  # b is next in line now
        # A disable by the broker's refresh (invalid_grant), lifted with --enable after re-login: a
        # 401 drops b's token, so its next use refreshes, and Google says the grant is revoked.
        self.script(path="/token", status=400, times=1, match="1//rt-acct-b",
                    body='{"error":"invalid_grant","error_description":"revoked"}')
        t = self.lease_on(b, "acct-b")
        b.report(lease=t.lease_id, status=401)
        for _ in range(10):
            if self.account_file("acct-b").get("disabled"):
                break
            try:
                t = b.get_token()
                b.report(lease=t.lease_id, status=200)
            except grpc.RpcError:
                pass
        self.assertTrue(self.account_file("acct-b").get("disabled"))
        self.assertEqual(self.accounts()["acct-b"].get("state"), "ACCOUNT_STATE_DISABLED")
        r = self.tbctl_env(None, "--json", "reset-account", "--account=acct-b", "--enable")
        self.assertTrue(json.loads(r.stdout).get("enabled"))
        self.assertFalse(self.account_file("acct-b").get("disabled"))
        self.lease_on(b, "acct-b")
        self.c.broker.stop()
        resets = [json.loads(line) for line in open(audit) if '"account_reset"' in line]
        self.assertEqual([r["account_id"] for r in resets], ["acct-a", "acct-b"])

    def test_item5_reset_reaches_every_replica_with_redis(self):
        redis = harness.RedisServer(self.c.dir)
        try:
            b1 = self.start(f"--state_backend={redis.url}")
            target1 = self.c.target
            b2 = self.start(f"--state_backend={redis.url}")
            target2 = self.c.target
            t = self.lease_on(b1, "acct-a")
            b1.report(lease=t.lease_id, status=429, retry_after="3600")

            def cooling(target):
                r = self.c.tbctl("--json", "explain", f"--model={MODEL}", target=target)
                return any(a.get("accountId") == "acct-a" and a.get("verdict") == "VERDICT_COOLDOWN"
                           for a in json.loads(r.stdout).get("accounts", []))
            harness.wait_for(lambda: cooling(target2), what="the cooldown to reach replica 2")
            self.c.tbctl("reset-account", "--account=acct-a", target=target1)
            harness.wait_for(lambda: not cooling(target2), timeout=5, what="the reset to reach replica 2")
            self.assertFalse(cooling(target1))
        finally:
            redis.stop()


class Hygiene(HostileCase):
    ACCOUNTS = (("acct-a", "ULTRA"),)

    def test_item15_temp_files_audit_mode_and_keyed_session_tags(self):
        leftover = os.path.join(self.c.accounts_dir, "acct-a.json.tmp.12345")
        with open(leftover, "w") as f:
            f.write('{"token":{"refresh_token":"1//secret-left-behind"}}')
        audit = os.path.join(self.c.dir, "audit.jsonl")
        with open(audit, "w") as f:
            f.write("")
        os.chmod(audit, 0o644)
        key = "k" * 32
        os.environ["TOKENBROKER_AUDIT_KEY"] = key
        try:
            b = self.start(f"--audit_log={audit}")
        finally:
            del os.environ["TOKENBROKER_AUDIT_KEY"]
        harness.wait_for(lambda: not os.path.exists(leftover), timeout=5, what="the temp file to be removed")
        self.assertEqual(stat.S_IMODE(os.stat(audit).st_mode), 0o600)
        b.get_token(session="conversation-1")
        self.c.broker.stop()
        issued = [json.loads(line) for line in open(audit) if '"token_issued"' in line]
        want = hmac.new(key.encode(), b"conversation-1", hashlib.sha256).hexdigest()[:16]
        self.assertEqual(issued[0]["session"], want)


if __name__ == "__main__":
    unittest.main()
