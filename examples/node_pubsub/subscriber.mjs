// Listens for "chat" events on the hub of a `wraith serve` and acknowledges
// each one with an "ack" event. With --count N it exits after N messages.
import { options, wraith } from './common.mjs';

const opts = options();
// No target: the stream is the server's control channel (wraith-control:0), i.e. its event hub.
const stream = await wraith.connect(opts.connect);
const hub = wraith.createWraithEventTarget({ stream });

let n = 0;
hub.addEventListener('chat', (ev) => {
  const { from, text } = ev.detail;
  console.log(`[${opts.name}] ${from}: ${text}`);
  hub.emit('ack', { id: ev.id, by: opts.name });
  if (opts.count && ++n === opts.count) hub.close().then(() => process.exit(0));
});
// tell whoever starts us that we are subscribed
console.log(`[${opts.name}] subscribed to chat`);
process.on('SIGINT', () => hub.close().then(() => process.exit(0)));
