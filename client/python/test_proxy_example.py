"""Runs the Python example client against a live broker (TCP and unix socket) and the fake upstream.

Started by tests/e2e/clients_test.py with TB_BUILD_DIR and TB_BUF set; starts its own processes."""
import json
import os
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.environ.get("TB_BUILD_DIR", os.path.join(HERE, "..", "..", "build"))
sys.path.insert(0, os.path.join(BUILD, "python"))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "e2e"))
import grpc  # noqa: E402
import harness  # noqa: E402
import proxy_example  # noqa: E402

QUOTA_429 = json.dumps({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
                                  "message": "You have exhausted your capacity on this model.",
                                  "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                               "reason": "QUOTA_EXHAUSTED",
                                               "metadata": {"quotaResetDelay": "1h"}}]}})


class ProxyExampleTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        c = cls.cluster = harness.Cluster(BUILD)
        c.write_account("ultra", harness.account_json("u@example.com", "1//rt-ultra", "ULTRA"))
        c.write_account("pro", harness.account_json("p@example.com", "1//rt-pro", "PRO"))
        c.start_upstream()
        cls.upstream = f"http://127.0.0.1:{c.upstream.port}"
        cls.sock = os.path.join(c.dir, "broker.sock")
        c.start_broker(listen="unix:" + cls.sock)
        cls.unix_target = "unix:" + cls.sock
        c.start_broker()
        cls.tcp_target = c.target

    @classmethod
    def tearDownClass(cls):
        cls.cluster.close()

    def check_proxy(self, target, model):
        broker = proxy_example.Broker(target)
        try:
            # The upstream answers 429 QUOTA_EXHAUSTED for the ULTRA account once.
            self.cluster.upstream_call("/__fake/script", {"path": "/v1internal:generateContent", "match": "1//rt-ultra",
                                                          "status": 429, "body": QUOTA_429, "times": 1})
            account, answer = proxy_example.proxy(broker, self.upstream, model, "conv-1", {"request": {}})
            self.assertEqual(account, "pro")
            self.assertIn("candidates", answer["response"])
            # The report cooled the ULTRA account for this model: the next request goes to PRO directly.
            self.assertEqual(broker.get_token(model).account_id, "pro")
            self.assertEqual(broker.get_token(model + "-other").account_id, "ultra")
        finally:
            broker.close()

    def test_proxy_over_tcp(self):
        self.check_proxy(self.tcp_target, "model-tcp")

    def test_proxy_over_unix_socket(self):
        self.check_proxy(self.unix_target, "model-unix")

    def test_retries_resource_exhausted_after_retry_info(self):
        broker = proxy_example.Broker(self.tcp_target)
        try:
            model = "model-retry"
            for account, delay in (("ultra", "600"), ("pro", "2")):
                broker.stub.ReportOutcome(proxy_example.broker_pb2.ReportOutcomeRequest(
                    account_id=account, model=model, http_status=429, retry_after=delay), timeout=10)
            with self.assertRaises(grpc.RpcError) as caught:
                broker.get_token(model, max_retries=0)
            self.assertEqual(caught.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.assertAlmostEqual(proxy_example.retry_delay(caught.exception), 2, delta=1)
            slept = []
            start = time.monotonic()
            token = broker.get_token(model, sleep=lambda s: (slept.append(s), time.sleep(s)))
            self.assertEqual(token.account_id, "pro")
            self.assertEqual(len(slept), 1)
            self.assertGreater(slept[0], 0.5)
            self.assertGreaterEqual(time.monotonic() - start, slept[0])
        finally:
            broker.close()


if __name__ == "__main__":
    unittest.main()
