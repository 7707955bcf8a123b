'use strict';
// connect() streams through a real daemon and a real `wraith serve`.
const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { once } = require('node:events');
const h = require('./helpers');

const wraith = h.loadPackage();
let keys;
let serve;
let base;

test.before(async () => {
  keys = await h.makeKeys();
  serve = await h.startServe(keys);
  base = { server: serve.address, identity: keys.client, hostKey: keys.hostPub };
});

test.after(async () => {
  await wraith.shutdownDaemon();
  if (serve) await serve.stop();
});

const sha = (b) => crypto.createHash('sha256').update(b).digest('hex');

test('bytes arrive intact both ways through a TCP target (sha256)', { timeout: 60000 }, async () => {
  const target = await h.tcpServer((s) => s.pipe(s)); // echo
  const stream = await wraith.connect({ ...base, target: target.target });
  assert.equal(stream.wraith.role, 'client');
  assert.equal(stream.wraith.target, target.target);
  assert.equal(typeof stream.wraith.id, 'string');
  const data = crypto.randomBytes(24 * 1024 * 1024 + 12345);
  const got = h.drain(stream);
  // write in uneven pieces, honouring backpressure, then EOF at once: the
  // target echoes the rest, ends and closes while data is still in flight
  let off = 0;
  while (off < data.length) {
    const k = Math.min(data.length - off, 1 + Math.floor(Math.random() * 3 * 1024 * 1024));
    if (!stream.write(data.subarray(off, off + k))) await once(stream, 'drain');
    off += k;
  }
  stream.end();
  const r = await got;
  assert.equal(r.bytes, data.length);
  assert.equal(r.hash, sha(data));
  await h.closed(stream);
  assert.equal(stream.bytesWritten, data.length);
  assert.equal(stream.bytesRead, data.length);
  await target.close();
});

test('a target that speaks first: its first bytes are not lost', { timeout: 30000 }, async () => {
  const target = await h.tcpServer((s) => s.end('220 hello from the target\r\n'));
  const stream = await wraith.connect({ ...base, target: target.target });
  const r = await h.drain(stream);
  stream.end();
  assert.equal(r.bytes, 27);
  await target.close();
});

test('half-close: end() sends EOF, the other direction keeps flowing', { timeout: 30000 }, async () => {
  const payload = crypto.randomBytes(3 * 1024 * 1024);
  const target = await h.tcpServer((s) => {
    // read until EOF, then answer with a digest of what came and a 2 MiB tail
    const hh = crypto.createHash('sha256');
    s.on('data', (d) => hh.update(d));
    s.on('end', () => {
      s.write(hh.digest('hex'));
      s.end(Buffer.alloc(2 * 1024 * 1024, 0x61));
    });
  });
  const stream = await wraith.connect({ ...base, target: target.target });
  const got = h.drain(stream);
  stream.end(payload);
  await once(stream, 'finish');
  assert.equal(stream.readableEnded, false, 'our EOF did not end the readable side');
  const r = await got;
  assert.equal(r.bytes, 64 + 2 * 1024 * 1024);
  await h.closed(stream);
  await target.close();
});

test("allowHalfOpen: true: the target's EOF ends readable, our writes still arrive", { timeout: 30000 }, async () => {
  let received = null;
  const target = await h.tcpServer((s) => {
    s.end('bye'); // target half-closes first
    const hh = crypto.createHash('sha256');
    let n = 0;
    s.on('data', (d) => {
      hh.update(d);
      n += d.length;
    });
    s.on('end', () => {
      received = { bytes: n, hash: hh.digest('hex') };
    });
  });
  const stream = await wraith.connect({ ...base, target: target.target, allowHalfOpen: true });
  assert.equal(stream.allowHalfOpen, true);
  const r = await h.drain(stream);
  assert.equal(r.bytes, 3);
  await h.sleep(200);
  assert.equal(stream.writable, true, 'still writable after the peer EOF');
  const more = crypto.randomBytes(1024 * 1024);
  stream.end(more);
  await h.waitFor(() => received !== null, 10000, 'the target to get our data and EOF');
  assert.deepEqual(received, { bytes: more.length, hash: sha(more) });
  await h.closed(stream);
  await target.close();
});

test("allowHalfOpen (default false, as net.Socket): the target's EOF ends our side too, and the stream closes", { timeout: 30000 }, async () => {
  let targetSawEnd = false;
  // "send the response, then FIN", keeping the socket until the client ends too
  const target = await h.tcpServer((c) => {
    c.on('end', () => {
      targetSawEnd = true;
    });
    c.resume();
    c.end('HTTP/1.0 200 OK\r\n\r\nbody');
  });
  for (const opt of [{}, { allowHalfOpen: false }]) {
    targetSawEnd = false;
    const stream = await wraith.connect({ ...base, target: target.target, ...opt });
    assert.equal(stream.allowHalfOpen, false);
    const errors = [];
    stream.on('error', (e) => errors.push(e));
    const r = await h.drain(stream);
    assert.equal(r.bytes, 23);
    await Promise.race([h.closed(stream), h.sleep(10000).then(() => assert.fail('the stream is still open 10 s after the far end ended'))]);
    assert.deepEqual(errors, []);
    assert.equal(stream.writableEnded, true);
    await h.waitFor(() => targetSawEnd, 5000, 'the target to see our EOF');
  }
  await target.close();
});

test('allowHalfOpen: true: writing after the target closed is an EPIPE error, never a silent drop', { timeout: 30000 }, async () => {
  let got = 0;
  const target = await h.tcpServer(
    (c) => {
      c.on('data', (d) => (got += d.length));
      c.end('reply');
      c.destroySoon();
    },
    { allowHalfOpen: false },
  );
  const stream = await wraith.connect({ ...base, target: target.target, allowHalfOpen: true });
  stream.resume();
  await once(stream, 'end');
  await h.sleep(300);
  const errored = once(stream, 'error');
  const ok = [];
  for (let i = 0; i < 30 && !stream.destroyed; i++) {
    stream.write(Buffer.alloc(32768, 1), (e) => ok.push(!e));
    await h.sleep(10);
  }
  const [err] = await Promise.race([errored, h.sleep(10000).then(() => assert.fail('no error: the writes were dropped silently'))]);
  assert.equal(err.code, 'EPIPE');
  assert.equal(got, 0);
  await h.closed(stream);
  // default (allowHalfOpen false): our side ended with the target's, a write is a write after end
  const s2 = await wraith.connect({ ...base, target: target.target });
  s2.resume();
  await once(s2, 'end');
  const e2 = await new Promise((resolve) => s2.write('late', resolve));
  assert.equal(e2.code, 'ERR_STREAM_WRITE_AFTER_END');
  await h.closed(s2);
  await target.close();
});

test('destroy() aborts the channel: the target sees the connection go away', { timeout: 30000 }, async () => {
  let targetClosed = false;
  let targetSock;
  const target = await h.tcpServer((s) => {
    targetSock = s;
    const gone = () => {
      targetClosed = true;
    };
    s.on('end', gone);
    s.on('close', gone);
    s.resume();
  });
  const stream = await wraith.connect({ ...base, target: target.target });
  stream.write('some bytes');
  await h.waitFor(() => targetSock !== undefined, 5000, 'the target connection');
  stream.destroy();
  await h.closed(stream);
  assert.equal(stream.destroyed, true);
  await h.waitFor(() => targetClosed, 10000, 'the target to see the abort');
  // destroy(err) emits that error
  const s2 = await wraith.connect({ ...base, target: target.target });
  const boom = new Error('boom');
  s2.destroy(boom);
  const [err] = await once(s2, 'error');
  assert.equal(err, boom);
  await target.close();
});

test('the far end resetting the stream is an error with a code, never a silent EOF', { timeout: 30000 }, async () => {
  let targetSock;
  const target = await h.tcpServer((s) => {
    targetSock = s;
    s.write('partial');
  });
  const stream = await wraith.connect({ ...base, target: target.target });
  const chunks = [];
  const outcome = new Promise((resolve) => {
    stream.on('error', (e) => resolve({ error: e }));
    stream.on('end', () => resolve({ end: true }));
  });
  stream.on('data', (d) => {
    chunks.push(d);
    targetSock.resetAndDestroy(); // once the bytes are through, the target resets
  });
  const r = await outcome;
  // the target's RST comes through as an error (SPEC §10: never a silent truncation)
  assert.ok(r.error, 'an error, not an end');
  assert.equal(r.error.code, 'ECONNRESET');
  assert.equal(Buffer.concat(chunks).toString(), 'partial');
  stream.destroy();
  await target.close();
});

test('backpressure: a fast writer into a slow target keeps memory flat; write() returns false', { timeout: 90000 }, async () => {
  const TOTAL = 160 * 1024 * 1024;
  let received = 0;
  const target = await h.tcpServer((s) => {
    // slow reader: ~64 KiB every 2 ms
    s.pause();
    const iv = setInterval(() => {
      let c;
      while ((c = s.read(64 * 1024)) !== null) {
        received += c.length;
        if (c.length >= 64 * 1024) break;
      }
    }, 2);
    s.on('close', () => clearInterval(iv));
    s.on('end', () => {
      clearInterval(iv);
      s.end();
    });
    s.on('readable', () => {}); // keep 'end' detectable
  });
  const stream = await wraith.connect({ ...base, target: target.target });
  stream.resume();
  const daemonPid = wraith.childDaemon().pid;
  const rss0 = process.memoryUsage().rss;
  const drss0 = h.rssOf(daemonPid);
  const chunk = Buffer.alloc(1024 * 1024, 0x5a);
  let written = 0;
  let falses = 0;
  let maxAhead = 0;
  let maxRss = 0;
  let maxDaemonRss = 0;
  while (written < TOTAL) {
    const ok = stream.write(chunk);
    written += chunk.length;
    maxAhead = Math.max(maxAhead, written - received);
    if (!ok) {
      falses++;
      assert.ok(stream.writableLength <= 2 * 1024 * 1024, `writableLength ${stream.writableLength}`);
      await once(stream, 'drain');
    }
    if (written % (16 * 1024 * 1024) === 0) {
      maxRss = Math.max(maxRss, process.memoryUsage().rss - rss0);
      maxDaemonRss = Math.max(maxDaemonRss, h.rssOf(daemonPid) - drss0);
    }
  }
  stream.end();
  await h.waitFor(() => received >= TOTAL, 60000, 'the slow target to read everything');
  assert.ok(falses > 10, `write() returned false ${falses} times`);
  // Node and the daemon hold a bounded amount. (Bytes in flight overall,
  // maxAhead, also include what `wraith serve` buffers towards a slow target;
  // see NOTES-ipc.md §3. The serve() test checks flow control end to end.)
  assert.ok(maxAhead < TOTAL, `max bytes in flight ${maxAhead}`);
  assert.ok(maxRss < 96 * 1024 * 1024, `node RSS grew by ${maxRss}`);
  assert.ok(maxDaemonRss < 96 * 1024 * 1024, `daemon RSS grew by ${maxDaemonRss}`);
  await h.closed(stream);
  await target.close();
});

test('backpressure: a slow reader of a fast target keeps memory flat', { timeout: 90000 }, async () => {
  const TOTAL = 160 * 1024 * 1024;
  let sentByTarget = 0;
  const target = await h.tcpServer(async (s) => {
    const chunk = Buffer.alloc(1024 * 1024, 0x42);
    while (sentByTarget < TOTAL && !s.destroyed) {
      sentByTarget += chunk.length;
      if (!s.write(chunk)) await once(s, 'drain');
    }
    s.end();
  });
  const stream = await wraith.connect({ ...base, target: target.target });
  const daemonPid = wraith.childDaemon().pid;
  const rss0 = process.memoryUsage().rss;
  const drss0 = h.rssOf(daemonPid);
  let got = 0;
  let maxAhead = 0;
  let maxRss = 0;
  let maxDaemonRss = 0;
  let ended = false;
  stream.on('end', () => {
    ended = true;
  });
  // slow consumer: read 256 KiB every 2 ms
  while (!ended) {
    let c;
    let n = 0;
    while (n < 256 * 1024 && (c = stream.read()) !== null) n += c.length;
    got += n;
    maxAhead = Math.max(maxAhead, sentByTarget - got);
    if (got % (16 * 1024 * 1024) < 256 * 1024) {
      maxRss = Math.max(maxRss, process.memoryUsage().rss - rss0);
      maxDaemonRss = Math.max(maxDaemonRss, h.rssOf(daemonPid) - drss0);
    }
    if (n === 0) await Promise.race([once(stream, 'readable'), h.sleep(50)]);
    else await h.sleep(2);
  }
  assert.equal(got, TOTAL);
  assert.ok(stream.readableLength <= 2 * 1024 * 1024);
  assert.ok(maxAhead < 48 * 1024 * 1024, `max bytes in flight ${maxAhead}`);
  assert.ok(maxRss < 96 * 1024 * 1024, `node RSS grew by ${maxRss}`);
  assert.ok(maxDaemonRss < 96 * 1024 * 1024, `daemon RSS grew by ${maxDaemonRss}`);
  stream.end();
  await h.closed(stream);
  await target.close();
});

test('100 concurrent streams, each with its own bytes, share one pooled session', { timeout: 90000 }, async () => {
  const target = await h.tcpServer((s) => s.pipe(s));
  const N = 100;
  const streams = await Promise.all(Array.from({ length: N }, () => wraith.connect({ ...base, target: target.target })));
  assert.equal(new Set(streams.map((s) => s.wraith.id)).size, N);
  assert.equal(new Set(streams.map((s) => s.wraith.session)).size, 1, 'one SSH session for all');
  assert.ok(streams.filter((s) => s.wraith.pooled).length >= N - 1);
  const results = await Promise.all(
    streams.map(async (s, i) => {
      const data = crypto.randomBytes(64 * 1024 + i * 997);
      const got = h.drain(s);
      s.end(data);
      const r = await got;
      return r.hash === sha(data) && r.bytes === data.length;
    }),
  );
  assert.equal(results.filter(Boolean).length, N);
  await Promise.all(streams.map((s) => h.closed(s)));
  await target.close();
});

test('error codes: refused target, wrong key, wrong host key, unknown server, bad options', { timeout: 60000 }, async () => {
  const port = await h.closedPort();
  await assert.rejects(wraith.connect({ ...base, target: `127.0.0.1:${port}` }), (e) => {
    assert.ok(e instanceof Error);
    assert.equal(e.code, 'ECONNREFUSED');
    return true;
  });
  await assert.rejects(wraith.connect({ ...base, identity: keys.stranger, target: `127.0.0.1:${port}` }), { code: 'EAUTH' });
  await assert.rejects(wraith.connect({ ...base, hostKey: keys.otherhostPub }), { code: 'EHOSTKEY' });
  await assert.rejects(wraith.connect({ ...base, server: `127.0.0.1:${port}` }), { code: 'ECONNREFUSED' });
  await assert.rejects(wraith.connect({ ...base, hostKey: undefined }), { code: 'EUSAGE' });
  await assert.rejects(wraith.connect({ ...base, identity: '/nonexistent/key' }), { code: 'EKEY' });
  await assert.rejects(wraith.connect({ ...base, target: 'wraith-secret:1' }), { code: 'EPROHIBITED' });
  await assert.rejects(wraith.connect(null), { code: 'EUSAGE' });
  // the session is fine after all that
  const target = await h.tcpServer((s) => s.end('ok'));
  const s = await wraith.connect({ ...base, target: target.target });
  assert.equal((await h.drain(s)).bytes, 2);
  s.end();
  await target.close();
});

test('key inputs as Buffers and relative paths; a pinned SHA256 fingerprint', { timeout: 30000 }, async () => {
  const fs = require('node:fs');
  const path = require('node:path');
  const target = await h.tcpServer((s) => s.end('hi'));
  const s1 = await wraith.connect({ server: serve.address, identity: fs.readFileSync(keys.client), hostKey: fs.readFileSync(keys.hostPub), target: target.target });
  assert.equal((await h.drain(s1)).bytes, 2);
  s1.end();
  const cwd = process.cwd();
  process.chdir(keys.dir);
  try {
    const s2 = await wraith.connect({ server: serve.address, identity: 'client', hostKey: 'host.pub', target: target.target });
    assert.equal((await h.drain(s2)).bytes, 2);
    s2.end();
  } finally {
    process.chdir(cwd);
  }
  const b64 = fs.readFileSync(keys.hostPub, 'utf8').trim().split(/\s+/)[1];
  const fp = `SHA256:${crypto.createHash('sha256').update(Buffer.from(b64, 'base64')).digest('base64').replace(/=+$/, '')}`;
  const s3 = await wraith.connect({ server: serve.address, identity: keys.client, hostKey: fp, target: target.target });
  assert.equal((await h.drain(s3)).bytes, 2);
  s3.end();
  assert.ok(path.isAbsolute(keys.client));
  await target.close();
});

test('net.Socket niceties: setTimeout emits timeout when idle, not while busy', { timeout: 30000 }, async () => {
  const target = await h.tcpServer((s) => s.resume()); // silent target
  const stream = await wraith.connect({ ...base, target: target.target });
  let timeouts = 0;
  stream.setTimeout(1000, () => timeouts++);
  // busy: a write every 100 ms for 1.5 s keeps it from firing
  for (let i = 0; i < 15; i++) {
    stream.write('x');
    await h.sleep(100);
  }
  assert.equal(timeouts, 0);
  await h.waitFor(() => timeouts === 1, 10000, "'timeout' when idle");
  assert.equal(stream.setNoDelay(true), stream);
  stream.unref().ref();
  stream.destroy();
  await target.close();
});

test('ETIMEDOUT: a server that accepts but never speaks SSH', { timeout: 60000 }, async () => {
  const silent = await h.tcpServer(() => {}); // accepts, says nothing
  const t0 = Date.now();
  await assert.rejects(wraith.connect({ ...base, server: silent.target, connectTimeout: 1 }), { code: 'ETIMEDOUT' });
  assert.ok(Date.now() - t0 < 30000);
  await silent.close();
});
