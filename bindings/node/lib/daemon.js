'use strict';

// Finding (or starting) a wraith daemon and opening WebSockets to it
// (docs/ipc.md §1-2). Order: the `daemon` option, WRAITH_DAEMON, daemon.json
// in the daemon directory whose pid is alive, else a child daemon of our own
// (`$WRAITH_PYTHON -m wraith_core daemon --dir TMP --exit-with-stdin`) that
// dies with this process (its stdin is our pipe) and is stopped on exit.

const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { spawn } = require('node:child_process');
const WebSocket = require('ws');
const { wraithError, abortError } = require('./errors');
const { MAX_MESSAGE } = require('./ipc');

const READY_TIMEOUT = 20000;
const READY_PREFIX = 'wraith daemon: ready ';
const INSTALL_HINT = "pip install 'wraith[daemon]'";

function defaultDir() {
  const xdg = process.env.XDG_RUNTIME_DIR;
  if (xdg) return path.join(xdg, 'wraith');
  return `/tmp/wraith-${process.getuid ? process.getuid() : 0}`;
}

/** `unix:PATH` | `tcp:HOST:PORT` | `/abs/path` | `ws://host:port` -> `unix:…` / `tcp:…` */
function parseEndpoint(spec, where) {
  if (typeof spec !== 'string' || !spec) throw wraithError('EUSAGE', `${where}: expected unix:PATH or tcp:HOST:PORT`);
  if (spec.startsWith('unix:') || spec.startsWith('tcp:')) return spec;
  if (spec.startsWith('/')) return `unix:${spec}`;
  if (spec.startsWith('ws://')) return `tcp:${spec.slice(5).replace(/\/+$/, '')}`;
  throw wraithError('EUSAGE', `${where} ${JSON.stringify(spec)}: expected unix:PATH or tcp:HOST:PORT`);
}

function pidAlive(pid) {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return e.code === 'EPERM';
  }
}

const MAX_SMALL_FILE = 64 * 1024; // daemon.json and token files

// The contents of `file` if it is a small regular file of ours in a directory only we can
// use (as the daemon makes it: ours, 0700, not a symlink), else null. In /tmp another user
// could make the directory first, with a daemon.json pointing at their listener and a
// tokenFile naming one of our secrets: such files are never read.
function readPrivateFile(file) {
  const uid = process.getuid ? process.getuid() : -1;
  let fd;
  try {
    const dir = fs.lstatSync(path.dirname(file));
    if (!dir.isDirectory() || dir.uid !== uid || dir.mode & 0o077) return null;
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
  } catch {
    return null;
  }
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile() || st.uid !== uid || st.size > MAX_SMALL_FILE) return null;
    const buf = Buffer.alloc(MAX_SMALL_FILE + 1);
    const n = fs.readSync(fd, buf, 0, buf.length, 0);
    return n <= MAX_SMALL_FILE ? buf.subarray(0, n).toString('utf8') : null;
  } catch {
    return null;
  } finally {
    fs.closeSync(fd);
  }
}

function readDaemonJson(file) {
  const text = readPrivateFile(file);
  if (text === null) return null;
  let info;
  try {
    info = JSON.parse(text);
  } catch {
    return null;
  }
  if (!info || typeof info !== 'object' || info.version !== 1 || typeof info.ws !== 'string') return null;
  try {
    parseEndpoint(info.ws, 'daemon.json');
  } catch {
    return null;
  }
  if (info.tokenFile != null) {
    // the daemon writes its token beside daemon.json
    if (typeof info.tokenFile !== 'string' || path.resolve(path.dirname(info.tokenFile)) !== path.resolve(path.dirname(file))) return null;
  }
  if (info.events != null && typeof info.events !== 'string') return null;
  if (!pidAlive(info.pid)) return null;
  return info;
}

function isLoopback(host) {
  const h = host.replace(/^\[|\]$/g, '');
  if (h === 'localhost' || h === '::1') return true;
  return net.isIPv4(h) && h.startsWith('127.');
}

function tokenFor(ws, explicit, tokenFile) {
  if (!ws.startsWith('tcp:')) return null;
  if (explicit) return explicit;
  if (process.env.WRAITH_DAEMON_TOKEN) return process.env.WRAITH_DAEMON_TOKEN;
  // the local daemon's token file goes to no other host, whatever names it
  if (!isLoopback(ws.slice(4, ws.lastIndexOf(':')))) return null;
  const text = readPrivateFile(tokenFile || path.join(defaultDir(), 'token'));
  const token = text === null ? '' : text.trim();
  return token && /^[\x21-\x7e]+$/.test(token) ? token : null;
}

/** The endpoint of a running daemon, or null if there is none to find. */
function discover({ daemon, token } = {}) {
  if (daemon) {
    const ws = parseEndpoint(daemon, 'option daemon');
    return { ws, token: tokenFor(ws, token, null), events: null, source: 'daemon option' };
  }
  const env = process.env.WRAITH_DAEMON;
  if (env) {
    const ws = parseEndpoint(env, 'WRAITH_DAEMON');
    return { ws, token: tokenFor(ws, token, null), events: null, source: 'WRAITH_DAEMON' };
  }
  const info = readDaemonJson(path.join(defaultDir(), 'daemon.json'));
  if (info) {
    return { ws: info.ws, token: tokenFor(info.ws, token, info.tokenFile), events: info.events || null, source: 'daemon.json', pid: info.pid };
  }
  return null;
}

// -- the child daemon --------------------------------------------------------------

let child = null; // { proc, dir, endpoint, python }
let starting = null; // Promise<endpoint>

function whichSync(cmd) {
  if (cmd.includes('/')) {
    try {
      fs.accessSync(cmd, fs.constants.X_OK);
      return cmd;
    } catch {
      return null;
    }
  }
  for (const dir of (process.env.PATH || '').split(path.delimiter)) {
    if (!dir) continue;
    const p = path.join(dir, cmd);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      if (fs.statSync(p).isFile()) return p;
    } catch {
      // keep looking
    }
  }
  return null;
}

function missingPython(python) {
  return wraithError(
    'EDAEMON',
    `cannot start a wraith daemon: the Python interpreter ${JSON.stringify(python)} was not found. ` +
      `Install Python 3.11+ and wraith into it (\`${python} -m ${INSTALL_HINT}\`), set WRAITH_PYTHON to an ` +
      'interpreter that has wraith, or point WRAITH_DAEMON at a running daemon (`wraith daemon`)',
    { missing: 'python', python },
  );
}

function readLog(file) {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return '';
  }
}

function startFailure(python, log, why) {
  if (/No module named ['"]?wraith_core/.test(log)) {
    return wraithError(
      'EDAEMON',
      `cannot start a wraith daemon: wraith_core is not installed for ${python}. Install it with ` +
        `\`${python} -m ${INSTALL_HINT}\` (or set WRAITH_PYTHON to an interpreter that has it, or ` +
        'WRAITH_DAEMON to a running daemon)',
      { missing: 'wraith_core', python },
    );
  }
  const m = /No module named ['"]?([\w.]+)/.exec(log);
  if (m) {
    return wraithError(
      'EDAEMON',
      `cannot start a wraith daemon: ${python} lacks the Python module '${m[1]}' the daemon needs. ` +
        `Install it with \`${python} -m ${INSTALL_HINT}\``,
      { missing: m[1], python },
    );
  }
  const tail = log.trim().split('\n').slice(-15).join('\n');
  return wraithError('EDAEMON', `the wraith daemon (${python}) ${why}${tail ? `:\n${tail}` : ''}`, { python });
}

function spawnChild() {
  const python = process.env.WRAITH_PYTHON || 'python3';
  const found = whichSync(python);
  if (!found) return Promise.reject(missingPython(python));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'wraith-node-')); // 0700
  const logFile = path.join(dir, 'daemon.log');
  const logFd = fs.openSync(logFile, 'w', 0o600);
  const env = { ...process.env };
  delete env.WRAITH_DAEMON;
  let proc;
  try {
    proc = spawn(found, ['-m', 'wraith_core', 'daemon', '--dir', path.join(dir, 'd'), '--exit-with-stdin'], {
      stdio: ['pipe', 'pipe', logFd],
      env,
    });
  } catch (e) {
    fs.closeSync(logFd);
    fs.rmSync(dir, { recursive: true, force: true });
    return Promise.reject(missingPython(python));
  }
  fs.closeSync(logFd);
  return new Promise((resolve, reject) => {
    let out = '';
    let settled = false;
    const finish = (err, info) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      proc.stdout.off('data', onData);
      proc.off('exit', onExit);
      proc.off('error', onError);
      if (err) {
        stopProc(proc, dir);
        reject(err);
        return;
      }
      // Don't let the daemon's pipes keep this process alive; the stdin pipe
      // stays open as the daemon's lifeline until we exit.
      proc.stdout.resume();
      proc.stdout.unref?.();
      proc.stdin.unref?.();
      proc.stdin.on('error', () => {});
      proc.unref();
      child = { proc, dir, python, endpoint: { ws: info.ws, token: tokenFor(info.ws, null, info.tokenFile), events: info.events || null, source: 'child daemon', pid: info.pid } };
      proc.once('exit', () => {
        if (child && child.proc === proc) child = null;
        fs.rmSync(dir, { recursive: true, force: true });
      });
      resolve(child.endpoint);
    };
    const onData = (chunk) => {
      out += chunk.toString('utf8');
      let nl;
      while ((nl = out.indexOf('\n')) >= 0) {
        const line = out.slice(0, nl).trim();
        out = out.slice(nl + 1);
        if (line.startsWith(READY_PREFIX)) {
          try {
            const info = JSON.parse(line.slice(READY_PREFIX.length));
            if (info && typeof info.ws === 'string') return finish(null, info);
          } catch {
            // not JSON: keep waiting
          }
        }
      }
      return undefined;
    };
    const onExit = (code, signal) => {
      // give the log a moment to be complete
      setTimeout(() => finish(startFailure(python, readLog(logFile), `exited with ${signal || `status ${code}`}`)), 20);
    };
    const onError = (e) => finish(e.code === 'ENOENT' || e.code === 'EACCES' ? missingPython(python) : wraithError('EDAEMON', `cannot start the wraith daemon: ${e.message}`));
    const timer = setTimeout(() => finish(startFailure(python, readLog(logFile), `did not become ready within ${READY_TIMEOUT / 1000} s`)), READY_TIMEOUT);
    proc.stdout.on('data', onData);
    proc.on('exit', onExit);
    proc.on('error', onError);
  });
}

function stopProc(proc, dir) {
  try {
    proc.stdin.destroy(); // the lifeline: the daemon exits on EOF
  } catch {
    // already gone
  }
  if (proc.exitCode === null && proc.signalCode === null) {
    try {
      proc.kill('SIGTERM');
    } catch {
      // already gone
    }
  }
  if (dir) {
    const rm = () => fs.rmSync(dir, { recursive: true, force: true });
    if (proc.exitCode !== null || proc.signalCode !== null) rm();
    else proc.once('exit', rm);
  }
}

process.once('exit', () => {
  // Synchronous last words: signal the child and remove its directory. (If we
  // are killed instead, the daemon still sees EOF on its stdin and exits.)
  if (!child) return;
  try {
    child.proc.kill('SIGTERM');
  } catch {
    // already gone
  }
  try {
    fs.rmSync(child.dir, { recursive: true, force: true });
  } catch {
    // best effort
  }
});

/**
 * Stop the daemon this process started, if any; resolves when it has exited.
 */
function shutdown({ timeout = 5000 } = {}) {
  const c = child;
  child = null;
  starting = null;
  if (!c) return Promise.resolve();
  const { proc } = c;
  return new Promise((resolve) => {
    if (proc.exitCode !== null || proc.signalCode !== null) {
      fs.rmSync(c.dir, { recursive: true, force: true });
      resolve();
      return;
    }
    const t1 = setTimeout(() => proc.kill('SIGKILL'), timeout);
    proc.once('exit', () => {
      clearTimeout(t1);
      fs.rmSync(c.dir, { recursive: true, force: true });
      resolve();
    });
    try {
      proc.stdin.destroy();
    } catch {
      // gone
    }
    proc.kill('SIGTERM');
  });
}

/**
 * After `err` from opening `endpoint`: if that endpoint is our child daemon's and the
 * error says it is gone or going (its socket removed or refusing: ENOENT,
 * ECONNREFUSED; close 1001 "shutting down"), forget that child (stopping what is
 * left of it) so the next resolve() starts a new one, and return true: worth one
 * retry. Before its 'exit' event the dead child would otherwise be handed out again.
 */
function dropStaleChild(endpoint, err) {
  if (!endpoint || endpoint.source !== 'child daemon' || !err) return false;
  const code = (err.cause && err.cause.code) || err.code;
  if (!(code === 'ENOENT' || code === 'ECONNREFUSED' || err.closeCode === 1001)) return false;
  if (child && child.endpoint === endpoint) {
    const c = child;
    child = null;
    stopProc(c.proc, c.dir);
  }
  return true;
}

/** The daemon this process started (pid, endpoint), or null. */
function childDaemon() {
  return child ? { pid: child.proc.pid, dir: child.dir, python: child.python, ...child.endpoint } : null;
}

/** Resolve the daemon endpoint to use, autostarting a child daemon if none is found. */
async function resolve({ daemon, token, autostart = true } = {}) {
  const found = discover({ daemon, token });
  if (found) return found;
  if (child && child.proc.exitCode === null && child.proc.signalCode === null) return child.endpoint;
  if (!autostart) {
    throw wraithError('EDAEMON', 'no wraith daemon is running (start one with `wraith daemon`, or set WRAITH_DAEMON)');
  }
  if (!starting) {
    starting = spawnChild().finally(() => {
      starting = null;
    });
  }
  return starting;
}

const WS_OPTIONS = {
  perMessageDeflate: false,
  maxPayload: MAX_MESSAGE + 1024,
  skipUTF8Validation: true,
  // Zero mask: ws then skips masking entirely. The peer is our own daemon on a
  // local socket; masking defends browsers' proxies, which are not involved.
  generateMask() {},
  handshakeTimeout: 10000,
};

// A full accept queue of the daemon's Unix socket fails connect() at once with EAGAIN
// (a burst of connects): that is retried, after a short random delay, until the timeout.
const EAGAIN_FIRST_DELAY = 2;
const EAGAIN_MAX_DELAY = 50;

/**
 * Open one WebSocket to the daemon at `endpoint` (resolves once open).
 * `timeout` (ms) bounds the whole attempt, retries and handshake included;
 * `signal` aborts it.
 */
function openWebSocket(endpoint, { timeout = 10000, signal } = {}) {
  let url;
  const headers = {};
  if (endpoint.ws.startsWith('unix:')) {
    url = `ws+unix://${endpoint.ws.slice(5)}:/`;
  } else {
    url = `ws://${endpoint.ws.slice(4)}/`;
    if (endpoint.token) headers.Authorization = `Bearer ${endpoint.token}`;
  }
  const deadline = Date.now() + timeout;
  return new Promise((resolve, reject) => {
    let ws = null;
    let retry = null;
    let attempt = 0;
    let settled = false;
    const noop = () => {};
    const finish = (err) => {
      if (settled) return;
      settled = true;
      clearTimeout(retry);
      clearTimeout(overall);
      if (signal) signal.removeEventListener('abort', onAbort);
      if (err) {
        if (ws) {
          ws.removeAllListeners('open');
          ws.on('error', noop);
          ws.terminate();
        }
        reject(err);
      } else {
        resolve(ws);
      }
    };
    const onAbort = () => finish(abortError(signal));
    const overall = setTimeout(
      () => finish(wraithError('ETIMEDOUT', `cannot reach the wraith daemon at ${endpoint.ws} (${endpoint.source}) within ${timeout} ms`)),
      Math.max(0, timeout),
    );
    const tryOnce = () => {
      retry = null;
      try {
        ws = new WebSocket(url, { ...WS_OPTIONS, headers, handshakeTimeout: Math.max(1, Math.min(WS_OPTIONS.handshakeTimeout, deadline - Date.now())) });
      } catch (e) {
        ws = null;
        finish(wraithError('EDAEMON', `bad daemon endpoint ${endpoint.ws}: ${e.message}`));
        return;
      }
      ws.binaryType = 'nodebuffer';
      const cleanup = () => {
        ws.off('open', onOpen);
        ws.off('error', onError);
        ws.off('unexpected-response', onResponse);
      };
      const onOpen = () => {
        cleanup();
        finish(null);
      };
      const onError = (e) => {
        cleanup();
        ws.on('error', noop);
        if (e && e.code === 'EAGAIN' && !settled) {
          const delay = Math.min(EAGAIN_MAX_DELAY, EAGAIN_FIRST_DELAY * 2 ** attempt++) * (0.5 + Math.random());
          if (Date.now() + delay < deadline) {
            ws = null;
            retry = setTimeout(tryOnce, delay);
            return;
          }
        }
        finish(
          wraithError('EDAEMON', `cannot reach the wraith daemon at ${endpoint.ws} (${endpoint.source}): ${e.message}`, {
            cause: e,
          }),
        );
      };
      const onResponse = (req, res) => {
        cleanup();
        ws.on('error', noop);
        req.destroy();
        const hint = res.statusCode === 401 ? ' (wrong or missing token)' : '';
        finish(wraithError('EDAEMON', `the daemon at ${endpoint.ws} refused us: HTTP ${res.statusCode}${hint}`, { status: res.statusCode }));
      };
      ws.on('open', onOpen);
      ws.on('error', onError);
      ws.on('unexpected-response', onResponse);
    };
    if (signal && signal.aborted) {
      onAbort();
      return;
    }
    if (signal) signal.addEventListener('abort', onAbort, { once: true });
    tryOnce();
  });
}

module.exports = { defaultDir, parseEndpoint, discover, resolve, shutdown, childDaemon, openWebSocket, dropStaleChild };
