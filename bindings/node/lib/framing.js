'use strict';

// SPEC §7 control-stream framing: 4-byte big-endian length, then that many
// bytes of UTF-8 JSON (an EventEnvelope {type, id, payload}). Sans-I/O: bytes
// in, envelopes out; no streams here. The rules are those of the Python twin
// (wraith_core/protocol/envelope.py), so both sides accept the same frames.

const { wraithError } = require('./errors');

const DEFAULT_MAX_FRAME = 16 * 1024 * 1024;
// An event type is 1..1024 Unicode code points (Python's len()), valid Unicode
// (no lone surrogates): envelope.py MAX_TYPE_LENGTH / check_type().
const MAX_TYPE_LENGTH = 1024;
// How deep a payload may nest (arrays/objects inside each other). Python's
// json decoder gives up somewhere under 1000 levels (RecursionError) and then
// closes the sender's stream, so we refuse to send anything deeper than this.
const MAX_PAYLOAD_DEPTH = 512;
// The decoder's buffer for a partial frame: first allocation, and the largest
// one it keeps for the next frame (bigger ones are dropped once used).
const MIN_PENDING = 256;
const KEEP_PENDING = 64 * 1024;

function usageError(message) {
  const err = new TypeError(message);
  err.code = 'EUSAGE';
  return err;
}

/**
 * Why `type` is not a valid event type name, or null if it is (envelope.py
 * check_type, reserved `__` types allowed: the caller checks those).
 */
function typeProblem(type) {
  if (typeof type !== 'string' || type.length === 0) return 'event type must be a non-empty string';
  if (type.length > MAX_TYPE_LENGTH) {
    // Over 1024 UTF-16 units may still be <= 1024 code points (astral characters
    // are 2 units): count code points (a lone surrogate counts as one, as in Python).
    let n = 0;
    for (const _ of type) {
      if (++n > MAX_TYPE_LENGTH) return `event type longer than ${MAX_TYPE_LENGTH} characters`;
    }
  }
  if (!type.isWellFormed()) return 'event type is not valid Unicode (lone surrogate)';
  return null;
}

/** Throws a TypeError (code EUSAGE) unless `type` is a valid event type name. */
function checkType(type) {
  const problem = typeProblem(type);
  if (problem) throw usageError(problem);
  return type;
}

/** JSON.stringify of an envelope: binary data as base64, nesting limited to MAX_PAYLOAD_DEPTH. */
function stringifyEnvelope(envelope) {
  // JSON.stringify walks depth first and calls the replacer with the holder as
  // `this`, so the chain of open containers is a stack: pop back to the holder,
  // and its index is the depth (the root's holder 0, so the envelope is level 0
  // and its payload level 1). No hashing, O(1) amortised per value.
  const open = [];
  return JSON.stringify(envelope, function replacer(key, value) {
    // Binary payload data travels as base64 (SPEC §7). Buffer.prototype.toJSON
    // runs before a replacer sees the value, so look at the holder's raw value.
    const raw = this[key];
    if (raw instanceof Uint8Array) return Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength).toString('base64');
    if (raw instanceof ArrayBuffer) return Buffer.from(raw).toString('base64');
    if (value !== null && typeof value === 'object') {
      while (open.length && open[open.length - 1] !== this) open.pop();
      if (open.length === 0) open.push(this);
      if (open.length > MAX_PAYLOAD_DEPTH + 1) {
        throw wraithError('EFRAME', `event payload nests deeper than ${MAX_PAYLOAD_DEPTH} levels (not sent)`);
      }
      open.push(value);
    }
    return value;
  });
}

/**
 * Encode one envelope into a length-prefixed frame (a single Buffer).
 * Throws (nothing is encoded): TypeError code EUSAGE for an invalid type or a
 * non-string id; EFRAME for a frame over `maxSize` bytes or a payload nested
 * deeper than 512 levels.
 */
function encodeFrame(envelope, maxSize = DEFAULT_MAX_FRAME) {
  if (envelope === null || typeof envelope !== 'object') throw usageError('encodeFrame(envelope) needs an object');
  checkType(envelope.type);
  if (typeof envelope.id !== 'string') throw usageError('envelope id must be a string');
  const json = stringifyEnvelope(envelope);
  const len = Buffer.byteLength(json, 'utf8');
  if (len > maxSize) {
    throw wraithError('EFRAME', `event of ${len} bytes is larger than the ${maxSize}-byte frame limit`);
  }
  const frame = Buffer.allocUnsafe(4 + len);
  frame.writeUInt32BE(len, 0);
  frame.write(json, 4, 'utf8');
  return frame;
}

/** Why a parsed frame body is not an EventEnvelope (envelope.py parse_body), or null. */
function envelopeProblem(v) {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) return 'envelope must be a JSON object';
  const problem = typeProblem(v.type);
  if (problem) return problem;
  if (typeof v.id !== 'string') return 'envelope id must be a string';
  return null;
}

/**
 * Incremental decoder. push(chunk) returns the complete envelopes found so far
 * and never throws. On an oversize length, invalid UTF-8/JSON (a UTF-8 BOM
 * included), or a JSON value that is not an envelope ({type: valid type name,
 * id: string, payload}) it sets `error` (an Error with code EFRAME), returns
 * the envelopes that came before the bad frame and ignores all further input:
 * the stream must then be closed (SPEC §7).
 *
 * Memory stays O(frame size) whatever the chunking: complete frames are parsed
 * straight out of the chunk they arrived in, and only the bytes of the one
 * incomplete frame are copied into a buffer the decoder owns (grown by
 * doubling, never beyond that frame's size), so no chunk is retained.
 */
class FrameDecoder {
  constructor({ maxSize = DEFAULT_MAX_FRAME } = {}) {
    this.maxSize = maxSize;
    this._pend = null; // owned buffer holding the incomplete frame (header included)
    this._pendLen = 0; // bytes of it in use
    this._need = -1; // body length of the incomplete frame, -1 while its header is incomplete
    this.error = null;
    // ignoreBOM: keep a leading U+FEFF so JSON.parse rejects it, as Python does.
    this._utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
  }

  /** Bytes of the incomplete frame's body received so far (of its header while that is incomplete). */
  get buffered() {
    return this._need >= 0 ? this._pendLen - 4 : this._pendLen;
  }

  /** True when the input ended in the middle of a frame. */
  get partial() {
    return this._pendLen > 0;
  }

  push(chunk) {
    if (this.error) return [];
    const out = [];
    if (!chunk || !chunk.length) return out;
    let buf;
    if (Buffer.isBuffer(chunk)) buf = chunk;
    else if (ArrayBuffer.isView(chunk)) buf = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    else buf = Buffer.from(chunk);
    const end = buf.length;
    let pos = 0;

    // 1. Complete the frame left incomplete by earlier chunks (copying only its bytes).
    if (this._pendLen > 0) {
      if (this._need < 0) {
        const take = Math.min(4 - this._pendLen, end - pos);
        this._append(buf, pos, pos + take);
        pos += take;
        if (this._pendLen < 4) return out;
        if (!this._header(this._pend.readUInt32BE(0))) return out;
      }
      const take = Math.min(4 + this._need - this._pendLen, end - pos);
      this._append(buf, pos, pos + take);
      pos += take;
      if (this._pendLen < 4 + this._need) return out;
      const body = this._pend.subarray(4, this._pendLen);
      this._need = -1;
      this._pendLen = 0;
      const ok = this._parse(body, out);
      if (this._pend && this._pend.length > KEEP_PENDING) this._pend = null;
      if (!ok) return out;
    }

    // 2. Frames complete within this chunk: parsed in place, no copy.
    while (end - pos >= 4) {
      const len = buf.readUInt32BE(pos);
      if (len > this.maxSize) return this._fail(out, `frame of ${len} bytes is larger than the ${this.maxSize}-byte limit`);
      if (end - pos - 4 < len) break;
      if (!this._parse(buf.subarray(pos + 4, pos + 4 + len), out)) return out;
      pos += 4 + len;
    }

    // 3. Keep the start of the next frame (a copy: the chunk itself is not retained).
    if (pos < end) {
      this._append(buf, pos, end);
      if (this._pendLen >= 4) this._header(this._pend.readUInt32BE(0)); // length already checked in 2.
    }
    return out;
  }

  _header(len) {
    if (len > this.maxSize) {
      this._fail(null, `frame of ${len} bytes is larger than the ${this.maxSize}-byte limit`);
      return false;
    }
    this._need = len;
    return true;
  }

  // Copy src[start, stop) after the incomplete frame's bytes. The buffer grows by
  // doubling but never past the frame's own size (4 + body length, or 4 while the
  // header is incomplete): a header alone must not reserve memory the peer never sends.
  _append(src, start, stop) {
    const want = this._pendLen + (stop - start);
    if (!this._pend || this._pend.length < want) {
      let frameSize = 4;
      if (this._need >= 0) frameSize = 4 + this._need;
      else if (this._pendLen === 0 && stop - start >= 4) frameSize = 4 + src.readUInt32BE(start);
      frameSize = Math.max(frameSize, want);
      // double; straight to the frame's size once a quarter of it is here (fewer copies, <= 4x received)
      let cap = Math.max(want, MIN_PENDING, this._pend ? this._pend.length * 2 : 0);
      if (cap > frameSize || want * 4 >= frameSize) cap = frameSize;
      const grown = Buffer.allocUnsafe(cap);
      if (this._pendLen) this._pend.copy(grown, 0, 0, this._pendLen);
      this._pend = grown;
    }
    src.copy(this._pend, this._pendLen, start, stop);
    this._pendLen = want;
  }

  _parse(body, out) {
    let value;
    try {
      value = JSON.parse(this._utf8.decode(body));
    } catch (e) {
      this._fail(out, `frame is not valid UTF-8 JSON (${e.message})`);
      return false;
    }
    const problem = envelopeProblem(value);
    if (problem) {
      this._fail(out, `frame is not an EventEnvelope: ${problem}`);
      return false;
    }
    out.push(value);
    return true;
  }

  _fail(out, message) {
    this.error = wraithError('EFRAME', message);
    this._pend = null;
    this._pendLen = 0;
    this._need = -1;
    return out;
  }
}

module.exports = {
  encodeFrame,
  FrameDecoder,
  DEFAULT_MAX_FRAME,
  MAX_TYPE_LENGTH,
  MAX_PAYLOAD_DEPTH,
  checkType,
  typeProblem,
};
