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
