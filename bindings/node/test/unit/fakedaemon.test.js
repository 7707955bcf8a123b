'use strict';
// The client side of docs/ipc.md against a scripted fake daemon (a `ws`
// server on a Unix socket): what the client sends, and how it copes with a
// daemon that errors, aborts or talks garbage.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { once } = require('node:events');
const { WebSocketServer } = require('ws');
const { encode: mp, decode: unmp } = require('@msgpack/msgpack');
const wraith = require('../..');

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'wraith-fake-daemon-'));
process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
let n = 0;

/** A fake daemon; `script(ws, firstMessage)` plays the daemon's part. */
async function fakeDaemon(script, { verifyClient } = {}) {
  const sock = path.join(dir, `d${++n}.sock`);
  const http = require('node:http').createServer();
  const wss = new WebSocketServer({ server: http, verifyClient });
  http.listen(sock);
  await once(http, 'listening');
  const seen = [];
  wss.on('connection', (ws, req) => {
    ws.once('message', (raw, isBinary) => {
      const first = unmp(raw);
      seen.push({ first, isBinary, headers: req.headers });
      script(ws, first);
    });
  });
  return {
    daemon: `unix:${sock}`,
    seen,
    close: () =>
      new Promise((r) => {
        for (const c of wss.clients) c.terminate();
        wss.close(() => http.close(() => r()));
        http.closeAllConnections();
      }),
  };
}

const send = (ws, obj) => ws.send(Buffer.from(mp(obj)));
const opts = (d) => ({ daemon: d.daemon, server: '127.0.0.1:1', identity: Buffer.from('k'), hostKey: 'SHA256:x', target: 'db:5432' });

test('open message: kind connect, camelCase options, key Buffers as bin, client-only options stripped', { timeout: 10000 }, async () => {
  const d = await fakeDaemon((ws) => send(ws, { type: 'error', code: 'EAUTH', message: 'nope' }));
  await assert.rejects(
    wraith.connect({ ...opts(d), token: 't', autostart: false, timeout: 5000, connectTimeout: 3, user: undefined }),
    (e) => e instanceof Error && e.code === 'EAUTH' && e.message === 'nope',
  );
  const { first, isBinary, headers } = d.seen[0];
  assert.equal(isBinary, true);
  assert.equal(headers.origin, undefined, 'never an Origin header');
  assert.equal(headers['sec-websocket-extensions'], undefined, 'no permessage-deflate');
  assert.deepEqual(Object.keys(first).sort(), ['kind', 'options', 'type']);
  assert.equal(first.type, 'open');
  assert.equal(first.kind, 'connect');
  assert.deepEqual(Object.keys(first.options).sort(), ['connectTimeout', 'hostKey', 'identity', 'server', 'target']);
  assert.ok(first.options.identity instanceof Uint8Array);
  await d.close();
});

test('a stream: data and eof both ways, close 1000 after eof = clean end', { timeout: 10000 }, async () => {
  const got = [];
  const d = await fakeDaemon((ws) => {
    send(ws, { type: 'opened', kind: 'connect', id: 's1', target: 'db:5432', session: 'p1', pooled: false });
    send(ws, { type: 'data', data: Buffer.from('hello ') }); // right after opened: must not be lost
    ws.on('message', (raw) => {
      const m = unmp(raw);
      got.push(m.type === 'data' ? Buffer.from(m.data).toString() : m.type);
      if (m.type === 'eof') {
        send(ws, { type: 'data', data: Buffer.from('world') });
        send(ws, { type: 'eof' });
        ws.close(1000);
      }
    });
  });
  const s = await wraith.connect(opts(d));
  assert.deepEqual({ id: s.wraith.id, session: s.wraith.session, pooled: s.wraith.pooled }, { id: 's1', session: 'p1', pooled: false });
  const chunks = [];
  s.on('data', (c) => chunks.push(c));
  s.write('abc');
  s.end('def');
  await once(s, 'end');
  await once(s, 'close');
  assert.equal(Buffer.concat(chunks).toString(), 'hello world');
  assert.deepEqual(got.join(''), 'abcdefeof');
  await d.close();
});

test('close without the daemon eof, or with 1011 after an error: an error, never a silent EOF', { timeout: 10000 }, async () => {
  for (const [how, code] of [
    [(ws) => ws.close(1000), 'ECONNRESET'],
    [(ws) => (send(ws, { type: 'error', code: 'ESESSION', message: 'session lost' }), ws.close(1011)), 'ESESSION'],
    [(ws) => ws.terminate(), 'ECONNRESET'],
    [(ws) => ws.close(1001), 'EDAEMON'],
  ]) {
    const d = await fakeDaemon((ws) => {
      send(ws, { type: 'opened', kind: 'connect', id: 's1' });
      send(ws, { type: 'data', data: Buffer.from('partial') });
      setTimeout(() => how(ws), 20);
    });
    const s = await wraith.connect(opts(d));
    s.resume();
    const [err] = await once(s, 'error');
    assert.equal(err.code, code);
    await d.close();
  }
});

test('garbage from the daemon is EDAEMON, for open and for a running stream', { timeout: 10000 }, async () => {
  const d1 = await fakeDaemon((ws) => ws.send(Buffer.from([0xc1, 0xc1])));
  await assert.rejects(wraith.connect(opts(d1)), { code: 'EDAEMON' });
  await d1.close();
  const d2 = await fakeDaemon((ws) => send(ws, { type: 'incoming', id: 'x', info: {} }));
  await assert.rejects(wraith.connect(opts(d2)), { code: 'EDAEMON' });
  await d2.close();
  const d3 = await fakeDaemon((ws) => {
    send(ws, { type: 'opened', kind: 'connect', id: 's1' });
    setTimeout(() => send(ws, { type: 'data', data: 'not bin' }), 20);
  });
  const s = await wraith.connect(opts(d3));
  s.resume();
  const [err] = await once(s, 'error');
  assert.equal(err.code, 'EDAEMON');
  await d3.close();
  // the daemon hangs up before answering
  const d4 = await fakeDaemon((ws) => ws.close(1011));
  await assert.rejects(wraith.connect(opts(d4)), { code: 'EDAEMON' });
  await d4.close();
});

test('a frame ws refuses (RSV bits, over maxPayload) fails the open or the stream, never the process', { timeout: 10000 }, async () => {
  let uncaught = null;
  const onUncaught = (e) => (uncaught = e);
  process.on('uncaughtException', onUncaught);
  try {
    for (const bad of [Buffer.from([0xa2, 0x00]), Buffer.from([0x82, 0x7f, 0, 0, 0, 0, 0x10, 0, 0, 0])]) {
      const d1 = await fakeDaemon((ws) => ws._socket.write(bad));
      await assert.rejects(wraith.connect(opts(d1)), { code: 'EDAEMON' });
      await d1.close();
      const d2 = await fakeDaemon((ws) => {
        send(ws, { type: 'opened', kind: 'connect', id: 's1' });
        ws._socket.write(bad); // right behind 'opened', before the stream exists
      });
      const s = await wraith.connect(opts(d2));
      s.resume();
      const [err] = await once(s, 'error');
      assert.ok(err.code, String(err));
      await d2.close();
    }
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(uncaught, null, String(uncaught));
  } finally {
    process.off('uncaughtException', onUncaught);
  }
});

test('refused handshake (HTTP 403), unreachable socket, no answer in time, aborted', { timeout: 20000 }, async () => {
  const d = await fakeDaemon(() => {}, { verifyClient: (info, cb) => cb(false, 403, 'Forbidden') });
  await assert.rejects(wraith.connect(opts(d)), (e) => e.code === 'EDAEMON' && e.status === 403);
  await d.close();
  await assert.rejects(wraith.connect({ ...opts(d), daemon: `unix:${path.join(dir, 'nothing.sock')}` }), { code: 'EDAEMON' });
  const silent = await fakeDaemon(() => {});
  await assert.rejects(wraith.connect({ ...opts(silent), timeout: 300 }), { code: 'ETIMEDOUT' });
  const ac = new AbortController();
  const p = wraith.connect({ ...opts(silent), signal: ac.signal });
  setTimeout(() => ac.abort(), 50);
  await assert.rejects(p, (e) => e instanceof Error && e.code === 'ABORT_ERR' && e.name === 'AbortError');
  await assert.rejects(wraith.connect({ ...opts(silent), signal: AbortSignal.abort() }), { code: 'ABORT_ERR' });
  await silent.close();
});

test('backpressure from the daemon side: write() returns false while the daemon does not read', { timeout: 20000 }, async () => {
  let daemonWs;
  const d = await fakeDaemon((ws) => {
    daemonWs = ws;
    send(ws, { type: 'opened', kind: 'connect', id: 's1' });
    ws._socket.pause(); // stop reading
  });
  const s = await wraith.connect(opts(d));
  let written = 0;
  let sawFalse = false;
  const chunk = Buffer.alloc(256 * 1024);
  while (written < 256 * 1024 * 1024) {
    written += chunk.length;
    if (!s.write(chunk)) {
      sawFalse = true;
      const drained = await Promise.race([once(s, 'drain').then(() => true), new Promise((r) => setTimeout(() => r(false), 500))]);
      if (!drained) break;
    }
  }
  assert.equal(sawFalse, true);
  assert.ok(written < 64 * 1024 * 1024, `${written} bytes accepted while nothing was read`);
  assert.ok(s.writableLength + s._inflight < 8 * 1024 * 1024);
  daemonWs._socket.resume();
  s.destroy();
  await d.close();
});

test('serve control: incoming -> accept on a new WebSocket -> onConnection(stream, info)', { timeout: 10000 }, async () => {
  const info = { remoteAddress: '127.0.0.1', transport: 'tcp', user: 'u', keyFingerprint: 'SHA256:abc' };
  const d = await fakeDaemon((ws, first) => {
    if (first.kind === 'serve') {
      send(ws, { type: 'opened', kind: 'serve', id: 'srv1', addresses: ['127.0.0.1:4000'] });
      send(ws, { type: 'incoming', id: 'in1', info });
      ws.on('close', () => {});
    } else if (first.kind === 'accept') {
      assert.equal(first.id, 'in1');
      send(ws, { type: 'opened', kind: 'accept', id: 'in1', info });
      send(ws, { type: 'data', data: Buffer.from('hi from a client') });
      send(ws, { type: 'eof' });
      ws.on('message', (raw) => {
        if (unmp(raw).type === 'eof') ws.close(1000);
      });
    }
  });
  const server = await wraith.serve({ daemon: d.daemon, hostKey: Buffer.from('k'), authorizedKeys: 'x', listen: '127.0.0.1:0' });
  assert.deepEqual(server.addresses, ['127.0.0.1:4000']);
  assert.equal(d.seen[0].first.kind, 'serve');
  assert.ok(d.seen[0].first.options.hostKey instanceof Uint8Array);
  const [stream, got] = await new Promise((resolve) => server.onConnection((...a) => resolve(a)));
  assert.deepEqual(got, info);
  assert.equal(stream.wraith.role, 'server');
  const chunks = [];
  stream.on('data', (c) => chunks.push(c));
  await once(stream, 'end');
  stream.end();
  await once(stream, 'close');
  assert.equal(Buffer.concat(chunks).toString(), 'hi from a client');
  await server.close();
  await d.close();
});
