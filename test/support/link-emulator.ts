// A user-space link emulator: this machine's kernel has no `netem`, so one-way delay, jitter, loss and rate
// are made here, in relays that sit between two endpoints on loopback.
//  - UdpRelay: one UDP front socket in front of one target (an iroh QUIC endpoint). Each source that sends
//    to the front gets its own upstream socket (like a NAT mapping), so the target's answers find their way
//    back. Datagrams are delayed, jittered (and so may be reordered), dropped with the loss rate, and paced
//    to the rate; a full queue drops the tail, as a router would.
//  - TcpRelay: one TCP front port in front of one target (a node's data port). Byte order is kept; a chunk
//    "lost" with the loss rate arrives after a retransmission penalty instead (TCP recovers it: the stream
//    just stalls), and a full queue pauses the sender (backpressure).
// Both count bytes and datagrams/chunks each way, and can `cut()` the link (UDP: everything dropped; TCP:
// bytes held, new connections not forwarded, as during a partition) and `restore()` it. The shape can be
// changed at any time (`setShape`): it applies to what is sent from then on.
import { createSocket, type RemoteInfo, type Socket as UdpSocket } from 'node:dgram';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { DelayLine, emptyCounters, TCP_MIN_RTO_MS, type DirectionCounters, type LinkShape, type RelayCounters } from './delay-line.ts';

export { symmetricShape, TCP_MIN_RTO_MS, type DirectionCounters, type LinkShape, type RelayCounters } from './delay-line.ts';

export interface RelayOptions {
  /** Where the relay listens; default 127.0.0.1. */
  readonly listenHost?: string;
  /** Default 0 (ephemeral). */
  readonly listenPort?: number;
  readonly target: { readonly host: string; readonly port: number };
  /** Client -> target; default no delay. */
  readonly forward?: LinkShape;
  /** Target -> client; default the forward shape. */
  readonly backward?: LinkShape;
  /** Random numbers in [0, 1) for jitter and loss (tests pass a seeded one); default Math.random. */
  readonly random?: () => number;
}

/** What UdpRelay and TcpRelay share. */
export interface LinkRelay {
  /** "host:port" to dial instead of the target. */
  readonly address: string;
  readonly port: number;
  counters(): RelayCounters;
  /** New shapes for what is sent from now on (one for both directions unless `backward` is given). */
  setShape(forward: LinkShape, backward?: LinkShape): void;
  /** Sever the link: nothing crosses until restore(). */
  cut(): void;
  restore(): void;
  readonly isCut: boolean;
  close(): Promise<void>;
}

/** Most a UDP direction queues before it drops the tail: 1 s at its rate, or 4 MiB without one. */
function udpQueueLimit(shape: LinkShape): number {
  return shape.bytesPerSecond ? shape.bytesPerSecond : 4 * 2 ** 20;
}

interface UdpMapping {
  readonly upstream: UdpSocket;
  readonly client: RemoteInfo;
  readonly toTarget: DelayLine<Buffer>;
  readonly toClient: DelayLine<Buffer>;
}

export class UdpRelay implements LinkRelay {
  private readonly mappings = new Map<string, UdpMapping>();
  private forwardShape: LinkShape;
  private backwardShape: LinkShape;
  private cutNow = false;
  private readonly retired: DirectionCounters[] = [];
  address = '';
  port = 0;

  private constructor(
    private readonly front: UdpSocket,
    private readonly opts: RelayOptions,
  ) {
    this.forwardShape = opts.forward ?? { delayMs: 0 };
    this.backwardShape = opts.backward ?? this.forwardShape;
  }

  static async start(opts: RelayOptions): Promise<UdpRelay> {
    const front = createSocket('udp4');
    const relay = new UdpRelay(front, opts);
    await new Promise<void>((resolve, reject) => {
      front.once('error', reject);
      front.bind(opts.listenPort ?? 0, opts.listenHost ?? '127.0.0.1', () => {
        front.off('error', reject);
        resolve();
      });
    });
    const a = front.address();
    relay.port = a.port;
    relay.address = `${a.address}:${a.port}`;
    front.on('message', (msg, rinfo) => relay.fromClient(msg, rinfo));
    front.on('error', () => {}); // a send to a vanished client (ICMP) must not end the relay
    return relay;
  }

  get isCut(): boolean {
    return this.cutNow;
  }

  private mappingFor(client: RemoteInfo): UdpMapping {
    const key = `${client.address}:${client.port}`;
    let m = this.mappings.get(key);
    if (m) return m;
    const random = this.opts.random ?? Math.random;
    const upstream = createSocket('udp4');
    upstream.bind(0);
    upstream.on('error', () => {});
    const toTarget = new DelayLine<Buffer>(this.forwardShape, false, (b) => upstream.send(b, this.opts.target.port, this.opts.target.host), random);
    const toClient = new DelayLine<Buffer>(this.backwardShape, false, (b) => this.front.send(b, client.port, client.address), random);
    m = { upstream, client, toTarget, toClient };
    upstream.on('message', (msg) => this.send(toClient, msg));
    this.mappings.set(key, m);
    return m;
  }

  private fromClient(msg: Buffer, rinfo: RemoteInfo): void {
    this.send(this.mappingFor(rinfo).toTarget, msg);
  }

  private send(line: DelayLine<Buffer>, msg: Buffer): void {
    if (this.cutNow || line.queuedBytes + msg.length > udpQueueLimit(line.shape)) {
      line.counters.packets++;
      line.counters.bytes += msg.length;
      line.counters.lostPackets++;
      return;
    }
    line.push(msg, msg.length, null);
  }

  counters(): RelayCounters {
    const forward = emptyCounters();
    const backward = emptyCounters();
    const add = (into: DirectionCounters, c: DirectionCounters) => {
      for (const k of Object.keys(into) as (keyof DirectionCounters)[]) into[k] += c[k];
    };
    for (const m of this.mappings.values()) {
      add(forward, m.toTarget.counters);
      add(backward, m.toClient.counters);
    }
    return { forward, backward, sessions: this.mappings.size };
  }

  setShape(forward: LinkShape, backward: LinkShape = forward): void {
    this.forwardShape = forward;
    this.backwardShape = backward;
    for (const m of this.mappings.values()) {
      m.toTarget.shape = forward;
      m.toClient.shape = backward;
    }
  }

  cut(): void {
    this.cutNow = true;
    for (const m of this.mappings.values()) {
      m.toTarget.clear();
      m.toClient.clear();
    }
  }

  restore(): void {
    this.cutNow = false;
  }

  async close(): Promise<void> {
    for (const m of this.mappings.values()) {
      m.toTarget.clear();
      m.toClient.clear();
      m.upstream.close();
    }
    this.mappings.clear();
    await new Promise<void>((r) => this.front.close(() => r()));
  }
}

/** Most a TCP direction queues before it pauses the sender. */
const TCP_HIGH_WATER = 1 * 2 ** 20;

interface TcpPair {
  readonly client: Socket;
  readonly upstream: Socket;
  readonly toTarget: DelayLine<Buffer | 'end'>;
  readonly toClient: DelayLine<Buffer | 'end'>;
}

export class TcpRelay implements LinkRelay {
  private readonly pairs = new Set<TcpPair>();
  private readonly waiting = new Set<() => void>();
  private forwardShape: LinkShape;
  private backwardShape: LinkShape;
  private cutNow = false;
  private accepted = 0;
  private readonly closedTotals = { forward: emptyCounters(), backward: emptyCounters() };
  address = '';
  port = 0;

  private constructor(
    private readonly server: Server,
    private readonly opts: RelayOptions,
  ) {
    this.forwardShape = opts.forward ?? { delayMs: 0 };
    this.backwardShape = opts.backward ?? this.forwardShape;
  }

  static async start(opts: RelayOptions): Promise<TcpRelay> {
    let relay: TcpRelay | null = null;
    const server = createServer({ noDelay: true, pauseOnConnect: true }, (client) => relay!.accept(client));
    relay = new TcpRelay(server, opts);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(opts.listenPort ?? 0, opts.listenHost ?? '127.0.0.1', () => {
        server.off('error', reject);
        resolve();
      });
    });
    const a = server.address();
    if (a === null || typeof a === 'string') throw new Error('TCP relay has no address');
    relay.port = a.port;
    relay.address = `${a.address}:${a.port}`;
    return relay;
  }

  get isCut(): boolean {
    return this.cutNow;
  }

  private accept(client: Socket): void {
    this.accepted++;
    client.on('error', () => client.destroy());
    // During a cut a new connection gets no further than the relay (its SYN would be lost) until restore().
    if (this.cutNow) {
      const go = () => {
        this.waiting.delete(go);
        if (!client.destroyed) this.connectUpstream(client);
      };
      this.waiting.add(go);
      client.once('close', () => this.waiting.delete(go));
      return;
    }
    this.connectUpstream(client);
  }

  private connectUpstream(client: Socket): void {
    const random = this.opts.random ?? Math.random;
    const upstream = connect({ host: this.opts.target.host, port: this.opts.target.port, noDelay: true });
    const writer = (to: Socket) => (chunk: Buffer | 'end') => {
      if (chunk === 'end') to.end();
      else to.write(chunk);
    };
    const pair: TcpPair = {
      client,
      upstream,
      toTarget: new DelayLine<Buffer | 'end'>(this.forwardShape, true, writer(upstream), random),
      toClient: new DelayLine<Buffer | 'end'>(this.backwardShape, true, writer(client), random),
    };
    if (this.cutNow) {
      pair.toTarget.hold();
      pair.toClient.hold();
    }
    this.pairs.add(pair);
    this.relay(client, pair.toTarget);
    this.relay(upstream, pair.toClient);
    let closed = false;
    const close = () => {
      if (closed) return;
      closed = true;
      this.retire(pair);
      client.destroy();
      upstream.destroy();
    };
    // An abrupt end on either side ends the pair at once (a reset crosses a link faster than data matters).
    upstream.on('error', close);
    client.on('error', close);
    // An orderly end travels after the bytes before it; the pair goes once both sockets are closed.
    let closedSockets = 0;
    const oneClosed = () => {
      if (++closedSockets === 2) close();
    };
    client.on('close', oneClosed);
    upstream.on('close', oneClosed);
    upstream.on('connect', () => client.resume());
  }

  /** Reads `from` into `line` (a retransmission penalty for "lost" chunks), pausing above the high water. */
  private relay(from: Socket, line: DelayLine<Buffer | 'end'>): void {
    from.on('data', (chunk: Buffer) => {
      const rtt = this.forwardShape.delayMs + this.backwardShape.delayMs;
      line.push(chunk, chunk.length, TCP_MIN_RTO_MS + rtt);
      if (line.queuedBytes > TCP_HIGH_WATER) {
        from.pause();
        const check = setInterval(() => {
          if (line.queuedBytes <= TCP_HIGH_WATER / 2 || from.destroyed) {
            clearInterval(check);
            from.resume();
          }
        }, 1);
      }
    });
    from.on('end', () => line.push('end', 0, TCP_MIN_RTO_MS + this.forwardShape.delayMs + this.backwardShape.delayMs));
  }

  private retire(pair: TcpPair): void {
    if (!this.pairs.delete(pair)) return;
    for (const [into, line] of [[this.closedTotals.forward, pair.toTarget], [this.closedTotals.backward, pair.toClient]] as const) {
      for (const k of Object.keys(into) as (keyof DirectionCounters)[]) into[k] += line.counters[k];
      line.clear();
    }
  }

  counters(): RelayCounters {
    const forward = { ...this.closedTotals.forward };
    const backward = { ...this.closedTotals.backward };
    for (const p of this.pairs) {
      for (const k of Object.keys(forward) as (keyof DirectionCounters)[]) {
        forward[k] += p.toTarget.counters[k];
        backward[k] += p.toClient.counters[k];
      }
    }
    return { forward, backward, sessions: this.accepted };
  }

  setShape(forward: LinkShape, backward: LinkShape = forward): void {
    this.forwardShape = forward;
    this.backwardShape = backward;
    for (const p of this.pairs) {
      p.toTarget.shape = forward;
      p.toClient.shape = backward;
    }
  }

  cut(): void {
    this.cutNow = true;
    for (const p of this.pairs) {
      p.toTarget.hold();
      p.toClient.hold();
    }
  }

  restore(): void {
    this.cutNow = false;
    for (const p of this.pairs) {
      p.toTarget.release();
      p.toClient.release();
    }
    for (const go of [...this.waiting]) go();
  }

  async close(): Promise<void> {
    for (const p of [...this.pairs]) {
      this.retire(p);
      p.client.destroy();
      p.upstream.destroy();
    }
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}
