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
