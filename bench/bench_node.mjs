#!/usr/bin/env node
// Benchmark: a Node consumer's throughput and connect latency through
// @wraith/node (Node -> wraith daemon -> SSH -> wraith serve -> target)
// against the `ssh2` npm package opening a `forwardOut` channel to the SAME
// `wraith serve` (Node -> SSH in process -> wraith serve -> target), in the
// same run, rounds interleaved. Everything on loopback.
//
//   (cd bindings/node && npm install) && (cd bench/node && npm install)
//   node bench/bench_node.mjs [--mib 256] [--rounds 3] [--latency 20] [--quick]
//
// Prints a table, the ratios (wraith / ssh2 for throughput: > 1 means wraith
// is faster; ssh2 / wraith for latency: > 1 means wraith is faster) and one
// JSON line. Hard limit: 300 s.
import { execFileSync, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const here = path.dirname(fileURLToPath(import.meta.url));
const wraith = await import('@wraith/node').catch(() => import(path.join(here, '../bindings/node/index.mjs')));
let ssh2;
try {
  ssh2 = createRequire(path.join(here, 'node/package.json'))('ssh2');
} catch {
  console.error('bench_node: ssh2 is missing: run `npm install` in bench/node');
  process.exit(2);
}

const { values: args } = parseArgs({
  options: {
    mib: { type: 'string', default: '256' },
    rounds: { type: 'string', default: '3' },
    latency: { type: 'string', default: '20' },
    quick: { type: 'boolean', default: false },
  },
});
const MIB = args.quick ? 64 : Number(args.mib);
const ROUNDS = args.quick ? 2 : Number(args.rounds);
const LAT_N = args.quick ? 8 : Number(args.latency);
const PY = process.env.WRAITH_PYTHON || 'python3';

const hardStop = setTimeout(() => {
  console.error('bench_node: hard time limit (300 s) reached');
  process.exit(1);
}, 300_000);
hardStop.unref();

// -- setup: keys, wraith serve, a target process ----------------------------------------------

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'wraith-bench-node-'));
const children = [];
function cleanup() {
  for (const c of children) {
    try {
      c.kill('SIGTERM');
    } catch {
      // gone
    }
  }
  fs.rmSync(tmp, { recursive: true, force: true });
}
process.on('exit', cleanup);
process.on('SIGINT', () => process.exit(130));

for (const k of ['host', 'client']) execFileSync(PY, ['-m', 'wraith_core', 'keygen', path.join(tmp, k)]);
fs.copyFileSync(path.join(tmp, 'client.pub'), path.join(tmp, 'authorized_keys'));

function startAndRead(cmd, argv, pattern, what) {
  const p = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(p);
  let err = '';
  p.stderr.on('data', (d) => {
    err = (err + d).slice(-20000);
  });
  return new Promise((resolve, reject) => {
    let out = '';
    const t = setTimeout(() => reject(new Error(`${what} did not start:\n${err}`)), 20000);
    p.stdout.on('data', (d) => {
      out += d;
      const m = pattern.exec(out);
      if (m) {
        clearTimeout(t);
        p.stdout.resume();
        resolve(m[1]);
      }
    });
    p.on('exit', (c) => reject(new Error(`${what} exited (${c}):\n${err}`)));
  });
}

const serveAddr = await startAndRead(
  PY,
  ['-m', 'wraith_core', 'serve', '--key', path.join(tmp, 'host'), '--authorized-keys', path.join(tmp, 'authorized_keys'), '--listen', '127.0.0.1:0', '--log-level', 'warning'],
  /listening tcp (\S+:\d+)/,
  'wraith serve',
);
const [serveHost, servePort] = [serveAddr.split(':')[0], Number(serveAddr.split(':')[1])];

// Target (own process, so neither contender shares its event loop with it):
// 'U' = sink, answers the byte count (8 bytes BE) at EOF; 'D'+u64 = send that
// many bytes then EOF; 'E' = echo.
const TARGET = `
const net = require('net');
const chunk = Buffer.alloc(1 << 20, 0x77);
net.createServer({ allowHalfOpen: true }, (s) => {
  s.setNoDelay(true);
  let mode = null, n = 0, head = Buffer.alloc(0);
  s.on('error', () => {});
  s.on('data', (d) => {
    if (mode === null) {
      head = Buffer.concat([head, d]);
      if (head[0] === 0x55) { mode = 'U'; n += head.length - 1; }
      else if (head[0] === 0x45) { mode = 'E'; if (head.length > 1) s.write(head.subarray(1)); }
      else if (head[0] === 0x44 && head.length >= 9) {
        mode = 'D';
        let left = Number(head.readBigUInt64BE(1));
        const pump = () => {
          while (left > 0) {
            const k = Math.min(left, chunk.length);
            left -= k;
            if (!s.write(k === chunk.length ? chunk : chunk.subarray(0, k))) return s.once('drain', pump);
          }
          s.end();
        };
        pump();
      }
      return;
    }
    if (mode === 'U') n += d.length;
    else if (mode === 'E') s.write(d);
  });
  s.on('end', () => {
    if (mode === 'U') { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(n)); s.end(b); }
    else if (mode === 'E') s.end();
  });
}).listen(0, '127.0.0.1', function () { console.log('target ' + this.address().port); });
`;
const targetPort = Number(await startAndRead(process.execPath, ['-e', TARGET], /target (\d+)/, 'target'));
const target = `127.0.0.1:${targetPort}`;

// -- the two contenders: open a stream to the target ---------------------------------------

const identity = path.join(tmp, 'client');
const hostPub = path.join(tmp, 'host.pub');
const hostBlob = Buffer.from(fs.readFileSync(hostPub, 'utf8').trim().split(/\s+/)[1], 'base64');
let fresh = 0;

const contenders = {
  wraith: {
    // warm: a channel on the daemon's pooled session
    open: () => wraith.connect({ server: serveAddr, identity, hostKey: hostPub, target }),
    // cold: a new SSH session (a distinct pool key forces one) + channel
    openCold: () => wraith.connect({ server: serveAddr, identity, hostKey: hostPub, target, connectTimeout: 15 + ++fresh / 1e6 }),
  },
  ssh2: {
    conn: null,
    sshConnect() {
      return new Promise((resolve, reject) => {
        const c = new ssh2.Client();
        c.on('ready', () => resolve(c));
        c.on('error', reject);
        c.connect({
          host: serveHost,
          port: servePort,
          username: os.userInfo().username,
          privateKey: fs.readFileSync(identity),
          hostVerifier: (key) => Buffer.compare(key, hostBlob) === 0,
          readyTimeout: 20000,
        });
        // ssh2 leaves Nagle on by default, which costs its handshake ~80 ms of
        // delayed ACKs on loopback; give it the best case.
        c.setNoDelay(true);
      });
    },
    forward(c) {
      return new Promise((resolve, reject) => {
        c.forwardOut('127.0.0.1', 0, '127.0.0.1', targetPort, (err, ch) => (err ? reject(err) : resolve(ch)));
      });
    },
    async open() {
      if (!this.conn) this.conn = await this.sshConnect();
      return this.forward(this.conn);
    },
    async openCold() {
      const c = await this.sshConnect();
      const ch = await this.forward(c);
      ch.on('close', () => c.end());
      return ch;
    },
  },
};

// -- measurements ------------------------------------------------------------------------------

const CHUNK = crypto.randomBytes(1 << 20);

function readAll(stream) {
  const parts = [];
  return new Promise((resolve, reject) => {
    stream.on('data', (d) => parts.push(d));
    stream.on('end', () => resolve(Buffer.concat(parts)));
    stream.on('error', reject);
  });
}

async function upload(c, mib) {
  const s = await c.open();
  const reply = readAll(s);
  const t0 = process.hrtime.bigint();
  s.write(Buffer.from('U'));
  for (let i = 0; i < mib; i++) {
    if (!s.write(CHUNK)) await once(s, 'drain');
  }
  s.end();
  const r = await reply;
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.length !== 8 || Number(r.readBigUInt64BE(0)) !== mib << 20) throw new Error(`upload: target got ${r.length === 8 ? r.readBigUInt64BE(0) : r.length}`);
  return (mib * 1048576) / secs / 1e6;
}

async function download(c, mib) {
  const s = await c.open();
  const cmd = Buffer.alloc(9);
  cmd[0] = 0x44;
  cmd.writeBigUInt64BE(BigInt(mib << 20), 1);
  let n = 0;
  const t0 = process.hrtime.bigint();
  const done = new Promise((resolve, reject) => {
    s.on('data', (d) => {
      n += d.length;
    });
    s.on('end', resolve);
    s.on('error', reject);
  });
  s.write(cmd);
  await done;
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  s.end();
  if (n !== mib << 20) throw new Error(`download: got ${n}`);
  return (mib * 1048576) / secs / 1e6;
}

/** ms from "open a stream" to the first echoed byte back. */
async function latency(open) {
  const t0 = process.hrtime.bigint();
  const s = await open();
  const back = new Promise((resolve, reject) => {
    s.once('data', resolve);
    s.once('error', reject);
  });
  s.write(Buffer.from('Ex'));
  await back;
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  s.resume();
  s.end();
  await new Promise((r) => (s.closed || s.destroyed ? r() : s.once('close', r)));
  return ms;
}

const median = (xs) => {
  const a = [...xs].sort((x, y) => x - y);
  return a.length % 2 ? a[(a.length - 1) / 2] : (a[a.length / 2 - 1] + a[a.length / 2]) / 2;
};
const p90 = (xs) => [...xs].sort((x, y) => x - y)[Math.min(xs.length - 1, Math.ceil(xs.length * 0.9) - 1)];

// warm-up: start the daemon (timed), one session each, a small transfer each
const td = process.hrtime.bigint();
const first = await contenders.wraith.open();
const daemonStartMs = Number(process.hrtime.bigint() - td) / 1e6;
first.destroy();
for (const name of ['wraith', 'ssh2']) {
  await upload(contenders[name], 8);
  await download(contenders[name], 8);
}

const results = { wraith: { up: [], down: [], cold: [], warm: [] }, ssh2: { up: [], down: [], cold: [], warm: [] } };
for (let r = 0; r < ROUNDS; r++) {
  const order = r % 2 ? ['ssh2', 'wraith'] : ['wraith', 'ssh2'];
  for (const name of order) results[name].up.push(await upload(contenders[name], MIB));
  for (const name of order) results[name].down.push(await download(contenders[name], MIB));
}
for (let i = 0; i < LAT_N; i++) {
  const order = i % 2 ? ['ssh2', 'wraith'] : ['wraith', 'ssh2'];
  for (const name of order) results[name].warm.push(await latency(() => contenders[name].open()));
  for (const name of order) results[name].cold.push(await latency(() => contenders[name].openCold()));
}

// -- report --------------------------------------------------------------------------------------

const best = (xs) => Math.max(...xs);
const w = results.wraith;
const s = results.ssh2;
let nativeSsh2 = false;
try {
  createRequire(path.join(here, 'node/package.json'))('ssh2/lib/protocol/crypto/build/Release/sshcrypto.node');
  nativeSsh2 = true;
} catch {
  // pure JS crypto fallback
}
const fmt = (x) => x.toFixed(1).padStart(9);
console.log(`bench_node: ${MIB} MiB per transfer, best of ${ROUNDS} rounds; latency median/p90 of ${LAT_N}; Node ${process.version}, ssh2 ${createRequire(path.join(here, 'node/package.json'))('ssh2/package.json').version}${nativeSsh2 ? ' (native crypto binding)' : ' (JS crypto)'}, setNoDelay(true)`);
console.log(`daemon autostart + first session + first stream: ${daemonStartMs.toFixed(0)} ms (once per process)`);
console.log('                                 @wraith/node       ssh2    ratio');
console.log(`upload   MB/s (client->target) ${fmt(best(w.up))}  ${fmt(best(s.up))}   ${(best(w.up) / best(s.up)).toFixed(2)}x`);
console.log(`download MB/s (target->client) ${fmt(best(w.down))}  ${fmt(best(s.down))}   ${(best(w.down) / best(s.down)).toFixed(2)}x`);
console.log(`connect, new session   ms med ${fmt(median(w.cold))}  ${fmt(median(s.cold))}   ${(median(s.cold) / median(w.cold)).toFixed(2)}x   (p90 ${p90(w.cold).toFixed(1)} / ${p90(s.cold).toFixed(1)})`);
console.log(`connect, pooled/warm   ms med ${fmt(median(w.warm))}  ${fmt(median(s.warm))}   ${(median(s.warm) / median(w.warm)).toFixed(2)}x   (p90 ${p90(w.warm).toFixed(1)} / ${p90(s.warm).toFixed(1)})`);
console.log('ratios: throughput = wraith/ssh2, latency = ssh2/wraith (> 1: wraith better)');
console.log(
  `JSON ${JSON.stringify({
    mib: MIB,
    rounds: ROUNDS,
    wraith: { upMBps: best(w.up), downMBps: best(w.down), coldMs: median(w.cold), warmMs: median(w.warm) },
    ssh2: { upMBps: best(s.up), downMBps: best(s.down), coldMs: median(s.cold), warmMs: median(s.warm), native: nativeSsh2 },
    ratio: {
      up: best(w.up) / best(s.up),
      down: best(w.down) / best(s.down),
      cold: median(s.cold) / median(w.cold),
      warm: median(s.warm) / median(w.warm),
    },
    daemonStartMs,
  })}`,
);

if (contenders.ssh2.conn) contenders.ssh2.conn.end();
await wraith.shutdownDaemon();
process.exit(0);
