// Type definitions for @wraith/node (SPEC §6–§8, docs/ipc.md).
/// <reference types="node" />

import { Duplex } from 'node:stream';
import { EventEmitter } from 'node:events';

/** Every error from this package: an Error with a stable `code`. */
export interface WraithError extends Error {
  /**
   * EUSAGE, EKEY, EAUTH, EHOSTKEY, ECONNREFUSED, EHOSTUNREACH, ENETUNREACH,
   * ETIMEDOUT, ENOTFOUND, ECONNECT, EPROHIBITED, ECHANNEL, ESESSION,
   * ECONNRESET, EADDRINUSE, EACCES, ESERVE, EPROTO, EDAEMON (daemon missing,
   * unreachable or not startable), EFRAME (bad control-stream frame),
   * ECLOSED, EPIPE, ABORT_ERR.
   */
  code: WraithErrorCode | (string & {});
  /** Autostart failures: what is missing ('python', 'wraith_core', or a module name). */
  missing?: string;
  python?: string;
}

export type WraithErrorCode =
  | 'EUSAGE' | 'EKEY' | 'EAUTH' | 'EHOSTKEY' | 'ECONNREFUSED' | 'EHOSTUNREACH' | 'ENETUNREACH'
  | 'ETIMEDOUT' | 'ENOTFOUND' | 'ECONNECT' | 'EPROHIBITED' | 'ECHANNEL' | 'ESESSION' | 'ECONNRESET'
  | 'EADDRINUSE' | 'EACCES' | 'ESERVE' | 'EPROTO' | 'EDAEMON' | 'EFRAME' | 'ECLOSED' | 'EPIPE' | 'ABORT_ERR';

/** A path to a key file, or the key material itself. */
export type KeyInput = string | Buffer | Uint8Array;

/** How to reach the daemon (docs/ipc.md §1.4). All optional. */
export interface DaemonOptions {
  /** `unix:PATH`, `tcp:127.0.0.1:PORT` or an absolute socket path. Default: WRAITH_DAEMON, daemon.json, else autostart. */
  daemon?: string;
  /** Bearer token for a TCP daemon endpoint (default WRAITH_DAEMON_TOKEN or the token file). */
  token?: string;
  /** Start a child daemon when none is found (default true). */
  autostart?: boolean;
  /**
   * Milliseconds for the whole open: finding or starting the daemon, the WebSocket
   * handshake and the daemon's answer (default 60000, or connectTimeout + 10 s).
   */
  timeout?: number;
  /** Abort the pending open (also while the daemon is being started). */
  signal?: AbortSignal;
}

/** Options of connect(): the `wraith connect` flags in camelCase (SPEC §6). */
export interface WraithConnectOptions extends DaemonOptions {
  /** `[user@]host:port` (tcp, tls). */
  server?: string;
  /** iroh endpoint id or ticket. */
  peer?: string;
  transport?: 'tcp' | 'tls' | 'iroh';
  /** Client private key (OpenSSH format): path or bytes. */
  identity: KeyInput;
  certificate?: KeyInput;
  user?: string;
  /** Pinned server host key: public key (path or text) or `SHA256:` fingerprint. */
  hostKey?: KeyInput;
  knownHosts?: KeyInput;
  acceptAnyHostKey?: boolean;
  tlsServerName?: string;
  tlsCa?: KeyInput;
  insecure?: boolean;
  proxy?: string;
  irohRelay?: string;
  maxPktsize?: number;
  window?: number;
  keepaliveInterval?: number;
  keepaliveCountMax?: number;
  /** Seconds. */
  connectTimeout?: number;
  /** `host:port` to open; default `wraith-control:0` (the server's event bus). */
  target?: string;
  /**
   * As net.Socket's (client side only, not sent to the daemon). false (default): when
   * the far end sends EOF, the stream ends its own side too (sends EOF) once the
   * readable side has ended, and closes. true: the writable side stays open until
   * end(); if the far end has closed meanwhile, a write() fails with EPIPE.
   */
  allowHalfOpen?: boolean;
}

/** Options of serve(): the `wraith serve` flags in camelCase. */
export interface WraithServeOptions extends DaemonOptions {
  /** Host private key: path or bytes (alias `key`). */
  hostKey?: KeyInput;
  key?: KeyInput;
  authorizedKeys?: KeyInput;
  certAuthority?: KeyInput;
  /** `host:port`, port 0 = any free port. */
  listen?: string;
  transport?: 'tcp' | 'tls' | 'iroh';
  tlsCert?: KeyInput;
  tlsKey?: KeyInput;
  stealth?: boolean;
  proxy?: string;
  irohRelay?: string;
  maxConnectionsPerIp?: number;
  /** OpenSSH's MaxStartups over connections not yet logged in: `"start:rate:full"` or a number (0 = none). */
  maxStartups?: string | number;
  maxForwardsPerConnection?: number;
  maxChannelsPerConnection?: number;
  maxAuthAttempts?: number;
  loginGraceTime?: number;
  maxPktsize?: number;
  window?: number;
  /**
   * allowHalfOpen of the incoming streams, as net.Server's (client side only, not
   * sent to the daemon). Default false: a client's EOF ends the stream's writable
   * side too. true: reply after the client's EOF, then end() yourself.
   */
  allowHalfOpen?: boolean;
}

export interface ConnectionInfo {
  remoteAddress: string;
  transport: string;
  user: string;
  keyFingerprint: string;
}

export interface WraithStreamInfo {
  readonly role: 'client' | 'server';
  readonly kind: 'connect' | 'accept';
  /** Stream id given by the daemon. */
  readonly id: string;
  readonly target?: string;
  readonly session?: string;
  /** True when the stream reused a pooled SSH session. */
  readonly pooled?: boolean;
  readonly info?: ConnectionInfo;
  readonly server?: string;
}

/** One SSH channel as a Duplex that behaves like a net.Socket. */
export declare class WraithStream extends Duplex {
  private constructor();
  readonly wraith: WraithStreamInfo;
  readonly id: string;
  bytesRead: number;
  bytesWritten: number;
  setNoDelay(noDelay?: boolean): this;
  setKeepAlive(enable?: boolean, initialDelay?: number): this;
  /** Emit 'timeout' after `ms` idle (0 disables), like net.Socket. */
  setTimeout(ms: number, callback?: () => void): this;
  ref(): this;
  unref(): this;
}

export declare class WraithServer extends EventEmitter {
  private constructor();
  readonly id: string;
  /** Addresses the server listens on (`host:port`). */
  readonly addresses: string[];
  readonly address: string | undefined;
  readonly closed: boolean;
  error: WraithError | null;
  onConnection(cb: (stream: WraithStream, info: ConnectionInfo) => void): this;
  close(): Promise<void>;
  [Symbol.asyncIterator](): AsyncIterator<{ stream: WraithStream; info: ConnectionInfo }>;
  on(event: 'connection', listener: (stream: WraithStream, info: ConnectionInfo) => void): this;
  on(event: 'close', listener: (err: WraithError | null) => void): this;
  on(event: 'error', listener: (err: WraithError) => void): this;
  on(event: 'acceptError', listener: (err: WraithError, info: ConnectionInfo) => void): this;
  on(event: string | symbol, listener: (...args: any[]) => void): this;
}

/** Open one stream through the daemon (default target: the server's control channel). */
export declare function connect(options: WraithConnectOptions): Promise<WraithStream>;

/** Run a wraith server in the daemon; its control-channel streams arrive via onConnection(). */
export declare function serve(options: WraithServeOptions): Promise<WraithServer>;

// -- pubsub adapter (SPEC §7) ---------------------------------------------------------------

/** A received event: `detail` is the envelope's payload. */
export declare class WraithEvent<T = unknown> extends CustomEvent<T> {
  constructor(type: string, init?: CustomEventInit<T> & { id?: string });
  /** The envelope id. */
  readonly id: string;
}

export type WraithEventListener<T> =
  | ((this: any, event: WraithEvent<T>) => void)
  | { handleEvent(event: WraithEvent<T>): void };

export interface WraithEventTargetOptions {
  stream: Duplex;
  /** Frame size limit (default 16 MiB). */
  maxFrameSize?: number;
  /** Send only types the peer subscribed to (default true; false for hubs that announce nothing). */
  pointToPoint?: boolean;
  /** ms close() waits for the peer's EOF before destroying the stream (default 5000). */
  closeTimeout?: number;
  onClose?: (err: Error | null) => void;
}

/**
 * EventTarget over a control stream. `EventMap` maps event types to payload
 * types, e.g. `WraithEventTarget<{ chat: { text: string } }>`.
 */
export declare class WraithEventTarget<EventMap extends Record<string, any> = Record<string, any>> extends EventTarget {
  constructor(options: WraithEventTargetOptions);
  readonly stream: Duplex;
  /** Types the peer subscribed to. */
  readonly peerSubscriptions: Set<string>;
  /** Types this side listens to. */
  readonly subscriptions: Set<string>;
  readonly isClosed: boolean;
  /** True while the stream's write buffer is full (await flush()). */
  readonly needsDrain: boolean;
  /** Why the stream ended badly (EFRAME, ECONNRESET, …), or null. */
  error: Error | null;
  /** Resolves when the stream has closed. */
  readonly closed: Promise<void>;

  /**
   * Sends __subscribe on the first listener of a type. Throws a TypeError (code
   * EUSAGE), sending nothing, if `type` is empty, over 1024 characters (code
   * points) or not valid Unicode.
   */
  addEventListener<K extends keyof EventMap & string>(
    type: K,
    listener: WraithEventListener<EventMap[K]> | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof EventMap & string>(
    type: K,
    listener: WraithEventListener<EventMap[K]> | null,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;
  /**
   * Sends {type, id, payload: event.detail}; true if sent (the peer is subscribed).
   * Throws, sending nothing (the stream stays open): TypeError code EUSAGE for an
   * invalid or reserved (`__`) type; EFRAME for an event over the frame limit or a
   * payload nested deeper than 512 levels.
   */
  dispatchEvent(event: Event): boolean;
  /** dispatchEvent(new CustomEvent(type, { detail })), typed. */
  emit<K extends keyof EventMap & string>(type: K, detail: EventMap[K]): boolean;
  /** Resolves when the peer subscribes to `type`. */
  waitSubscribed(type: keyof EventMap & string, options?: { timeout?: number; signal?: AbortSignal }): Promise<void>;
  /** Resolves when the stream can take more data. */
  flush(): Promise<void>;
  /** End the stream; resolves once it has closed. */
  close(): Promise<void>;
}

export declare function createWraithEventTarget<EventMap extends Record<string, any> = Record<string, any>>(
  options: WraithEventTargetOptions,
): WraithEventTarget<EventMap>;

// -- daemon ---------------------------------------------------------------------------------

export interface DaemonEventMap {
  'session.connecting': { session: string; server: string };
  'session.up': { session: string; server: string };
  'session.lost': { session: string; server: string; error?: string };
  'session.closed': { session: string; server: string };
  'stream.opened': { stream: string; kind: 'connect' | 'accept'; session?: string };
  'stream.closed': { stream: string; clean: boolean };
  'server.listening': { server: string; addresses: string[] };
  'server.incoming': { server: string; stream: string; info: ConnectionInfo };
  'server.closed': { server: string };
}

export declare class DaemonEvent<T = Record<string, unknown>> extends CustomEvent<T> {
  constructor(type: string, detail: T, time: number);
  /** Unix seconds. */
  readonly time: number;
}

export interface DaemonEventRecord {
  event: string;
  time: number;
  data: Record<string, unknown>;
}

export declare class WraithDaemonEvents extends EventTarget {
  private constructor();
  readonly id: string;
  error: Error | null;
  readonly closed: Promise<void>;
  addEventListener<K extends keyof DaemonEventMap>(
    type: K,
    listener: ((event: DaemonEvent<DaemonEventMap[K]>) => void) | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  /** Every event; returns a function that stops it. */
  onEvent(cb: (event: DaemonEventRecord) => void): () => void;
  close(): Promise<void>;
}

export interface DaemonEventsOptions extends DaemonOptions {
  /** Event-name prefixes, e.g. ['session.']; default all. */
  topics?: string[];
  onEvent?: (event: DaemonEventRecord) => void;
}

/** The daemon's state events (session / stream / server). */
export declare function daemonEvents(options?: DaemonEventsOptions): Promise<WraithDaemonEvents>;

export interface DaemonEndpoint {
  ws: string;
  token: string | null;
  events: string | null;
  source: string;
  pid?: number;
}

/** Stop the child daemon this process started, if any. */
export declare function shutdownDaemon(options?: { timeout?: number }): Promise<void>;
/** The child daemon this process started, or null. */
export declare function childDaemon(): (DaemonEndpoint & { pid: number; dir: string; python: string }) | null;
/** The daemon that would be used (without autostart), or null. */
export declare function discoverDaemon(options?: { daemon?: string; token?: string }): DaemonEndpoint | null;

// -- framing (SPEC §7), for custom hubs ------------------------------------------------------

export interface EventEnvelope<T = unknown> {
  type: string;
  id: string;
  payload: T;
}

export declare const DEFAULT_MAX_FRAME: number;
/**
 * One length-prefixed frame. Throws TypeError code EUSAGE for an invalid type (empty,
 * over 1024 code points, lone surrogate) or a non-string id; EFRAME for a frame over
 * `maxSize` bytes or a payload nested deeper than 512 levels.
 */
export declare function encodeFrame(envelope: EventEnvelope, maxSize?: number): Buffer;
export declare class FrameDecoder {
  constructor(options?: { maxSize?: number });
  readonly maxSize: number;
  /** Set (code EFRAME) after a bad frame; further input is ignored. */
  error: Error | null;
  /** Bytes of the incomplete frame's body received so far (of its header while that is incomplete). */
  readonly buffered: number;
  /** True when the bytes pushed so far end in the middle of a frame. */
  readonly partial: boolean;
  push(chunk: Buffer | Uint8Array): EventEnvelope[];
}
