"""`make sim`: the simulator of issue 10. A fleet of proxies (scripts/sim_load.py) plays the same
deterministic load against a fake Google that really counts quota (tests/fakes/fake_quota.h: per
account, model family and window, with Google's real 429s and quota API), through each
configuration side by side — no broker (naive round robin), the broker alone (reactive), the broker
with its quota monitor (proactive, with each policy) and three brokers on one Redis — for demand
below, at 1.5× and at 3× what the pool can serve, and with a quota API that lags.

Prints one Markdown table, writes it with every figure as JSON, and draws one chart (PNG).

    /usr/bin/python3 scripts/sim.py --build build            # the full run, a few minutes
    /usr/bin/python3 scripts/sim.py --build build --smoke    # ~1 minute: checks that always hold

Time is scaled: a "5-hour" window lasts --short_window seconds, the weekly one --long_window.
"""
import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
sys.path.insert(0, HERE)
import harness  # noqa: E402
import sim_load  # noqa: E402

# Six accounts of three tiers, as in the issue.
ACCOUNTS = [
    {"id": "ultra-1", "tier": "ULTRA", "tier_id": "g1-ultra-tier"},
    {"id": "ultra-2", "tier": "ULTRA", "tier_id": "g1-ultra-tier"},
    {"id": "pro-1", "tier": "PRO", "tier_id": "g1-pro-tier"},
    {"id": "pro-2", "tier": "PRO", "tier_id": "g1-pro-tier"},
    {"id": "free-1", "tier": "FREE", "tier_id": "free-tier"},
    {"id": "free-2", "tier": "FREE", "tier_id": "free-tier"},
]
for _a in ACCOUNTS:
    _a["refresh_token"] = "1//sim-" + _a["id"]
    _a["project"] = "proj-" + _a["id"]

# Calls per short window, per tier and family (ULTRA > PRO > FREE); scaled by --budget_scale.
SHORT_BUDGETS = {"ULTRA": {"gemini": 20, "3p": 10}, "PRO": {"gemini": 12, "3p": 6}, "FREE": {"gemini": 6, "3p": 3}}

POLICIES = ["balance", "fill_first", "reset_soonest", "round_robin"]

# name → how it runs. "proactive" is the default policy (balance).
CONFIGS = {
    "naive": {"broker": False},
    "reactive": {"broker": True, "monitor": False, "policy": "balance", "brokers": 1},
    "proactive": {"broker": True, "monitor": True, "policy": "balance", "brokers": 1},
    "proactive fill_first": {"broker": True, "monitor": True, "policy": "fill_first", "brokers": 1},
    "proactive reset_soonest": {"broker": True, "monitor": True, "policy": "reset_soonest", "brokers": 1},
    "proactive round_robin": {"broker": True, "monitor": True, "policy": "round_robin", "brokers": 1},
    "redis3": {"broker": True, "monitor": True, "policy": "balance", "brokers": 3, "redis": True},
}

# name → (demand as a multiple of supply, quota API lag as a fraction of the poll interval).
SCENARIOS = {"0.8x": (0.8, 0.0), "1.5x": (1.5, 0.0), "3x": (3.0, 0.0), "1.5x lag": (1.5, 0.5)}

SMOKE_CONFIGS = ["naive", "reactive", "proactive", "redis3"]
SMOKE_SCENARIOS = ["1.5x"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", default="build")
    p.add_argument("--out", help="where the table, JSON and chart go (default <build>/sim)")
    p.add_argument("--smoke", action="store_true", help="short run of a few configurations; asserts what must always hold")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, help="seconds of arrivals per run (default 10; smoke 6)")
    p.add_argument("--short_window", type=float, help="seconds of the short ('5-hour') window (default 2.5; smoke 2)")
    p.add_argument("--long_window", type=float, help="seconds of the long ('weekly') window (default 3 short windows)")
    p.add_argument("--long_budget_ratio", type=float, default=2.5,
                   help="long-window budget as a multiple of the short one (2.5 over 3 windows: the long one binds)")
    p.add_argument("--budget_scale", type=float, default=1.0, help="multiplies every budget")
    p.add_argument("--workers", type=int, default=48, help="proxy worker threads")
    p.add_argument("--deadline", type=float, help="seconds a request may wait for an account (default 0.4 short windows)")
    p.add_argument("--think", type=float, help="mean seconds between a session's turns (default 0.1 short windows)")
    p.add_argument("--poll_interval", type=float, help="monitor poll interval, s (default 0.2 short windows)")
    p.add_argument("--cache_ttl", type=float, help="broker --quota_cache_ttl, s (default 2.5 poll intervals)")
    p.add_argument("--naive_lock", type=float, help="naive: fixed lock after a 429, s (default short window / 50)")
    p.add_argument("--lie_3p", action="store_true", help="the fake reports 1.0 for Claude/GPT (Google's known lie)")
    p.add_argument("--configs", help="comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument("--scenarios", help="comma-separated subset of: " + ", ".join(SCENARIOS))
    a = p.parse_args()
    a.duration = a.duration or (6.0 if a.smoke else 10.0)
    a.short_window = a.short_window or (2.0 if a.smoke else 2.5)
    a.long_window = a.long_window or 3 * a.short_window
    a.deadline = a.deadline or 0.4 * a.short_window
    a.think = a.think or 0.1 * a.short_window
    a.poll_interval = a.poll_interval or 0.2 * a.short_window
    a.cache_ttl = a.cache_ttl or 2.5 * a.poll_interval
    a.naive_lock = a.naive_lock or a.short_window / 50
    a.configs = a.configs.split(",") if a.configs else (SMOKE_CONFIGS if a.smoke else list(CONFIGS))
    a.scenarios = a.scenarios.split(",") if a.scenarios else (SMOKE_SCENARIOS if a.smoke else list(SCENARIOS))
    for name in a.configs:
        if name not in CONFIGS:
            p.error(f"unknown configuration {name!r}")
    for name in a.scenarios:
        if name not in SCENARIOS:
            p.error(f"unknown scenario {name!r}")
    a.build = os.path.abspath(a.build)
    a.out = os.path.abspath(a.out or os.path.join(a.build, "sim"))
    return a


def budgets(args):
    """tier → family → (short, long) budgets."""
    return {tier: {f: (max(0, round(b * args.budget_scale)), max(0, round(b * args.budget_scale * args.long_budget_ratio)))
                   for f, b in fams.items()} for tier, fams in SHORT_BUDGETS.items()}


def supply_by_family(args, bud):
    """Calls per second the pool serves in the long run, per family: each account's tighter window."""
    out = {}
    for a in ACCOUNTS:
        for f, (bs, bl) in bud[a["tier"]].items():
            out[f] = out.get(f, 0) + sim_load.sustainable_rate(bs, bl, args.short_window, args.long_window)
    return out


def quota_config(args, bud, lag_ms):
    return {"enabled": True, "short_window_s": args.short_window, "long_window_s": args.long_window, "lag_ms": lag_ms,
            "models": [m for fam in sim_load.MODELS.values() for m, _ in fam],
            "budgets": {t: {f: {"short": bs, "long": bl} for f, (bs, bl) in fams.items()} for t, fams in bud.items()},
            "min_over_windows": True, "lie_3p": args.lie_3p}


def ms(seconds):
    return f"{max(1, round(seconds * 1000))}ms"


def wait_ready(cluster, stubs, pb, proactive, redis):
    """Every broker has a token for every account (and quota for each, when proactive)."""
    def ready():
        for stub in stubs:
            accounts = stub.ListAccounts(pb.ListAccountsRequest(), timeout=5).accounts
            if len(accounts) != len(ACCOUNTS):
                return False
            for a in accounts:
                if not a.HasField("token_expire_time") or (proactive and not a.quotas):
                    return False
        return True
    harness.wait_for(ready, timeout=30, what="the brokers to hold tokens (and quota) for every account")
    if redis:
        for p in cluster.extra:
            if p.name == "tokenbroker":
                harness.wait_for(lambda: cluster.tbctl("health", "--service", "tokenbroker.v1.StateBackend", check=False,
                                                       target=f"127.0.0.1:{p.port}").returncode == 0,
                                 what="the broker to sync with redis")


def run_one(args, name, scenario, sessions, bud):
    cfg = CONFIGS[name]
    _, lag_fraction = SCENARIOS[scenario]
    c = harness.Cluster(args.build)
    redis, clients = None, []
    try:
        for a in ACCOUNTS:
            c.write_account(a["id"], harness.account_json(f"{a['id']}@example.com", a["refresh_token"], a["tier"]))
        c.start_upstream()
        for a in ACCOUNTS:
            c.upstream_call("/__fake/profile", {"refresh_token": a["refresh_token"], "project": a["project"],
                                                "tier": a["tier_id"]})
        c.upstream_call("/__fake/quota", quota_config(args, bud, lag_fraction * args.poll_interval * 1000))
        upstream = sim_load.Upstream(c.upstream.port)
        if cfg["broker"]:
            from tokenbroker.v1 import broker_pb2, broker_pb2_grpc
            flags = ["--log_level=warn", f"--policy={cfg['policy']}"]
            if cfg["monitor"]:
                monitor = c.start_monitor(f"--poll_interval={ms(args.poll_interval)}", "--poll_concurrency=4",
                                          "--log_level=warn")
                flags += [f"--quota_monitor=127.0.0.1:{monitor.port}", f"--quota_cache_ttl={ms(args.cache_ttl)}"]
            if cfg.get("redis"):
                redis = harness.RedisServer(c.dir)
                flags += ["--state_backend", redis.url]
            for _ in range(cfg["brokers"]):
                broker = c.start_broker(*flags)
                clients.append(sim_load.BrokerClient(f"127.0.0.1:{broker.port}", broker_pb2, broker_pb2_grpc))
            wait_ready(c, [b.stub for b in clients], broker_pb2, cfg["monitor"], cfg.get("redis"))
            driver = sim_load.Driver(sessions, args.duration, upstream, ACCOUNTS, args.workers, args.deadline,
                                     brokers=clients)
        else:
            driver = sim_load.Driver(sessions, args.duration, upstream, ACCOUNTS, args.workers, args.deadline,
                                     naive=sim_load.NaiveRouter(ACCOUNTS, upstream, args.naive_lock))
        driver.run()
        stats = c.upstream_call("/__fake/quota_stats")
        return sim_load.metrics(driver, stats, ACCOUNTS, bud, args.short_window, args.long_window)
    except BaseException:
        keep = os.path.join(args.out, "failed", f"{scenario}-{name}".replace(" ", "_"))
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(c.dir, keep, ignore=shutil.ignore_patterns("accounts", "*.port", "*.sock"), dirs_exist_ok=True)
        print(f"sim: {scenario} / {name} failed; its logs are in {keep}", file=sys.stderr)
        raise
    finally:
        for b in clients:
            b.close()
        try:
            c.close()
        finally:
            if redis is not None:
                redis.stop()


def fmt(v, spec, none="–"):
    return none if v is None else format(v, spec)


def table(results, args):
    lines = ["| scenario | configuration | 429s / 1k upstream calls | served / offered | broker RESOURCE_EXHAUSTED "
             "| gave up | quota used | session affinity | premium share | GetToken p50 / p99 ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        m = r["metrics"]
        gt = "–" if r["config"] == "naive" else f"{fmt(m['get_token_p50_ms'], '.1f')} / {fmt(m['get_token_p99_ms'], '.1f')}"
        lines.append(
            f"| {r['scenario']} | {r['config']} | {m['per_1000']:.1f} | {m['served']} / {m['offered']} "
            f"| {m['broker_exhausted'] if r['config'] != 'naive' else '–'} | {m['gave_up'] + m['failed_after_retry']} "
            f"| {fmt(m['quota_used'], '.1%')} | {fmt(m['affinity'], '.2f')} | {fmt(m['premium_share'], '.2f')} | {gt} |")
    return "\n".join(lines)


def why_table(results):
    """Why the broker handed out the accounts that answered 429, per broker configuration."""
    lines = ["| scenario | configuration | upstream 429s | fresh | concurrent | known, other model of the family "
             "| known, same model | on the force_rotate retry | broker's decision at the 429 | fraction it believed (p50) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in results:
        if r["config"] == "naive":
            continue
        m = r["metrics"]
        why = m["why_429"]
        decisions = ", ".join(f"{k.replace('QUOTA_DECISION_', '').lower()} {n}"
                              for k, n in sorted(m["decision_at_429"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {r['scenario']} | {r['config']} | {m['upstream_429']} | {why.get('fresh', 0)} "
                     f"| {why.get('concurrent', 0)} | {why.get('known_family', 0)} | {why.get('known_same_model', 0)} "
                     f"| {m['429_on_retry']} | {decisions or '–'} | {fmt(m['fraction_at_429_p50'], '.2f')} |")
    return "\n".join(lines)


WHY_LEGEND = ("Why the broker handed out accounts that answered 429, as of each lease: fresh = nothing told it "
              "(only a prediction could have avoided it); concurrent = the account's first 429 of that window came "
              "back to another lease after this one was handed out (leases in flight, or a herd woken by the same "
              "RetryInfo); known, other model = a 429 of another model of the same family had been reported and not "
              "reset (cooldowns are per model, quota is per family); known, same model = a 429 of this very "
              "(account, model) had been reported and not reset. The broker's decision and remaining fraction are "
              "what GetToken answered for that lease (unspecified: no quota data).")


def legend(args, bud, supply):
    per_tier = ", ".join(f"{t} " + " / ".join(f"{f} {bs}+{bl}" for f, (bs, bl) in fams.items())
                         for t, fams in bud.items())
    return "\n".join([
        f"Six accounts (2 ULTRA, 2 PRO, 2 FREE); budgets in calls per short+long window: {per_tier}. "
        f"Short window {args.short_window:g} s, long window {args.long_window:g} s (time scaled: seconds stand for "
        f"hours and weeks). Supply = what the pool serves in the long run, each account at its tighter window: "
        + ", ".join(f"{f} {r:.1f}/s" for f, r in sorted(supply.items())) + f". Each run: {args.duration:g} s of Poisson "
        f"arrivals of sessions of 2–6 turns (one model each, across both families) at demand × supply, played by "
        f"{args.workers} proxy workers; a request may wait {args.deadline:g} s for an account (RetryInfo). "
        f"Proactive: monitor polls every {args.poll_interval:g} s, broker quota cache TTL {args.cache_ttl:g} s; "
        f"'lag': the quota API answers as of half a poll interval ago. Naive: round robin, {args.naive_lock:g} s "
        f"lock of the account on a 429.",
        "",
        "- 429s / 1k: upstream 429 answers per 1,000 generateContent calls (first tries and retries).",
        "- gave up: requests not served — broker RetryInfo past the deadline, no account (naive), or a 429 again "
        "after the one retry on another account.",
        "- quota used: 200s / the requests a perfect router serves from the same arrivals (each turn when it was "
        "ready; on an account with quota left in both windows of the family, at once or at a refill within the "
        "deadline): 100 % = no quota left unused that the demand could have spent. The oracle spends greedily, so a "
        "router whose windows open later (and straddle a refill of the long window) can pass 100 % by a few points.",
        "- session affinity: served turns on the account of the session's previous turn, counted only while that "
        "account still had quota for the family (from the fake's ground truth).",
        "- premium share: 200s served by ULTRA or PRO accounts. GetToken latency as the Python proxies see it.",
    ])


def chart(results, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scenarios = [s for s in args.scenarios]
    configs = [c for c in args.configs]
    by = {(r["scenario"], r["config"]): r["metrics"] for r in results}
    fig, axes = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    width = 0.8 / len(configs)
    colors = plt.get_cmap("tab10").colors
    for ax, key, title, scale in ((axes[0], "per_1000", "Upstream 429s per 1,000 calls (lower is better)", 1),
                                  (axes[1], "quota_used", "Quota used before reset, % (higher is better)", 100)):
        for i, c in enumerate(configs):
            xs = [j + (i - (len(configs) - 1) / 2) * width for j in range(len(scenarios))]
            ys = [(by[(sc, c)][key] or 0) * scale if (sc, c) in by else 0 for sc in scenarios]
            bars = ax.bar(xs, ys, width * 0.92, label=c, color=colors[i % len(colors)])
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.0f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=6.5,
                            xytext=(0, 1), textcoords="offset points")
        ax.set_title(title, fontsize=11, loc="left")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[1].axhline(95, color="grey", linestyle="--", linewidth=0.8)
    axes[1].set_ylim(0, 115)
    axes[1].set_xticks(range(len(scenarios)))
    axes[1].set_xticklabels([f"demand {s}" for s in scenarios])
    top = max([(m["per_1000"] or 0) for m in by.values()] or [1])
    axes[0].set_ylim(0, top * 1.12 + 1)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=min(7, len(configs)), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 0.955))
    fig.suptitle(f"tokenbroker simulator: 6 accounts, short window {args.short_window:g} s, long {args.long_window:g} s, "
                 f"{args.duration:g} s per run", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    args = parse_args()
    sys.path.insert(0, os.path.join(args.build, "python"))  # generated stubs
    sys.path.insert(0, os.path.join(HERE, "..", "client", "python"))  # the client library
    needed = [("tests", "fakes", "fake_upstream")]
    if any(CONFIGS[c]["broker"] for c in args.configs):
        needed += [("server", "tokenbroker"), ("server", "tokenbroker-monitor"), ("client", "tbctl")]
    for binary in needed:
        if not os.access(os.path.join(args.build, *binary), os.X_OK):
            sys.exit(f"sim: {os.path.join(args.build, *binary)} is missing: build first")
    if any(CONFIGS[c].get("redis") for c in args.configs) and not shutil.which("redis-server"):
        sys.exit("sim: redis-server is missing (apt-get install redis-server), needed by redis3")
    os.makedirs(args.out, exist_ok=True)
    bud = budgets(args)
    supply = supply_by_family(args, bud)

    results = []
    runs = [(s, c) for s in args.scenarios for c in args.configs]
    started = time.monotonic()
    for i, (scenario, name) in enumerate(runs, 1):
        demand, _ = SCENARIOS[scenario]
        sessions = sim_load.make_schedule(args.seed * 1000 + round(demand * 100),
                                          {f: demand * r for f, r in supply.items()}, args.duration,
                                          think_s=args.think)
        t = time.monotonic()
        m = run_one(args, name, scenario, sessions, bud)
        results.append({"scenario": scenario, "config": name, "metrics": m})
        print(f"sim [{i}/{len(runs)}] {scenario:9} {name:24} 429s/1k {m['per_1000']:6.1f}  served {m['served']:5}/"
              f"{m['offered']:<5} quota used {fmt(m['quota_used'], '.0%'):>5}  cross-check "
              f"{'ok' if m['cross_check']['ok'] else 'MISMATCH'}  ({time.monotonic() - t:.1f} s)",
              file=sys.stderr, flush=True)

    md = table(results, args)
    text = legend(args, bud, supply) + "\n\n" + md + "\n"
    if any(r["config"] != "naive" for r in results):
        text += "\n" + WHY_LEGEND + "\n\n" + why_table(results) + "\n"
    print(text)
    with open(os.path.join(args.out, "sim.md"), "w") as f:
        f.write(text)
    params = {k: v for k, v in vars(args).items()}
    with open(os.path.join(args.out, "sim.json"), "w") as f:
        json.dump({"params": params, "budgets": bud, "supply_per_s": supply, "results": results}, f, indent=2)
    png = os.path.join(args.out, "sim.png")
    try:
        chart(results, args, png)
    except ImportError:
        # The smoke test checks the simulation, not the drawing; the full run needs the chart.
        if not args.smoke:
            sys.exit("sim: python3-matplotlib is missing (apt-get install python3-matplotlib): no chart drawn")
        print("sim: python3-matplotlib is missing: no chart (smoke run)", file=sys.stderr)
    print(f"sim: {len(runs)} runs in {time.monotonic() - started:.0f} s; table, JSON and chart in {args.out}",
          file=sys.stderr)

    # What must always hold, whatever the broker does.
    failures = []
    for r in results:
        m, where = r["metrics"], f"{r['scenario']} / {r['config']}"
        if not m["cross_check"]["ok"]:
            failures.append(f"{where}: the driver's counts differ from the fake's: {m['cross_check']}")
        if m["errors"]:
            failures.append(f"{where}: {m['errors']} requests failed with errors: {m['error_kinds']}")
        if m["served"] + m["gave_up"] + m["failed_after_retry"] + m["errors"] != m["offered"]:
            failures.append(f"{where}: turns lost: {m}")
        if r["scenario"] == "1.5x" and r["config"] in ("naive", "reactive") and m["upstream_429"] == 0:
            failures.append(f"{where}: no upstream 429 at 1.5x demand: the fake's quota is not biting")
    if failures:
        print("sim: FAILED\n  " + "\n  ".join(failures), file=sys.stderr)
        sys.exit(1)
    print("sim: every run completed; counts cross-check with the fake's ground truth", file=sys.stderr)


if __name__ == "__main__":
    main()
