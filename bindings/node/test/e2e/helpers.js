'use strict';
// Shared setup of the end-to-end tests: the installed package, keys, a real
// `wraith serve`, TCP targets. Each test file runs in its own process with its
// own empty XDG_RUNTIME_DIR, so it autostarts its own child daemon and never
// finds a daemon some other program left running.

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const net = require('node:net');
const { spawn, execFile } = require('node:child_process');
const { createRequire } = require('node:module');
const { once } = require('node:events');

const PYTHON = process.env.WRAITH_PYTHON || 'python3';
const APP = process.env.WRAITH_TEST_APP;

function tmpdir(prefix = 'wraith-e2e-') {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

// Isolate this test process from any daemon on the machine.
const RUNTIME = tmpdir('wraith-e2e-xdg-');
process.env.XDG_RUNTIME_DIR = RUNTIME;
delete process.env.WRAITH_DAEMON;
delete process.env.WRAITH_DAEMON_TOKEN;
process.on('exit', () => fs.rmSync(RUNTIME, { recursive: true, force: true }));

/** The package as installed from the packed tarball into a fresh app (npm test), else the source tree. */
function loadPackage() {
  if (APP) return createRequire(path.join(APP, 'package.json'))('@wraith/node');
  return require('../..');
}

function pyRun(args, opts = {}) {
  return new Promise((resolve, reject) => {
    execFile(PYTHON, args, { timeout: 30000, ...opts }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${PYTHON} ${args.join(' ')} failed: ${err.message}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

/** host key, client key, a second (unauthorized) client key, authorized_keys. */
async function makeKeys(dir = tmpdir()) {
  const names = ['host', 'client', 'stranger', 'otherhost'];
  await Promise.all(names.map((n) => pyRun(['-m', 'wraith_core', 'keygen', path.join(dir, n)])));
  fs.copyFileSync(path.join(dir, 'client.pub'), path.join(dir, 'authorized_keys'));
  const k = Object.fromEntries(names.flatMap((n) => [[n, path.join(dir, n)], [`${n}Pub`, path.join(dir, `${n}.pub`)]]));
  k.authorizedKeys = path.join(dir, 'authorized_keys');
  k.dir = dir;
  return k;
}

/** A real `wraith serve` on 127.0.0.1:random; returns { address, proc, stop() }. */
async function startServe(keys) {
  const proc = spawn(PYTHON, ['-m', 'wraith_core', 'serve', '--key', keys.host, '--authorized-keys', keys.authorizedKeys, '--listen', '127.0.0.1:0'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let err = '';
  proc.stderr.on('data', (d) => {
    err += d;
    if (err.length > 100000) err = err.slice(-50000);
  });
  const address = await new Promise((resolve, reject) => {
    let out = '';
    const t = setTimeout(() => reject(new Error(`wraith serve did not start:\n${err}`)), 20000);
    proc.stdout.on('data', (d) => {
      out += d;
      const m = /listening tcp (\S+:\d+)/.exec(out);
      if (m) {
        clearTimeout(t);
        resolve(m[1]);
      }
    });
    proc.on('exit', (code) => {
      clearTimeout(t);
      reject(new Error(`wraith serve exited (${code}):\n${err}`));
    });
  });
  proc.stdout.resume();
  return {
    address,
    proc,
    log: () => err,
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      const done = once(proc, 'exit');
      proc.kill('SIGTERM');
      const t = setTimeout(() => proc.kill('SIGKILL'), 5000);
      await done;
      clearTimeout(t);
    },
  };
}

/** A TCP server on loopback (half-open sockets allowed); onConn(socket). Returns { port, target, server, close() }. */
async function tcpServer(onConn, { allowHalfOpen = true } = {}) {
  const sockets = new Set();
  const server = net.createServer({ allowHalfOpen }, (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => {});
    onConn(s);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: server.address().port,
    target: `127.0.0.1:${server.address().port}`,
    server,
    close() {
      for (const s of sockets) s.destroy();
      return new Promise((r) => server.close(() => r()));
    },
  };
}

/** A port on loopback where nothing listens. */
async function closedPort() {
  const s = net.createServer().listen(0, '127.0.0.1');
  await once(s, 'listening');
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

function rssOf(pid) {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : null;
  } catch {
    return null;
  }
}

function pidAlive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return e.code === 'EPERM';
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(pred, ms = 5000, what = 'condition') {
  const end = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** Read everything until 'end'; resolves { bytes, hash }. */
function drain(stream, algo = 'sha256') {
  const crypto = require('node:crypto');
  const h = crypto.createHash(algo);
  let n = 0;
  return new Promise((resolve, reject) => {
    stream.on('data', (d) => {
      h.update(d);
      n += d.length;
    });
    stream.on('end', () => resolve({ bytes: n, hash: h.digest('hex') }));
    stream.on('error', reject);
  });
}

/** Resolves once the stream has emitted 'close' (at once if it already has). */
function closed(stream) {
  if (stream.closed) return Promise.resolve();
  return new Promise((resolve) => stream.once('close', resolve));
}

module.exports = {
  closed, PYTHON, APP, RUNTIME, tmpdir, loadPackage, pyRun, makeKeys, startServe, tcpServer, closedPort, rssOf, pidAlive, sleep, waitFor, drain };
