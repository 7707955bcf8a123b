'use strict';
// Daemon discovery, autostart and shutdown, install hints, the events feed,
// the TCP endpoint with its token.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { spawn, execFileSync } = require('node:child_process');
const { once } = require('node:events');
const h = require('./helpers');

const wraith = h.loadPackage();
let keys;
let serve;
let base;

test.before(async () => {
  keys = await h.makeKeys();
  serve = await h.startServe(keys);
  base = { server: serve.address, identity: keys.client, hostKey: keys.hostPub };
});

test.after(async () => {
  await wraith.shutdownDaemon();
  if (serve) await serve.stop();
});

function withEnv(vars, fn) {
  const saved = {};
  for (const k of Object.keys(vars)) {
    saved[k] = process.env[k];
    if (vars[k] === undefined) delete process.env[k];
    else process.env[k] = vars[k];
  }
  const restore = () => {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  };
  return Promise.resolve()
    .then(fn)
    .finally(restore);
}

/** Start `wraith daemon` ourselves; resolves { info, proc, stop() }. */
async function startDaemon(args, env = {}) {
  const proc = spawn(h.PYTHON, ['-m', 'wraith_core', 'daemon', ...args], { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  let errText = '';
  proc.stderr.on('data', (d) => {
    errText += d;
  });
  const info = await new Promise((resolve, reject) => {
    let out = '';
    const t = setTimeout(() => reject(new Error(`daemon not ready:\n${errText}`)), 20000);
    proc.stdout.on('data', (d) => {
      out += d;
      const m = /wraith daemon: ready (\{.*\})\n/.exec(out);
      if (m) {
        clearTimeout(t);
        resolve(JSON.parse(m[1]));
      }
    });
    proc.on('exit', (c) => reject(new Error(`daemon exited ${c}:\n${errText}`)));
  });
  return {
    info,
    proc,
    async stop() {
      if (proc.exitCode !== null) return;
      const done = once(proc, 'exit');
      proc.kill('SIGTERM');
      await done;
    },
  };
}

test('a missing Python: EDAEMON saying what to install', { timeout: 30000 }, async () => {
  assert.equal(wraith.childDaemon(), null);
  await withEnv({ WRAITH_PYTHON: '/nonexistent/bin/python3' }, async () => {
    await assert.rejects(wraith.connect(base), (e) => {
      assert.equal(e.code, 'EDAEMON');
      assert.equal(e.missing, 'python');
      assert.match(e.message, /\/nonexistent\/bin\/python3/);
      assert.match(e.message, /pip install 'wraith\[daemon\]'/);
      return true;
    });
  });
});

test('Python without wraith_core: EDAEMON saying what to install', { timeout: 30000 }, async () => {
  const dir = h.tmpdir();
  const bare = path.join(dir, 'python-without-wraith');
  // -I -S: no site-packages, no cwd on sys.path -> wraith_core is not importable
  fs.writeFileSync(bare, `#!/bin/sh\nexec ${execFileSync('sh', ['-c', `command -v ${h.PYTHON}`]).toString().trim()} -I -S "$@"\n`, { mode: 0o755 });
  await withEnv({ WRAITH_PYTHON: bare }, async () => {
    await assert.rejects(wraith.connect(base), (e) => {
      assert.equal(e.code, 'EDAEMON');
      assert.equal(e.missing, 'wraith_core');
      assert.match(e.message, /wraith_core is not installed/);
      assert.match(e.message, /pip install 'wraith\[daemon\]'/);
      return true;
    });
  });
  assert.equal(wraith.childDaemon(), null);
  fs.rmSync(dir, { recursive: true, force: true });
});

test('autostart: a child daemon in a private dir, reused, stopped when the Node process exits', { timeout: 60000 }, async () => {
  const app = process.env.WRAITH_TEST_APP;
  const pkg = app ? JSON.stringify(path.join(app, 'package.json')) : JSON.stringify(path.resolve(__dirname, '../../package.json'));
  const script = `
    const { createRequire } = require('node:module');
    const w = createRequire(${pkg})('@wraith/node');
    (async () => {
      const s1 = await w.connect(${JSON.stringify(base)});
      const s2 = await w.connect(${JSON.stringify(base)});
      const c = w.childDaemon();
      console.log(JSON.stringify({ pid: c.pid, dir: c.dir, ws: c.ws, pooled: s2.wraith.pooled }));
      s1.destroy(); s2.destroy();
      if (process.argv[1] === 'hang') setInterval(() => {}, 1000); // wait to be killed
      // 'exit': end naturally (no process.exit) once the parent closes our stdin
      process.stdin.on('data', () => {});
      process.stdin.on('end', () => process.stdin.destroy());
    })().catch((e) => { console.error(e); process.exit(3); });
  `;
  for (const mode of ['exit', 'hang']) {
    const child = spawn(process.execPath, ['-e', script, mode], { stdio: ['pipe', 'pipe', 'inherit'], env: { ...process.env } });
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
    });
    await h.waitFor(() => out.includes('\n'), 30000, 'the child to connect');
    const info = JSON.parse(out);
    assert.ok(h.pidAlive(info.pid));
    assert.ok(info.ws.startsWith(`unix:${info.dir}`), 'the child daemon lives in a private temp dir');
    assert.equal((fs.statSync(info.dir).mode & 0o777).toString(8), '700');
    assert.equal(info.pooled, true, 'the second stream reused the session');
    // a child daemon is never written where other clients would discover it
    assert.equal(fs.existsSync(path.join(h.RUNTIME, 'wraith', 'daemon.json')), false);
    if (mode === 'hang') child.kill('SIGKILL'); // no exit handlers run: the stdin lifeline must do it
    else child.stdin.end();
    await once(child, 'exit');
    await h.waitFor(() => !h.pidAlive(info.pid), 15000, `daemon ${info.pid} to exit after its client (${mode})`);
    if (mode === 'exit') assert.equal(fs.existsSync(info.dir), false, 'the temp dir is removed');
    else fs.rmSync(info.dir, { recursive: true, force: true });
  }
});

test('autostart: after our child daemon was stopped gracefully, the next connect() starts a new one at once', { timeout: 60000 }, async () => {
  const target = await h.tcpServer((s) => s.pipe(s));
  const s1 = await wraith.connect({ ...base, target: target.target });
  s1.on('error', () => {});
  const old = wraith.childDaemon();
  assert.ok(old, 'a child daemon was started');
  process.kill(old.pid, 'SIGTERM'); // stopped from outside, gracefully
  for (let i = 0; i < 3; i++) {
    // no retry loop here: each connect() must succeed the first time
    const s2 = await wraith.connect({ ...base, target: target.target });
    s2.end('ping');
    assert.equal((await h.drain(s2)).bytes, 4);
    await h.closed(s2);
  }
  const now = wraith.childDaemon();
  assert.ok(now && now.pid !== old.pid, 'a new child daemon');
  await h.waitFor(() => !h.pidAlive(old.pid), 15000, 'the old daemon to exit');
  await target.close();
});

test('discovery: daemon.json in $XDG_RUNTIME_DIR/wraith, WRAITH_DAEMON, the daemon option', { timeout: 60000 }, async () => {
  await wraith.shutdownDaemon();
  const d = await startDaemon([]); // default dir: $XDG_RUNTIME_DIR/wraith (our private one)
  try {
    const found = wraith.discoverDaemon();
    assert.equal(found.source, 'daemon.json');
    assert.equal(found.ws, d.info.ws);
    assert.equal(found.pid, d.proc.pid);
    const s = await wraith.connect(base);
    assert.equal(wraith.childDaemon(), null, 'no autostart when a daemon is running');
    s.destroy();
    // WRAITH_DAEMON wins over daemon.json; a bad one is EDAEMON
    await withEnv({ WRAITH_DAEMON: 'unix:/nonexistent/daemon.sock' }, async () => {
      assert.equal(wraith.discoverDaemon().source, 'WRAITH_DAEMON');
      await assert.rejects(wraith.connect(base), { code: 'EDAEMON' });
    });
    // the explicit option wins over everything
    await withEnv({ WRAITH_DAEMON: 'unix:/nonexistent/daemon.sock' }, async () => {
      const s2 = await wraith.connect({ ...base, daemon: d.info.ws });
      s2.destroy();
      const s3 = await wraith.connect({ ...base, daemon: d.info.ws.slice(5) }); // bare path
      s3.destroy();
    });
    await assert.rejects(wraith.connect({ ...base, daemon: 'carrier-pigeon' }), { code: 'EUSAGE' });
  } finally {
    await d.stop();
  }
  // stale daemon.json (dead pid) is ignored; autostart off -> EDAEMON
  fs.mkdirSync(path.join(h.RUNTIME, 'wraith'), { recursive: true, mode: 0o700 });
  fs.writeFileSync(path.join(h.RUNTIME, 'wraith', 'daemon.json'), JSON.stringify({ version: 1, pid: 999999, ws: 'unix:/nope' }));
  assert.equal(wraith.discoverDaemon(), null);
  await assert.rejects(wraith.connect({ ...base, autostart: false }), { code: 'EDAEMON' });
  fs.rmSync(path.join(h.RUNTIME, 'wraith', 'daemon.json'));
});

test('TCP endpoint: the token is sent; a wrong token is refused with 401', { timeout: 60000 }, async () => {
  const dir = h.tmpdir();
  const d = await startDaemon(['--ws', 'tcp:127.0.0.1:0', '--events', 'none', '--dir', path.join(dir, 'd')]);
  try {
    assert.match(d.info.ws, /^tcp:127\.0\.0\.1:\d+$/);
    const token = fs.readFileSync(d.info.tokenFile, 'utf8').trim();
    const s = await wraith.connect({ ...base, daemon: d.info.ws, token });
    const target = await h.tcpServer((c) => c.end('tcp ok'));
    s.destroy();
    const s2 = await wraith.connect({ ...base, daemon: d.info.ws, token, target: target.target });
    assert.equal((await h.drain(s2)).bytes, 6);
    s2.end();
    await withEnv({ WRAITH_DAEMON_TOKEN: token }, async () => {
      const s3 = await wraith.connect({ ...base, daemon: d.info.ws });
      s3.destroy();
    });
    await assert.rejects(wraith.connect({ ...base, daemon: d.info.ws, token: 'wrong' }), (e) => {
      assert.equal(e.code, 'EDAEMON');
      assert.equal(e.status, 401);
      return true;
    });
    await target.close();
  } finally {
    await d.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('daemon state events: session, stream and server events reach Node', { timeout: 60000 }, async () => {
  const seen = [];
  const feed = await wraith.daemonEvents({ onEvent: (e) => seen.push(e) });
  const ups = [];
  feed.addEventListener('session.up', (ev) => ups.push(ev));
  // a fresh session (a second wraith serve) so that session.* events happen now
  const serve2 = await h.startServe(keys);
  try {
    const target = await h.tcpServer((c) => c.end('x'));
    const s = await wraith.connect({ ...base, server: serve2.address, target: target.target });
    await h.drain(s);
    s.end();
    await h.closed(s);
    await h.waitFor(() => seen.some((e) => e.event === 'stream.closed' && e.data.stream === s.wraith.id), 10000, 'stream.closed');
    const names = seen.map((e) => e.event);
    for (const want of ['session.connecting', 'session.up', 'stream.opened', 'stream.closed']) assert.ok(names.includes(want), `${want} in ${names}`);
    const closed = seen.find((e) => e.event === 'stream.closed' && e.data.stream === s.wraith.id);
    assert.equal(closed.data.clean, true);
    assert.equal(typeof closed.time, 'number');
    assert.ok(ups.length >= 1);
    assert.ok(ups[0] instanceof CustomEvent);
    assert.equal(ups[0].detail.session, s.wraith.session);
    // nothing secret in events: no target, no byte counts
    assert.equal(JSON.stringify(seen).includes(target.target), false);
    await target.close();

    // topics filter
    const only = await wraith.daemonEvents({ topics: ['server.'] });
    const got = [];
    only.onEvent((e) => got.push(e.event));
    const server = await wraith.serve({ hostKey: keys.host, authorizedKeys: keys.authorizedKeys, listen: '127.0.0.1:0' });
    await server.close();
    await h.waitFor(() => got.includes('server.closed'), 10000, 'server.closed');
    assert.ok(got.every((n) => n.startsWith('server.')), String(got));
    assert.ok(got.includes('server.listening'));
    await only.close();
  } finally {
    await feed.close();
    await serve2.stop();
  }
});
