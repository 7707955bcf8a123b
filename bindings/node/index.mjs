// ESM entry: the same objects as the CommonJS entry (one module instance).
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const wraith = require('./index.js');

export const {
  connect,
  serve,
  createWraithEventTarget,
  daemonEvents,
  shutdownDaemon,
  childDaemon,
  discoverDaemon,
  WraithStream,
  WraithServer,
  WraithEventTarget,
  WraithEvent,
  WraithDaemonEvents,
  DaemonEvent,
  encodeFrame,
  FrameDecoder,
  DEFAULT_MAX_FRAME,
} = wraith;
export default wraith;
