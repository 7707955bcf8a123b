'use strict';

// The daemon's msgpack messages (docs/ipc.md §3). One WebSocket binary message
// = one msgpack map with a string `type`.

const { Encoder, Decoder } = require('@msgpack/msgpack');
const { wraithError } = require('./errors');

const MAX_MESSAGE = 16 * 1024 * 1024;
// Data messages we send carry at most this many bytes: the doc's limit, and what
// the daemon sends too. (Measured: 1 MiB ~ 256 KiB > 64 KiB for upload speed.)
const DATA_CHUNK = 1024 * 1024;

const encoder = new Encoder({ ignoreUndefined: true });
const decoder = new Decoder();

// {"type":"data","data":<bin>} with type first: the same bytes the Python side
// writes, so a data message costs one header and no msgpack walk either way.
const DATA_PREFIX = Buffer.from([0x82, 0xa4, 0x74, 0x79, 0x70, 0x65, 0xa4, 0x64, 0x61, 0x74, 0x61, 0xa4, 0x64, 0x61, 0x74, 0x61]);
const EOF_BYTES = Buffer.from(encoder.encode({ type: 'eof' }));

function dataHeader(n) {
  const p = DATA_PREFIX.length;
  let head;
  if (n < 256) {
    head = Buffer.allocUnsafe(p + 2);
    head[p] = 0xc4;
    head[p + 1] = n;
  } else if (n < 65536) {
    head = Buffer.allocUnsafe(p + 3);
    head[p] = 0xc5;
    head.writeUInt16BE(n, p + 1);
  } else {
    head = Buffer.allocUnsafe(p + 5);
    head[p] = 0xc6;
    head.writeUInt32BE(n, p + 1);
  }
  DATA_PREFIX.copy(head, 0);
  return head;
}

/** A `data` message holding `payload` (one copy). */
function encodeData(payload) {
  const head = dataHeader(payload.length);
  const out = Buffer.allocUnsafe(head.length + payload.length);
  head.copy(out, 0);
  if (Buffer.isBuffer(payload)) payload.copy(out, head.length);
  else out.set(payload, head.length);
  return out;
}

/** A `data` message from several chunks (for _writev), total length n. */
function encodeDataChunks(chunks, n) {
  const head = dataHeader(n);
  const out = Buffer.allocUnsafe(head.length + n);
  head.copy(out, 0);
  let off = head.length;
  for (const c of chunks) {
    out.set(c, off);
    off += c.length;
  }
  return out;
}

function encode(msg) {
  const u8 = encoder.encode(msg);
  return Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength);
}

function protoError(message) {
  return wraithError('EDAEMON', `the daemon broke the IPC protocol: ${message}`);
}

/**
 * One daemon message -> a plain object. `data` messages get `data` as a
 * Buffer viewing the received bytes (no copy). Throws EDAEMON on garbage.
 */
function decode(raw) {
  const buf = Buffer.isBuffer(raw) ? raw : Array.isArray(raw) ? Buffer.concat(raw) : Buffer.from(raw);
  // fast path: {"type":"data","data":bin}
  const p = DATA_PREFIX.length;
  if (buf.length > p + 1 && buf[p - 1] === 0x61 && buf.compare(DATA_PREFIX, 0, p, 0, p) === 0) {
    const tag = buf[p];
    let n = -1;
    let h = 0;
    if (tag === 0xc4) {
      n = buf[p + 1];
      h = p + 2;
    } else if (tag === 0xc5 && buf.length >= p + 3) {
      n = buf.readUInt16BE(p + 1);
      h = p + 3;
    } else if (tag === 0xc6 && buf.length >= p + 5) {
      n = buf.readUInt32BE(p + 1);
      h = p + 5;
    }
    if (n >= 0 && h + n === buf.length) return { type: 'data', data: buf.subarray(h) };
  }
  let obj;
  try {
    obj = decoder.decode(buf);
  } catch (e) {
    throw protoError(`not a msgpack message (${e.message})`);
  }
  if (obj === null || typeof obj !== 'object' || Array.isArray(obj) || obj instanceof Uint8Array) {
    throw protoError('a message must be a msgpack map');
  }
  if (typeof obj.type !== 'string') throw protoError("a message needs a string field 'type'");
  if (obj.type === 'data') {
    if (!(obj.data instanceof Uint8Array)) throw protoError("field 'data' must be bin");
    obj.data = Buffer.from(obj.data.buffer, obj.data.byteOffset, obj.data.byteLength);
  }
  return obj;
}

module.exports = { encode, decode, encodeData, encodeDataChunks, EOF_BYTES, MAX_MESSAGE, DATA_CHUNK };
