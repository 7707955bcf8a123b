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
  // an open over the daemon's size limit is refused from its frame header (close 1009): our message
  const d5 = await fakeDaemon((ws) => ws.close(1009));
  await assert.rejects(wraith.connect(opts(d5)), { code: 'EPROTO' });
  await d5.close();
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

// -- allowHalfOpen and writes after the far end closed (as net.Socket) ------------------

const opened = (ws) => send(ws, { type: 'opened', kind: 'connect', id: 's1' });

test('allowHalfOpen is a client option (never sent); default false: the far end EOF ends our side too', { timeout: 10000 }, async () => {
  let gotEof = false;
  const d = await fakeDaemon((ws) => {
    opened(ws);
    send(ws, { type: 'data', data: Buffer.from('reply') });
    send(ws, { type: 'eof' });
    ws.on('message', (raw) => {
      if (unmp(raw).type === 'eof') {
        gotEof = true;
        ws.close(1000);
      }
    });
  });
  const s = await wraith.connect(opts(d));
  assert.equal(s.allowHalfOpen, false, 'default false, as net.Socket');
  const events = [];
  s.on('end', () => events.push('end'));
  s.on('finish', () => events.push('finish'));
  s.on('error', (e) => events.push(`error ${e.code}`));
  s.resume();
  await once(s, 'close');
  assert.equal(gotEof, true, 'our eof was sent after the far end ended');
  assert.deepEqual(events, ['end', 'finish']);
  // a write after that is a write after end
  const err = await new Promise((resolve) => s.write('late', resolve));
  assert.equal(err.code, 'ERR_STREAM_WRITE_AFTER_END');
  const h = await wraith.connect({ ...opts(d), allowHalfOpen: true });
  assert.equal(h.allowHalfOpen, true);
  for (const { first } of d.seen) assert.equal('allowHalfOpen' in first.options, false, 'not sent to the daemon');
  h.resume();
  await once(h, 'end');
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(h.writable, true, 'allowHalfOpen: true keeps our side open');
  h.end();
  await once(h, 'close');
  await d.close();
});

test('allowHalfOpen true: bytes written after the far end EOF, then its close: error EPIPE, not silence', { timeout: 10000 }, async () => {
  const d = await fakeDaemon((ws) => {
    opened(ws);
    send(ws, { type: 'eof' });
    // the far end closes the channel: the daemon closes once our data came (it drops it)
    ws.on('message', (raw) => {
      if (unmp(raw).type === 'data') setTimeout(() => ws.close(1000), 20);
    });
  });
  const s = await wraith.connect({ ...opts(d), allowHalfOpen: true });
  s.resume();
  await once(s, 'end');
  const cbErr = new Promise((resolve) => s.write('request 2', resolve));
  const [err] = await once(s, 'error');
  assert.equal(err.code, 'EPIPE');
  assert.match(err.message, /may not have been read/);
  assert.ok(!(await cbErr), 'the write itself went out');
  await d.close();
});

test('allowHalfOpen true: a write() after the far end closed is an error EPIPE (like net.Socket), not only a callback', { timeout: 10000 }, async () => {
  let wsClosed;
  const d = await fakeDaemon((ws) => {
    opened(ws);
    send(ws, { type: 'eof' });
    ws.close(1000);
    wsClosed = once(ws, 'close');
  });
  const s = await wraith.connect({ ...opts(d), allowHalfOpen: true });
  s.resume();
  await once(s, 'end');
  await wsClosed;
  await new Promise((r) => setTimeout(r, 50));
  const cbErr = new Promise((resolve) => s.write('too late', resolve));
  const [err] = await once(s, 'error');
  assert.equal(err.code, 'EPIPE');
  assert.equal((await cbErr).code, 'EPIPE');
  // end() instead of a write: a clean close (nothing was lost)
  const d2 = await fakeDaemon((ws) => {
    opened(ws);
    send(ws, { type: 'eof' });
    ws.close(1000);
  });
  const s2 = await wraith.connect({ ...opts(d2), allowHalfOpen: true });
  s2.resume();
  s2.on('error', (e) => assert.fail(e));
  await once(s2, 'end');
  await new Promise((r) => setTimeout(r, 50));
  s2.end();
  await once(s2, 'close');
  await d.close();
  await d2.close();
});

test('serve(): incoming streams default to allowHalfOpen false (as net.Server), allowHalfOpen: true keeps them open', { timeout: 10000 }, async () => {
  for (const allowHalfOpen of [undefined, true]) {
    const d = await fakeDaemon((ws, first) => {
      if (first.kind === 'serve') {
        send(ws, { type: 'opened', kind: 'serve', id: 'srv1', addresses: ['127.0.0.1:4000'] });
        send(ws, { type: 'incoming', id: 'in1', info: {} });
      } else {
        send(ws, { type: 'opened', kind: 'accept', id: 'in1', info: {} });
        send(ws, { type: 'eof' });
        ws.on('message', (raw) => {
          if (unmp(raw).type === 'eof') ws.close(1000);
        });
      }
    });
    const server = await wraith.serve({ daemon: d.daemon, hostKey: Buffer.from('k'), allowHalfOpen });
    assert.equal('allowHalfOpen' in d.seen[0].first.options, false);
    const [stream] = await new Promise((resolve) => server.onConnection((...a) => resolve(a)));
    assert.equal(stream.allowHalfOpen, Boolean(allowHalfOpen));
    stream.resume();
    await once(stream, 'end');
    if (allowHalfOpen) {
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(stream.writable, true);
      stream.end('answer after the client EOF');
    }
    await once(stream, 'close');
    await server.close();
    await d.close();
  }
});

// -- hostile daemon messages ----------------------------------------------------------------

/** {type, junk: <array32 of `count` empty arrays | `count`-deep nesting>} */
function bomb(type, count, nested) {
  const head = Buffer.from(mp({ type, junk: null })); // ends with nil for junk
  const body = Buffer.alloc(5 + count, nested ? 0x91 : 0x90);
  body[0] = 0xdd;
  body.writeUInt32BE(nested ? 1 : count, 1);
  if (nested) body[body.length - 1] = 0x90;
  return Buffer.concat([head.subarray(0, head.length - 1), body]);
}

test('hostile control messages: over 1 MiB, too deep, too long: EDAEMON at once, that stream only', { timeout: 20000 }, async () => {
  const cases = [
    ['eof of 4 MiB', () => bomb('eof', 4 << 20, false), /not data/],
    ['eof nested 4M deep', () => bomb('eof', 4 << 20, true), /not data/],
    ['eof nested 1000 deep (small)', () => bomb('eof', 1000, true), /deeper than 8/],
    ['eof with an array of 2000', () => bomb('eof', 2000, false), /maxArrayLength/],
    ['eof with a map of 100', () => Buffer.from(mp({ type: 'eof', m: Object.fromEntries(Array.from({ length: 100 }, (_, i) => [`k${i}`, i])) })), /maxMapLength/],
  ];
  for (const [name, make, why] of cases) {
    const d = await fakeDaemon((ws) => {
      opened(ws);
      setTimeout(() => ws.send(make()), 10);
    });
    const s = await wraith.connect(opts(d));
    s.resume();
    const t0 = Date.now();
    const [err] = await once(s, 'error');
    assert.equal(err.code, 'EDAEMON', name);
    assert.match(err.message, why, name);
    assert.ok(Date.now() - t0 < 2000, `${name}: ${Date.now() - t0} ms`);
    await d.close();
  }
  // the same before 'opened': the open fails
  const d = await fakeDaemon((ws) => ws.send(bomb('opened', 4 << 20, false)));
  await assert.rejects(wraith.connect(opts(d)), (e) => e.code === 'EDAEMON' && /not data/.test(e.message));
  await d.close();
});

test("a frame ws refuses right behind 'opened': the stream's error says why", { timeout: 10000 }, async () => {
  // one socket write: the 'opened' frame and a frame with RSV2 set
  const body = Buffer.from(mp({ type: 'opened', kind: 'connect', id: 's1' }));
  const d = await fakeDaemon((ws) => ws._socket.write(Buffer.concat([Buffer.from([0x82, body.length]), body, Buffer.from([0xa2, 0x00])])));
  const s = await wraith.connect(opts(d));
  s.resume();
  const [err] = await once(s, 'error');
  assert.equal(err.code, 'EDAEMON');
  assert.match(err.message, /RSV/);
  await d.close();
  // and an 'error' message in the same read as 'opened'
  const d2 = await fakeDaemon((ws) => {
    const e = Buffer.from(mp({ type: 'error', code: 'ESESSION', message: 'session lost at once' }));
    ws._socket.write(Buffer.concat([Buffer.from([0x82, body.length]), body, Buffer.from([0x82, e.length]), e, Buffer.from([0x88, 0x02, 0x03, 0xf3])]));
  });
  const s2 = await wraith.connect(opts(d2));
  s2.resume();
  const [err2] = await once(s2, 'error');
  assert.deepEqual([err2.code, err2.message], ['ESESSION', 'session lost at once']);
  await d2.close();
});

// -- opening: bursts, timeouts, aborts -------------------------------------------------------

test('a burst of connects into a full accept queue (EAGAIN) is retried, not failed', { timeout: 30000 }, async () => {
  // A daemon in another process with a listen backlog of 1 whose event loop is busy
  // for a moment: the kernel's accept queue is full and connect() fails with EAGAIN.
  const sock = path.join(dir, `busy${++n}.sock`);
  const script = `
    const http = require('node:http');
    const { WebSocketServer } = require('ws');
    const { encode } = require('@msgpack/msgpack');
    const srv = http.createServer();
    const wss = new WebSocketServer({ server: srv });
    wss.on('connection', (ws) => ws.once('message', () => ws.send(Buffer.from(encode({ type: 'error', code: 'EAUTH', message: 'fake' })))));
    srv.listen({ path: ${JSON.stringify(sock)}, backlog: 1 }, () => {
      process.stdout.write('ready\\n');
      process.stdin.once('data', () => {
        const end = Date.now() + 700;
        while (Date.now() < end); // busy: accepts nothing
      });
    });
    process.stdin.on('end', () => process.exit(0));
  `;
  const proc = require('node:child_process').spawn(process.execPath, ['-e', script], { cwd: path.resolve(__dirname, '../..'), stdio: ['pipe', 'pipe', 'inherit'] });
  try {
    await once(proc.stdout, 'data');
    proc.stdin.write('block\n');
    await new Promise((r) => setTimeout(r, 100));
    const results = await Promise.allSettled(Array.from({ length: 64 }, () => wraith.connect({ ...opts({ daemon: `unix:${sock}` }), autostart: false, timeout: 10000 })));
    const codes = {};
    for (const r of results) {
      const why = r.status === 'rejected' ? `${r.reason.code}${r.reason.cause ? ` ${r.reason.cause.code}` : ''}` : 'opened';
      codes[why] = (codes[why] || 0) + 1;
    }
    assert.deepEqual(codes, { EAUTH: 64 }, 'every open reached the daemon');
  } finally {
    proc.stdin.end();
    await once(proc, 'exit');
  }
});

test('timeout and signal cover the WebSocket handshake and the daemon autostart', { timeout: 30000 }, async () => {
  // a socket that accepts and never answers the HTTP upgrade
  const sock = path.join(dir, `mute${++n}.sock`);
  const mute = require('node:net').createServer(() => {});
  mute.listen(sock);
  await once(mute, 'listening');
  const t0 = Date.now();
  await assert.rejects(wraith.connect({ ...opts({ daemon: `unix:${sock}` }), timeout: 300 }), { code: 'ETIMEDOUT' });
  assert.ok(Date.now() - t0 < 2000, `handshake timeout took ${Date.now() - t0} ms`);
  const ac = new AbortController();
  setTimeout(() => ac.abort(), 100);
  await assert.rejects(wraith.connect({ ...opts({ daemon: `unix:${sock}` }), signal: ac.signal }), { code: 'ABORT_ERR' });
  mute.close();
  // autostart of a "python" that takes its time (then fails)
  const slowPy = path.join(dir, 'slow-python');
  fs.writeFileSync(slowPy, '#!/bin/sh\nsleep 2\nexit 1\n', { mode: 0o755 });
  const saved = { WRAITH_PYTHON: process.env.WRAITH_PYTHON, XDG_RUNTIME_DIR: process.env.XDG_RUNTIME_DIR, WRAITH_DAEMON: process.env.WRAITH_DAEMON };
  process.env.WRAITH_PYTHON = slowPy;
  process.env.XDG_RUNTIME_DIR = fs.mkdtempSync(path.join(dir, 'xdg-'));
  delete process.env.WRAITH_DAEMON;
  try {
    const base = { server: '127.0.0.1:1', identity: Buffer.from('k'), hostKey: 'SHA256:x' };
    let t = Date.now();
    await assert.rejects(wraith.connect({ ...base, timeout: 300 }), { code: 'ETIMEDOUT' });
    assert.ok(Date.now() - t < 1500, `timeout during autostart took ${Date.now() - t} ms`);
    const ac2 = new AbortController();
    setTimeout(() => ac2.abort(), 100);
    t = Date.now();
    await assert.rejects(wraith.connect({ ...base, signal: ac2.signal }), { code: 'ABORT_ERR' });
    assert.ok(Date.now() - t < 1500, `abort during autostart took ${Date.now() - t} ms`);
    // the start itself goes on (shared by all callers) and fails on its own
    await assert.rejects(wraith.connect(base), { code: 'EDAEMON' });
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
});
