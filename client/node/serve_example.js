// A proxy frontend on tokenbroker. Usage: node serve_example.js BROKER UPSTREAM PORT; then POST to PORT/PATH?model=M.
'use strict';
const http = require('node:http');
const { Client } = require('./tokenbroker');

const [target, upstream, port] = process.argv.slice(2);
const broker = new Client(target, { token: process.env.TOKENBROKER_TOKEN });

http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://proxy');
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  try {
    const answer = await broker.do(url.searchParams.get('model'), req.headers['x-session-id'] || '',
      (token, account, signal) => fetch(upstream + url.pathname, {
        method: 'POST', body: Buffer.concat(chunks), headers: { Authorization: `Bearer ${token}` }, signal,
      }), { timeoutMs: 60000 });
    res.writeHead(answer.status, { 'content-type': answer.headers.get('content-type') || 'application/json' });
    res.end(Buffer.from(await answer.arrayBuffer()));
  } catch (err) { // no account, e.g. RESOURCE_EXHAUSTED: every one is cooling
    res.writeHead(503).end(String(err.details || err.message));
  }
}).listen(Number(port), '127.0.0.1');
