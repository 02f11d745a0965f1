// tokenbroker's Node.js client (@grpc/grpc-js): which Google account a request should use, and what
// Google answered, so that the broker's cooldowns learn.
//
//   const { Client } = require('./tokenbroker');
//   const broker = new Client('unix:/run/tokenbroker/broker.sock', { token: process.env.TOKENBROKER_TOKEN });
//   const answer = await broker.do('gemini-3-pro-high', sessionId,
//     (token, account, signal) => fetch(url, { method: 'POST', body, headers: { Authorization: `Bearer ${token}` }, signal }),
//     { timeoutMs: 60000 });
//
// The plain RPCs are methods too (getToken, reportOutcome, listAccounts, explainSelection,
// resetAccount, setQuotaManager), each returning a Promise of the response message (camelCase fields).
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const REPO = path.resolve(__dirname, '..', '..');
const PROTO_DIR = process.env.TB_PROTO_DIR || path.join(REPO, 'proto');
const GOOGLEAPIS = process.env.TB_GOOGLEAPIS_DIR || '/usr/share/gocode/src/github.com/gogo/googleapis';

const definition = protoLoader.loadSync('tokenbroker/v1/broker.proto', {
  includeDirs: [PROTO_DIR], keepCase: false, longs: Number, enums: String, defaults: true, oneofs: true,
});
const { TokenBrokerService } = grpc.loadPackageDefinition(definition).tokenbroker.v1;

const rpcTypes = new protobuf.Root();
rpcTypes.resolvePath = (origin, target) =>
  target.startsWith('google/protobuf/') ? protobuf.Root.prototype.resolvePath(origin, target) : path.join(GOOGLEAPIS, target);
rpcTypes.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);
const RpcStatus = rpcTypes.lookupType('google.rpc.Status');
const RetryInfo = rpcTypes.lookupType('google.rpc.RetryInfo');

// Upstream statuses another account may answer differently: quota (429), this account's token or
// standing (401, 403), its backend (5xx). Any other status is the request's own.
const RETRYABLE = new Set([401, 403, 429, 500, 502, 503, 504]);
// Reported when fn gave no answer (it threw, or the call was aborted): a 4xx, so the broker ends
// the lease (freeing a half-open probe) and cools nothing down.
const STATUS_NO_ANSWER = 499;

const MAX_SERVER_WAIT_MS = 600000; // the broker's limit on max_wait
const DEADLINE_MARGIN_MS = 200; // a waiting GetToken answers this long before the caller's deadline
const MAX_WAITS = 3; // RESOURCE_EXHAUSTED answers one GetToken waits out
const MAX_RETRY_AFTER = 256;
const MAX_ERROR_BODY = 64 * 1024;

// The RetryInfo delay (seconds) of a broker error, or null: on RESOURCE_EXHAUSTED, how long until an
// account frees.
function retryDelay(error) {
  const raw = error && error.metadata && error.metadata.get('grpc-status-details-bin');
  if (!raw || raw.length === 0) return null;
  const status = RpcStatus.decode(raw[0]);
  for (const detail of status.details) {
    if (detail.type_url.endsWith('/google.rpc.RetryInfo')) {
      const d = RetryInfo.decode(detail.value).retryDelay || {};
      return Number(d.seconds || 0) + (d.nanos || 0) / 1e9;
    }
  }
  return null;
}

// At most `limit` bytes of s, on a character boundary.
function utf8Prefix(s, limit) {
  const bytes = Buffer.from(String(s || ''), 'utf8');
  if (bytes.length <= limit) return bytes.toString('utf8');
  let n = limit;
  while (n > 0 && (bytes[n] & 0xc0) === 0x80) n--;
  return bytes.subarray(0, n).toString('utf8');
}

function header(headers, name) {
  if (!headers) return '';
  if (typeof headers.get === 'function') return headers.get(name) || '';
  const key = Object.keys(headers).find((k) => k.toLowerCase() === name.toLowerCase());
  return key === undefined ? '' : String(headers[key]);
}

// {httpStatus, retryAfter, errorBody} of what fn resolved to: a fetch Response (its body read from a
// clone, so the caller can still read it) or a plain {status, headers, body}.
async function outcomeOf(answer) {
  if (!answer || !Number.isInteger(answer.status)) {
    throw new TypeError('fn must resolve to a fetch Response or {status, headers, body}');
  }
  const ok = answer.status >= 200 && answer.status < 300;
  let body = '';
  if (!ok) {
    if (typeof answer.clone === 'function') body = await answer.clone().text();
    else if (answer.body !== undefined && answer.body !== null) body = Buffer.isBuffer(answer.body) ? answer.body.toString('utf8') : String(answer.body);
  }
  return {
    httpStatus: answer.status >= 100 && answer.status <= 599 ? answer.status : STATUS_NO_ANSWER,
    retryAfter: utf8Prefix(header(answer.headers, 'retry-after'), MAX_RETRY_AFTER),
    errorBody: ok ? '' : utf8Prefix(body, MAX_ERROR_BODY),
  };
}

const abortError = (signal) => signal.reason || Object.assign(new Error('aborted'), { name: 'AbortError' });

class Client {
  // target: 'host:port' or 'unix:/path.sock'. Options:
  //   tls: true for TLS with the system's roots; ca, cert, key: PEM files (a CA to trust; cert + key
  //     for mutual TLS), any of them turns TLS on;
  //   token: the bearer token (the broker's --caller_tokens_file), or a function (may be async)
  //     returning it, called before every RPC;
  //   maxAttempts (3): accounts do() tries per request; maxWaitMs (30000): how long do() waits in
  //   all for an account to free; rpcTimeoutMs (30000): per RPC without a caller's deadline;
  //   onReportError(err): a report that failed (do() resolves to the answer all the same).
  constructor(target, {
    tls = false, ca, cert, key, token, maxAttempts = 3, maxWaitMs = 30000, rpcTimeoutMs = 30000, onReportError,
  } = {}) {
    if (Boolean(cert) !== Boolean(key)) throw new Error('cert and key go together (mutual TLS)');
    const creds = tls || ca || cert
      ? grpc.credentials.createSsl(ca ? fs.readFileSync(ca) : null, key ? fs.readFileSync(key) : null,
        cert ? fs.readFileSync(cert) : null)
      : grpc.credentials.createInsecure();
    this.target = target;
    this.stub = new TokenBrokerService(target, creds);
    this.token = token;
    this.maxAttempts = Math.max(1, maxAttempts);
    this.maxWaitMs = maxWaitMs;
    this.rpcTimeoutMs = rpcTimeoutMs;
    this.onReportError = onReportError;
  }

  close() {
    this.stub.close();
  }

  async metadata() {
    const md = new grpc.Metadata();
    const token = typeof this.token === 'function' ? await this.token() : this.token;
    if (token) md.set('authorization', `Bearer ${token}`);
    return md;
  }

  // One RPC. deadline: ms since the epoch (default: now + rpcTimeoutMs); signal cancels it.
  async call(method, request, { deadline, signal } = {}) {
    const md = await this.metadata();
    return new Promise((resolve, reject) => {
      const cancel = () => call.cancel();
      const call = this.stub[method](request, md, { deadline: deadline || Date.now() + this.rpcTimeoutMs }, (err, reply) => {
        if (signal) signal.removeEventListener('abort', cancel);
        if (err) reject(err); else resolve(reply);
      });
      if (signal) {
        if (signal.aborted) call.cancel();
        else signal.addEventListener('abort', cancel, { once: true });
      }
    });
  }

  getToken(request, options) { return this.call('getToken', request, options); }

  reportOutcome(request, options) { return this.call('reportOutcome', request, options); }

  listAccounts(request = {}, options) { return this.call('listAccounts', request, options); }

  explainSelection(request, options) { return this.call('explainSelection', request, options); }

  resetAccount(request, options) { return this.call('resetAccount', request, options); }

  setQuotaManager(request, options) { return this.call('setQuotaManager', request, options); }

  // Gets a token for model (and sessionId, '' for none), calls fn(token, account, signal) — the
  // caller's own call to Google, resolving to a fetch Response or {status, headers, body} — and
  // reports its answer (status, Retry-After, and the body of a non-2xx answer). Always: when fn
  // throws, or the call is aborted (options.signal, or the deadline), STATUS_NO_ANSWER is reported
  // and do() rejects with that error (fn's own promise is left to settle).
  //
  // A retryable answer (RETRYABLE) is tried again on another account (force_rotate), at most
  // maxAttempts times in all. When every account is cooling, the broker's RESOURCE_EXHAUSTED says
  // when one frees (RetryInfo): do() waits for it if that comes within maxWaitMs and the deadline,
  // and otherwise rejects at once with that error (a grpc-js error: err.code, retryDelay(err)).
  //
  // options: timeoutMs or deadline (ms since the epoch) bound the whole; signal aborts it.
  // Resolves to fn's last answer; rejects with the broker's error when there was none.
  async do(model, sessionId, fn, { timeoutMs, deadline, signal } = {}) {
    const start = Date.now();
    const end = deadline || (timeoutMs !== undefined ? start + timeoutMs : undefined);
    const waitUntil = start + this.maxWaitMs;
    const signals = [signal, end !== undefined ? AbortSignal.timeout(Math.max(0, end - start)) : null].filter(Boolean);
    const callSignal = signals.length ? AbortSignal.any(signals) : undefined;
    let last = null;
    for (let attempt = 0; attempt < this.maxAttempts; attempt++) {
      if (attempt > 0 && callSignal && callSignal.aborted) break;
      let grant;
      try {
        grant = await this.acquire(model, sessionId, attempt > 0, waitUntil, end, callSignal);
      } catch (err) {
        if (last) return last; // the upstream's answer says more than "no other account now"
        throw err;
      }
      const answer = await this.try(grant, fn, callSignal);
      last = answer;
      if (!RETRYABLE.has(answer.status)) break;
    }
    return last;
  }

  async acquire(model, sessionId, forceRotate, waitUntil, end, signal) {
    const request = { model, sessionId, forceRotate };
    for (let waits = 0; ; waits++) {
      const maxWaitMs = request.maxWait ? request.maxWait.seconds * 1000 + request.maxWait.nanos / 1e6 : 0;
      try {
        return await this.call('getToken', request, { deadline: end || Date.now() + this.rpcTimeoutMs + maxWaitMs, signal });
      } catch (err) {
        const delay = err.code === grpc.status.RESOURCE_EXHAUSTED ? retryDelay(err) : null;
        const budgetMs = Math.min(waitUntil, end !== undefined ? end - DEADLINE_MARGIN_MS : Infinity) - Date.now();
        // No account frees in time: say so now rather than at the deadline.
        if (delay === null || waits >= MAX_WAITS || delay * 1000 > budgetMs) throw err;
        // The broker waits without a thread and answers as soon as an account frees, which may be
        // before the delay (another caller's report, a lease ending).
        const wait = Math.floor(Math.min(budgetMs, MAX_SERVER_WAIT_MS));
        request.maxWait = { seconds: Math.floor(wait / 1000), nanos: (wait % 1000) * 1e6 };
      }
    }
  }

  async try(grant, fn, signal) {
    const account = {
      id: grant.accountId, email: grant.email, projectId: grant.projectId, tier: grant.tier,
      leaseId: grant.leaseId, expireTime: grant.expireTime,
    };
    let outcome;
    let answer;
    let onAbort;
    try {
      const running = Promise.resolve().then(() => fn(grant.accessToken, account, signal));
      // An abort settles do() at once, even when fn ignores the signal.
      answer = await (signal ? Promise.race([running, new Promise((_, reject) => {
        onAbort = () => reject(abortError(signal));
        if (signal.aborted) onAbort();
        else signal.addEventListener('abort', onAbort, { once: true });
      })]) : running);
      outcome = await outcomeOf(answer);
    } catch (err) {
      const why = signal && signal.aborted ? 'no answer: the call was aborted'
        : `no answer: the caller's call threw ${(err && err.name) || typeof err}`; // not its message: it may name URLs
      await this.report(grant.leaseId, { httpStatus: STATUS_NO_ANSWER, retryAfter: '', errorBody: why });
      throw err;
    } finally {
      if (onAbort) signal.removeEventListener('abort', onAbort);
    }
    await this.report(grant.leaseId, outcome);
    return answer;
  }

  // Its own deadline, whatever is left of the caller's: the lease ends now, not at the lease timeout.
  async report(leaseId, outcome) {
    try {
      await this.call('reportOutcome', { leaseId, ...outcome });
    } catch (err) {
      if (this.onReportError) this.onReportError(err);
    }
  }
}

module.exports = { Client, RETRYABLE, STATUS_NO_ANSWER, retryDelay, outcomeOf };
