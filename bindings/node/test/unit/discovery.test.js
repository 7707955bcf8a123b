'use strict';
// Daemon discovery trusts daemon.json and the token only in a private directory
// (ours, 0700), as small regular files of ours, the token beside daemon.json.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { discover } = require('../../lib/daemon');

test('discovery ignores a daemon.json or token another user could have planted', () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'wraith-discovery-'));
  const saved = { xdg: process.env.XDG_RUNTIME_DIR, d: process.env.WRAITH_DAEMON, t: process.env.WRAITH_DAEMON_TOKEN };
  delete process.env.WRAITH_DAEMON;
  delete process.env.WRAITH_DAEMON_TOKEN;
  process.env.XDG_RUNTIME_DIR = root;
  const home = path.join(root, 'wraith');
  fs.mkdirSync(home, { mode: 0o700 });
  const json = path.join(home, 'daemon.json');
  const token = path.join(home, 'token');
  const secret = path.join(root, 'secret');
  const write = (extra, tokenFile) =>
    fs.writeFileSync(json, JSON.stringify({ version: 1, pid: process.pid, ws: 'tcp:127.0.0.1:9', events: null, tokenFile, ...extra }));
  try {
    fs.writeFileSync(token, 'good-token\n');
    fs.writeFileSync(secret, 'victim-api-token\n');
    write({}, token);
    assert.equal(discover().token, 'good-token');
    write({}, secret); // a token file elsewhere: the whole daemon.json is refused
    assert.equal(discover(), null);
    write({ ws: 5 }, token);
    assert.equal(discover(), null);
    write({}, token);
    fs.chmodSync(home, 0o755);
    assert.equal(discover(), null);
    fs.chmodSync(home, 0o700);
    if (process.getuid() === 0) {
      fs.chownSync(json, 65534, 65534);
      assert.equal(discover(), null);
      fs.chownSync(json, 0, 0);
      fs.chownSync(home, 65534, 65534);
      assert.equal(discover(), null);
      fs.chownSync(home, 0, 0);
    }
    fs.unlinkSync(json);
    fs.symlinkSync(secret, json); // never followed
    assert.equal(discover(), null);
    process.env.WRAITH_DAEMON = 'tcp:127.0.0.1:9';
    assert.equal(discover().token, 'good-token');
    for (const elsewhere of ['tcp:198.51.100.7:9', 'tcp:example.com:80', 'tcp:[2001:db8::1]:9']) {
      process.env.WRAITH_DAEMON = elsewhere; // the local token file goes to no other host
      assert.equal(discover().token, null, elsewhere);
    }
    process.env.WRAITH_DAEMON = 'tcp:[::1]:9';
    assert.equal(discover().token, 'good-token');
    fs.chmodSync(home, 0o711);
    assert.equal(discover().token, null);
  } finally {
    for (const [k, v] of [['XDG_RUNTIME_DIR', saved.xdg], ['WRAITH_DAEMON', saved.d], ['WRAITH_DAEMON_TOKEN', saved.t]]) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
    fs.rmSync(root, { recursive: true, force: true });
  }
});
