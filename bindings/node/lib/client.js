'use strict';

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { EventEmitter } = require('node:events');
const ipc = require('./ipc');
const daemon = require('./daemon');
const { WraithStream } = require('./stream');
const { wraithError, abortError } = require('./errors');

// Options that are this package's own, never sent to the daemon.
const CLIENT_OPTIONS = new Set(['daemon', 'token', 'autostart', 'signal', 'timeout', 'allowHalfOpen']);
// Key inputs: a path (made absolute here, the daemon may have another cwd) or the key itself.
const KEY_OPTIONS = new Set(['identity', 'certificate', 'hostKey', 'knownHosts', 'tlsCa', 'key', 'authorizedKeys', 'certAuthority', 'tlsCert', 'tlsKey']);
const DEFAULT_TIMEOUT = 60000;

function looksLikeKeyText(s) {
  return s.includes('\n') || /^(-----BEGIN|ssh-|ecdsa-|sk-|SHA256:|MD5:|@cert-authority|@revoked|cert-authority)/.test(s);
}

function keyInput(v) {
  if (typeof v === 'string') {
    if (v === '~' || v.startsWith('~/')) v = path.join(os.homedir(), v.slice(1));
    if (!v || looksLikeKeyText(v) || path.isAbsolute(v)) return v;
    const abs = path.resolve(v);
    return fs.existsSync(abs) ? abs : v;
  }
  if (v instanceof Uint8Array) return Buffer.from(v.buffer, v.byteOffset, v.byteLength);
  if (v instanceof ArrayBuffer) return Buffer.from(v);
  return v;
}

function daemonOptions(options) {
  const out = {};
  for (const [k, v] of Object.entries(options)) {
    if (CLIENT_OPTIONS.has(k) || v === undefined || typeof v === 'function') continue;
    out[k] = KEY_OPTIONS.has(k) ? keyInput(v) : v;
  }
  return out;
}

function checkOptions(options, what) {
  if (options === null || typeof options !== 'object' || Array.isArray(options)) {
    throw wraithError('EUSAGE', `${what}(options) needs an options object`);
  }
}

function firstMessage(ws, { timeout, total = timeout, signal, what }) {
  return new Promise((resolve, reject) => {
    let done = false;
    const finish = (err, msg) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      ws.off('message', onMessage);
      ws.off('close', onClose);
      ws.off('error', onError);
      if (signal) signal.removeEventListener('abort', onAbort);
      if (err) {
        ws.on('error', () => {});
        if (ws.readyState === 0 || ws.readyState === 1) ws.close(4000, 'abort');
        reject(err);
        return;
      }
      // Messages that follow 'opened' in the same socket read are emitted
      // before our caller's continuation runs: hold them for its consumer.
      // So do a WebSocket 'error' (a frame ws refused) and the 'close'.
      const backlog = [];
      const hold = (raw) => backlog.push(raw);
      const holdClose = (code, reason) => {
        backlog.closed = [code, reason];
      };
      const holdError = (e) => {
        if (!backlog.error) backlog.error = e;
      };
      ws.on('message', hold);
      ws.once('close', holdClose);
      ws.on('error', holdError);
      resolve({
        opened: msg,
        takeBacklog: () => {
          ws.off('message', hold);
          ws.off('close', holdClose);
          ws.off('error', holdError);
          return backlog;
        },
      });
    };
    let pendingError = null;
    const onMessage = (raw) => {
      let msg;
      try {
        msg = ipc.decode(raw);
      } catch (e) {
        finish(e);
        return;
      }
      if (msg.type === 'opened') finish(null, msg);
      else if (msg.type === 'error') {
        pendingError = wraithError(String(msg.code || 'EDAEMON'), String(msg.message || `${what} failed`));
        finish(pendingError);
      } else finish(wraithError('EDAEMON', `the daemon broke the IPC protocol: ${JSON.stringify(msg.type)} before opened`));
    };
    const onClose = (code, reason) =>
      finish(
        pendingError ||
          (code === 1009
            ? // the open message itself was over the daemon's size limit (refused from its header)
              wraithError('EPROTO', 'the open message is larger than the daemon accepts (WebSocket close 1009)', { closeCode: code })
            : wraithError('EDAEMON', `the daemon closed the WebSocket before answering (close ${code}${reason && reason.length ? ` ${reason}` : ''})`, {
                closeCode: code,
              })),
      );
    const onAbort = () => finish(abortError(signal));
    // A frame ws refuses (bad RSV bits, over maxPayload) is an 'error' event, then 'close':
    // without a listener Node would throw it in the host process. Before 'opened' it fails
    // this open; after it, the 'close' that follows (held in the backlog) ends the stream.
    const onError = (e) => {
      pendingError = pendingError || wraithError('EDAEMON', `the daemon connection failed: ${e.message}`, { cause: e });
      finish(pendingError);
    };
    ws.on('error', onError);
    ws.on('error', () => {});
    const timer = setTimeout(() => finish(wraithError('ETIMEDOUT', `${what}: no answer from the wraith daemon within ${total} ms`)), timeout);
    ws.on('message', onMessage);
    ws.on('close', onClose);
    if (signal) {
      if (signal.aborted) onAbort();
      else signal.addEventListener('abort', onAbort, { once: true });
    }
  });
}

/**
 * `promise`, or a rejection once `signal` aborts or `ms` pass (the work itself goes on:
 * a daemon being started is shared with other callers, and kept for them).
 */
function bounded(promise, { ms, total, signal, what }) {
  if (signal && signal.aborted) return Promise.reject(abortError(signal));
  return new Promise((resolve, reject) => {
    const done = () => {
      clearTimeout(timer);
      if (signal) signal.removeEventListener('abort', onAbort);
    };
    const onAbort = () => {
      done();
      reject(abortError(signal));
    };
    const timer = setTimeout(() => {
      done();
      reject(wraithError('ETIMEDOUT', `${what}: no wraith daemon ready within ${total} ms`));
    }, Math.max(0, ms));
    if (signal) signal.addEventListener('abort', onAbort, { once: true });
    promise.then(
      (v) => {
        done();
        resolve(v);
      },
      (e) => {
        done();
        reject(e);
      },
    );
  });
}

async function openChannel(openMsg, options, what) {
  const { signal } = options;
  if (signal && signal.aborted) throw abortError(signal);
  // One deadline for all of it: finding or starting the daemon, the WebSocket
  // handshake, and the daemon's answer.
  const timeout = options.timeout ?? (typeof options.connectTimeout === 'number' ? options.connectTimeout * 1000 + 10000 : DEFAULT_TIMEOUT);
  const deadline = Date.now() + timeout;
  const left = () => Math.max(0, deadline - Date.now());
  for (let attempt = 0; ; attempt++) {
    const endpoint = await bounded(daemon.resolve({ daemon: options.daemon, token: options.token, autostart: options.autostart !== false }), {
      ms: left(),
      total: timeout,
      signal,
      what,
    });
    // Our own child daemon that was stopped (gracefully) is gone or going: its
    // socket refuses, or it closes with 1001. Start a new one, once.
    const retry = (err) => attempt === 0 && options.autostart !== false && daemon.dropStaleChild(endpoint, err);
    let ws;
    try {
      ws = await daemon.openWebSocket(endpoint, { timeout: left(), signal });
    } catch (err) {
      if (retry(err)) continue;
      throw err;
    }
    const reply = firstMessage(ws, { timeout: left(), total: timeout, signal, what });
    ws.send(ipc.encode(openMsg));
    try {
      const { opened, takeBacklog } = await reply;
      return { ws, opened, takeBacklog };
    } catch (err) {
      if (retry(err)) continue;
      throw err;
    }
  }
}

/**
 * Open one stream through the daemon: connect options + `target`
 * (default `wraith-control:0`, the server's event bus).
 */
async function connect(options) {
  checkOptions(options, 'connect');
  const opts = daemonOptions(options);
  const { ws, opened, takeBacklog } = await openChannel({ type: 'open', kind: 'connect', options: opts }, options, 'connect');
  return new WraithStream(
    ws,
    takeBacklog,
    {
      role: 'client',
      kind: 'connect',
      id: opened.id,
      target: opened.target ?? opts.target ?? 'wraith-control:0',
      session: opened.session,
      pooled: Boolean(opened.pooled),
    },
    { allowHalfOpen: Boolean(options.allowHalfOpen) },
  );
}

class WraithServer extends EventEmitter {
  constructor(ws, opened, takeBacklog, options) {
    super();
    this._ws = ws;
    this._options = options;
    this.id = opened.id;
    this.addresses = Array.isArray(opened.addresses) ? opened.addresses.slice() : [];
    this._callbacks = [];
    this._backlog = [];
    this._closed = false;
    this.error = null;
    this._closedPromise = new Promise((resolve) => {
      this._resolveClosed = resolve;
    });
    ws.on('message', (raw) => this._onMessage(raw));
    ws.on('error', () => {});
    ws.on('close', (code, reason) => this._onClose(code, reason ? reason.toString() : ''));
    const backlog = takeBacklog();
    for (const raw of backlog) this._onMessage(raw);
    if (backlog.closed) this._onClose(backlog.closed[0], String(backlog.closed[1] || ''));
  }

  /** host:port the server listens on (first address). */
  get address() {
    return this.addresses[0];
  }

  get closed() {
    return this._closed;
  }

  /** Register a handler for incoming control-channel streams. */
  onConnection(cb) {
    if (typeof cb !== 'function') throw wraithError('EUSAGE', 'onConnection(cb) needs a function');
    this._callbacks.push(cb);
    const backlog = this._backlog.splice(0);
    for (const [stream, info] of backlog) this._deliver(stream, info);
    return this;
  }

  _deliver(stream, info) {
    this.emit('connection', stream, info);
    if (this._callbacks.length === 0) {
      if (this.listenerCount('connection') === 0) this._backlog.push([stream, info]);
      return;
    }
    for (const cb of this._callbacks) cb(stream, info);
  }

  async _accept(id, info) {
    let ch;
    try {
      ch = await openChannel({ type: 'open', kind: 'accept', id }, { ...this._options, timeout: 30000, signal: undefined }, 'accept');
    } catch (err) {
      this.emit('acceptError', err, info);
      return;
    }
    if (this._closed) {
      ch.ws.close(4000, 'abort');
      return;
    }
    const finalInfo = ch.opened.info && typeof ch.opened.info === 'object' ? ch.opened.info : info;
    const stream = new WraithStream(
      ch.ws,
      ch.takeBacklog,
      { role: 'server', kind: 'accept', id, info: finalInfo, server: this.id },
      { allowHalfOpen: Boolean(this._options.allowHalfOpen) },
    );
    this._deliver(stream, { ...finalInfo });
  }

  _onMessage(raw) {
    let msg;
    try {
      msg = ipc.decode(raw);
    } catch (err) {
      this._fail(err);
      return;
    }
    if (msg.type === 'incoming' && typeof msg.id === 'string') {
      const info = msg.info && typeof msg.info === 'object' ? msg.info : {};
      this._accept(msg.id, info);
    } else if (msg.type === 'error') {
      this.error = wraithError(String(msg.code || 'ESERVE'), String(msg.message || 'server error'));
    } else {
      this._fail(wraithError('EDAEMON', `the daemon broke the IPC protocol: unexpected ${JSON.stringify(msg.type)} on a serve control`));
    }
  }

  _fail(err) {
    this.error = err;
    this._ws.close(4000, 'protocol');
  }

  _onClose(code, reason) {
    const wasClosing = this._closing;
    this._closed = true;
    if (!wasClosing && !this.error) {
      this.error = code === 1001 ? wraithError('EDAEMON', 'the wraith daemon is shutting down') : wraithError('EDAEMON', `the daemon closed the server (WebSocket close ${code}${reason ? ` ${reason}` : ''})`);
    }
    const err = wasClosing ? null : this.error;
    for (const [stream] of this._backlog.splice(0)) stream.destroy();
    if (err && this.listenerCount('error') > 0) this.emit('error', err);
    this.emit('close', err);
    this._resolveClosed();
  }

  /** Stop listening; disconnects its sessions. Resolves when the daemon confirmed. */
  close() {
    if (!this._closed && !this._closing) {
      this._closing = true;
      try {
        this._ws.close(1000, 'close');
      } catch {
        this._ws.terminate();
      }
      const t = setTimeout(() => this._ws.terminate(), 5000);
      t.unref();
      this._closedPromise.then(() => clearTimeout(t));
    }
    return this._closedPromise;
  }

  /** Async iteration over incoming streams: `for await (const { stream, info } of server)`. */
  async *[Symbol.asyncIterator]() {
    const queue = [];
    let wake = null;
    const onConn = (stream, info) => {
      queue.push({ stream, info });
      if (wake) wake();
    };
    const onClose = () => {
      if (wake) wake();
    };
    this.on('connection', onConn);
    this.on('close', onClose);
    try {
      for (const [stream, info] of this._backlog.splice(0)) queue.push({ stream, info });
      for (;;) {
        while (queue.length) yield queue.shift();
        if (this._closed) return;
        await new Promise((r) => {
          wake = r;
        });
        wake = null;
      }
    } finally {
      this.off('connection', onConn);
      this.off('close', onClose);
    }
  }
}

/** Run a wraith server inside the daemon; its control-channel streams come to us. */
async function serve(options) {
  checkOptions(options, 'serve');
  const opts = daemonOptions(options);
  const { ws, opened, takeBacklog } = await openChannel({ type: 'open', kind: 'serve', options: opts }, options, 'serve');
  return new WraithServer(ws, opened, takeBacklog, {
    daemon: options.daemon,
    token: options.token,
    autostart: options.autostart,
    // for incoming streams; default false, as net.Server's
    allowHalfOpen: Boolean(options.allowHalfOpen),
  });
}

/** A daemon state event: `detail` is the event's data; `time` in unix seconds. */
class DaemonEvent extends CustomEvent {
  constructor(type, detail, time) {
    super(type, { detail });
    Object.defineProperty(this, 'time', { value: time, enumerable: true });
  }
}

class WraithDaemonEvents extends EventTarget {
  constructor(ws, opened, takeBacklog) {
    super();
    this._ws = ws;
    this.id = opened.id;
    this._all = new Set();
    this.error = null;
    this.closed = new Promise((resolve) => {
      this._resolveClosed = resolve;
    });
    ws.on('error', () => {});
    const onMessage = (raw) => {
      let msg;
      try {
        msg = ipc.decode(raw);
      } catch (e) {
        this.error = e;
        ws.close(4000, 'protocol');
        return;
      }
      if (msg.type !== 'event' || typeof msg.event !== 'string') return;
      const data = msg.data && typeof msg.data === 'object' ? msg.data : {};
      const ev = new DaemonEvent(msg.event, data, msg.time);
      for (const cb of this._all) cb({ event: msg.event, time: msg.time, data });
      this.dispatchEvent(ev);
    };
    ws.on('message', onMessage);
    // events in the backlog are replayed after the caller could add listeners
    const backlog = takeBacklog();
    if (backlog.length) setImmediate(() => backlog.forEach(onMessage));
    if (backlog.closed) setImmediate(() => this._resolveClosed());
    ws.on('close', (code) => {
      if (!this._closing && code !== 1000 && !this.error) this.error = wraithError('EDAEMON', `the daemon closed the events feed (close ${code})`);
      this._resolveClosed();
    });
  }

  /** Call cb({event, time, data}) for every event; returns an unsubscribe function. */
  onEvent(cb) {
    this._all.add(cb);
    return () => this._all.delete(cb);
  }

  close() {
    this._closing = true;
    if (this._ws.readyState === 0 || this._ws.readyState === 1) this._ws.close(1000, 'close');
    return this.closed;
  }
}

/**
 * Subscribe to the daemon's state events (session.*, stream.*, server.*).
 * `topics`: event-name prefixes (default: all). `onEvent`: optional callback.
 */
async function daemonEvents(options = {}) {
  checkOptions(options, 'daemonEvents');
  const msg = { type: 'open', kind: 'events' };
  if (options.topics) msg.topics = [...options.topics];
  const { ws, opened, takeBacklog } = await openChannel(msg, options, 'daemonEvents');
  const feed = new WraithDaemonEvents(ws, opened, takeBacklog);
  if (typeof options.onEvent === 'function') feed.onEvent(options.onEvent);
  return feed;
}

module.exports = { connect, serve, daemonEvents, WraithServer, WraithDaemonEvents, DaemonEvent };
