"""One proxied request through tokenbroker, from the command line (on the tokenbroker.client library).

The library does the loop: GetToken, the upstream call with the token (here Cloud Code's
generateContent with the account's project), ReportOutcome with what the upstream answered, another
account after a 429, 401, 403 or 5xx, and waiting out RESOURCE_EXHAUSTED while an account frees in
time. Against a secured broker the bearer token comes from $TOKENBROKER_TOKEN, and --tls-ca (with
--tls-cert/--tls-key for mutual TLS) turns TLS on.

    PYTHONPATH=build/python:client/python /usr/bin/python3 client/python/proxy_example.py \\
        --broker 127.0.0.1:50051 --upstream http://127.0.0.1:8080 --model gemini-3-pro-high --session conv-1
"""
import argparse
import json
import os
import sys
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tokenbroker.client import Client  # noqa: E402


def call_upstream(upstream, token, account, payload):
    """generateContent with the token, for the account's project: (status, headers, body)."""
    request = urllib.request.Request(f"{upstream}/v1internal:generateContent",
                                     data=json.dumps(dict(payload, project=account.project_id)).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def proxy(broker, upstream, model, session_id, payload, timeout=60):
    """One proxied request: (account id, the upstream's JSON answer). RuntimeError for a non-200."""
    used = []

    def call(token, account):
        used.append(account.id)
        return call_upstream(upstream, token, account, payload)

    status, _, body = broker.do(model, session_id, call, timeout=timeout)
    if status != 200:
        raise RuntimeError(f"upstream answered {status} (accounts tried: {', '.join(used)}): {body[:200]!r}")
    return used[-1], json.loads(body)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="127.0.0.1:50051", help="host:port or unix:/path.sock")
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--model", default="gemini-3-pro-high")
    parser.add_argument("--session", default="")
    parser.add_argument("--tls-ca", help="connect over TLS, trusting this PEM CA")
    parser.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", help="client key (mutual TLS)")
    args = parser.parse_args()
    with Client(args.broker, token=os.environ.get("TOKENBROKER_TOKEN"), ca_file=args.tls_ca,
                cert_file=args.tls_cert, key_file=args.tls_key) as broker:
        account, answer = proxy(broker, args.upstream, args.model, args.session, {"request": {"contents": []}})
    print(f"served by {account}: {json.dumps(answer)[:200]}")


if __name__ == "__main__":
    main()
