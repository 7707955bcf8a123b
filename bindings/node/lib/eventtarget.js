'use strict';

// The pubsub EventTarget adapter of SPEC §7, over ANY Node Duplex stream
// (a connect()/serve() stream, a net.Socket to a port forward, ...).

const { randomUUID } = require('node:crypto');
const { encodeFrame, FrameDecoder, DEFAULT_MAX_FRAME, checkType, typeProblem } = require('./framing');
const { wraithError } = require('./errors');

const SUBSCRIBE = '__subscribe';
const UNSUBSCRIBE = '__unsubscribe';
// Types a peer may subscribe to (a hub announces every wanted type; wraith's hub caps
// them at 65536): past this the peer is broken or hostile, and the stream closes.
const MAX_PEER_TYPES = 65536;

/** A received event: a CustomEvent whose `detail` is the envelope's payload, plus its `id`. */
class WraithEvent extends CustomEvent {
  constructor(type, init = {}) {
    super(type, init);
    Object.defineProperty(this, 'id', { value: init.id === undefined ? '' : String(init.id), enumerable: true });
  }
}

function captureOf(options) {
  return typeof options === 'boolean' ? options : Boolean(options && options.capture);
}

function isReserved(type) {
  return type.startsWith('__');
}

class WraithEventTarget extends EventTarget {
  /**
   * @param {object} opts
   * @param {import('node:stream').Duplex} opts.stream
   * @param {number} [opts.maxFrameSize] default 16 MiB
   * @param {boolean} [opts.pointToPoint] send only types the peer subscribed to
   *   (default true: SPEC §7 point-to-point semantics; the hub of `wraith serve`
   *   announces every type any member wants, so this works through it too).
   *   false: send every dispatched event (for a hub that announces nothing).
   * @param {(err: Error|null) => void} [opts.onClose]
   * @param {number} [opts.closeTimeout] ms close() waits for the peer's EOF before destroying the stream (5000)
   */
  constructor(opts) {
    super();
    const { stream, maxFrameSize = DEFAULT_MAX_FRAME, pointToPoint, onClose, closeTimeout = 5000 } = opts || {};
    if (!stream || typeof stream.write !== 'function' || typeof stream.on !== 'function') {
      throw wraithError('EUSAGE', 'createWraithEventTarget({ stream }) needs a Duplex stream');
    }
    this._stream = stream;
    this._maxFrameSize = maxFrameSize;
    this._decoder = new FrameDecoder({ maxSize: maxFrameSize });
    this._listeners = new Map(); // type -> [{ listener, capture, wrapper }]
    this._peerSubs = new Set();
    this._filtering = pointToPoint !== false;
    this._peerWaiters = new Map(); // type -> [resolve]
    this._closed = false;
    this._flushing = null;
    this.error = null;
    this._onClose = onClose;
    this._closeTimeout = closeTimeout;
    this.closed = new Promise((resolve) => {
      this._resolveClosed = resolve;
    });

    this._onData = (chunk) => this._receive(chunk);
    this._onEnd = () => {
      // The peer ended its side: nothing more will arrive, so end ours too.
      if (this._decoder.partial && !this.error) {
        this.error = wraithError('EFRAME', 'stream ended in the middle of a frame');
      }
      this._markClosed();
      if (!stream.writableEnded && !stream.destroyed) stream.end();
    };
    this._onError = (err) => {
      if (!this.error) this.error = err;
      this._markClosed();
    };
    this._onStreamClose = () => {
      this._markClosed();
      this._finish();
    };
    stream.on('data', this._onData);
    stream.on('end', this._onEnd);
    stream.on('error', this._onError);
    stream.on('close', this._onStreamClose);
    if (stream.destroyed) queueMicrotask(this._onStreamClose);
  }

  /** The underlying stream. */
  get stream() {
    return this._stream;
  }

  /** Types the peer has subscribed to (what a point-to-point peer gets sent). */
  get peerSubscriptions() {
    return new Set(this._peerSubs);
  }

  /** Types this side is subscribed to (has at least one listener for). */
  get subscriptions() {
    return new Set(this._listeners.keys());
  }

  get isClosed() {
    return this._closed;
  }

  /**
   * Throws a TypeError (code EUSAGE), sending nothing, if `type` is not a valid
   * event type: empty, over 1024 code points, or not valid Unicode (a lone
   * surrogate). The hub would close the whole stream over such a __subscribe.
   */
  addEventListener(type, listener, options) {
    if (listener == null) return;
    type = checkType(String(type));
    const capture = captureOf(options);
    const list = this._listeners.get(type) || [];
    if (list.some((e) => e.listener === listener && e.capture === capture)) return;
    const signal = options && typeof options === 'object' ? options.signal : undefined;
    if (signal && signal.aborted) return;
    const once = Boolean(options && typeof options === 'object' && options.once);
    const self = this;
    const entry = {
      listener,
      capture,
      wrapper(event) {
        if (once) self.removeEventListener(type, listener, { capture });
        if (typeof listener === 'function') return listener.call(self, event);
        if (listener && typeof listener.handleEvent === 'function') return listener.handleEvent(event);
        return undefined;
      },
    };
    if (signal) {
      entry.signal = signal;
      entry.onAbort = () => this.removeEventListener(type, listener, { capture });
      signal.addEventListener('abort', entry.onAbort, { once: true });
    }
    list.push(entry);
    this._listeners.set(type, list);
    super.addEventListener(type, entry.wrapper, {
      capture,
      passive: Boolean(options && typeof options === 'object' && options.passive),
    });
    if (list.length === 1 && !isReserved(type)) this._control(SUBSCRIBE, type);
  }

  removeEventListener(type, listener, options) {
    type = String(type);
    const capture = captureOf(options);
    const list = this._listeners.get(type);
    if (!list) return;
    const i = list.findIndex((e) => e.listener === listener && e.capture === capture);
    if (i < 0) return;
    const [entry] = list.splice(i, 1);
    super.removeEventListener(type, entry.wrapper, { capture });
    if (entry.signal) entry.signal.removeEventListener('abort', entry.onAbort);
    if (list.length === 0) {
      this._listeners.delete(type);
      if (!isReserved(type)) this._control(UNSUBSCRIBE, type);
    }
  }

  /**
   * Send `event` to the peer as {type, id, payload: event.detail}. It is NOT
   * delivered locally (a hub echoes it back if this side subscribed).
   * Returns true if the event was sent, false if not: the peer is not
   * subscribed to its type (point-to-point), or the adapter is closed.
   * Throws, sending nothing and leaving the stream open: a TypeError (code
   * EUSAGE) for an invalid or reserved type; EFRAME for an event over the frame
   * limit or a payload nested deeper than 512 levels.
   * Backpressure: `needsDrain` / `await flush()`.
   */
  dispatchEvent(event) {
    if (!(event instanceof Event)) throw new TypeError('dispatchEvent(event) needs an Event');
    const type = checkType(event.type);
    if (isReserved(type)) {
      throw Object.assign(new TypeError(`event type "${type}" is reserved (types starting with "__")`), { code: 'EUSAGE' });
    }
    if (this._closed) return false;
    if (this._filtering && !this._peerSubs.has(type)) return false;
    const id = typeof event.id === 'string' && event.id ? event.id : randomUUID();
    const payload = event.detail === undefined ? null : event.detail;
    this._write({ type, id, payload });
    return true;
  }

  /** True while the stream's write buffer is over its high-water mark. */
  get needsDrain() {
    return Boolean(this._stream.writableNeedDrain);
  }

  /**
   * Resolves once the peer has subscribed to `type` (at once if it already is).
   * Rejects with ECLOSED if the adapter closes first, ETIMEDOUT after `timeout` ms.
   */
  waitSubscribed(type, { timeout, signal } = {}) {
    type = String(type);
    if (!this._filtering || this._peerSubs.has(type)) return Promise.resolve();
    if (this._closed) return Promise.reject(wraithError('ECLOSED', 'the event target is closed'));
    return new Promise((resolve, reject) => {
      let timer;
      const entry = {
        resolve: () => {
          cleanup();
          resolve();
        },
        reject: (err) => {
          cleanup();
          reject(err);
        },
      };
      const onAbort = () => entry.reject(signal.reason || wraithError('EABORT', 'aborted'));
      const cleanup = () => {
        if (timer) clearTimeout(timer);
        if (signal) signal.removeEventListener('abort', onAbort);
        const list = this._peerWaiters.get(type);
        if (list) {
          const i = list.indexOf(entry);
          if (i >= 0) list.splice(i, 1);
          if (list.length === 0) this._peerWaiters.delete(type);
        }
      };
      const list = this._peerWaiters.get(type) || [];
      list.push(entry);
      this._peerWaiters.set(type, list);
      if (timeout !== undefined) {
        timer = setTimeout(
          () => entry.reject(wraithError('ETIMEDOUT', `the peer did not subscribe to "${type}" within ${timeout} ms`)),
          timeout,
        );
      }
      if (signal) {
        if (signal.aborted) return onAbort();
        signal.addEventListener('abort', onAbort, { once: true });
      }
    });
  }

  /** Typed shorthand for dispatchEvent(new CustomEvent(type, { detail })). */
  emit(type, detail) {
    return this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  /** Resolves once the stream can take more (immediately unless write() said false). */
  flush() {
    const s = this._stream;
    if (this._closed || !s.writableNeedDrain) return Promise.resolve();
    // One pending flush for every caller: one 'drain' and one 'close' listener,
    // however many producers wait.
    if (!this._flushing) {
      this._flushing = new Promise((resolve) => {
        const done = () => {
          s.off('drain', done);
          s.off('close', done);
          this._flushing = null;
          resolve();
        };
        s.on('drain', done);
        s.on('close', done);
      });
    }
    return this._flushing;
  }

  /** End the stream (EOF to the peer); resolves when it has closed. */
  close() {
    if (!this._closed) {
      this._markClosed();
      const s = this._stream;
      if (!s.destroyed) {
        if (!s.writableEnded) s.end();
        s.resume(); // discard whatever still arrives until the peer's EOF
        this._closeTimer = setTimeout(() => s.destroy(), this._closeTimeout);
        if (this._closeTimer.unref) this._closeTimer.unref();
      }
    }
    if (this._stream.destroyed || this._stream.closed) this._finish();
    return this.closed;
  }

  _control(kind, type) {
    if (this._closed) return;
    this._write({ type: kind, id: randomUUID(), payload: { type } });
  }

  _write(envelope) {
    const frame = encodeFrame(envelope, this._maxFrameSize);
    const s = this._stream;
    if (s.destroyed || s.writableEnded) return false;
    return s.write(frame);
  }

  _receive(chunk) {
    const envelopes = this._decoder.push(chunk);
    for (const env of envelopes) {
      if (env.type === SUBSCRIBE || env.type === UNSUBSCRIBE) {
        const t = env.payload && typeof env.payload.type === 'string' ? env.payload.type : null;
        if (t === null) continue;
        if (env.type === SUBSCRIBE) {
          const problem = typeProblem(t); // 1..1024 code points, valid Unicode (as the Python side)
          if (problem) {
            this.error = wraithError('EFRAME', `peer subscribed to an invalid type: ${problem}`);
            this._markClosed();
            this._stream.destroy();
            return;
          }
          if (!this._peerSubs.has(t) && this._peerSubs.size >= MAX_PEER_TYPES) {
            this.error = wraithError('EFRAME', `peer subscribed to more than ${MAX_PEER_TYPES} types`);
            this._markClosed();
            this._stream.destroy();
            return;
          }
          this._peerSubs.add(t);
          const waiters = this._peerWaiters.get(t);
          if (waiters) {
            this._peerWaiters.delete(t);
            for (const w of waiters) w.resolve();
          }
        } else {
          this._peerSubs.delete(t);
        }
        continue;
      }
      if (isReserved(env.type)) continue;
      if (!this._listeners.has(env.type)) continue; // not subscribed here: drop
      const id = typeof env.id === 'string' ? env.id : env.id == null ? '' : String(env.id);
      super.dispatchEvent(new WraithEvent(env.type, { detail: env.payload === undefined ? null : env.payload, id }));
    }
    if (this._decoder.error) {
      // SPEC §7: a protocol error closes that stream only.
      this.error = this._decoder.error;
      this._markClosed();
      this._stream.destroy();
    }
  }

  _markClosed() {
    this._closed = true;
  }

  _finish() {
    if (this._finished) return;
    this._finished = true;
    if (this._closeTimer) clearTimeout(this._closeTimer);
    const s = this._stream;
    s.off('data', this._onData);
    s.off('end', this._onEnd);
    s.off('close', this._onStreamClose);
    // keep the 'error' listener: a late error must not become an uncaught exception
    this._peerSubs.clear();
    for (const list of [...this._peerWaiters.values()]) {
      for (const w of [...list]) w.reject(this.error || wraithError('ECLOSED', 'the event target closed'));
    }
    if (this._onClose) {
      try {
        this._onClose(this.error);
      } catch (e) {
        queueMicrotask(() => {
          throw e;
        });
      }
    }
    this._resolveClosed();
  }
}

function createWraithEventTarget(opts) {
  return new WraithEventTarget(opts);
}

module.exports = { WraithEventTarget, WraithEvent, createWraithEventTarget };
