'use strict';
// The installed tarball: CommonJS and ESM entry points, shipped files, and
// the TypeScript declarations (tsc --noEmit over a typed consumer).
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { execFileSync, spawnSync } = require('node:child_process');

const APP = process.env.WRAITH_TEST_APP;
const PKG = path.resolve(__dirname, '../..');

test('npm test installed the packed tarball into a fresh app', () => {
  assert.ok(APP, 'run through `npm test` (test/run.mjs), which packs and installs the package');
  const installed = path.join(APP, 'node_modules/@wraith/node');
  const files = fs.readdirSync(installed).sort();
  for (const f of ['index.js', 'index.mjs', 'index.d.ts', 'package.json', 'lib']) assert.ok(files.includes(f), `${f} in ${files}`);
  assert.equal(fs.existsSync(path.join(installed, 'test')), false, 'tests are not shipped');
  const meta = JSON.parse(fs.readFileSync(path.join(installed, 'package.json'), 'utf8'));
  assert.equal(meta.name, '@wraith/node');
  assert.equal(meta.engines.node, '>=20');
  assert.deepEqual(Object.keys(meta.dependencies).sort(), ['@msgpack/msgpack', 'ws']);
  assert.equal(meta.scripts && (meta.scripts.install || meta.scripts.postinstall || meta.scripts.preinstall), undefined, 'no install scripts');
});

test('require() and import give the same API', () => {
  const cjs = `const w = require('@wraith/node'); console.log(JSON.stringify(Object.keys(w).sort()));`;
  const esm = `import w, * as ns from '@wraith/node'; import { connect, createWraithEventTarget } from '@wraith/node';
    if (w.connect !== connect || typeof createWraithEventTarget !== 'function') process.exit(2);
    console.log(JSON.stringify(Object.keys(ns).filter((k) => k !== 'default').sort()));`;
  const a = execFileSync(process.execPath, ['-e', cjs], { cwd: APP, encoding: 'utf8' });
  const b = execFileSync(process.execPath, ['--input-type=module', '-e', esm], { cwd: APP, encoding: 'utf8' });
  assert.deepEqual(JSON.parse(a), JSON.parse(b));
  for (const name of ['connect', 'serve', 'createWraithEventTarget', 'daemonEvents', 'shutdownDaemon']) assert.ok(JSON.parse(a).includes(name));
});

test('tsc --noEmit over a typed consumer of the installed declarations', { timeout: 120000 }, () => {
  const tsc = path.join(PKG, 'node_modules/typescript/bin/tsc');
  const ok = spawnSync(process.execPath, [tsc, '-p', path.join(APP, 'tsconfig.json')], { cwd: APP, encoding: 'utf8' });
  assert.equal(ok.status, 0, ok.stdout + ok.stderr);
  // and the declarations really constrain: a wrong payload type must not compile
  const bad = path.join(APP, 'bad.ts');
  fs.writeFileSync(bad, `import { createWraithEventTarget } from '@wraith/node';
import { Duplex } from 'node:stream';
const t = createWraithEventTarget<{ chat: { text: string } }>({ stream: new Duplex() });
t.emit('chat', { text: 42 });
`);
  const cfg = JSON.parse(fs.readFileSync(path.join(APP, 'tsconfig.json'), 'utf8'));
  cfg.files = ['bad.ts'];
  fs.writeFileSync(path.join(APP, 'tsconfig.bad.json'), JSON.stringify(cfg));
  const no = spawnSync(process.execPath, [tsc, '-p', path.join(APP, 'tsconfig.bad.json')], { cwd: APP, encoding: 'utf8' });
  assert.notEqual(no.status, 0);
  assert.match(no.stdout, /bad\.ts\(4,/);
});
