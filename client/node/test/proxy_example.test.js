// Runs the Node example client against a live broker over TCP and over the unix socket. The
// processes are started by tests/e2e/clients_test.py, which passes their addresses in the environment.
'use strict';

const test = require('node:test');
const assert = require('node:assert');
const grpc = require('@grpc/grpc-js');
const { Broker, proxy, retryDelay } = require('../proxy_example');

const UPSTREAM = process.env.TB_UPSTREAM;
const QUOTA_429 = JSON.stringify({
  error: {
    code: 429, status: 'RESOURCE_EXHAUSTED', message: 'You have exhausted your capacity on this model.',
    details: [{ '@type': 'type.googleapis.com/google.rpc.ErrorInfo', reason: 'QUOTA_EXHAUSTED', metadata: { quotaResetDelay: '1h' } }],
  },
});

async function fake(pathname, body) {
  const resp = await fetch(`${UPSTREAM}${pathname}`, { method: 'POST', body: JSON.stringify(body) });
  assert.strictEqual(resp.status, 200);
}

for (const [name, target] of [['tcp', process.env.TB_TCP_TARGET], ['unix socket', process.env.TB_UNIX_TARGET]]) {
  test(`proxy over ${name}: a 429 moves the request to the next account and cools the first`, async () => {
    const broker = new Broker(target);
    const model = `node-model-${name.replace(' ', '-')}`;
    try {
      await fake('/__fake/script', { path: '/v1internal:generateContent', match: '1//rt-ultra', status: 429, body: QUOTA_429, times: 1 });
      const result = await proxy(broker, UPSTREAM, model, 'node-conv', { request: {} });
      assert.strictEqual(result.accountId, 'pro');
      assert.ok(result.response.response.candidates.length > 0);
      assert.strictEqual((await broker.getToken(model)).accountId, 'pro');
      assert.strictEqual((await broker.getToken(`${model}-other`)).accountId, 'ultra');
    } finally {
      broker.close();
    }
  });
}

test('RESOURCE_EXHAUSTED is retried after the RetryInfo delay', async () => {
  const broker = new Broker(process.env.TB_TCP_TARGET);
  const model = 'node-model-retry';
  try {
    await broker.call('reportOutcome', { accountId: 'ultra', model, httpStatus: 429, retryAfter: '600' });
    await broker.call('reportOutcome', { accountId: 'pro', model, httpStatus: 429, retryAfter: '2' });
    await assert.rejects(broker.getToken(model, '', { maxRetries: 0 }), (err) => {
      assert.strictEqual(err.code, grpc.status.RESOURCE_EXHAUSTED);
      const delay = retryDelay(err);
      assert.ok(delay > 0.5 && delay <= 2.5, `delay ${delay}`);
      return true;
    });
    const waits = [];
    const token = await broker.getToken(model, '', {
      wait: (s) => { waits.push(s); return new Promise((r) => setTimeout(r, s * 1000)); },
    });
    assert.strictEqual(token.accountId, 'pro');
    assert.strictEqual(waits.length, 1);
  } finally {
    broker.close();
  }
});
