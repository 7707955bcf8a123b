'use strict';

// The daemon's msgpack messages (docs/ipc.md §3). One WebSocket binary message
// = one msgpack map with a string `type`.

const { Encoder, Decoder } = require('@msgpack/msgpack');
const { wraithError } = require('./errors');

const MAX_MESSAGE = 16 * 1024 * 1024;
// Every message but `data` is small (docs/ipc.md; the daemon holds its own input to
// the same bounds, wraith_core/protocol/ipc.py). A generic msgpack decode builds an
// object per input byte at worst (16 MiB of empty arrays: ~0.7 GB and a second of a
// blocked event loop; deep nesting: several GB), so anything else is decoded only
// under these limits.
const MAX_CONTROL_MESSAGE = 1024 * 1024;
// Legit messages nest at most 3 levels (opened.info, events' data); deeper is garbage.
const MAX_DEPTH = 8;
// Data messages we send carry at most this many bytes: the doc's limit, and what
// the daemon sends too. (Measured: 1 MiB ~ 256 KiB > 64 KiB for upload speed.)
const DATA_CHUNK = 1024 * 1024;

const encoder = new Encoder({ ignoreUndefined: true });
const decoder = new Decoder({
  maxStrLength: MAX_CONTROL_MESSAGE,
  maxBinLength: MAX_CONTROL_MESSAGE,
  maxArrayLength: 1024,
  maxMapLength: 64,
  maxExtLength: 0,
});

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

/**
 * Throws EDAEMON if the msgpack item in `buf` nests deeper than MAX_DEPTH (the
 * top-level map is level 1) or is malformed. Walks the items without building
 * them: O(bytes) time, O(MAX_DEPTH) memory. (@msgpack/msgpack has no depth limit.)
 */
function checkDepth(buf) {
  const left = []; // items still to read at each open container level
  let i = 0;
  const n = buf.length;
  const need = (k) => {
    if (i + k > n) throw protoError('not a msgpack message (truncated)');
  };
  let items = 1; // the top-level item
  while (items > 0 || left.length) {
    if (items === 0) {
      items = left.pop();
      continue;
    }
    items--;
    need(1);
    const t = buf[i++];
    let children = 0;
    let skip = 0;
    if (t <= 0x7f || t >= 0xe0 || t === 0xc0 || t === 0xc2 || t === 0xc3) skip = 0;
    else if (t >= 0x80 && t <= 0x8f) children = (t & 0x0f) * 2;
    else if (t >= 0x90 && t <= 0x9f) children = t & 0x0f;
    else if (t >= 0xa0 && t <= 0xbf) skip = t & 0x1f;
    else {
      switch (t) {
        case 0xc4: case 0xd9: need(1); skip = buf[i]; i += 1; break; // bin8, str8
        case 0xc5: case 0xda: need(2); skip = buf.readUInt16BE(i); i += 2; break;
        case 0xc6: case 0xdb: need(4); skip = buf.readUInt32BE(i); i += 4; break;
        case 0xc7: need(2); skip = buf[i] + 1; i += 1; break; // ext8: len, type
        case 0xc8: need(3); skip = buf.readUInt16BE(i) + 1; i += 2; break;
        case 0xc9: need(5); skip = buf.readUInt32BE(i) + 1; i += 4; break;
        case 0xca: skip = 4; break;
        case 0xcb: skip = 8; break;
        case 0xcc: case 0xd0: skip = 1; break;
        case 0xcd: case 0xd1: skip = 2; break;
        case 0xce: case 0xd2: skip = 4; break;
        case 0xcf: case 0xd3: skip = 8; break;
        case 0xd4: skip = 2; break; // fixext1: type + 1
        case 0xd5: skip = 3; break;
        case 0xd6: skip = 5; break;
        case 0xd7: skip = 9; break;
        case 0xd8: skip = 17; break;
        case 0xdc: need(2); children = buf.readUInt16BE(i); i += 2; break; // array16
        case 0xdd: need(4); children = buf.readUInt32BE(i); i += 4; break;
        case 0xde: need(2); children = buf.readUInt16BE(i) * 2; i += 2; break; // map16
        case 0xdf: need(4); children = buf.readUInt32BE(i) * 2; i += 4; break;
        default: throw protoError(`not a msgpack message (bad type byte 0x${t.toString(16)})`);
      }
    }
    if (skip) {
      need(skip);
      i += skip;
    }
    if (children > 0) {
      // every child takes at least one byte: more than the bytes left is a lie
      if (children > n - i) throw protoError('not a msgpack message (container longer than the message)');
      if (left.length + 1 > MAX_DEPTH) throw protoError(`a message nests deeper than ${MAX_DEPTH} levels`);
      left.push(items);
      items = children;
    }
  }
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
  if (buf.length > MAX_CONTROL_MESSAGE) {
    throw protoError(`a ${buf.length}-byte message that is not data (the limit is ${MAX_CONTROL_MESSAGE})`);
  }
  checkDepth(buf);
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

module.exports = { encode, decode, encodeData, encodeDataChunks, EOF_BYTES, MAX_MESSAGE, MAX_CONTROL_MESSAGE, MAX_DEPTH, DATA_CHUNK };
