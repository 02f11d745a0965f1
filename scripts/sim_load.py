"""The load half of the simulator (scripts/sim.py): a deterministic schedule of sessions, a fleet of
proxy workers that play it against the broker (or, for the naive baseline, against the accounts
directly), and the metrics computed from what they saw and from the fake upstream's ground truth.

Standard library, plus Debian's python3-grpcio / python3-protobuf and the stubs generated into
<build>/python for the broker modes.
"""
import collections
import datetime
import heapq
import http.client
import json
import math
import queue
import random
import threading
import time

GENERATE_PATH = "/v1internal:generateContent"

# Each family's models and their share of the family's sessions.
MODELS = {
    "gemini": [("gemini-3-pro-high", 0.6), ("gemini-3-flash", 0.4)],
    "3p": [("claude-sonnet-4-6-thinking", 0.6), ("claude-opus-4-5-thinking", 0.25), ("gpt-oss-120b-medium", 0.15)],
}


def family_of(model):
    """The fake's default family rules: claude or gpt → 3p, anything else → gemini."""
    return "3p" if ("claude" in model or "gpt" in model) else "gemini"


def oracle_served(arrivals, accounts, budgets, short_s, long_s, deadline_s):
    """Requests a perfect router would serve from the same arrivals ((time, family), each turn when
    it was ready): on the account that can serve it soonest — at once, or when a window refills if that is
    within the deadline — ties going to the account whose short window resets first; else never.
    Windows start at their first spend and refill at start + length, as the fake's do. By family."""
    windows = {}  # (account, family) → [[start, used] short, [start, used] long]
    served = collections.Counter()
    for t, family in sorted(arrivals):
        best, best_key = None, None
        for a in accounts:
            limits = list(zip(budgets[a["tier"]].get(family, (0, 0)), (short_s, long_s)))
            w = windows.setdefault((a["id"], family), [[None, 0], [None, 0]])
            when = t
            for i, (budget, length) in enumerate(limits):
                if budget <= 0:
                    when = math.inf
                elif w[i][0] is not None and w[i][1] >= budget:
                    when = max(when, w[i][0] + length)
            if when > t + deadline_s:
                continue
            key = (when, w[0][0] + short_s if w[0][0] is not None else math.inf)
            if best is None or key < best_key:
                best, best_key, limits_best = w, key, limits
        if best is None:
            continue
        when = best_key[0]
        for i, (_, length) in enumerate(limits_best):
            if best[i][0] is None or when >= best[i][0] + length:
                best[i] = [when, 0]
            best[i][1] += 1
        served[family] += 1
    return served


def sustainable_rate(short_budget, long_budget, short_s, long_s):
    """Calls per second one bucket pair serves in the long run: the tighter of its two windows."""
    return min(short_budget / short_s, long_budget / long_s)


class Session:
    __slots__ = ("sid", "family", "model", "turns")

    def __init__(self, sid, family, model, turns):
        self.sid, self.family, self.model, self.turns = sid, family, model, turns


def make_schedule(seed, rate_by_family, duration_s, turns=(2, 6), think_s=0.25):
    """Sessions whose turns arrive, all families together, as a Poisson process of `rate_by_family`
    requests per second over [0, duration). Every session sticks to one model of its family.
    Deterministic for a seed: every configuration of a scenario plays the same schedule."""
    rng = random.Random(seed)
    mean_turns = (turns[0] + turns[1]) / 2
    sessions = []
    for family in sorted(rate_by_family):
        rate = rate_by_family[family] / mean_turns  # sessions per second
        models, weights = zip(*MODELS[family])
        t = 0.0
        while True:
            t += rng.expovariate(rate)
            if t >= duration_s:
                break
            model = rng.choices(models, weights)[0]
            offsets, at = [], t
            for _ in range(rng.randint(*turns)):
                if at >= duration_s:
                    break
                offsets.append(at)
                at += rng.expovariate(1 / think_s)
            sessions.append(Session(f"{family}-{len(sessions):05d}-s{seed}", family, model, offsets))
    sessions.sort(key=lambda s: s.turns[0])
    return sessions


class Upstream:
    """The fake Google's generateContent, one connection per call (as the fake closes them)."""

    def __init__(self, port):
        self.port = port

    def generate(self, access_token, model, project):
        body = json.dumps({"model": model, "project": project,
                           "request": {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request("POST", GENERATE_PATH, body=body,
                         headers={"Authorization": f"Bearer {access_token}", "Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.getheader("Retry-After", "") or "", resp.read().decode()
        finally:
            conn.close()

    def token(self, refresh_token):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request("POST", "/token", body=f"grant_type=refresh_token&refresh_token={refresh_token}",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
            resp = conn.getresponse()
            doc = json.loads(resp.read().decode())
            if resp.status != 200:
                raise RuntimeError(f"/token answered {resp.status}: {doc}")
            return doc["access_token"]
        finally:
            conn.close()


class Tally:
    """One worker's counts; merged at the end so that workers never share a lock for them."""

    def __init__(self):
        self.counts = collections.Counter()
        self.upstream = collections.Counter()  # (account, family, status)
        self.get_token_ms = []
        self.fraction_at_429 = []  # what the broker believed was left when it handed out a 429
        self.lag_ms = []  # how late turns were picked up (the driver itself must not be the bottleneck)


class TurnResult:
    __slots__ = ("account", "ready_rel", "first_try_wall", "outcome")

    def __init__(self):
        self.account = None
        self.ready_rel = None  # when the turn could start: its scheduled time, or its previous turn's end
        self.first_try_wall = None
        self.outcome = None


class NaiveRouter:
    """What home-made proxies do: round robin over every account with tokens of their own, and on
    a 429 the account is locked for a fixed time, whatever delay the answer named."""

    def __init__(self, accounts, upstream, lock_s):
        self.accounts = accounts  # [{"id", "refresh_token", "project", "tier"}]
        self.lock_s = lock_s
        self.tokens = {a["id"]: upstream.token(a["refresh_token"]) for a in accounts}
        self.mu = threading.Lock()
        self.next = 0
        self.locked_until = {}

    def pick(self, exclude):
        now = time.monotonic()
        with self.mu:
            for i in range(len(self.accounts)):
                a = self.accounts[(self.next + i) % len(self.accounts)]
                if a["id"] in exclude or self.locked_until.get(a["id"], 0) > now:
                    continue
                self.next = (self.next + i + 1) % len(self.accounts)
                return a
        return None

    def lock(self, account_id):
        with self.mu:
            self.locked_until[account_id] = time.monotonic() + self.lock_s


class BrokerClient:
    def __init__(self, target, pb, pb_grpc):
        import grpc
        self.grpc = grpc
        self.pb = pb
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.TokenBrokerServiceStub(self.channel)

    def close(self):
        self.channel.close()


class Driver:
    """Plays a schedule with `workers` threads. Each turn of a session starts at its scheduled time,
    or when the session's previous turn ends if that is later (a conversation waits for its answer).

    mode "broker": GetToken(model, session) → generateContent → ReportOutcome, always; an upstream
    429 is retried once on another account (force_rotate); a broker RESOURCE_EXHAUSTED is retried
    after its RetryInfo delay while that fits the turn's deadline, else the turn is given up.
    mode "naive": NaiveRouter instead of the broker, retrying a 429 once on the next account."""

    def __init__(self, sessions, duration_s, upstream, accounts, workers, deadline_s, brokers=None, naive=None):
        self.sessions = sessions
        self.duration_s = duration_s
        self.upstream = upstream
        self.accounts = {a["id"]: a for a in accounts}
        self.workers = workers
        self.deadline_s = deadline_s
        self.brokers = brokers or []
        self.naive = naive
        self.results = {}  # (session index, turn) → TurnResult
        self.known = Known429s()
        self.offered = sum(len(s.turns) for s in sessions)
        self.tallies = []
        self._heap = []
        self._seq = 0
        self._cond = threading.Condition()
        self._work = queue.Queue()
        self._done = 0
        self._all_done = threading.Event()
        self.t0 = None

    # -- scheduling -------------------------------------------------------------------------------
    def _at(self, due, item):
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, item))
            self._cond.notify()

    def _timer(self):
        while True:
            with self._cond:
                while True:
                    if self._all_done.is_set():
                        return
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        due, _, item = heapq.heappop(self._heap)
                        break
                    self._cond.wait(timeout=None if not self._heap else self._heap[0][0] - now)
            self._work.put((due, item))

    def _finish_turn(self, si, k):
        s = self.sessions[si]
        if k + 1 < len(s.turns):
            self._at(max(self.t0 + s.turns[k + 1], time.monotonic()), (si, k + 1))
        with self._cond:
            self._done += 1
            if self._done == self.offered:
                self._all_done.set()
                self._cond.notify_all()

    def _worker(self, index, tally):
        broker = self.brokers[index % len(self.brokers)] if self.brokers else None
        while True:
            entry = self._work.get()
            if entry is None:
                return
            due, (si, k) = entry
            tally.lag_ms.append((time.monotonic() - due) * 1000)
            res = TurnResult()
            res.ready_rel = due - self.t0
            try:
                if broker is not None:
                    self._broker_turn(broker, tally, si, k, res)
                else:
                    self._naive_turn(tally, si, k, res)
            except Exception as e:  # counted, never silent: the run reports every error
                res.outcome = "error"
                tally.counts["error"] += 1
                tally.counts["error:" + type(e).__name__] += 1
            self.results[(si, k)] = res
            self._finish_turn(si, k)

    def run(self):
        """Plays the whole schedule; returns when every offered turn has ended."""
        self.tallies = [Tally() for _ in range(self.workers)]
        threads = [threading.Thread(target=self._worker, args=(i, self.tallies[i]), daemon=True)
                   for i in range(self.workers)]
        timer = threading.Thread(target=self._timer, daemon=True)
        self.t0 = time.monotonic() + 0.05
        for si, s in enumerate(self.sessions):
            self._at(self.t0 + s.turns[0], (si, 0))
        for t in threads:
            t.start()
        timer.start()
        if self.offered == 0:
            self._all_done.set()
        # Every turn ends by its deadline plus one call; the wait is bounded all the same.
        if not self._all_done.wait(timeout=self.duration_s + 120):
            raise TimeoutError(f"the load did not end: {self._done} of {self.offered} turns ended")
        with self._cond:
            self._cond.notify_all()
        for _ in threads:
            self._work.put(None)
        for t in threads:
            t.join(timeout=30)
        timer.join(timeout=5)
        self.elapsed_s = time.monotonic() - self.t0

    # -- one turn ---------------------------------------------------------------------------------
    def _served(self, tally, res, account_id):
        res.account = account_id
        res.outcome = "served"
        tally.counts["served"] += 1
        tally.counts["served:" + self.accounts[account_id]["tier"]] += 1

    def _broker_turn(self, broker, tally, si, k, res):
        s = self.sessions[si]
        pb, grpc = broker.pb, broker.grpc
        deadline = time.monotonic() + self.deadline_s
        force, rotated = False, False
        for _ in range(64):  # bounded whatever the broker answers
            if res.first_try_wall is None:
                res.first_try_wall = time.time()
            t = time.perf_counter()
            leased_at = time.time()
            try:
                lease = broker.stub.GetToken(pb.GetTokenRequest(model=s.model, session_id=s.sid, force_rotate=force),
                                             timeout=10)
                tally.get_token_ms.append((time.perf_counter() - t) * 1000)
            except grpc.RpcError as e:
                tally.get_token_ms.append((time.perf_counter() - t) * 1000)
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                tally.counts["broker_exhausted"] += 1
                from tokenbroker.client import retry_delay  # client/python: the library proxies use
                delay = retry_delay(e)
                if delay is None or time.monotonic() + delay > deadline:
                    res.outcome = "gave_up"
                    tally.counts["gave_up"] += 1
                    return
                time.sleep(max(delay, 0.002))
                continue
            status, retry_after, body = self.upstream.generate(lease.access_token, s.model, lease.project_id)
            tally.upstream[(lease.account_id, s.family, status)] += 1
            known = None
            if status == 429:
                tally.counts["why429:" + self.known.classify(lease.account_id, s.model, leased_at)] += 1
                known = self.known.received(lease.account_id, s.model, body)
                decision = lease.DESCRIPTOR.fields_by_name["quota_decision"].enum_type.values_by_number[lease.quota_decision]
                tally.counts["decision429:" + decision.name] += 1
                tally.counts["retry429" if rotated else "first429"] += 1
                if lease.HasField("remaining_fraction"):
                    tally.fraction_at_429.append(lease.remaining_fraction)
            broker.stub.ReportOutcome(pb.ReportOutcomeRequest(
                lease_id=lease.lease_id, http_status=status, retry_after=retry_after,
                error_body="" if status == 200 else body), timeout=10)
            if known is not None:
                self.known.reported(known)
            if status == 200:
                self._served(tally, res, lease.account_id)
                return
            if status != 429:
                raise RuntimeError(f"upstream answered {status}: {body[:200]}")
            if rotated:
                res.outcome = "failed_429"
                tally.counts["failed_429"] += 1
                return
            force, rotated = True, True
        raise RuntimeError("turn did not settle after 64 broker answers")

    def _naive_turn(self, tally, si, k, res):
        s = self.sessions[si]
        res.first_try_wall = time.time()
        tried = set()
        for _ in range(2):
            a = self.naive.pick(tried)
            if a is None:
                res.outcome = "no_account"
                tally.counts["no_account"] += 1
                return
            tried.add(a["id"])
            status, _, body = self.upstream.generate(self.naive.tokens[a["id"]], s.model, a["project"])
            tally.upstream[(a["id"], s.family, status)] += 1
            if status == 200:
                self._served(tally, res, a["id"])
                return
            if status != 429:
                raise RuntimeError(f"upstream answered {status}: {body[:200]}")
            self.naive.lock(a["id"])
        res.outcome = "failed_429"
        tally.counts["failed_429"] += 1


def reset_of(body):
    """quotaResetTimeStamp of a 429 body as unix time, or None."""
    try:
        for d in json.loads(body)["error"]["details"]:
            stamp = d.get("metadata", {}).get("quotaResetTimeStamp")
            if stamp:
                return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError):
        return None
    return None


class Known429s:
    """The 429s the fleet has seen, to tell why the broker handed out an account that answered 429.
    Of the lease's time: a 429 of the same (account, model) had been reported and its quota had not
    reset ("known_same_model": the broker knew); one of another model of the same family had
    ("known_family": cooldowns are per model, quota per family); a 429 of the (account, family)
    came back to a lease handed out before the broker could know ("concurrent"); or none
    ("fresh": only a prediction could have avoided it)."""

    def __init__(self):
        self.mu = threading.Lock()
        self.seen = collections.defaultdict(list)  # (account, family) → [[model, reported_at, reset]]

    def classify(self, account, model, leased_at):
        with self.mu:
            entries = list(self.seen[(account, family_of(model))])
        live = [(m, reported) for m, reported, reset in entries if reset > leased_at]
        if any(m == model and reported <= leased_at for m, reported in live):
            return "known_same_model"
        if any(reported <= leased_at for _, reported in live):
            return "known_family"
        return "concurrent" if live else "fresh"

    def received(self, account, model, body):
        """Records a 429 as it comes back; returns the handle to mark it reported."""
        entry = [model, math.inf, reset_of(body) or math.inf]
        with self.mu:
            self.seen[(account, family_of(model))].append(entry)
        return entry

    def reported(self, entry):
        with self.mu:
            entry[1] = time.time()


def percentile(values, p):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]


def exhausted_lookup(quota_stats, refresh_of):
    """(account, family) → [(from, to)] unix-time intervals during which a window was spent."""
    out = collections.defaultdict(list)
    by_refresh = {v: k for k, v in refresh_of.items()}
    for rt, acct in quota_stats["accounts"].items():
        for family, f in acct["families"].items():
            for w in f["windows"].values():
                out[(by_refresh.get(rt, rt), family)].extend(tuple(x) for x in w["exhausted"])
    return out


def metrics(driver, quota_stats, accounts, budgets, short_s, long_s):
    """Every figure of one (scenario, configuration) run, and the cross-check against the fake."""
    counts = collections.Counter()
    upstream = collections.Counter()
    get_token_ms, lag_ms, fraction_at_429 = [], [], []
    for t in driver.tallies:
        fraction_at_429.extend(t.fraction_at_429)
        counts.update(t.counts)
        upstream.update(t.upstream)
        get_token_ms.extend(t.get_token_ms)
        lag_ms.extend(t.lag_ms)
    ok_calls = sum(n for (_, _, st), n in upstream.items() if st == 200)
    calls_429 = sum(n for (_, _, st), n in upstream.items() if st == 429)
    calls = sum(upstream.values())

    # Ground truth: the fake's counts per account and family must equal the driver's.
    refresh_of = {a["id"]: a["refresh_token"] for a in accounts}
    mismatches = []
    for a in accounts:
        fams = quota_stats["accounts"].get(a["refresh_token"], {}).get("families", {})
        for family in MODELS:
            truth = fams.get(family, {"served": 0, "refused": 0})
            mine = (upstream[(a["id"], family, 200)], upstream[(a["id"], family, 429)])
            if (truth["served"], truth["refused"]) != mine:
                mismatches.append(f"{a['id']}/{family}: fake 200={truth['served']} 429={truth['refused']}, "
                                  f"driver 200={mine[0]} 429={mine[1]}")
    other = [f"{k}: {n}" for k, n in upstream.items() if k[2] not in (200, 429)]

    # Quota used: 200s / what a perfect router serves from the same arrivals.
    offered_f = collections.Counter(s.family for s in driver.sessions for _ in s.turns)
    served_f = collections.Counter(driver.sessions[si].family for (si, _), r in driver.results.items()
                                   if r.outcome == "served")
    arrivals = [(r.ready_rel, driver.sessions[si].family) for (si, _), r in driver.results.items()]
    oracle_f = oracle_served(arrivals, accounts, budgets, short_s, long_s, driver.deadline_s)
    quota_used = ok_calls / sum(oracle_f.values()) if oracle_f else None

    # Affinity: a served turn on the account of the session's previous served turn, counted only
    # when that account still had quota for the family at the time (moving away then is right).
    spent = exhausted_lookup(quota_stats, refresh_of)
    same = eligible = 0
    for si, s in enumerate(driver.sessions):
        for k in range(1, len(s.turns)):
            prev, cur = driver.results.get((si, k - 1)), driver.results.get((si, k))
            if not prev or not cur or prev.outcome != "served" or cur.outcome != "served":
                continue
            t = cur.first_try_wall
            if any(a <= t < b for a, b in spent[(prev.account, s.family)]):
                continue
            eligible += 1
            same += cur.account == prev.account
    premium = counts["served:ULTRA"] + counts["served:PRO"]

    windows_full = [u for acct in quota_stats["accounts"].values() for f in acct["families"].values()
                    for u in f["windows"]["short"]["used_at_reset"]]
    return {
        "offered": driver.offered,
        "served": counts["served"],
        "upstream_calls": calls,
        "upstream_429": calls_429,
        "per_1000": 1000 * calls_429 / calls if calls else 0.0,
        "broker_exhausted": counts["broker_exhausted"],
        "gave_up": counts["gave_up"] + counts["no_account"],
        "failed_after_retry": counts["failed_429"],
        "errors": counts["error"],
        "error_kinds": {k: n for k, n in counts.items() if k.startswith("error:")},
        "quota_used": quota_used,
        "oracle_served_by_family": dict(oracle_f),
        "offered_by_family": dict(offered_f),
        "served_by_family": dict(served_f),
        "short_windows_full_at_reset": sum(windows_full) / len(windows_full) if windows_full else None,
        "affinity": same / eligible if eligible else None,
        "affinity_turns": eligible,
        "premium_share": premium / counts["served"] if counts["served"] else None,
        "get_token_p50_ms": percentile(get_token_ms, 50),
        "get_token_p99_ms": percentile(get_token_ms, 99),
        "get_token_calls": len(get_token_ms),
        "dispatch_lag_p99_ms": percentile(lag_ms, 99),
        # Why the broker handed out the accounts that answered 429 (broker configurations only).
        "why_429": {k.split(":", 1)[1]: n for k, n in counts.items() if k.startswith("why429:")},
        "decision_at_429": {k.split(":", 1)[1]: n for k, n in counts.items() if k.startswith("decision429:")},
        "fraction_at_429_p50": percentile(fraction_at_429, 50),
        "fraction_at_429_n": len(fraction_at_429),
        "429_on_first_try": counts["first429"],
        "429_on_retry": counts["retry429"],
        "elapsed_s": driver.elapsed_s,
        "cross_check": {"ok": not mismatches and not other and ok_calls == counts["served"],
                        "mismatches": mismatches, "other_statuses": other,
                        "fake_served": quota_stats["totals"]["served"], "fake_refused": quota_stats["totals"]["refused"]},
    }
