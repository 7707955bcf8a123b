'use strict';
// Pubsub through the hub of a real `wraith serve`, and serve()+connect()
// through the daemon, with the EventTarget adapter on both ends.
const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const { once } = require('node:events');
const h = require('./helpers');

const wraith = h.loadPackage();
let keys;
let hub;
let base;

test.before(async () => {
  keys = await h.makeKeys();
  hub = await h.startServe(keys);
  base = { server: hub.address, identity: keys.client, hostKey: keys.hostPub };
});

test.after(async () => {
  await wraith.shutdownDaemon();
  if (hub) await hub.stop();
});

function fingerprint(pubPath) {
  const b64 = fs.readFileSync(pubPath, 'utf8').trim().split(/\s+/)[1];
  return `SHA256:${crypto.createHash('sha256').update(Buffer.from(b64, 'base64')).digest('base64').replace(/=+$/, '')}`;
}

function nextEvent(target, type, ms = 10000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no ${type} event within ${ms} ms`)), ms);
    target.addEventListener(
      type,
      (ev) => {
        clearTimeout(t);
        resolve(ev);
      },
      { once: true },
    );
  });
}

test('hub pubsub between two Node clients through `wraith serve`', { timeout: 60000 }, async () => {
  const [sa, sb] = await Promise.all([wraith.connect(base), wraith.connect(base)]);
  assert.equal(sa.wraith.target, 'wraith-control:0');
  const a = wraith.createWraithEventTarget({ stream: sa });
  const b = wraith.createWraithEventTarget({ stream: sb });

  const seenByA = [];
  a.addEventListener('chat', (ev) => seenByA.push(ev.detail));
  // The hub tells every member which types someone wants.
  await b.waitSubscribed('chat', { timeout: 10000 });
  assert.equal(b.emit('news', 'nobody wants this'), false, 'not sent: nobody subscribed to news');
  const got = nextEvent(a, 'chat');
  assert.equal(b.emit('chat', { text: 'hello from b', n: [1, 2, 3] }), true);
  const ev = await got;
  assert.ok(ev instanceof CustomEvent);
  assert.deepEqual(ev.detail, { text: 'hello from b', n: [1, 2, 3] });
  assert.equal(typeof ev.id, 'string');

  // the publisher gets its own event too when it subscribed (retry until b's
  // __subscribe has reached the hub; every try also goes to a)
  const seenByB = [];
  b.addEventListener('chat', (e) => seenByB.push(e.detail));
  const aSaw = [];
  a.addEventListener('chat', (e) => aSaw.push(e.detail));
  let tries = 0;
  while (seenByB.length === 0) {
    assert.ok(++tries < 100, 'b never got its own event back');
    b.dispatchEvent(new CustomEvent('chat', { detail: `to all ${tries}` }));
    await h.sleep(100);
  }
  await h.waitFor(() => aSaw.includes(seenByB[0]), 10000, 'a to get the same event');

  // other direction, binary payload as base64
  const bin = crypto.randomBytes(1000);
  b.addEventListener('blob', () => {});
  await a.waitSubscribed('blob', { timeout: 10000 });
  const gotBlob = nextEvent(b, 'blob');
  a.emit('blob', { data: bin });
  assert.equal((await gotBlob).detail.data, bin.toString('base64'));

  // last listener removed -> the hub unsubscribes -> the other side stops sending
  const onNews = () => {};
  a.addEventListener('news', onNews);
  await b.waitSubscribed('news', { timeout: 10000 });
  a.removeEventListener('news', onNews);
  await h.waitFor(() => !b.peerSubscriptions.has('news'), 10000, 'the hub to unsubscribe news');
  assert.equal(b.emit('news', 'late'), false);

  await Promise.all([a.close(), b.close()]);
  assert.ok(seenByA.length >= 1);
});

test('hub: a malformed frame closes only that client', { timeout: 30000 }, async () => {
  const [sGood, sBad] = await Promise.all([wraith.connect(base), wraith.connect(base)]);
  const good = wraith.createWraithEventTarget({ stream: sGood });
  good.addEventListener('ping', () => {});
  sBad.write(Buffer.from([0, 0, 0, 5, 0x7b, 0x7b, 0x7b, 0x7b, 0x7b])); // "{{{{{" is not JSON
  sBad.resume();
  await new Promise((resolve) => {
    sBad.on('close', resolve);
    sBad.on('error', () => {});
  });
  const [s3] = await Promise.all([wraith.connect(base)]);
  const third = wraith.createWraithEventTarget({ stream: s3 });
  await third.waitSubscribed('ping', { timeout: 10000 });
  const got = nextEvent(good, 'ping');
  third.emit('ping', 1);
  assert.equal((await got).detail, 1);
  await Promise.all([good.close(), third.close()]);
});

test('hub: a type of 600 emoji (600 characters, 1200 UTF-16 units) closes no member; invalid types are refused locally', { timeout: 60000 }, async () => {
  const [sa, sb] = await Promise.all([wraith.connect(base), wraith.connect(base)]);
  const a = wraith.createWraithEventTarget({ stream: sa });
  const b = wraith.createWraithEventTarget({ stream: sb });
  a.addEventListener('ping', () => {});
  await b.waitSubscribed('ping', { timeout: 10000 });
  // a's subscription is announced by the hub to every member, b included
  const wide = '\u{1F600}'.repeat(600);
  const got = nextEvent(a, wide);
  await b.waitSubscribed(wide, { timeout: 10000 });
  assert.equal(b.emit(wide, 'hi'), true);
  assert.equal((await got).detail, 'hi');
  // what the hub would close the whole stream for is refused here, before anything is sent
  for (const t of ['', 'x'.repeat(1025), 'a\ud800']) {
    assert.throws(() => b.addEventListener(t, () => {}), { name: 'TypeError', code: 'EUSAGE' }, JSON.stringify(t));
    assert.throws(() => b.emit(t, 1), { name: 'TypeError', code: 'EUSAGE' }, JSON.stringify(t));
  }
  await h.sleep(300);
  assert.equal(a.isClosed || b.isClosed, false);
  assert.equal(a.error || b.error, null);
  // both still work
  const pong = nextEvent(a, 'ping');
  assert.equal(b.emit('ping', 2), true);
  assert.equal((await pong).detail, 2);
  await Promise.all([a.close(), b.close()]);
});

test('hub: payloads nested 512 levels get through; deeper ones are refused locally and the stream stays open', { timeout: 60000 }, async () => {
  const [sa, sb] = await Promise.all([wraith.connect(base), wraith.connect(base)]);
  const rx = wraith.createWraithEventTarget({ stream: sa });
  const tx = wraith.createWraithEventTarget({ stream: sb });
  const nest = (n) => {
    let p = 0;
    for (let i = 0; i < n; i++) p = [p];
    return p;
  };
  rx.addEventListener('tree', () => {});
  await tx.waitSubscribed('tree', { timeout: 10000 });
  const deep = nextEvent(rx, 'tree');
  assert.equal(tx.emit('tree', nest(512)), true);
  assert.deepEqual((await deep).detail, nest(512));
  // Python's decoder gives up near 1000 levels and the hub would close tx's stream
  assert.throws(() => tx.emit('tree', nest(1200)), { code: 'EFRAME', message: /512 levels/ });
  const after = nextEvent(rx, 'tree');
  assert.equal(tx.emit('tree', 'after'), true);
  assert.equal((await after).detail, 'after');
  assert.equal(tx.isClosed, false);
  assert.equal(tx.error, null);
  await Promise.all([rx.close(), tx.close()]);
});

test('serve() + connect(): events both ways, ConnectionInfo, point-to-point', { timeout: 60000 }, async () => {
  const server = await wraith.serve({ hostKey: keys.host, authorizedKeys: keys.authorizedKeys, listen: '127.0.0.1:0' });
  assert.match(server.address, /^127\.0\.0\.1:\d+$/);
  const incoming = new Promise((resolve) => server.onConnection((stream, info) => resolve({ stream, info })));
  const cstream = await wraith.connect({ server: server.address, identity: keys.client, hostKey: keys.hostPub });
  const { stream: sstream, info } = await incoming;
  assert.equal(info.remoteAddress, '127.0.0.1');
  assert.equal(info.transport, 'tcp');
  assert.equal(typeof info.user, 'string');
  assert.equal(info.keyFingerprint, fingerprint(keys.clientPub));
  assert.equal(sstream.wraith.role, 'server');

  const client = wraith.createWraithEventTarget({ stream: cstream });
  const srv = wraith.createWraithEventTarget({ stream: sstream });
  client.addEventListener('pong', () => {});
  srv.addEventListener('ping', () => {});
  await Promise.all([srv.waitSubscribed('pong', { timeout: 10000 }), client.waitSubscribed('ping', { timeout: 10000 })]);
  for (let i = 0; i < 20; i++) {
    const gotPing = nextEvent(srv, 'ping');
    assert.equal(client.emit('ping', { i }), true);
    const ping = await gotPing;
    const gotPong = nextEvent(client, 'pong');
    assert.equal(srv.emit('pong', { i: ping.detail.i, ok: true }), true);
    assert.deepEqual((await gotPong).detail, { i, ok: true });
  }
  assert.equal(srv.emit('unwanted', 1), false, 'point-to-point: the client never subscribed');
  assert.equal(client.emit('unwanted', 1), false);

  // close on one side closes the other adapter
  await client.close();
  await srv.closed;
  assert.equal(srv.isClosed, true);
  await server.close();
  await assert.rejects(wraith.connect({ server: server.address, identity: keys.client, hostKey: keys.hostPub }), { code: 'ECONNREFUSED' });
});

test('serve(): bytes intact and flow control end to end (fast writer, slow server-side reader)', { timeout: 90000 }, async () => {
  // allowHalfOpen: the server side answers after the client's EOF
  const server = await wraith.serve({ hostKey: keys.host, authorizedKeys: keys.authorizedKeys, listen: '127.0.0.1:0', allowHalfOpen: true });
  const conns = [];
  server.onConnection((stream) => conns.push(stream));
  const c = await wraith.connect({ server: server.address, identity: keys.client, hostKey: keys.hostPub });
  await h.waitFor(() => conns.length === 1, 10000, 'the incoming stream');
  const s = conns[0];

  // 1) 32 MiB with hashes, then the server answers and both ends close cleanly
  const data = crypto.randomBytes(32 * 1024 * 1024);
  // (no for-await here: finishing a for-await loop destroys the stream, and
  // this side still has to answer)
  const gotByServer = new Promise((resolve, reject) => {
    const hh = crypto.createHash('sha256');
    let n = 0;
    let slowed = false;
    s.on('data', (chunk) => {
      hh.update(chunk);
      n += chunk.length;
      if (!slowed && n >= 8 * 1024 * 1024) {
        slowed = true; // stop reading a while: flow control must hold the writer back
        s.pause();
        setTimeout(() => s.resume(), 300);
      }
    });
    s.on('end', () => resolve({ n, hash: hh.digest('hex') }));
    s.on('error', reject);
  });
  let falses = 0;
  const rss0 = process.memoryUsage().rss;
  const daemonPid = wraith.childDaemon().pid;
  const drss0 = h.rssOf(daemonPid);
  let maxRss = 0;
  let maxDaemonRss = 0;
  for (let off = 0; off < data.length; off += 1024 * 1024) {
    if (!c.write(data.subarray(off, off + 1024 * 1024))) {
      falses++;
      await once(c, 'drain');
    }
    maxRss = Math.max(maxRss, process.memoryUsage().rss - rss0);
    maxDaemonRss = Math.max(maxDaemonRss, h.rssOf(daemonPid) - drss0);
  }
  c.end();
  const r = await gotByServer;
  assert.equal(r.n, data.length);
  assert.equal(r.hash, crypto.createHash('sha256').update(data).digest('hex'));
  assert.ok(falses > 0, 'write() returned false at least once');
  assert.ok(maxRss < 160 * 1024 * 1024, `node RSS grew by ${maxRss}`);
  assert.ok(maxDaemonRss < 96 * 1024 * 1024, `daemon RSS grew by ${maxDaemonRss}`);
  // server -> client after the client's EOF (half-close through serve())
  const back = h.drain(c);
  s.end(Buffer.from('done'));
  const rb = await back;
  assert.equal(rb.bytes, 4);
  await Promise.all([h.closed(c), h.closed(s)]);
  await server.close();
});

test('serve(): a stalled reader really stops the writer (bounded bytes in flight)', { timeout: 60000 }, async () => {
  const server = await wraith.serve({ hostKey: keys.host, authorizedKeys: keys.authorizedKeys, listen: '127.0.0.1:0' });
  const conns = [];
  server.onConnection((stream) => conns.push(stream));
  const c = await wraith.connect({ server: server.address, identity: keys.client, hostKey: keys.hostPub });
  await h.waitFor(() => conns.length === 1, 10000, 'the incoming stream');
  const s = conns[0];
  s.pause(); // never read
  const chunk = Buffer.alloc(1024 * 1024, 7);
  // write until write() has said false and no 'drain' came for a while
  let stalled = false;
  for (let i = 0; i < 512 && !stalled; i++) {
    if (!c.write(chunk)) {
      stalled = await Promise.race([once(c, 'drain').then(() => false), h.sleep(1500).then(() => true)]);
    }
  }
  assert.equal(stalled, true, 'the writer was stopped');
  const inFlight = c.bytesWritten - s.bytesRead;
  assert.ok(inFlight < 64 * 1024 * 1024, `${inFlight} bytes went out while nobody read`);
  c.destroy();
  s.destroy();
  await server.close();
});

test('serve(): errors have codes (address in use, bad key), async iteration works', { timeout: 60000 }, async () => {
  const port = hub.address.split(':')[1];
  await assert.rejects(wraith.serve({ hostKey: keys.host, authorizedKeys: keys.authorizedKeys, listen: `127.0.0.1:${port}` }), { code: 'EADDRINUSE' });
  await assert.rejects(wraith.serve({ hostKey: '/nonexistent/key', authorizedKeys: keys.authorizedKeys, listen: '127.0.0.1:0' }), (e) => {
    assert.match(e.code, /^(EKEY|EUSAGE|ESERVE)$/);
    return true;
  });
  const server = await wraith.serve({ hostKey: fs.readFileSync(keys.host), authorizedKeys: fs.readFileSync(keys.authorizedKeys), listen: '127.0.0.1:0' });
  const c = await wraith.connect({ server: server.address, identity: keys.client, hostKey: keys.hostPub });
  let accepted;
  for await (const { stream, info } of server) {
    assert.equal(info.keyFingerprint, fingerprint(keys.clientPub));
    accepted = stream;
    stream.resume(); // read the client's EOF too, so the stream can end cleanly
    stream.end('hi');
    break;
  }
  assert.equal((await h.drain(c)).bytes, 2);
  c.end();
  await Promise.all([h.closed(c), h.closed(accepted)]);
  await server.close();
  assert.equal(server.closed, true);
});
