'use strict';
// The examples, run as a user would: separate Node processes importing
// '@wraith/node' from the installed tarball, against a real `wraith serve`.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { spawn } = require('node:child_process');
const h = require('./helpers');

const REPO = path.resolve(__dirname, '../../../..');
const APP = process.env.WRAITH_TEST_APP;

function copyExample(rel) {
  const dest = path.join(APP, 'examples', rel);
  fs.mkdirSync(path.dirname(dest), { recursive: true });
  fs.cpSync(path.join(REPO, 'examples', rel), dest, { recursive: true });
  return dest;
}

function run(file, args, { timeout = 60000 } = {}) {
  const p = spawn(process.execPath, [file, ...args], { cwd: APP, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  p.stdout.on('data', (d) => {
    out += d;
  });
  p.stderr.on('data', (d) => {
    err += d;
  });
  const done = new Promise((resolve) => {
    const t = setTimeout(() => p.kill('SIGKILL'), timeout);
    p.on('exit', (code, signal) => {
      clearTimeout(t);
      resolve({ code, signal, out, err });
    });
  });
  return { proc: p, done, output: () => out };
}

test('examples/node_pubsub: two Node processes exchange events through wraith serve', { timeout: 90000 }, async () => {
  assert.ok(APP, 'run through npm test');
  const dir = copyExample('node_pubsub');
  const keys = await h.makeKeys();
  const serve = await h.startServe(keys);
  try {
    const flags = ['--server', serve.address, '--identity', keys.client, '--host-key', keys.hostPub];
    const sub = run(path.join(dir, 'subscriber.mjs'), [...flags, '--name', 'alice', '--count', '4']);
    await h.waitFor(() => sub.output().includes('subscribed'), 30000, 'the subscriber');
    const pub = run(path.join(dir, 'publisher.mjs'), [...flags, '--name', 'bob', '--count', '4']);
    const [p, s] = await Promise.all([pub.done, sub.done]);
    assert.equal(p.code, 0, p.out + p.err);
    assert.equal(s.code, 0, s.out + s.err);
    assert.match(p.out, /4 messages published and acknowledged/);
    for (let i = 1; i <= 4; i++) assert.ok(s.out.includes(`[alice] bob: message ${i} of 4`), s.out);
  } finally {
    await serve.stop();
  }
});

test('examples/node_serve.mjs: serve() + connect() ping-pong demo', { timeout: 90000 }, async () => {
  assert.ok(APP, 'run through npm test');
  const file = copyExample('node_serve.mjs');
  const r = await run(file, []).done;
  assert.equal(r.code, 0, r.out + r.err);
  assert.match(r.out, /\[server\] listening on 127\.0\.0\.1:\d+/);
  for (let n = 1; n <= 3; n++) assert.match(r.out, new RegExp(`\\[client\\] pong ${n} after`));
  assert.match(r.out, /\[demo\] done/);
});
