"""`make demo`: a guided tour of tokenbroker on embedded defaults.

Starts the fake Google upstream and the real broker on free loopback ports with generated sample
accounts in a temp folder, then drives it with tbctl, printing every command line it runs.
Everything is removed at the end, unless --keep: then the processes stay up with their folder, and
the demo prints how to go on by hand and how to stop them.
"""
import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))
import harness  # noqa: E402

MODEL = "gemini-3-pro-high"
QUOTA_MODEL = "claude-sonnet-4-6-thinking"
ACCOUNTS = [
    ("ultra-1", "ultra1@example.com", "ULTRA"),
    ("pro-1", "pro1@example.com", "PRO"),
    ("pro-2", "pro2@example.com", "PRO"),
    ("free-1", "free1@example.com", "FREE"),
    ("free-2", "free2@example.com", "FREE"),
]


def shown(argv):
    """A command line as a person would type it: paths relative to here when shorter."""
    def short(a):
        rel = os.path.relpath(a) if os.path.isabs(a) else a
        return rel if os.path.isabs(a) and not rel.startswith("../..") and len(rel) < len(a) else a
    return " ".join(shlex.quote(short(a)) for a in argv)


def show_started(name, process):
    env = "TOKENBROKER_OAUTH_CLIENT_ID=demo-client TOKENBROKER_OAUTH_CLIENT_SECRET=demo-secret " \
        if name != "fake Google upstream" else ""
    print(f"started {name} (pid {process.proc.pid}), log {shown([process.log_path])}:\n"
          f"  $ {env}{shown(process.proc.args)} &")


def step(n, title):
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    print(f"\n{bold}== {n}. {title}{plain}")


def run(cluster, *args, target=None):
    print("$ " + shown([cluster.bin("client", "tbctl"), f"--target={target or cluster.target}"] + list(args)))
    r = cluster.tbctl(*args, check=False, target=target)
    out = (r.stdout + r.stderr).rstrip()
    print("  " + out.replace("\n", "\n  "))
    return r


def get_token(cluster, *args):
    r = run(cluster, "get-token", "--model", MODEL, *args)
    if r.returncode != 0:
        raise SystemExit("demo: get-token failed")
    account = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("account")][0]
    tier = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("tier")][0]
    return account, tier


def set_proxy_disabled(cluster, account_ids, value):
    for account_id in account_ids:
        path = os.path.join(cluster.accounts_dir, account_id + ".json")
        with open(path) as f:
            doc = json.load(f)
        doc["proxy_disabled"] = value
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
    want = "ACCOUNT_STATE_PROXY_DISABLED" if value else "ACCOUNT_STATE_ENABLED"

    def applied():
        states = {a["accountId"]: a["state"] for a in cluster.tbctl_json("list-accounts")["accounts"]}
        return all(states.get(a) == want for a in account_ids)
    harness.wait_for(applied, what="the broker to pick up the edited files")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", default="build")
    parser.add_argument("--keep", action="store_true",
                        help="leave the fake upstream, the brokers, the monitor and their folder running at the end")
    args = parser.parse_args()

    cluster = harness.Cluster(args.build)
    keep = False
    try:
        for account_id, email, tier in ACCOUNTS:
            cluster.write_account(account_id, harness.account_json(email, "1//demo-" + account_id, tier))
        show_started("fake Google upstream", cluster.start_upstream())
        show_started("tokenbroker", cluster.start_broker())
        print(f"fake Google upstream on 127.0.0.1:{cluster.upstream.port}, tokenbroker on {cluster.target}")
        print(f"accounts folder: {cluster.accounts_dir} (Antigravity-Manager format)")

        step(1, "The broker loaded five accounts; health is SERVING")
        run(cluster, "health")
        run(cluster, "list-accounts")

        step(2, "Selection ranks tiers ULTRA > PRO > FREE")
        run(cluster, "explain", "--model", MODEL)

        step(3, "GetToken serves the ULTRA account first")
        _, tier = get_token(cluster)
        assert tier == "ULTRA", tier

        step(4, "ULTRA leaves the rotation (proxy_disabled set in its file, picked up without a restart): PRO is served")
        set_proxy_disabled(cluster, ["ultra-1"], True)
        _, tier = get_token(cluster)
        assert tier == "PRO", tier

        step(5, "Both PRO accounts leave too: FREE is served")
        set_proxy_disabled(cluster, ["pro-1", "pro-2"], True)
        _, tier = get_token(cluster)
        assert tier == "FREE", tier
        set_proxy_disabled(cluster, ["ultra-1", "pro-1", "pro-2"], False)
        print("(all accounts back in rotation)")

        step(6, "A session stays on its account across calls (prompt caches stay warm)")
        first, _ = get_token(cluster, "--session", "conversation-42")
        for _ in range(2):
            account, _ = get_token(cluster, "--session", "conversation-42")
            assert account == first, (account, first)
        print(f"-> three calls, one account: {first}")

        step(7, "force_rotate moves the session to another account, where it then stays")
        moved, _ = get_token(cluster, "--session", "conversation-42", "--force_rotate")
        assert moved != first, moved
        again, _ = get_token(cluster, "--session", "conversation-42")
        assert again == moved, (again, moved)
        print(f"-> moved from {first} to {moved}")

        step(8, "The proxy reports a 429 QUOTA_EXHAUSTED for that account: it cools down for this model only")
        body = json.dumps({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
                                     "message": "You have exhausted your capacity on this model.",
                                     "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                                  "reason": "QUOTA_EXHAUSTED",
                                                  "metadata": {"model": MODEL, "quotaResetDelay": "2h1m1.5s"}}]}})
        run(cluster, "report-outcome", "--account", moved, "--model", MODEL, "--http_status", "429",
            "--error_body", body)
        run(cluster, "explain", "--model", MODEL, "--session", "conversation-42")
        after, _ = get_token(cluster, "--session", "conversation-42")
        assert after != moved, after
        print(f"-> the session moved off {moved} (cooling for {MODEL}); other models still use it")

        step(9, "The quota monitor sees ultra-1 at 2 % for a model: the broker skips it before any 429")
        for account_id, _, tier in ACCOUNTS:
            fraction = 0.02 if account_id == "ultra-1" else 0.8
            cluster.upstream_call("/__fake/profile", {
                "refresh_token": "1//demo-" + account_id, "project": "proj-" + account_id,
                "tier": "g1-%s-tier" % tier.lower(),
                "models": {QUOTA_MODEL: {"quotaInfo": {"remainingFraction": fraction}}}})
        monitor = cluster.start_monitor("--poll_interval=2s")
        show_started("tokenbroker-monitor", monitor)
        target = f"127.0.0.1:{monitor.port}"
        run(cluster, "set-quota-manager", "--enabled", "--monitor", target)
        harness.wait_for(lambda: cluster.tbctl_json("get-token", "--model", QUOTA_MODEL).get("quotaDecision")
                         == "QUOTA_DECISION_PROCEED", what="quota to arrive")
        r = run(cluster, "get-token", "--model", QUOTA_MODEL)
        assert "ultra-1" not in r.stdout, r.stdout
        run(cluster, "explain", "--model", QUOTA_MODEL)

        step(10, "Bad input gets a clear error naming the field")
        run(cluster, "get-token", "--model", "gemini 3 pro")

        step(11, "Scale out: two more brokers share one Redis; a session and a cooldown hold on both")
        redis = harness.RedisServer(cluster.dir)
        cluster.extra.append(redis)
        replicas = []
        print("started redis-server:\n  $ " + shown(redis.proc.args) + " &")
        first_broker = cluster.broker
        for _ in range(2):
            show_started("tokenbroker replica", cluster.start_broker("--state_backend", redis.url))
            replicas.append(cluster.target)
        print(f"redis-server on 127.0.0.1:{redis.port}; replicas on {replicas[0]} and {replicas[1]}")
        for t in replicas:
            harness.wait_for(lambda t=t: cluster.tbctl("health", "--service", "tokenbroker.v1.StateBackend",
                                                       check=False, target=t).returncode == 0,
                             what="the replicas to sync with redis")
        served = []
        for t in replicas + replicas:
            r = run(cluster, "get-token", "--model", MODEL, "--session", "shared-conversation", target=t)
            served.append([line.split()[1] for line in r.stdout.splitlines() if line.startswith("account")][0])
        assert len(set(served)) == 1, served
        print(f"-> four calls over two replicas, one account: {served[0]}")
        run(cluster, "report-outcome", "--account", served[0], "--model", MODEL, "--http_status", "429",
            "--error_body", body, target=replicas[0])
        harness.wait_for(lambda: served[0] not in cluster.tbctl("get-token", "--model", MODEL, "--session",
                                                                "shared-conversation", target=replicas[1]).stdout,
                         what="the cooldown to reach the other replica")
        run(cluster, "get-token", "--model", MODEL, "--session", "shared-conversation", target=replicas[1])
        print(f"-> reported to the first replica, honoured by the second: the session left {served[0]}")

        print("\nDemo complete. Tokens are redacted in tbctl's output; --show_token prints them.")
        if args.keep:
            keep = True
            cluster.broker = first_broker
            tbctl = shown([cluster.bin("client", "tbctl"), f"--target={cluster.target}"])
            pids = " ".join(str(p.proc.pid) for p in cluster.extra + [cluster.upstream])
            print(f"""
Still running (--keep), with their folder {cluster.dir}:
  the fake upstream on 127.0.0.1:{cluster.upstream.port}, the first broker on {cluster.target}, the monitor on
  {target}, and two replicas on {replicas[0]} and {replicas[1]} sharing redis on 127.0.0.1:{redis.port}.
Go on by hand, e.g.:
  $ {tbctl} list-accounts
  $ {tbctl} get-token --model={MODEL} --session=my-conversation
  $ {tbctl} explain --model={QUOTA_MODEL}
  edit or add a file in {cluster.accounts_dir}: the brokers pick it up within a second
Stop everything:
  $ kill {pids}; rm -rf {cluster.dir}""")
        return 0
    finally:
        if not keep:
            cluster.close()


if __name__ == "__main__":
    sys.exit(main())
