'use strict';

// SPEC §7 control-stream framing: 4-byte big-endian length, then that many
// bytes of UTF-8 JSON (an EventEnvelope {type, id, payload}). Sans-I/O: bytes
// in, envelopes out; no streams here.

const { wraithError } = require('./errors');

const DEFAULT_MAX_FRAME = 16 * 1024 * 1024;

// Binary payload data travels as base64 (SPEC §7). Buffer.prototype.toJSON
// runs before a replacer sees the value, so look at the holder's raw value.
function binaryReplacer(key, value) {
  const raw = this[key];
  if (raw instanceof Uint8Array) return Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength).toString('base64');
  if (raw instanceof ArrayBuffer) return Buffer.from(raw).toString('base64');
  return value;
}

/** Encode one envelope into a length-prefixed frame (a single Buffer). */
function encodeFrame(envelope, maxSize = DEFAULT_MAX_FRAME) {
  const json = JSON.stringify(envelope, binaryReplacer);
  const len = Buffer.byteLength(json, 'utf8');
  if (len > maxSize) {
    throw wraithError('EFRAME', `event of ${len} bytes is larger than the ${maxSize}-byte frame limit`);
  }
  const frame = Buffer.allocUnsafe(4 + len);
  frame.writeUInt32BE(len, 0);
  frame.write(json, 4, 'utf8');
  return frame;
}

function isEnvelope(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v) && typeof v.type === 'string';
}

/**
 * Incremental decoder. push(chunk) returns the complete envelopes found so far
 * and never throws. On an oversize length, invalid UTF-8/JSON, or a JSON value
 * that is not an envelope object it sets `error` (an Error with code EFRAME),
 * returns the envelopes that came before the bad frame and ignores all further
 * input: the stream must then be closed (SPEC §7).
 */
class FrameDecoder {
  constructor({ maxSize = DEFAULT_MAX_FRAME } = {}) {
    this.maxSize = maxSize;
    this._chunks = [];
    this._buffered = 0;
    this._need = -1; // body length of the frame being read, -1 while reading the header
    this.error = null;
    this._utf8 = new TextDecoder('utf-8', { fatal: true });
  }

  /** Bytes received but not yet returned as envelopes. */
  get buffered() {
    return this._buffered;
  }

  _take(n) {
    // Remove and return exactly n bytes from the front of the chunk list.
    const first = this._chunks[0];
    let out;
    if (first.length === n) {
      out = first;
      this._chunks.shift();
    } else if (first.length > n) {
      out = first.subarray(0, n);
      this._chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let off = 0;
      while (off < n) {
        const c = this._chunks[0];
        const want = n - off;
        if (c.length <= want) {
          c.copy(out, off);
          off += c.length;
          this._chunks.shift();
        } else {
          c.copy(out, off, 0, want);
          this._chunks[0] = c.subarray(want);
          off += want;
        }
      }
    }
    this._buffered -= n;
    return out;
  }

  push(chunk) {
    if (this.error) return [];
    if (chunk && chunk.length) {
      this._chunks.push(Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk));
      this._buffered += chunk.length;
    }
    const out = [];
    for (;;) {
      if (this._need < 0) {
        if (this._buffered < 4) break;
        const len = this._take(4).readUInt32BE(0);
        if (len > this.maxSize) {
          return this._fail(out, `frame of ${len} bytes is larger than the ${this.maxSize}-byte limit`);
        }
        this._need = len;
      }
      if (this._buffered < this._need) break;
      const body = this._need === 0 ? Buffer.alloc(0) : this._take(this._need);
      this._need = -1;
      let value;
      try {
        value = JSON.parse(this._utf8.decode(body));
      } catch (e) {
        return this._fail(out, `frame is not valid UTF-8 JSON (${e.message})`);
      }
      if (!isEnvelope(value)) return this._fail(out, 'frame is not an EventEnvelope object with a string "type"');
      out.push(value);
    }
    return out;
  }

  /** True when the input ended in the middle of a frame. */
  get partial() {
    return this._need >= 0 || this._buffered > 0;
  }

  _fail(out, message) {
    this.error = wraithError('EFRAME', message);
    this._chunks = [];
    this._buffered = 0;
    this._need = -1;
    return out;
  }
}

module.exports = { encodeFrame, FrameDecoder, DEFAULT_MAX_FRAME };
