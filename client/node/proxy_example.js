// A minimal proxy frontend on tokenbroker, in Node.js (@grpc/grpc-js + @grpc/proto-loader).
//
// For each upstream request: GetToken, call the upstream with the token, ReportOutcome. When every
// account is cooling, the broker answers RESOURCE_EXHAUSTED with google.rpc.RetryInfo: this client
// waits exactly that long and tries again.
//
//   node client/node/proxy_example.js --broker 127.0.0.1:50051 --upstream http://127.0.0.1:8080 --model gemini-3-pro-high
//
// Against a secured broker: the bearer token comes from $TOKENBROKER_TOKEN; --tls-ca (with
// --tls-cert and --tls-key for mutual TLS) turns TLS on.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const REPO = path.resolve(__dirname, '..', '..');
const GOOGLEAPIS = process.env.TB_GOOGLEAPIS_DIR || '/usr/share/gocode/src/github.com/gogo/googleapis';

const definition = protoLoader.loadSync('tokenbroker/v1/broker.proto', {
  includeDirs: [path.join(REPO, 'proto')],
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { TokenBrokerService } = grpc.loadPackageDefinition(definition).tokenbroker.v1;

const rpcTypes = new protobuf.Root();
rpcTypes.resolvePath = (origin, target) =>
  target.startsWith('google/protobuf/') ? protobuf.Root.prototype.resolvePath(origin, target) : path.join(GOOGLEAPIS, target);
rpcTypes.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);
const RpcStatus = rpcTypes.lookupType('google.rpc.Status');
const RetryInfo = rpcTypes.lookupType('google.rpc.RetryInfo');

// The RetryInfo delay (seconds) of a gRPC error, or null.
function retryDelay(error) {
  const raw = error.metadata && error.metadata.get('grpc-status-details-bin');
  if (!raw || raw.length === 0) return null;
  const status = RpcStatus.decode(raw[0]);
  for (const detail of status.details) {
    if (detail.type_url.endsWith('/google.rpc.RetryInfo')) {
      const info = RetryInfo.decode(detail.value);
      const d = info.retryDelay || {};
      return Number(d.seconds || 0) + (d.nanos || 0) / 1e9;
    }
  }
  return null;
}

const sleep = (seconds) => new Promise((resolve) => setTimeout(resolve, seconds * 1000));

class Broker {
  constructor(target, { token, tlsCa, tlsCert, tlsKey } = {}) {
    const creds = tlsCa
      ? grpc.credentials.createSsl(fs.readFileSync(tlsCa), tlsKey ? fs.readFileSync(tlsKey) : null,
        tlsCert ? fs.readFileSync(tlsCert) : null)
      : grpc.credentials.createInsecure();
    this.client = new TokenBrokerService(target, creds);
    this.metadata = new grpc.Metadata();
    if (token) this.metadata.set('authorization', `Bearer ${token}`);
  }

  call(method, request) {
    return new Promise((resolve, reject) => {
      this.client[method](request, this.metadata, { deadline: Date.now() + 30000 },
        (err, reply) => (err ? reject(err) : resolve(reply)));
    });
  }

  // GetToken, retrying RESOURCE_EXHAUSTED after the broker's RetryInfo delay.
  async getToken(model, sessionId = '', { maxRetries = 3, wait = sleep } = {}) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.call('getToken', { model, sessionId });
      } catch (err) {
        const delay = err.code === grpc.status.RESOURCE_EXHAUSTED ? retryDelay(err) : null;
        if (delay === null || attempt >= maxRetries) throw err;
        await wait(delay);
      }
    }
  }

  report(leaseId, httpStatus, retryAfter = '', errorBody = '') {
    return this.call('reportOutcome', { leaseId, httpStatus, retryAfter, errorBody });
  }

  close() {
    this.client.close();
  }
}

async function callUpstream(upstream, token, payload) {
  const resp = await fetch(`${upstream}/v1internal:generateContent`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token.accessToken}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ ...payload, project: token.projectId }),
  });
  return { status: resp.status, retryAfter: resp.headers.get('retry-after') || '', body: await resp.text() };
}

// One proxied request: token, upstream call, report; on 429 the broker moves us to another account.
async function proxy(broker, upstream, model, sessionId, payload, attempts = 3) {
  for (let i = 0; i < attempts; i++) {
    const token = await broker.getToken(model, sessionId);
    const answer = await callUpstream(upstream, token, payload);
    await broker.report(token.leaseId, answer.status, answer.retryAfter, answer.status === 200 ? '' : answer.body);
    if (answer.status === 200) return { accountId: token.accountId, response: JSON.parse(answer.body) };
    if (![401, 403, 429, 500, 503].includes(answer.status)) throw new Error(`upstream answered ${answer.status}`);
  }
  throw new Error(`no account could serve ${model} after ${attempts} attempts`);
}

module.exports = { Broker, proxy, retryDelay };

if (require.main === module) {
  const args = Object.fromEntries(process.argv.slice(2).reduce((acc, v, i, all) => (i % 2 ? acc : [...acc, [v.replace(/^--/, ''), all[i + 1]]]), []));
  const broker = new Broker(args.broker || '127.0.0.1:50051', {
    token: process.env.TOKENBROKER_TOKEN, tlsCa: args['tls-ca'], tlsCert: args['tls-cert'], tlsKey: args['tls-key'],
  });
  proxy(broker, args.upstream, args.model || 'gemini-3-pro-high', args.session || '', { request: { contents: [] } })
    .then((r) => console.log(`served by ${r.accountId}: ${JSON.stringify(r.response).slice(0, 200)}`))
    .catch((e) => { console.error(e.message); process.exitCode = 1; })
    .finally(() => broker.close());
}
