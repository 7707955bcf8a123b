'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const { encodeFrame, FrameDecoder } = require('../../lib/framing');

test('encode/decode round trip, split at every byte boundary', () => {
  const envs = [
    { type: 'a', id: '1', payload: { x: 1, s: 'héllo ✓' } },
    { type: 'b', id: '2', payload: null },
    { type: 'c', id: '3', payload: [1, 2, 3] },
  ];
  const wire = Buffer.concat(envs.map((e) => encodeFrame(e)));
  assert.equal(wire.readUInt32BE(0), Buffer.byteLength(JSON.stringify(envs[0])));
  for (let cut = 0; cut <= wire.length; cut++) {
    const d = new FrameDecoder();
    const got = [...d.push(wire.subarray(0, cut)), ...d.push(wire.subarray(cut))];
    assert.deepEqual(got, envs);
    assert.equal(d.partial, false);
  }
  const d = new FrameDecoder();
  const got = [];
  for (const b of wire) got.push(...d.push(Buffer.from([b])));
  assert.deepEqual(got, envs);
});

test('binary payload data is base64', () => {
  const buf = Buffer.from([0, 1, 2, 255]);
  const f = encodeFrame({ type: 't', id: 'i', payload: { b: buf, u: new Uint8Array([9]) } });
  const [env] = new FrameDecoder().push(f);
  assert.equal(env.payload.b, buf.toString('base64'));
  assert.equal(env.payload.u, 'CQ==');
});

test('oversize frame: EFRAME, earlier frames still returned, later input ignored', () => {
  const d = new FrameDecoder({ maxSize: 64 });
  const ok = encodeFrame({ type: 'ok', id: '1', payload: 1 });
  const bad = Buffer.alloc(4);
  bad.writeUInt32BE(65);
  const got = d.push(Buffer.concat([ok, bad]));
  assert.deepEqual(got, [{ type: 'ok', id: '1', payload: 1 }]);
  assert.equal(d.error.code, 'EFRAME');
  assert.deepEqual(d.push(ok), []);
  assert.throws(() => encodeFrame({ type: 'x', id: '1', payload: 'y'.repeat(100) }, 64), { code: 'EFRAME' });
});

test('invalid JSON, invalid UTF-8 and non-envelopes are EFRAME', () => {
  const frame = (body) => {
    const b = Buffer.from(body);
    const h = Buffer.alloc(4);
    h.writeUInt32BE(b.length);
    return Buffer.concat([h, b]);
  };
  for (const body of ['{nope', Buffer.from([0x7b, 0xff, 0x7d]), '[1,2]', '"str"', '{"id":"x"}', '{"type":3}', '']) {
    const d = new FrameDecoder();
    assert.deepEqual(d.push(frame(body)), []);
    assert.equal(d.error && d.error.code, 'EFRAME', String(body));
  }
});

test('partial frame is reported', () => {
  const d = new FrameDecoder();
  const f = encodeFrame({ type: 'a', id: '1', payload: 1 });
  d.push(f.subarray(0, 6));
  assert.equal(d.partial, true);
  assert.equal(d.buffered, 2);
});

// -- parity with the Python decoder (wraith_core/protocol/envelope.py) -----------------------

function rawFrame(body) {
  const b = Buffer.isBuffer(body) ? body : Buffer.from(body);
  const h = Buffer.alloc(4);
  h.writeUInt32BE(b.length);
  return Buffer.concat([h, b]);
}

test('type names are 1..1024 code points, not UTF-16 units, and valid Unicode (Python check_type)', () => {
  const emoji = '\u{1F600}';
  // 1024 astral characters are 2048 UTF-16 units but 1024 characters for Python: valid
  for (const ok of ['x'.repeat(1024), emoji.repeat(600), emoji.repeat(1024), `a${emoji}b`, '__subscribe']) {
    const [env] = new FrameDecoder().push(encodeFrame({ type: ok, id: 'i', payload: 1 }));
    assert.equal(env.type, ok);
  }
  for (const bad of ['', 'x'.repeat(1025), emoji.repeat(1025), `${emoji.repeat(1024)}x`, 'a\ud800', '\udc00b', `${emoji}\ud83d`]) {
    assert.throws(() => encodeFrame({ type: bad, id: 'i', payload: 1 }), (e) => e instanceof TypeError && e.code === 'EUSAGE', JSON.stringify(bad));
    // and a peer sending one (JSON escapes make lone surrogates expressible) breaks the stream
    const d = new FrameDecoder();
    assert.deepEqual(d.push(rawFrame(JSON.stringify({ type: bad, id: 'i', payload: 1 }))), [], JSON.stringify(bad));
    assert.equal(d.error && d.error.code, 'EFRAME', JSON.stringify(bad));
  }
});

test('decoder rejects what Python rejects: a UTF-8 BOM, a missing or non-string id', () => {
  const body = JSON.stringify({ type: 't', id: 'i', payload: 1 });
  const bom = Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(body)]);
  for (const bad of [bom, '{"type":"t","payload":1}', '{"type":"t","id":12345,"payload":1}', '{"type":"t","id":null}', '{"type":"t","id":["x"]}']) {
    const d = new FrameDecoder();
    const ok = rawFrame('{"type":"ok","id":"1"}');
    assert.deepEqual(d.push(Buffer.concat([ok, rawFrame(bad), ok])), [{ type: 'ok', id: '1' }], String(bad));
    assert.equal(d.error && d.error.code, 'EFRAME', String(bad));
  }
  // a U+FEFF inside a string is just a character
  const [env] = new FrameDecoder().push(rawFrame('{"type":"t","id":"","payload":"\ufeffx"}'));
  assert.deepEqual(env, { type: 't', id: '', payload: '\ufeffx' });
  assert.throws(() => encodeFrame({ type: 't', id: 1, payload: 1 }), { code: 'EUSAGE' });
  assert.throws(() => encodeFrame({ type: 't', payload: 1 }), { code: 'EUSAGE' });
});

test('payloads may nest 512 levels; deeper is refused locally with EFRAME (Python fails near 1000)', () => {
  const nest = (n, leaf = 0) => {
    let p = leaf;
    for (let i = 0; i < n; i++) p = i % 2 ? { k: p } : [p];
    return p;
  };
  const f = encodeFrame({ type: 't', id: 'i', payload: nest(512) });
  assert.deepEqual(new FrameDecoder().push(f)[0].payload, nest(512));
  assert.doesNotThrow(() => encodeFrame({ type: 't', id: 'i', payload: [nest(500), nest(511), { a: nest(510) }] }));
  for (const deep of [nest(513), nest(1200), [1, [2, nest(511)]], { a: nest(10), b: { c: nest(511) } }]) {
    assert.throws(() => encodeFrame({ type: 't', id: 'i', payload: deep }), { code: 'EFRAME', message: /deeper than 512 levels/ });
  }
  // the same object twice is fine (not a cycle), its depth counted where it appears
  const shared = nest(300);
  assert.doesNotThrow(() => encodeFrame({ type: 't', id: 'i', payload: [shared, [[shared]]] }));
  assert.throws(() => encodeFrame({ type: 't', id: 'i', payload: [shared, nest(212, shared)] }), { code: 'EFRAME' });
});

test('a frame trickled in 1-byte chunks costs O(frame size) memory, not a Buffer per chunk', () => {
  const v8 = require('node:v8');
  const vm = require('node:vm');
  v8.setFlagsFromString('--expose-gc');
  const gc = vm.runInNewContext('gc');
  const N = 1024 * 1024;
  // each chunk its own allocation, as socket reads are
  const body = Buffer.from(JSON.stringify({ type: 't', id: 'i', payload: 'p'.repeat(N - 40) }));
  const frame = rawFrame(body);
  const d = new FrameDecoder();
  gc();
  const used = () => {
    const m = process.memoryUsage();
    return m.heapUsed + m.arrayBuffers;
  };
  const before = used();
  const last = frame.length - 1;
  for (let i = 0; i < last; i++) d.push(Uint8Array.of(frame[i]));
  gc();
  const grown = used() - before;
  assert.equal(d.partial, true);
  assert.equal(d.buffered, last - 4);
  assert.ok(grown < 8 * frame.length, `holding ${frame.length} bytes of a frame cost ${grown} bytes`);
  const [env] = d.push(Uint8Array.of(frame[last]));
  assert.equal(env.payload.length, N - 40);
  assert.equal(d.partial, false);
});

test('mixed frame sizes in random chunk sizes decode exactly', () => {
  let seed = 1;
  const rand = (n) => {
    seed = (seed * 1103515245 + 12345) % 2147483648;
    return seed % n;
  };
  const envs = [];
  for (let i = 0; i < 60; i++) {
    const size = [0, 10, 300, 5000, 70000, 300000][rand(6)];
    envs.push({ type: `t${i}`, id: String(i), payload: 'x'.repeat(size) });
  }
  const wire = Buffer.concat(envs.map((e) => encodeFrame(e)));
  for (const maxChunk of [1, 7, 100, 4096, 65536, 1 << 20]) {
    if (maxChunk === 1 && wire.length > 2e6) continue;
    const d = new FrameDecoder();
    const got = [];
    for (let pos = 0; pos < wire.length; ) {
      const n = 1 + rand(maxChunk);
      got.push(...d.push(Buffer.from(wire.subarray(pos, pos + n))));
      pos += n;
    }
    assert.equal(d.error, null);
    assert.equal(got.length, envs.length, `chunks up to ${maxChunk}`);
    assert.deepEqual(got, envs);
    assert.equal(d.partial, false);
  }
});
