// Publishes --count "chat" events once somebody on the hub listens, then waits
// for an "ack" of each and exits.
import { options, wraith } from './common.mjs';

const opts = options();
const count = opts.count || 5;
const stream = await wraith.connect(opts.connect);
const hub = wraith.createWraithEventTarget({ stream });

const acked = new Set();
const allAcked = new Promise((resolve) => {
  hub.addEventListener('ack', (ev) => {
    acked.add(ev.detail.id);
    if (acked.size === count) resolve();
  });
});

// The hub announces which types its members want: wait for a subscriber.
await hub.waitSubscribed('chat', { timeout: 30000 });
for (let i = 1; i <= count; i++) {
  const ev = new CustomEvent('chat', { detail: { from: opts.name, text: `message ${i} of ${count}` } });
  hub.dispatchEvent(ev);
}
const timer = setTimeout(() => {
  console.error(`[${opts.name}] only ${acked.size} of ${count} acknowledged`);
  process.exit(1);
}, 30000);
await allAcked;
clearTimeout(timer);
console.log(`[${opts.name}] ${count} messages published and acknowledged`);
await hub.close();
process.exit(0);
