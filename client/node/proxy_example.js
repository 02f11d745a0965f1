// One proxied request through tokenbroker, from the command line (on the tokenbroker.js library).
//
// The library does the loop: GetToken, the upstream call with the token (here Cloud Code's
// generateContent with the account's project), ReportOutcome with what the upstream answered,
// another account after a 429, 401, 403 or 5xx, and waiting out RESOURCE_EXHAUSTED while an account
// frees in time.
//
//   node client/node/proxy_example.js --broker 127.0.0.1:50051 --upstream http://127.0.0.1:8080 --model gemini-3-pro-high
//
// Against a secured broker: the bearer token comes from $TOKENBROKER_TOKEN; --tls-ca (with
// --tls-cert and --tls-key for mutual TLS) turns TLS on.
'use strict';

const { Client } = require('./tokenbroker');

// One proxied request: { accountId, response } (the upstream's JSON answer); throws for a non-200.
async function proxy(broker, upstream, model, sessionId, payload, { timeoutMs = 60000 } = {}) {
  const used = [];
  const answer = await broker.do(model, sessionId, (token, account, signal) => {
    used.push(account.id);
    return fetch(`${upstream}/v1internal:generateContent`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ ...payload, project: account.projectId }),
      signal,
    });
  }, { timeoutMs });
  const body = await answer.text();
  if (answer.status !== 200) throw new Error(`upstream answered ${answer.status} (accounts tried: ${used.join(', ')}): ${body.slice(0, 200)}`);
  return { accountId: used[used.length - 1], response: JSON.parse(body) };
}

// Command-line options as tbctl takes them: --name=value or --name value.
function parseArgs(argv) {
  const args = {};
  for (let i = 0; i < argv.length; i++) {
    const m = /^--?([^=]+)(?:=(.*))?$/s.exec(argv[i]);
    if (!m) throw new Error(`unexpected argument '${argv[i]}': options are --name=value or --name value`);
    if (m[2] !== undefined) {
      args[m[1]] = m[2];
    } else if (i + 1 < argv.length && !argv[i + 1].startsWith('--')) {
      args[m[1]] = argv[++i];
    } else {
      throw new Error(`option --${m[1]} needs a value`);
    }
  }
  return args;
}

module.exports = { proxy, parseArgs };

if (require.main === module) {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.error(`proxy_example: ${e.message}`);
    process.exit(2);
  }
  const broker = new Client(args.broker || '127.0.0.1:50051', {
    token: process.env.TOKENBROKER_TOKEN, ca: args['tls-ca'], cert: args['tls-cert'], key: args['tls-key'],
  });
  proxy(broker, args.upstream, args.model || 'gemini-3-pro-high', args.session || '', { request: { contents: [] } })
    .then((r) => console.log(`served by ${r.accountId}: ${JSON.stringify(r.response).slice(0, 200)}`))
    .catch((e) => { console.error(e.message); process.exitCode = 1; })
    .finally(() => broker.close());
}
