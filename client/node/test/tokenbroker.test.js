// tokenbroker.js against the real broker and the real fake upstream: the loop over TCP and a unix
// socket, a 429 moving the request to another account and cooling the first, RESOURCE_EXHAUSTED
// waited out within the deadline and given up past it, failures and aborts in fn still reported,
// TLS with a bearer token; and the example proxies (serve_example.js, the README's, and
// proxy_example.js) run as programs. The processes are started by tests/e2e/clients_test.py, which
// passes their addresses in the environment.
'use strict';

const test = require('node:test');
const assert = require('node:assert');
const net = require('node:net');
const path = require('node:path');
const fs = require('node:fs');
const { spawn, execFile } = require('node:child_process');
const grpc = require('@grpc/grpc-js');
const { Client, STATUS_NO_ANSWER, retryDelay } = require('../tokenbroker');
const { parseArgs } = require('../proxy_example');

const E = process.env;
const UPSTREAM = E.TB_UPSTREAM;
const pki = (name) => path.join(E.TB_PKI_DIR, name);
const QUOTA_429 = JSON.stringify({
  error: {
    code: 429, status: 'RESOURCE_EXHAUSTED', message: 'You have exhausted your capacity on this model.',
    details: [{ '@type': 'type.googleapis.com/google.rpc.ErrorInfo', reason: 'QUOTA_EXHAUSTED', metadata: { quotaResetDelay: '1h' } }],
  },
});

async function script(rule) {
  const resp = await fetch(`${UPSTREAM}/__fake/script`, {
    method: 'POST', body: JSON.stringify({ path: '/v1internal:generateContent', ...rule }),
  });
  assert.strictEqual(resp.status, 200);
}

// A fn of do(): generateContent on the fake upstream with the token.
const callUpstream = (used) => (token, account, signal) => {
  used.push(account.id);
  return fetch(`${UPSTREAM}/v1internal:generateContent`, {
    method: 'POST', headers: { Authorization: `Bearer ${token}` }, body: JSON.stringify({ project: account.projectId }), signal,
  });
};

const admin = new Client(E.TB_TCP_TARGET);
test.after(() => admin.close());

async function account(id) {
  return (await admin.listAccounts()).accounts.find((a) => a.accountId === id);
}
const cooling = async (id, model) => (await account(id)).cooldowns.some((c) => c.model === model);

async function assertReported(id, model) {
  assert.strictEqual((await account(id)).inflightLeases, 0, 'the outcome was not reported');
  assert.ok(!(await cooling(id, model)), "a failure of the caller's own cooled the account");
}

async function coolBoth(model, ultra, pro) {
  await admin.reportOutcome({ accountId: 'ultra', model, httpStatus: 429, retryAfter: ultra });
  await admin.reportOutcome({ accountId: 'pro', model, httpStatus: 429, retryAfter: pro });
}

for (const [name, target] of [['tcp', E.TB_TCP_TARGET], ['unix socket', E.TB_UNIX_TARGET]]) {
  test(`do() serves through the broker over ${name}`, async () => {
    const broker = new Client(target);
    try {
      const used = [];
      const answer = await broker.do('node-happy', 'conv-1', callUpstream(used), { timeoutMs: 10000 });
      assert.strictEqual(answer.status, 200);
      assert.ok((await answer.json()).response.candidates.length > 0);
      assert.deepStrictEqual(used, ['ultra']);
      assert.strictEqual((await account('ultra')).inflightLeases, 0);
    } finally {
      broker.close();
    }
  });
}

test('a 429 is reported and the request rotates to another account', async () => {
  const model = 'node-rotate';
  await script({ match: '1//rt-ultra', status: 429, body: QUOTA_429, times: 1 });
  const used = [];
  const answer = await admin.do(model, 'conv-rotate', callUpstream(used));
  assert.strictEqual(answer.status, 200);
  assert.deepStrictEqual(used, ['ultra', 'pro']);
  assert.ok(await cooling('ultra', model));
  for (const [m, want] of [[model, 'pro'], [`${model}-other`, 'ultra']]) {
    const grant = await admin.getToken({ model: m });
    assert.strictEqual(grant.accountId, want);
    await admin.reportOutcome({ leaseId: grant.leaseId, httpStatus: 200 });
  }
});

test('after maxAttempts the last answer is returned, its body still readable', async () => {
  await script({ status: 503, body: '{"error":{"code":503,"message":"backend unavailable"}}', times: 2 });
  const broker = new Client(E.TB_TCP_TARGET, { maxAttempts: 2 });
  try {
    const used = [];
    const answer = await broker.do('node-attempts', '', callUpstream(used));
    assert.strictEqual(answer.status, 503);
    assert.match(await answer.text(), /backend unavailable/);
    assert.strictEqual(new Set(used).size, 2);
  } finally {
    broker.close();
  }
});

test('RESOURCE_EXHAUSTED is waited out within the deadline', async () => {
  const model = 'node-wait';
  await coolBoth(model, '600', '2');
  const used = [];
  const start = Date.now();
  const answer = await admin.do(model, '', callUpstream(used), { timeoutMs: 15000 });
  assert.strictEqual(answer.status, 200);
  assert.deepStrictEqual(used, ['pro']);
  assert.ok(Date.now() - start > 1000, 'served before pro freed');
});

test('RESOURCE_EXHAUSTED past the deadline or maxWaitMs gives up at once', async () => {
  const model = 'node-give-up';
  await coolBoth(model, '600', '60');
  const capped = new Client(E.TB_TCP_TARGET, { maxWaitMs: 5000 });
  try {
    for (const [broker, options] of [[admin, { timeoutMs: 3000 }], [capped, {}]]) {
      const used = [];
      const start = Date.now();
      await assert.rejects(broker.do(model, '', callUpstream(used), options), (err) => {
        assert.strictEqual(err.code, grpc.status.RESOURCE_EXHAUSTED);
        assert.ok(retryDelay(err) > 50, `RetryInfo ${retryDelay(err)}`);
        return true;
      });
      assert.ok(Date.now() - start < 1000, 'it waited for what comes too late');
      assert.deepStrictEqual(used, []);
    }
  } finally {
    capped.close();
  }
});

test('an exception in fn is still reported', async () => {
  await assert.rejects(admin.do('node-throw', '', () => { throw new RangeError('boom'); }), RangeError);
  await assertReported('ultra', 'node-throw');
  await assert.rejects(admin.do('node-throw', '', async () => 'not an answer'), TypeError);
  await assertReported('ultra', 'node-throw');
});

test('an abort while fn runs is still reported', async () => {
  const controller = new AbortController();
  const hang = (token, account, signal) => {
    setTimeout(() => controller.abort(new Error('the client went away')), 50);
    return new Promise(() => {}); // ignores the signal: do() must not wait for it
  };
  await assert.rejects(admin.do('node-abort', '', hang, { signal: controller.signal }), /the client went away/);
  await assertReported('ultra', 'node-abort');
  assert.strictEqual(STATUS_NO_ANSWER, 499);
});

test('TLS with a bearer token', async () => {
  const tls = { ca: pki('ca.pem'), cert: pki('client.pem'), key: pki('client.key') };
  const withToken = new Client(E.TB_TLS_TARGET, { ...tls, token: async () => E.TB_CALLER_TOKEN });
  const withoutToken = new Client(E.TB_TLS_TARGET, tls);
  try {
    const answer = await withToken.do('node-tls', '', callUpstream([]), { timeoutMs: 10000 });
    assert.strictEqual(answer.status, 200);
    await assert.rejects(withoutToken.do('node-tls', '', callUpstream([]), { timeoutMs: 10000 }),
      (err) => err.code === grpc.status.UNAUTHENTICATED);
  } finally {
    withToken.close();
    withoutToken.close();
  }
});

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    }).on('error', reject);
  });
}

async function waitForPort(port, child, timeoutMs = 10000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`serve_example.js exited with ${child.exitCode}`);
    const open = await new Promise((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => { s.destroy(); resolve(true); }).on('error', () => resolve(false));
    });
    if (open) return;
    if (Date.now() > deadline) throw new Error('timed out waiting for serve_example.js to listen');
    await new Promise((r) => setTimeout(r, 20));
  }
}

test('serve_example.js serves through the broker, and the upstream 429 cools the account', async () => {
  const file = path.join(__dirname, '..', 'serve_example.js');
  assert.ok(fs.readFileSync(file, 'utf8').trimEnd().split('\n').length <= 30);
  const port = await freePort();
  const child = spawn(process.execPath, [file, E.TB_TCP_TARGET, UPSTREAM, String(port)], { stdio: 'ignore' });
  try {
    await waitForPort(port, child);
    const model = 'node-example';
    await script({ match: '1//rt-ultra', status: 429, body: QUOTA_429, times: 1 });
    for (let i = 0; i < 3; i++) {
      const resp = await fetch(`http://127.0.0.1:${port}/v1internal:generateContent?model=${model}`, {
        method: 'POST', body: '{"request":{}}',
      });
      assert.strictEqual(resp.status, 200);
      assert.ok((await resp.json()).response.candidates.length > 0);
    }
    assert.ok(await cooling('ultra', model), "the upstream's 429 did not cool the account");
    assert.ok(!(await cooling('pro', model)));
  } finally {
    child.kill();
  }
});

test('proxy_example.js serves one request from the command line', async () => {
  const out = await new Promise((resolve, reject) => {
    execFile(process.execPath, [path.join(__dirname, '..', 'proxy_example.js'), `--broker=${E.TB_UNIX_TARGET}`,
      '--upstream', UPSTREAM, '--model=node-cli'], { timeout: 60000 }, (err, stdout, stderr) => (err ? reject(new Error(stderr)) : resolve(stdout)));
  });
  assert.match(out, /served by ultra/);
});

test('options are taken as --name=value or --name value, like tbctl', () => {
  assert.deepStrictEqual(parseArgs(['--broker=unix:/run/tb.sock', '--model', 'gemini-3-pro-high', '--session=a=b']),
    { broker: 'unix:/run/tb.sock', model: 'gemini-3-pro-high', session: 'a=b' });
  assert.throws(() => parseArgs(['--broker']), /--broker needs a value/);
  assert.throws(() => parseArgs(['stray']), /unexpected argument/);
});
