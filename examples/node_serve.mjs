// serve() from Node: a wraith SSH server run by the local daemon whose
// control-channel streams come to this process, here answering "ping" events
// with "pong". Without flags it is a self-contained demo: it makes throwaway
// keys, serves on a loopback port, connects to itself with connect() and
// plays ping-pong 3 times. With --key/--authorized-keys it keeps serving.
//
//   node examples/node_serve.mjs
//   node examples/node_serve.mjs --key host --authorized-keys authorized_keys --listen 127.0.0.1:2222
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';

// In an app: `import { serve, connect, createWraithEventTarget } from '@wraith/node'`.
const { serve, connect, createWraithEventTarget, shutdownDaemon } = await import('@wraith/node').catch(
  () => import('../bindings/node/index.mjs'),
);

const { values } = parseArgs({
  options: {
    key: { type: 'string' },
    'authorized-keys': { type: 'string' },
    listen: { type: 'string', default: '127.0.0.1:0' },
  },
});

let demoDir = null;
let keys = { host: values.key, authorizedKeys: values['authorized-keys'] };
if (!keys.host) {
  demoDir = fs.mkdtempSync(path.join(os.tmpdir(), 'wraith-node-serve-'));
  const py = process.env.WRAITH_PYTHON || 'python3';
  for (const k of ['host', 'client']) execFileSync(py, ['-m', 'wraith_core', 'keygen', path.join(demoDir, k)]);
  fs.copyFileSync(path.join(demoDir, 'client.pub'), path.join(demoDir, 'authorized_keys'));
  keys = { host: path.join(demoDir, 'host'), authorizedKeys: path.join(demoDir, 'authorized_keys') };
}

const server = await serve({ hostKey: keys.host, authorizedKeys: keys.authorizedKeys, listen: values.listen });
console.log(`[server] listening on ${server.addresses.join(', ')}`);

server.onConnection((stream, info) => {
  console.log(`[server] ${info.user} from ${info.remoteAddress} (${info.transport}, ${info.keyFingerprint})`);
  const peer = createWraithEventTarget({ stream });
  peer.addEventListener('ping', (ev) => {
    peer.emit('pong', { n: ev.detail.n, at: Date.now() });
  });
  peer.closed.then(() => console.log(`[server] ${info.remoteAddress} left`));
});

if (demoDir) {
  // the client side of the demo: connect() to our own server's control channel
  const stream = await connect({ server: server.address, identity: path.join(demoDir, 'client'), hostKey: `${keys.host}.pub` });
  const client = createWraithEventTarget({ stream });
  for (let n = 1; n <= 3; n++) {
    const pong = new Promise((resolve) => client.addEventListener('pong', resolve, { once: true }));
    await client.waitSubscribed('ping', { timeout: 10000 });
    const t0 = performance.now();
    client.emit('ping', { n });
    const ev = await pong;
    console.log(`[client] pong ${ev.detail.n} after ${(performance.now() - t0).toFixed(1)} ms`);
  }
  await client.close();
  await server.close();
  await shutdownDaemon();
  fs.rmSync(demoDir, { recursive: true, force: true });
  console.log('[demo] done');
} else {
  process.on('SIGINT', () => server.close().then(() => process.exit(0)));
}
