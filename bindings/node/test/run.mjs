// `npm test`: pack the package, install the tarball into a fresh app directory
// (what a user gets from the registry), then run the unit tests and the
// end-to-end tests against that installed copy, a real `wraith daemon` and a
// real `wraith serve`.
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const pkgDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'wraith-node-test-'));
const app = path.join(work, 'app');
fs.mkdirSync(app);
let status = 1;
try {
  const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm';
  const quiet = ['--no-audit', '--no-fund', '--loglevel=error'];
  const out = execFileSync(npm, ['pack', '--json', '--pack-destination', work, ...quiet], { cwd: pkgDir, encoding: 'utf8' });
  const tarball = path.join(work, JSON.parse(out)[0].filename);
  fs.writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'wraith-node-test-app', version: '1.0.0', private: true }, null, 2));
  execFileSync(npm, ['install', '--prefer-offline', ...quiet, tarball], { cwd: app, stdio: ['ignore', 'inherit', 'inherit'] });
  // the typed consumer, compiled against the installed declarations
  fs.copyFileSync(path.join(pkgDir, 'test/typed/consumer.ts'), path.join(app, 'consumer.ts'));
  const tsconfig = JSON.parse(fs.readFileSync(path.join(pkgDir, 'test/typed/tsconfig.json'), 'utf8'));
  tsconfig.compilerOptions.typeRoots = [path.join(pkgDir, 'node_modules/@types')];
  fs.writeFileSync(path.join(app, 'tsconfig.json'), JSON.stringify(tsconfig, null, 2));

  const files = process.argv.slice(2);
  const args = ['--test', '--test-force-exit', '--test-timeout=120000', '--test-concurrency=1'];
  if (files.length) args.push(...files);
  else args.push('test/unit/', 'test/e2e/');
  const r = spawnSync(process.execPath, args, {
    cwd: pkgDir,
    stdio: 'inherit',
    env: { ...process.env, WRAITH_TEST_APP: app, WRAITH_TEST_PKG: pkgDir },
  });
  status = r.status ?? 1;
} catch (e) {
  console.error(`wraith-node tests: setup failed: ${e.message}`);
} finally {
  fs.rmSync(work, { recursive: true, force: true });
}
process.exit(status);
