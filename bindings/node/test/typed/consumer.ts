// Compiled with `tsc --noEmit` against the installed package: proves index.d.ts.
import { connect, serve, createWraithEventTarget, daemonEvents, DaemonEvent, WraithStream, type ConnectionInfo, type WraithError } from '@wraith/node';
import type { Duplex } from 'node:stream';

interface ChatEvents {
  chat: { from: string; text: string };
  ping: number;
}

async function main(): Promise<void> {
  const stream: WraithStream = await connect({ server: '127.0.0.1:2222', identity: './id', hostKey: 'SHA256:abc' });
  const asDuplex: Duplex = stream;
  asDuplex.write(Buffer.from('x'));
  const ok: boolean = stream.write('hello');
  if (!ok) await new Promise((r) => stream.once('drain', r));
  stream.end();
  console.log(stream.wraith.id, stream.wraith.pooled);

  const events = createWraithEventTarget<ChatEvents>({ stream });
  events.addEventListener('chat', (ev) => {
    const text: string = ev.detail.text;
    const id: string = ev.id;
    console.log(text, id);
  });
  events.addEventListener('ping', (ev) => {
    const n: number = ev.detail;
    console.log(n + 1);
  });
  // @ts-expect-error the payload of "chat" is an object, not a number
  events.addEventListener('chat', (ev) => { const n: number = ev.detail; console.log(n); });
  events.emit('chat', { from: 'a', text: 'b' });
  // @ts-expect-error wrong payload type for "ping"
  events.emit('ping', 'not a number');
  await events.waitSubscribed('chat', { timeout: 1000 });
  const sent: boolean = events.dispatchEvent(new CustomEvent('ping', { detail: 1 }));
  console.log(sent, events.isClosed);
  await events.close();

  const server = await serve({ hostKey: Buffer.from('key'), authorizedKeys: './ak', listen: '127.0.0.1:0' });
  server.onConnection((s: WraithStream, info: ConnectionInfo) => {
    const fp: string = info.keyFingerprint;
    console.log(fp, s.wraith.role);
  });
  for await (const { stream: s, info } of server) {
    console.log(info.remoteAddress);
    s.destroy();
    break;
  }
  await server.close();

  const feed = await daemonEvents({ topics: ['session.'] });
  feed.addEventListener('session.up', (ev) => {
    const server: string = ev.detail.server;
    console.log(server, ev.time);
  });
  const stop = feed.onEvent((e) => console.log(e.event));
  stop();
  await feed.close();
  // DaemonEvent is constructible (e.g. to re-dispatch or to fake events in tests)
  const fake = new DaemonEvent('session.up', { session: 's1', server: 'gw:22' }, 1700000000);
  const t: number = fake.time;
  const srv: string = fake.detail.server;
  console.log(t, srv);
  feed.dispatchEvent(fake);

  // allowHalfOpen: a client-side option of connect() and serve(), as net's
  const half = await connect({ server: 'x:1', identity: './id', hostKey: 'SHA256:abc', allowHalfOpen: true });
  half.end();
  const halfServer = await serve({ hostKey: './host', listen: '127.0.0.1:0', allowHalfOpen: false });
  await halfServer.close();

  try {
    // @ts-expect-error identity is required
    await connect({ server: 'x' });
  } catch (e) {
    const err = e as WraithError;
    if (err.code === 'EAUTH' || err.code === 'EHOSTKEY') console.log(err.message);
  }
}

void main;
