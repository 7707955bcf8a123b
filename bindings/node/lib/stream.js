'use strict';

// One daemon WebSocket carrying one stream (docs/ipc.md §4.1), as a Node
// Duplex that behaves like a net.Socket: write() false + 'drain' under
// backpressure, end() half-closes (eof), the far end's eof ends the readable
// side (and, unless allowHalfOpen, our writable side too, as net.Socket does),
// destroy() aborts the channel, and an unclean end is an 'error' with a stable
// code, never a silent EOF.

const { Duplex } = require('node:stream');
const ipc = require('./ipc');
const { wraithError } = require('./errors');

// How many bytes may sit unsent in the WebSocket before _write() holds its
// callback (which is what makes write() return false upstream).
const MAX_INFLIGHT = 1024 * 1024;
const HIGH_WATER = 256 * 1024;
const CLEAN_CLOSE_WAIT = 5000;

function closeError(code, reason, daemonError) {
  if (daemonError) return daemonError;
  if (code === 1001) return wraithError('EDAEMON', 'the wraith daemon is shutting down');
  if (code === 1002 || code === 1003 || code === 1007 || code === 1009) {
    return wraithError('EDAEMON', `the daemon closed the stream for a protocol error (WebSocket close ${code}${reason ? ` ${reason}` : ''})`);
  }
  if (code === 1006) return wraithError('ECONNRESET', 'the connection to the wraith daemon was lost');
  return wraithError('ECONNRESET', `the stream was aborted (WebSocket close ${code}${reason ? ` ${reason}` : ''})`);
}

class WraithStream extends Duplex {
  /**
   * @param {import('ws')} ws an open WebSocket whose `opened` was received
   * @param {() => Buffer[]} takeBacklog messages that arrived after `opened`
   * @param {object} meta { id, kind, role, target, session, pooled, info }
   * @param {object} [opts]
   * @param {boolean} [opts.allowHalfOpen] false (default, as net.Socket): the far
   *   end's eof ends our writable side too once the readable side has ended
   */
  constructor(ws, takeBacklog, meta, { allowHalfOpen = false } = {}) {
    super({
      allowHalfOpen: Boolean(allowHalfOpen),
      readableHighWaterMark: HIGH_WATER,
      writableHighWaterMark: HIGH_WATER,
      decodeStrings: true,
    });
    this._ws = ws;
    this.wraith = Object.freeze({ ...meta });
    this._inflight = 0;
    this._heldCb = null;
    this._eofSent = false;
    this._eofReceived = false;
    this._daemonError = null;
    this._wsClosed = false;
    this._closeInfo = null;
    this._onWsClosed = [];
    // bytes we sent after the far end's eof: if it then closes before our eof, they
    // may never have been read (EPIPE, as a socket whose peer is gone)
    this._sentAfterEof = 0;
    this.bytesRead = 0;
    this.bytesWritten = 0;

    const onWsError = (err) => {
      if (this._daemonError) return;
      // ws refused a frame (bad RSV bits, over maxPayload, …): the daemon broke the protocol
      this._daemonError =
        err && typeof err.code === 'string' && err.code.startsWith('WS_ERR_')
          ? wraithError('EDAEMON', `the daemon broke the WebSocket protocol: ${err.message}`, { cause: err })
          : wraithError('ECONNRESET', `the connection to the wraith daemon failed: ${err.message}`, { cause: err });
    };
    ws.on('error', onWsError);
    const backlog = takeBacklog ? takeBacklog() : [];
    // a WebSocket error (a frame ws refused) in the same read as `opened`
    if (backlog.error) onWsError(backlog.error);
    ws.on('message', (data) => this._onMessage(data));
    for (const raw of backlog) this._onMessage(raw);
    ws.on('close', (code, reason) => this._onClose(code, reason ? reason.toString() : ''));
    if (backlog.closed) {
      // closed before we attached (e.g. a tiny target that spoke, ended and closed)
      const [code, reason] = backlog.closed;
      process.nextTick(() => this._onClose(code, reason ? reason.toString() : ''));
    }
  }

  /** Stream id assigned by the daemon. */
  get id() {
    return this.wraith.id;
  }

  /** Like net.Socket#setNoDelay / setKeepAlive: accepted for compatibility, no effect. */
  setNoDelay() {
    return this;
  }

  setKeepAlive() {
    return this;
  }

  /** Like net.Socket#setTimeout: emit 'timeout' after `ms` without reads or writes (0 disables). */
  setTimeout(ms, cb) {
    this._idleMs = ms > 0 ? ms : 0;
    if (cb) {
      if (this._idleMs) this.once('timeout', cb);
      else this.off('timeout', cb);
    }
    if (this._idleTimer) {
      clearTimeout(this._idleTimer);
      this._idleTimer = null;
    }
    if (this._idleMs && !this.destroyed) {
      this._idleTimer = setTimeout(() => this.emit('timeout'), this._idleMs);
      this._idleTimer.unref();
    }
    return this;
  }

  _touch() {
    if (this._idleTimer) this._idleTimer.refresh();
  }

  /** Like net.Socket#ref / unref: whether this stream keeps the process alive. */
  ref() {
    if (this._ws._socket) this._ws._socket.ref();
    return this;
  }

  unref() {
    if (this._ws._socket) this._ws._socket.unref();
    return this;
  }

  // -- readable side ------------------------------------------------------------------

  _onMessage(raw) {
    let msg;
    try {
      msg = ipc.decode(raw);
    } catch (err) {
      this._abort(err);
      return;
    }
    switch (msg.type) {
      case 'data':
        if (this._eofReceived || msg.data.length === 0) {
          this._abort(wraithError('EDAEMON', 'the daemon broke the IPC protocol: data after eof or empty data'));
          return;
        }
        this.bytesRead += msg.data.length;
        if (this._idleTimer) this._touch();
        if (!this.push(msg.data)) this._ws.pause();
        break;
      case 'eof':
        this._eofReceived = true;
        this.push(null);
        break;
      case 'error':
        this._daemonError = wraithError(String(msg.code || 'EDAEMON'), String(msg.message || 'stream error'));
        break;
      default:
        this._abort(wraithError('EDAEMON', `the daemon broke the IPC protocol: unexpected ${JSON.stringify(msg.type)} on a stream`));
    }
  }

  _read() {
    if (this._ws.isPaused) this._ws.resume();
  }

  // -- writable side --------------------------------------------------------------------

  _send(buf, n) {
    if (this._idleTimer) this._touch();
    this._inflight += buf.length;
    this.bytesWritten += n;
    if (this._eofReceived) this._sentAfterEof += n;
    this._ws.send(buf, { binary: true }, (err) => {
      this._inflight -= buf.length;
      if (err) {
        if (!this.destroyed) this.destroy(this._daemonError || wraithError('ECONNRESET', `write to the wraith daemon failed: ${err.message}`));
        return;
      }
      this._release();
    });
  }

  _release() {
    if (this._heldCb && this._inflight < MAX_INFLIGHT) {
      const cb = this._heldCb;
      this._heldCb = null;
      cb();
    }
  }

  _writable() {
    if (this._wsClosed || this._ws.readyState !== 1) {
      if (this._daemonError) return this._daemonError;
      if (this._eofReceived && this._closeInfo && this._closeInfo.code === 1000) {
        return wraithError('EPIPE', 'the far end closed the stream: nothing more can be written');
      }
      return wraithError('EPIPE', 'the stream is closed');
    }
    return null;
  }

  _write(chunk, encoding, cb) {
    const err = this._writable();
    if (err) return cb(err);
    for (let off = 0; off < chunk.length; off += ipc.DATA_CHUNK) {
      const part = chunk.length <= ipc.DATA_CHUNK ? chunk : chunk.subarray(off, off + ipc.DATA_CHUNK);
      this._send(ipc.encodeData(part), part.length);
    }
    if (this._inflight < MAX_INFLIGHT) cb();
    else this._heldCb = cb;
    return undefined;
  }

  _writev(entries, cb) {
    const err = this._writable();
    if (err) return cb(err);
    let batch = [];
    let n = 0;
    const flush = () => {
      if (n > 0) this._send(ipc.encodeDataChunks(batch, n), n);
      batch = [];
      n = 0;
    };
    for (const { chunk } of entries) {
      if (chunk.length > ipc.DATA_CHUNK) {
        flush();
        for (let off = 0; off < chunk.length; off += ipc.DATA_CHUNK) {
          const part = chunk.subarray(off, off + ipc.DATA_CHUNK);
          this._send(ipc.encodeData(part), part.length);
        }
        continue;
      }
      if (n + chunk.length > ipc.DATA_CHUNK) flush();
      if (chunk.length) {
        batch.push(chunk);
        n += chunk.length;
      }
    }
    flush();
    if (this._inflight < MAX_INFLIGHT) cb();
    else this._heldCb = cb;
    return undefined;
  }

  _final(cb) {
    const err = this._writable();
    if (err) {
      // The far end already closed everything cleanly (and nothing we wrote after
      // its eof was lost, or _onClose had destroyed us): nothing to half-close.
      if (this._eofReceived && this._closeInfo && this._closeInfo.code === 1000 && !this._daemonError) return cb();
      return cb(err);
    }
    this._eofSent = true;
    this._ws.send(ipc.EOF_BYTES, { binary: true }, (e) => {
      if (e) cb(this._daemonError || wraithError('ECONNRESET', `eof to the wraith daemon failed: ${e.message}`));
      else cb();
    });
    return undefined;
  }

  // -- ending ---------------------------------------------------------------------------

  _onClose(code, reason) {
    this._wsClosed = true;
    this._closeInfo = { code, reason };
    const waiters = this._onWsClosed.splice(0);
    for (const w of waiters) w();
    if (this.destroyed) return;
    const clean = code === 1000 && this._eofReceived && !this._daemonError;
    if (!clean) {
      this.destroy(closeError(code, reason, this._daemonError));
      return;
    }
    // Clean end. If our side still has unsent writes they can never arrive.
    if (this._heldCb || (this.writableLength > 0 && !this.writableFinished)) {
      this.destroy(wraithError('EPIPE', 'the far end closed the stream before all written data was sent'));
      return;
    }
    if (this.writableFinished || this._eofSent) return; // autoDestroy completes it
    // The far end closed while our writable side was open. Bytes we wrote after
    // its eof went into a channel it no longer reads: say so, never drop them silently.
    if (this._sentAfterEof > 0) {
      this.destroy(wraithError('EPIPE', `the far end closed; data written after its end may not have been read (${this._sentAfterEof} bytes)`));
      return;
    }
    // Nothing lost. Buffered readable data is still consumed first. Then:
    // - allowHalfOpen false: Duplex ends our writable side at 'end'; _final sees the
    //   clean close and the stream closes without an error.
    // - allowHalfOpen true: the writable side stays open, as a net.Socket's does
    //   after the peer's FIN: end() completes at once, write() fails with EPIPE.
  }

  _abort(err) {
    if (!this.destroyed) this.destroy(err);
  }

  _destroy(err, cb) {
    const ws = this._ws;
    if (this._idleTimer) clearTimeout(this._idleTimer);
    if (this._heldCb) {
      const held = this._heldCb;
      this._heldCb = null;
      held(err || wraithError('ECLOSED', 'the stream was destroyed'));
    }
    if (this._wsClosed) {
      const info = this._closeInfo;
      if (!err && info && !(info.code === 1000 && this._eofReceived) && !this._daemonError) {
        return cb(closeError(info.code, info.reason, null));
      }
      return cb(err);
    }
    const cleanSoFar = !err && this._eofSent && this._eofReceived;
    if (cleanSoFar) {
      // Both eofs exchanged: the daemon closes with 1000 once it has processed
      // ours. Wait for that rather than racing it with an abort.
      const timer = setTimeout(() => {
        ws.terminate();
      }, CLEAN_CLOSE_WAIT);
      this._onWsClosed.push(() => {
        clearTimeout(timer);
        const info = this._closeInfo;
        if (info.code === 1000 && !this._daemonError) cb(null);
        else cb(closeError(info.code, info.reason, this._daemonError));
      });
      return undefined;
    }
    // Abort: closing the WebSocket before both eofs makes the daemon abort the channel.
    try {
      if (ws.readyState === 0 || ws.readyState === 1) ws.close(4000, 'abort');
    } catch {
      ws.terminate();
    }
    const t = setTimeout(() => ws.terminate(), 2000);
    t.unref();
    ws.once('close', () => clearTimeout(t));
    cb(err);
    return undefined;
  }
}

module.exports = { WraithStream };
