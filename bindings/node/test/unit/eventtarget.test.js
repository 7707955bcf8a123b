'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const net = require('node:net');
const { once } = require('node:events');
const { createWraithEventTarget, WraithEventTarget } = require('../../lib/eventtarget');
const { encodeFrame, FrameDecoder } = require('../../lib/framing');

async function socketPair() {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const accepted = once(server, 'connection');
  const a = net.connect(server.address().port, '127.0.0.1');
  await once(a, 'connect');
  const [b] = await accepted;
  server.close();
  return [a, b];
}

// Collect raw envelopes arriving on a socket (the "peer" seen from the wire).
function rawReader(sock) {
  const dec = new FrameDecoder();
  const got = [];
  const waiters = [];
  sock.on('data', (c) => {
    got.push(...dec.push(c));
    for (const w of waiters.splice(0)) w();
  });
  return {
    got,
    async waitFor(n, ms = 2000) {
      const end = Date.now() + ms;
      while (got.length < n) {
        if (Date.now() > end) throw new Error(`timed out waiting for ${n} envelopes, have ${JSON.stringify(got)}`);
        await new Promise((r) => {
          waiters.push(r);
          setTimeout(r, 50);
        });
      }
      return got;
    },
  };
}

const tick = (ms = 30) => new Promise((r) => setTimeout(r, ms));

test('first listener subscribes, last removal unsubscribes, extra listeners do not', { timeout: 10000 }, async () => {
  const [a, b] = await socketPair();
  const raw = rawReader(b);
  const et = createWraithEventTarget({ stream: a });
  assert.ok(et instanceof EventTarget);
  assert.ok(et instanceof WraithEventTarget);
  const f1 = () => {};
  const f2 = () => {};
  et.addEventListener('chat', f1);
  et.addEventListener('chat', f2);
  et.addEventListener('chat', f1); // duplicate: ignored like EventTarget does
  et.removeEventListener('chat', f1);
  await tick();
  assert.deepEqual(raw.got.map((e) => [e.type, e.payload]), [['__subscribe', { type: 'chat' }]]);
  et.removeEventListener('chat', f2);
  const got = await raw.waitFor(2);
  assert.deepEqual(got[1].type, '__unsubscribe');
  assert.deepEqual(got[1].payload, { type: 'chat' });
  assert.equal(typeof got[0].id, 'string');
  assert.ok(got[0].id.length > 0);
  await et.close();
  b.destroy();
});

test('once listeners and AbortSignal removal also unsubscribe', { timeout: 10000 }, async () => {
  const [a, b] = await socketPair();
  const raw = rawReader(a);
  const sender = createWraithEventTarget({ stream: a, pointToPoint: false });
  const et = createWraithEventTarget({ stream: b });
  const seen = [];
  et.addEventListener('x', (ev) => seen.push(ev.detail), { once: true });
  const ac = new AbortController();
  et.addEventListener('y', () => {}, { signal: ac.signal });
  await raw.waitFor(2);
  sender.emit('x', 1);
  sender.emit('x', 2);
  ac.abort();
  const got = await raw.waitFor(4);
  assert.deepEqual(got.map((e) => `${e.type}:${e.payload.type}`).sort(), ['__subscribe:x', '__subscribe:y', '__unsubscribe:x', '__unsubscribe:y']);
  assert.deepEqual(seen, [1]);
  await Promise.all([sender.close(), et.close()]);
});

test('dispatchEvent sends {type,id,payload: detail}; received envelopes are CustomEvents', { timeout: 10000 }, async () => {
  const [a, b] = await socketPair();
  const left = createWraithEventTarget({ stream: a });
  const right = createWraithEventTarget({ stream: b });
  const got = new Promise((resolve) => right.addEventListener('greet', resolve));
  // Point-to-point: left only sends what right subscribed to, so wait for the subscription.
  await left.waitSubscribed('greet', { timeout: 5000 });
  assert.equal(left.dispatchEvent(new CustomEvent('ignored', { detail: 1 })), false);
  assert.equal(left.dispatchEvent(new CustomEvent('greet', { detail: { hello: 'wörld', n: [1, 2] } })), true);
  const ev = await got;
  assert.ok(ev instanceof CustomEvent);
  assert.equal(ev.type, 'greet');
  assert.deepEqual(ev.detail, { hello: 'wörld', n: [1, 2] });
  assert.equal(typeof ev.id, 'string');
  // and the other way
  const back = new Promise((resolve) => left.addEventListener('reply', (e) => resolve(e.detail)));
  await right.waitSubscribed('reply', { timeout: 5000 });
  assert.equal(right.emit('reply', 42), true);
  assert.equal(await back, 42);
  await Promise.all([left.close(), right.close()]);
  assert.equal(a.destroyed && b.destroyed, true);
});

test('point-to-point: unsubscribed types are never put on the wire', { timeout: 10000 }, async () => {
  const [a, b] = await socketPair();
  const raw = rawReader(b);
  const et = createWraithEventTarget({ stream: a });
  assert.equal(et.emit('nobody', 1), false);
  b.write(encodeFrame({ type: '__subscribe', id: '1', payload: { type: 'some' } }));
  while (!et.peerSubscriptions.has('some')) await tick(5);
  et.emit('nobody', 2);
  et.emit('some', 3);
  b.write(encodeFrame({ type: '__unsubscribe', id: '2', payload: { type: 'some' } }));
  while (et.peerSubscriptions.has('some')) await tick(5);
  et.emit('some', 4);
  await tick(50);
  assert.deepEqual(raw.got.map((e) => [e.type, e.payload]), [['some', 3]]);
  await et.close();
  b.destroy();
});

test('pointToPoint:false sends everything (for a hub that announces nothing)', { timeout: 10000 }, async () => {
  const [a, b] = await socketPair();
  const raw = rawReader(b);
  const et = createWraithEventTarget({ stream: a, pointToPoint: false });
  et.emit('t1', 'x');
  et.dispatchEvent(Object.assign(new CustomEvent('t2'), { id: 'my-id' }));
  const got = await raw.waitFor(2);
  assert.deepEqual(got[0].type, 't1');
  assert.deepEqual(got[0].payload, 'x');
  assert.deepEqual(got[1], { type: 't2', id: 'my-id', payload: null });
  assert.throws(() => et.emit('__subscribe', {}), TypeError);
  await et.close();
  b.destroy();
});

test('events of types nobody listens to are dropped; __ types are never dispatched', { timeout: 10000 }, async () => {
  const [a, b] = await socketPair();
  const et = createWraithEventTarget({ stream: a });
  const seen = [];
  et.addEventListener('yes', (e) => seen.push(e.detail));
  b.write(encodeFrame({ type: 'no', id: '1', payload: 1 }));
  b.write(encodeFrame({ type: 'yes', id: '2', payload: 2 }));
  b.write(encodeFrame({ type: '__weird', id: '3', payload: 3 }));
  b.write(encodeFrame({ type: 'yes', id: '4' }));
  while (seen.length < 2) await tick(5);
  assert.deepEqual(seen, [2, null]);
  const closing = et.close();
  b.destroy();
  await closing;
});

test('malformed frame closes that stream with EFRAME; oversize too', { timeout: 10000 }, async () => {
  for (const bad of [Buffer.from([0, 0, 0, 3, 0x7b, 0x7b, 0x7b]), Buffer.from([0x7f, 0xff, 0xff, 0xff])]) {
    const [a, b] = await socketPair();
    let reported;
    const et = createWraithEventTarget({ stream: a, onClose: (e) => (reported = e) });
    const seen = [];
    et.addEventListener('ok', (e) => seen.push(e.detail));
    b.write(Buffer.concat([encodeFrame({ type: 'ok', id: '1', payload: 'before' }), bad]));
    await et.closed;
    assert.deepEqual(seen, ['before']);
    assert.equal(et.error.code, 'EFRAME');
    assert.equal(reported.code, 'EFRAME');
    assert.equal(et.isClosed, true);
    assert.equal(et.emit('ok', 1), false);
    b.destroy();
  }
});

test('a peer subscribing to more than 65536 types closes the stream with EFRAME', { timeout: 20000 }, async () => {
  const [a, b] = await socketPair();
  const et = createWraithEventTarget({ stream: a });
  const frames = [];
  for (let i = 0; i <= 65536; i++) frames.push(encodeFrame({ type: '__subscribe', id: '', payload: { type: `t${i}` } }));
  b.write(Buffer.concat(frames));
  await et.closed;
  assert.equal(et.error.code, 'EFRAME');
  assert.match(et.error.message, /more than 65536 types/);
  b.destroy();
});

test('a peer subscribing to a type name over 1024 characters closes the stream with EFRAME', { timeout: 10000 }, async () => {
  const [a, b] = await socketPair();
  const et = createWraithEventTarget({ stream: a });
  b.write(encodeFrame({ type: '__subscribe', id: '', payload: { type: 'x'.repeat(1024) } }));
  await et.waitSubscribed('x'.repeat(1024), { timeout: 5000 });
  b.write(encodeFrame({ type: '__subscribe', id: '', payload: { type: 'y'.repeat(1025) } }));
  await et.closed;
  assert.equal(et.error.code, 'EFRAME');
  b.destroy();
});

test('a peer may subscribe to a type of up to 1024 code points (astral characters count once)', { timeout: 10000 }, async () => {
  const [a, b] = await socketPair();
  const et = createWraithEventTarget({ stream: a });
  const wide = '\u{1F600}'.repeat(600); // 600 characters for Python, 1200 UTF-16 units
  const widest = '\u{1F600}'.repeat(1024);
  b.write(encodeFrame({ type: '__subscribe', id: '', payload: { type: wide } }));
  b.write(encodeFrame({ type: '__subscribe', id: '', payload: { type: widest } }));
  await et.waitSubscribed(widest, { timeout: 5000 });
  assert.equal(et.isClosed, false);
  assert.equal(et.error, null);
  assert.ok(et.peerSubscriptions.has(wide));
  const raw = rawReader(b);
  assert.equal(et.emit(wide, 'still open'), true);
  assert.deepEqual((await raw.waitFor(1))[0].payload, 'still open');
  // 1025 characters, or a lone surrogate (a JSON escape), is a broken peer, as for Python
  b.write(encodeFrame({ type: '__subscribe', id: '', payload: { type: '\u{1F600}'.repeat(1025) } }));
  await et.closed;
  assert.equal(et.error.code, 'EFRAME');
  b.destroy();
  const [c, d] = await socketPair();
  const et2 = createWraithEventTarget({ stream: c });
  d.write(encodeFrame({ type: '__subscribe', id: '', payload: { type: 'a\ud800' } }));
  await et2.closed;
  assert.equal(et2.error.code, 'EFRAME');
  d.destroy();
});

test('addEventListener/dispatchEvent refuse invalid types locally: TypeError EUSAGE, nothing sent, stream open', { timeout: 10000 }, async () => {
  const [a, b] = await socketPair();
  const raw = rawReader(b);
  const et = createWraithEventTarget({ stream: a, pointToPoint: false });
  et.addEventListener('chat', () => {});
  const bad = ['', 'x'.repeat(1025), '\u{1F600}'.repeat(1025), 'a\ud800', '\udc00', `${'\u{1F600}'.repeat(3)}\ud83d`];
  for (const t of bad) {
    const isUsage = (e) => e instanceof TypeError && e.code === 'EUSAGE';
    assert.throws(() => et.addEventListener(t, () => {}), isUsage, JSON.stringify(t));
    assert.throws(() => et.dispatchEvent(new CustomEvent(t, { detail: 1 })), isUsage, JSON.stringify(t));
    assert.throws(() => et.emit(t, 1), isUsage, JSON.stringify(t));
  }
  assert.deepEqual([...et.subscriptions], ['chat']);
  // the longest valid ones still work
  const widest = '\u{1F600}'.repeat(1024);
  et.addEventListener(widest, () => {});
  assert.equal(et.emit(widest, 'w'), true);
  assert.equal(et.emit('chat', 'c'), true);
  const got = await raw.waitFor(4);
  await tick(50);
  assert.deepEqual(
    raw.got.map((e) => [e.type, e.payload]),
    [['__subscribe', { type: 'chat' }], ['__subscribe', { type: widest }], [widest, 'w'], ['chat', 'c']],
  );
  assert.equal(got.length, 4);
  assert.equal(et.isClosed, false);
  await et.close();
  b.destroy();
});

test('dispatchEvent refuses a payload nested deeper than 512 levels (EFRAME), sends nothing, stream stays open', { timeout: 10000 }, async () => {
  const [a, b] = await socketPair();
  const raw = rawReader(b);
  const et = createWraithEventTarget({ stream: a, pointToPoint: false });
  const nest = (n) => {
    let p = 0;
    for (let i = 0; i < n; i++) p = [p];
    return p;
  };
  assert.equal(et.emit('tree', nest(512)), true);
  assert.throws(() => et.emit('tree', nest(513)), { code: 'EFRAME', message: /512 levels/ });
  assert.throws(() => et.emit('tree', nest(1200)), { code: 'EFRAME' });
  assert.equal(et.emit('tree', 'after'), true);
  const got = await raw.waitFor(2);
  await tick(50);
  assert.equal(raw.got.length, 2);
  assert.deepEqual(got[0].payload, nest(512));
  assert.equal(got[1].payload, 'after');
  assert.equal(et.isClosed, false);
  assert.equal(et.error, null);
  await et.close();
  b.destroy();
});

test('close() half-closes; the peer adapter closes too; closed resolves on both', { timeout: 10000 }, async () => {
  const [a, b] = await socketPair();
  const left = createWraithEventTarget({ stream: a });
  const right = createWraithEventTarget({ stream: b });
  await left.close();
  await right.closed;
  assert.equal(right.isClosed, true);
  assert.equal(right.error, null);
});

test('flush() waits for drain under backpressure', { timeout: 20000 }, async () => {
  const [a, b] = await socketPair();
  b.pause();
  const et = createWraithEventTarget({ stream: a, pointToPoint: false });
  const big = 'z'.repeat(256 * 1024);
  let n = 0;
  while (!et.needsDrain && n < 10000) {
    assert.equal(et.emit('big', big), true);
    n++;
  }
  assert.equal(et.needsDrain, true, 'the buffer eventually reports full');
  let flushed = false;
  const p = et.flush().then(() => (flushed = true));
  await tick(50);
  assert.equal(flushed, false);
  b.resume();
  await p;
  assert.equal(flushed, true);
  await et.close();
  b.destroy();
});

test('concurrent flush() calls share one pending flush: one drain and one close listener', { timeout: 20000 }, async () => {
  const [a, b] = await socketPair();
  b.pause();
  const et = createWraithEventTarget({ stream: a, pointToPoint: false });
  const big = 'z'.repeat(256 * 1024);
  while (!et.needsDrain) et.emit('big', big);
  const drain0 = a.listenerCount('drain');
  const close0 = a.listenerCount('close');
  const warnings = [];
  const onWarning = (w) => warnings.push(w);
  process.on('warning', onWarning);
  try {
    const flushes = Array.from({ length: 20 }, () => et.flush());
    assert.equal(a.listenerCount('drain') - drain0, 1);
    assert.equal(a.listenerCount('close') - close0, 1);
    b.resume();
    await Promise.all(flushes);
    assert.equal(a.listenerCount('drain'), drain0);
    assert.equal(a.listenerCount('close'), close0);
    // the next backpressure gets a fresh flush
    b.pause();
    while (!et.needsDrain) et.emit('big', big);
    const p = et.flush();
    b.resume();
    await p;
    await tick(10);
    assert.deepEqual(warnings.map((w) => w.name), []);
  } finally {
    process.off('warning', onWarning);
  }
  await et.close();
  b.destroy();
});

test('waitSubscribed: timeout, and rejection when the target closes', { timeout: 10000 }, async () => {
  const [a, b] = await socketPair();
  const et = createWraithEventTarget({ stream: a });
  await assert.rejects(et.waitSubscribed('never', { timeout: 50 }), { code: 'ETIMEDOUT' });
  const p = et.waitSubscribed('never');
  b.destroy();
  await assert.rejects(p, (e) => e instanceof Error);
});

test('close() destroys the stream when the peer never ends its side', { timeout: 10000 }, async () => {
  const [a, b] = await socketPair();
  b.pause(); // never reads, so never sees our EOF
  const et = createWraithEventTarget({ stream: a, closeTimeout: 200 });
  const t0 = Date.now();
  await et.close();
  assert.ok(Date.now() - t0 < 3000);
  assert.equal(a.destroyed, true);
  b.destroy();
});

test("events.on() iterates an event type; leaving the loop unsubscribes", { timeout: 10000 }, async () => {
  const { on } = require('node:events');
  const [a, b] = await socketPair();
  const left = createWraithEventTarget({ stream: a });
  const right = createWraithEventTarget({ stream: b });
  (async () => {
    await right.waitSubscribed('x', { timeout: 5000 });
    for (let i = 0; i < 3; i++) right.emit('x', i);
  })();
  const got = [];
  for await (const [ev] of on(left, 'x')) {
    got.push(ev.detail);
    if (got.length === 3) break;
  }
  assert.deepEqual(got, [0, 1, 2]);
  while (right.peerSubscriptions.has('x')) await tick(5);
  await Promise.all([left.close(), right.closed]);
});

test('bad construction is EUSAGE', () => {
  assert.throws(() => createWraithEventTarget({}), { code: 'EUSAGE' });
  assert.throws(() => createWraithEventTarget(), { code: 'EUSAGE' });
});
