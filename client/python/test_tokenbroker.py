"""tokenbroker.client (sync and asyncio) against the real broker and the real fake upstream: the loop
over TCP and a unix socket, a 429 moving the request to another account and cooling the first,
RESOURCE_EXHAUSTED waited out within the deadline and given up past it, failures and cancellation in
fn still reported, TLS with a bearer token; and the example proxies (serve_example.py, the README's,
and proxy_example.py) run as programs.

Run by tests/e2e/clients_test.py with TB_BUILD_DIR set; starts its own processes (tests/e2e/harness.py)."""
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import unittest
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.abspath(os.environ.get("TB_BUILD_DIR", os.path.join(HERE, "..", "..", "build")))
sys.path[:0] = [os.path.join(BUILD, "python"), HERE, os.path.join(HERE, "..", "..", "tests", "e2e")]
import grpc  # noqa: E402
import harness  # noqa: E402
from clients_test import QUOTA_429, make_pki  # noqa: E402
from tokenbroker.client import STATUS_NO_ANSWER, AsyncClient, Client, retry_delay  # noqa: E402

CALLER_TOKEN = "py-caller-token-0123456789abcdef"


class TokenbrokerClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        c = cls.cluster = harness.Cluster(BUILD)
        try:
            c.write_account("ultra", harness.account_json("u@example.com", "1//rt-ultra", "ULTRA"))
            c.write_account("pro", harness.account_json("p@example.com", "1//rt-pro", "PRO"))
            c.start_upstream()
            cls.upstream = f"http://127.0.0.1:{c.upstream.port}"
            cls.unix_target = "unix:" + os.path.join(c.dir, "broker.sock")
            c.start_broker(listen=cls.unix_target)
            make_pki(c.dir)
            with open(os.path.join(c.dir, "callers.txt"), "w") as f:
                f.write(f"proxy-py {CALLER_TOKEN}\n")
            c.start_broker(f"--caller_tokens_file={cls.pki('callers.txt')}", f"--tls_cert_file={cls.pki('server.pem')}",
                           f"--tls_key_file={cls.pki('server.key')}", f"--tls_client_ca_file={cls.pki('ca.pem')}")
            cls.tls_target = c.target
            c.start_broker()
            cls.tcp_target = c.target
            cls.broker = Client(cls.tcp_target)
        except BaseException:
            c.close()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.broker.close()
        cls.cluster.close()

    @classmethod
    def pki(cls, name):
        return os.path.join(cls.cluster.dir, name)

    def script(self, **rule):
        self.cluster.upstream_call("/__fake/script", dict({"path": "/v1internal:generateContent"}, **rule))

    def call_upstream(self, used):
        """A fn of do(): generateContent on the fake upstream, answered as (status, headers, body)."""
        def call(token, account):
            used.append(account.id)
            request = urllib.request.Request(f"{self.upstream}/v1internal:generateContent",
                                             json.dumps({"project": account.project_id}).encode(),
                                             {"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:
                    return resp.status, resp.headers, resp.read()
            except urllib.error.HTTPError as e:
                return e.code, e.headers, e.read()
        return call

    def account(self, account_id, broker=None):
        """The account as the broker (default: the TCP one; each broker has its own state) sees it."""
        return next(a for a in (broker or self.broker).list_accounts().accounts if a.account_id == account_id)

    def cooling(self, account_id, model):
        return any(c.model == model for c in self.account(account_id).cooldowns)

    def get_token(self, model):
        """The account GetToken chooses now for model; its lease is given back at once."""
        grant = self.broker.get_token(model)
        self.broker.report_outcome(lease_id=grant.lease_id, http_status=200)
        return grant.account_id

    def assert_reported(self, account_id, model):
        """No lease of the account is left in flight (the outcome was reported), and nothing cooled."""
        self.assertEqual(self.account(account_id).inflight_leases, 0, "the outcome was not reported")
        self.assertFalse(self.cooling(account_id, model), "a failure of the caller's own cooled the account")

    def cool_both(self, model, ultra, pro):
        for account_id, delay in (("ultra", ultra), ("pro", pro)):
            self.broker.report_outcome(account_id=account_id, model=model, http_status=429, retry_after=delay)

    # The loop.
    def test_do_serves_through_the_broker_over_tcp_and_a_unix_socket(self):
        for target in (self.tcp_target, self.unix_target):
            with self.subTest(target=target), Client(target) as broker:
                used = []
                status, headers, body = broker.do("py-happy", "conv-1", self.call_upstream(used))
                self.assertEqual(status, 200)
                self.assertIn("candidates", json.loads(body)["response"])
                self.assertEqual(used, ["ultra"])
                self.assertEqual(self.account("ultra", broker).inflight_leases, 0)

    def test_async_do(self):
        async def run():
            async with AsyncClient(self.unix_target) as broker:
                used = []

                async def call(token, account):
                    return await asyncio.to_thread(self.call_upstream(used), token, account)
                status, _, _ = await broker.do("py-async", "conv-2", call, timeout=10)
                self.assertEqual((status, used), (200, ["ultra"]))
                grant = await broker.get_token("py-async", "conv-2")
                self.assertEqual(grant.account_id, "ultra")
                await broker.report_outcome(lease_id=grant.lease_id, http_status=200)
        asyncio.run(run())

    def test_a_429_is_reported_and_the_request_rotates_to_another_account(self):
        model = "py-rotate"
        self.script(match="1//rt-ultra", status=429, body=QUOTA_429, times=1)
        used = []
        status, _, _ = self.broker.do(model, "conv-rotate", self.call_upstream(used))
        self.assertEqual((status, used), (200, ["ultra", "pro"]))
        self.assertTrue(self.cooling("ultra", model))  # for the hour the body named
        self.assertEqual(self.get_token(model), "pro")
        self.assertEqual(self.get_token(model + "-other"), "ultra")

    def test_after_max_attempts_the_last_answer_is_returned(self):
        self.script(status=503, body='{"error":{"code":503,"message":"backend unavailable"}}', times=2)
        used = []
        with Client(self.tcp_target, max_attempts=2) as broker:
            status, _, body = broker.do("py-attempts", "", self.call_upstream(used))
        self.assertEqual(status, 503)
        self.assertIn(b"backend unavailable", body)
        self.assertEqual(len(set(used)), 2)

    def test_urllib_http_error_counts_as_the_answer(self):
        self.script(match="1//rt-ultra", status=400, body='{"error":{"code":400,"message":"bad request"}}', times=1)

        def call(token, account):
            return urllib.request.urlopen(urllib.request.Request(
                f"{self.upstream}/v1internal:generateContent", b"{}", {"Authorization": f"Bearer {token}"}))
        with self.assertRaises(urllib.error.HTTPError) as caught:
            self.broker.do("py-httperror", "", call)
        self.assertEqual(caught.exception.code, 400)  # not retried: the request's own fault
        self.assertIn(b"bad request", caught.exception.read())
        self.assert_reported("ultra", "py-httperror")

    # RESOURCE_EXHAUSTED.
    def test_resource_exhausted_is_waited_out_within_the_deadline(self):
        model = "py-wait"
        self.cool_both(model, "600", "2")
        used = []
        start = time.monotonic()
        status, _, _ = self.broker.do(model, "", self.call_upstream(used), timeout=15)
        self.assertEqual((status, used), (200, ["pro"]))
        self.assertGreater(time.monotonic() - start, 1.0)

    def test_resource_exhausted_past_the_deadline_gives_up_at_once(self):
        model = "py-give-up"
        self.cool_both(model, "600", "60")
        capped = Client(self.tcp_target, max_wait=5)
        self.addCleanup(capped.close)
        for broker, timeout in ((self.broker, 3), (capped, None)):
            with self.subTest(timeout=timeout):
                used = []
                start = time.monotonic()
                with self.assertRaises(grpc.RpcError) as caught:
                    broker.do(model, "", self.call_upstream(used), timeout=timeout)
                self.assertEqual(caught.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
                self.assertGreater(retry_delay(caught.exception), 50)
                self.assertLess(time.monotonic() - start, 1.0, "it waited for what comes too late")
                self.assertEqual(used, [])

    def test_async_resource_exhausted(self):
        model = "py-async-wait"
        self.cool_both(model, "600", "2")

        async def run():
            async with AsyncClient(self.tcp_target) as broker:
                with self.assertRaises(grpc.RpcError) as caught:
                    await broker.do(model, "", lambda token, account: (200, {}, b""), timeout=1)
                self.assertEqual(caught.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
                status, _, _ = await broker.do(model, "", lambda token, account: (200, {}, b""), timeout=15)
                self.assertEqual(status, 200)
        asyncio.run(run())

    # Failures in fn.
    def test_an_exception_in_fn_is_still_reported(self):
        def fail(token, account):
            raise ValueError("boom")
        with self.assertRaises(ValueError):
            self.broker.do("py-raise", "", fail)
        self.assert_reported("ultra", "py-raise")
        with self.assertRaises(TypeError):  # an answer that is not one
            self.broker.do("py-raise", "", lambda token, account: "not an answer")
        self.assert_reported("ultra", "py-raise")

    def test_async_cancellation_is_still_reported(self):
        async def run():
            async with AsyncClient(self.tcp_target) as broker:
                started = asyncio.Event()

                async def hang(token, account):
                    started.set()
                    await asyncio.sleep(3600)
                task = asyncio.create_task(broker.do("py-cancel", "", hang))
                await asyncio.wait_for(started.wait(), 10)
                task.cancel()
                with self.assertRaises(asyncio.CancelledError):
                    await task
        asyncio.run(run())
        self.assert_reported("ultra", "py-cancel")
        self.assertEqual(STATUS_NO_ANSWER, 499)

    # Security.
    def test_tls_with_a_bearer_token(self):
        tls = dict(ca_file=self.pki("ca.pem"), cert_file=self.pki("client.pem"), key_file=self.pki("client.key"))
        used = []
        with Client(self.tls_target, token=lambda: CALLER_TOKEN, **tls) as broker:
            status, _, _ = broker.do("py-tls", "", self.call_upstream(used), timeout=10)
            self.assertEqual(status, 200)
        with Client(self.tls_target, **tls) as broker, self.assertRaises(grpc.RpcError) as caught:
            broker.do("py-tls", "", self.call_upstream(used), timeout=10)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAUTHENTICATED)

        async def run():
            async with AsyncClient(self.tls_target, token=CALLER_TOKEN, **tls) as broker:
                return (await broker.do("py-tls", "", lambda token, account: (200, {}, b""), timeout=10))[0]
        self.assertEqual(asyncio.run(run()), 200)

    # The example proxies, as programs.
    def test_serve_example(self):
        path = os.path.join(HERE, "serve_example.py")
        with open(path) as f:
            self.assertLessEqual(len(f.read().splitlines()), 30)
        port = harness.free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(BUILD, "python"), HERE]))
        proxy = subprocess.Popen(["/usr/bin/python3", path, self.tcp_target, self.upstream, str(port)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            def listening():
                if proxy.poll() is not None:
                    raise RuntimeError(f"serve_example.py exited: {proxy.stderr.read().decode()}")
                with socket.socket() as s:
                    return s.connect_ex(("127.0.0.1", port)) == 0
            harness.wait_for(listening, what="serve_example.py to listen")
            model = "py-example"
            self.script(match="1//rt-ultra", status=429, body=QUOTA_429, times=1)
            for _ in range(3):
                with urllib.request.urlopen(urllib.request.Request(
                        f"http://127.0.0.1:{port}/v1internal:generateContent?model={model}", b'{"request":{}}'),
                        timeout=30) as resp:
                    self.assertEqual(resp.status, 200)
                    self.assertIn("candidates", json.loads(resp.read())["response"])
            self.assertTrue(self.cooling("ultra", model), "the upstream's 429 did not cool the account")
            self.assertFalse(self.cooling("pro", model))
        finally:
            proxy.kill()
            proxy.wait()
            proxy.stderr.close()

    def test_proxy_example_command_line(self):
        env = dict(os.environ, PYTHONPATH=os.path.join(BUILD, "python"))
        r = subprocess.run(["/usr/bin/python3", os.path.join(HERE, "proxy_example.py"), "--broker", self.unix_target,
                            "--upstream", self.upstream, "--model", "py-cli", "--session", "conv-cli"],
                           capture_output=True, text=True, timeout=60, env=env)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("served by ultra", r.stdout)


if __name__ == "__main__":
    unittest.main()
