// Shared bits of the pubsub example: load @wraith/node, parse the flags.
import { parseArgs } from 'node:util';

// In an app: `import { connect, createWraithEventTarget } from '@wraith/node'`.
// Run from this repository, fall back to the package source next door.
export const wraith = await import('@wraith/node').catch(() => import('../../bindings/node/index.mjs'));

export function options(extra = {}) {
  const { values } = parseArgs({
    options: {
      server: { type: 'string', default: process.env.WRAITH_SERVER },
      identity: { type: 'string', default: process.env.WRAITH_IDENTITY },
      'host-key': { type: 'string' },
      name: { type: 'string', default: `node-${process.pid}` },
      count: { type: 'string', default: '0' },
      ...extra,
    },
  });
  if (!values.server || !values.identity || !values['host-key']) {
    console.error('usage: --server HOST:PORT --identity KEY --host-key HOST_KEY.pub [--name NAME] [--count N]');
    process.exit(2);
  }
  return {
    connect: { server: values.server, identity: values.identity, hostKey: values['host-key'] },
    name: values.name,
    count: Number(values.count),
  };
}
