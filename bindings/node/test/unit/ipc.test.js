'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const { encode: mpEncode, decode: mpDecode } = require('@msgpack/msgpack');
const ipc = require('../../lib/ipc');

test('data messages: fast encoder matches msgpack, fast decoder matches general one', () => {
  for (const n of [1, 255, 256, 65535, 65536, 300000]) {
    const payload = Buffer.alloc(n, 7);
    const wire = ipc.encodeData(payload);
    assert.deepEqual(Buffer.from(mpEncode({ type: 'data', data: payload })), wire);
    const got = ipc.decode(wire);
    assert.equal(got.type, 'data');
    assert.ok(Buffer.isBuffer(got.data));
    assert.ok(got.data.equals(payload));
    const chunks = [payload.subarray(0, 1), payload.subarray(1)];
    assert.deepEqual(ipc.encodeDataChunks(chunks, n), wire);
  }
  // data with keys in the other order still decodes (general path)
  const other = Buffer.from(mpEncode({ data: Buffer.from('hi'), type: 'data' }));
  assert.equal(ipc.decode(other).data.toString(), 'hi');
});

test('control messages round trip; garbage is EDAEMON', () => {
  assert.deepEqual(mpDecode(ipc.EOF_BYTES), { type: 'eof' });
  const open = ipc.encode({ type: 'open', kind: 'connect', options: { identity: Buffer.from('k'), user: undefined } });
  assert.deepEqual(mpDecode(open) && { ...mpDecode(open), options: { identity: Buffer.from(mpDecode(open).options.identity) } }, { type: 'open', kind: 'connect', options: { identity: Buffer.from('k') } });
  assert.deepEqual(ipc.decode(Buffer.from(mpEncode({ type: 'error', code: 'EAUTH', message: 'no' }))), {
    type: 'error', code: 'EAUTH', message: 'no',
  });
  for (const bad of [Buffer.from([0xc1]), Buffer.from(mpEncode([1])), Buffer.from(mpEncode({ x: 1 })), Buffer.from(mpEncode({ type: 'data', data: 'str' }))]) {
    assert.throws(() => ipc.decode(bad), { code: 'EDAEMON' });
  }
});

test('hostile control messages are refused before decoding: > 1 MiB, > 8 levels, long arrays/maps', () => {
  const { encode: mp } = require('@msgpack/msgpack');
  const bomb = (count, nested) => {
    const head = Buffer.from(mp({ type: 'eof', junk: null }));
    const body = Buffer.alloc(5 + count, nested ? 0x91 : 0x90);
    body[0] = 0xdd;
    body.writeUInt32BE(nested ? 1 : count, 1);
    if (nested) body[body.length - 1] = 0x90;
    return Buffer.concat([head.subarray(0, head.length - 1), body]);
  };
  for (const [msg, why] of [
    [bomb(16 * 1024 * 1024 - 64, false), /not data/], // was ~0.7 GB and ~1 s of a blocked loop
    [bomb(16 * 1024 * 1024 - 64, true), /not data/], // was several GB and seconds
    [bomb(1024 * 1024 - 64, true), /deeper than 8/],
    [bomb(1025, false), /maxArrayLength/],
  ]) {
    const t0 = process.hrtime.bigint();
    assert.throws(() => ipc.decode(msg), (e) => e.code === 'EDAEMON' && why.test(e.message));
    assert.ok(Number(process.hrtime.bigint() - t0) / 1e6 < 200, 'refused cheaply');
  }
  // what the daemon really sends still decodes: nesting up to 8, 1024 items, 64 keys, 1 MiB
  let deep = 1;
  for (let i = 0; i < 7; i++) deep = [deep]; // the map + 7 arrays: 8 levels
  assert.deepEqual(ipc.decode(Buffer.from(mp({ type: 'event', data: deep }))).data, deep);
  const m = ipc.decode(Buffer.from(mp({ type: 'opened', a: new Array(1024).fill(0), s: 'x'.repeat(1000 * 1000) })));
  assert.equal(m.a.length, 1024);
  const data = ipc.decode(ipc.encodeData(Buffer.alloc(ipc.MAX_MESSAGE - 32, 1)));
  assert.equal(data.data.length, ipc.MAX_MESSAGE - 32);
});
