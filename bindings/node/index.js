'use strict';

// @wraith/node — SSH-tunnelled Duplex streams through the local wraith daemon
// (SPEC §6–§8, docs/ipc.md). Python runs in the daemon, never in this process.

const { connect, serve, daemonEvents, WraithServer, WraithDaemonEvents, DaemonEvent } = require('./lib/client');
const { WraithStream } = require('./lib/stream');
const { createWraithEventTarget, WraithEventTarget, WraithEvent } = require('./lib/eventtarget');
const { encodeFrame, FrameDecoder, DEFAULT_MAX_FRAME } = require('./lib/framing');
const daemon = require('./lib/daemon');

module.exports = {
  connect,
  serve,
  createWraithEventTarget,
  daemonEvents,
  shutdownDaemon: daemon.shutdown,
  childDaemon: daemon.childDaemon,
  discoverDaemon: daemon.discover,
  WraithStream,
  WraithServer,
  WraithEventTarget,
  WraithEvent,
  WraithDaemonEvents,
  DaemonEvent,
  encodeFrame,
  FrameDecoder,
  DEFAULT_MAX_FRAME,
};
