// The llama.cpp RPC wire protocol without I/O: its command table, an incremental parser of one connection's
// two byte streams, and the counts it keeps (commands, bytes, blocking round trips), snapshots and their table.

/**
 * Commands of RPC protocol 6.0.0 (enum rpc_cmd in ggml/src/ggml-rpc/ggml-rpc.cpp of the pinned
 * release, plus our patch's), and whether the server answers each. Checked against rpc_serve_client: FREE_BUFFER,
 * BUFFER_CLEAR, MEMSET_TENSOR, SET_TENSOR, INIT_TENSOR, GRAPH_COMPUTE and GRAPH_RECOMPUTE get no reply.
 */
export const RPC_COMMANDS: Readonly<Record<number, RpcCommandInfo>> = {
  0: { name: 'ALLOC_BUFFER', reply: true },
  1: { name: 'GET_ALIGNMENT', reply: true },
  2: { name: 'GET_MAX_SIZE', reply: true },
  3: { name: 'BUFFER_GET_BASE', reply: true },
  4: { name: 'FREE_BUFFER', reply: false },
  5: { name: 'BUFFER_CLEAR', reply: false },
  6: { name: 'SET_TENSOR', reply: false },
  7: { name: 'SET_TENSOR_HASH', reply: true },
  8: { name: 'GET_TENSOR', reply: true },
  9: { name: 'COPY_TENSOR', reply: true },
  10: { name: 'GRAPH_COMPUTE', reply: false },
  11: { name: 'GET_DEVICE_MEMORY', reply: true },
  12: { name: 'INIT_TENSOR', reply: false },
  13: { name: 'GET_ALLOC_SIZE', reply: true },
  14: { name: 'HELLO', reply: true },
  15: { name: 'DEVICE_COUNT', reply: true },
  16: { name: 'GRAPH_RECOMPUTE', reply: false },
  17: { name: 'MEMSET_TENSOR', reply: false },
  // Ours (native/patches/0001-rpc-set-tensor-gguf.patch): load a tensor from the server's own GGUF.
  // A stock client never sends it, so knowing it costs nothing when counting stock traffic.
  18: { name: 'SET_TENSOR_GGUF', reply: true },
};

export interface RpcCommandInfo {
  readonly name: string;
  /** Whether the server sends a response frame for this command. */
  readonly reply: boolean;
}

/** HELLO's payload: conn_caps[24] (RPC_CONN_CAPS_SIZE); non-zero caps offer an RDMA upgrade. */
export const HELLO_CAPS_BYTES = 24;
/** RPC_CMD_HELLO: the first command of every connection. */
export const RPC_CMD_HELLO = 14;

/** A HELLO request with zero caps (plain TCP: no RDMA upgrade offered). */
export function helloRequest(): Buffer {
  const req = Buffer.alloc(9 + HELLO_CAPS_BYTES);
  req[0] = RPC_CMD_HELLO;
  req.writeBigUInt64LE(BigInt(HELLO_CAPS_BYTES), 1);
  return req;
}

export interface RpcCommandStats {
  /** Requests seen (complete headers). */
  count: number;
  /** Request bytes, frame headers (9 bytes each) included. */
  bytesToServer: number;
  /** Response bytes, frame headers (8 bytes each) included. */
  bytesToClient: number;
  /**
   * Replies the client waited for: the request was answered before the client sent anything else.
   * The stock client's dispatcher sends one command at a time, so every replied command blocks.
   */
  roundTrips: number;
  /**
   * Summed time from the end of each blocking request to the end of its reply, in ms, as seen at the
   * proxy: the server's work plus the proxy<->server hop, not the client<->proxy hop.
   */
  waitMs: number;
}

export interface RpcTrafficSnapshot {
  /** Keyed by command name (`CMD_<n>` for numbers configured nowhere). */
  readonly commands: Readonly<Record<string, RpcCommandStats>>;
  readonly totals: RpcCommandStats;
  /** Raw bytes forwarded each way (equal to the totals unless the stream could not be parsed). */
  readonly rawBytesToServer: number;
  readonly rawBytesToClient: number;
  readonly connectionsOpened: number;
  /** Protocol surprises (an unknown command, a reply nobody asked for, an RDMA offer), capped. */
  readonly notes: readonly string[];
}

const emptyStats = (): RpcCommandStats => ({ count: 0, bytesToServer: 0, bytesToClient: 0, roundTrips: 0, waitMs: 0 });

/** Accumulates statistics; shared by all connections of one proxy. */
export class RpcTrafficCounter {
  private commands = new Map<string, RpcCommandStats>();
  private rawToServer = 0;
  private rawToClient = 0;
  private opened = 0;
  private notes: string[] = [];

  stats(name: string): RpcCommandStats {
    let s = this.commands.get(name);
    if (!s) {
      s = emptyStats();
      this.commands.set(name, s);
    }
    return s;
  }
  raw(toServer: number, toClient: number): void {
    this.rawToServer += toServer;
    this.rawToClient += toClient;
  }
  connectionOpened(): void {
    this.opened++;
  }
  note(msg: string): void {
    if (this.notes.length < 100) this.notes.push(msg);
  }
  snapshot(): RpcTrafficSnapshot {
    const commands: Record<string, RpcCommandStats> = {};
    const totals = emptyStats();
    for (const [name, s] of [...this.commands].sort(([a], [b]) => a.localeCompare(b))) {
      commands[name] = { ...s };
      addInto(totals, s);
    }
    return {
      commands,
      totals,
      rawBytesToServer: this.rawToServer,
      rawBytesToClient: this.rawToClient,
      connectionsOpened: this.opened,
      notes: [...this.notes],
    };
  }
  reset(): void {
    this.commands.clear();
    this.rawToServer = 0;
    this.rawToClient = 0;
    this.opened = 0;
    this.notes = [];
  }
}

function addInto(into: RpcCommandStats, s: RpcCommandStats): void {
  into.count += s.count;
  into.bytesToServer += s.bytesToServer;
  into.bytesToClient += s.bytesToClient;
  into.roundTrips += s.roundTrips;
  into.waitMs += s.waitMs;
}

/** `after - before`, command by command: the traffic of what happened between two snapshots. */
export function diffRpcSnapshots(after: RpcTrafficSnapshot, before: RpcTrafficSnapshot): RpcTrafficSnapshot {
  const commands: Record<string, RpcCommandStats> = {};
  const totals = emptyStats();
  for (const [name, a] of Object.entries(after.commands)) {
    const b = before.commands[name] ?? emptyStats();
    const d: RpcCommandStats = {
      count: a.count - b.count,
      bytesToServer: a.bytesToServer - b.bytesToServer,
      bytesToClient: a.bytesToClient - b.bytesToClient,
      roundTrips: a.roundTrips - b.roundTrips,
      waitMs: a.waitMs - b.waitMs,
    };
    if (d.count === 0 && d.bytesToServer === 0 && d.bytesToClient === 0) continue;
    commands[name] = d;
    addInto(totals, d);
  }
  return {
    commands,
    totals,
    rawBytesToServer: after.rawBytesToServer - before.rawBytesToServer,
    rawBytesToClient: after.rawBytesToClient - before.rawBytesToClient,
    connectionsOpened: after.connectionsOpened - before.connectionsOpened,
    notes: after.notes.slice(before.notes.length),
  };
}

interface Pending {
  readonly name: string;
  /** Set once the request's last byte was seen; the wait is measured from there. */
  sentAt: number | null;
  /** False once the client sent something else before this reply came: it did not wait. */
  blocking: boolean;
}

/**
 * Parses one connection's two byte streams incrementally, on chunks of any size, without copying
 * payloads (a SET_TENSOR of a gigabyte is only counted). Pure: no sockets, time passed in.
 */
export class RpcStreamParser {
  // client -> server
  private reqHeader = Buffer.alloc(9);
  private reqHeaderFill = 0;
  private reqRemaining = 0;
  private reqName = '';
  private reqIsHello = false;
  /** The pending reply of the request being read, if it gets one. */
  private reqPending: Pending | null = null;
  private helloCaps: number[] = [];
  // server -> client
  private rspHeader = Buffer.alloc(8);
  private rspHeaderFill = 0;
  private rspRemaining = 0;
  private rspFor: Pending | null = null;
  private readonly pending: Pending[] = [];
  /** After a stream is not understood, parsing stops (forwarding goes on). */
  private broken = false;

  constructor(
    private readonly counter: RpcTrafficCounter,
    private readonly commands: Readonly<Record<number, RpcCommandInfo>> = RPC_COMMANDS,
  ) {}

  fromClient(chunk: Uint8Array, now: number): void {
    this.counter.raw(chunk.length, 0);
    if (this.broken) return;
    let i = 0;
    while (i < chunk.length) {
      if (this.reqRemaining > 0) {
        const n = Math.min(this.reqRemaining, chunk.length - i);
        this.counter.stats(this.reqName).bytesToServer += n;
        if (this.reqIsHello) for (let k = 0; k < n && this.helloCaps.length < HELLO_CAPS_BYTES; k++) this.helloCaps.push(chunk[i + k]!);
        this.reqRemaining -= n;
        i += n;
        if (this.reqRemaining === 0) this.requestDone(now);
        continue;
      }
      const n = Math.min(9 - this.reqHeaderFill, chunk.length - i);
      this.reqHeader.set(chunk.subarray(i, i + n), this.reqHeaderFill);
      this.reqHeaderFill += n;
      i += n;
      if (this.reqHeaderFill < 9) break;
      this.reqHeaderFill = 0;
      const cmd = this.reqHeader[0]!;
      const size = this.reqHeader.readBigUInt64LE(1);
      const info = this.commands[cmd];
      if (!info) {
        this.fail(`unknown RPC command ${cmd} (size ${size}); counting stopped for this connection`);
        return;
      }
      if (size > BigInt(Number.MAX_SAFE_INTEGER)) {
        this.fail(`${info.name} with absurd size ${size}; counting stopped for this connection`);
        return;
      }
      // Anything the client sends while a reply is outstanding means it did not wait for that reply.
      for (const p of this.pending) p.blocking = false;
      if (this.rspFor) this.rspFor.blocking = false;
      const s = this.counter.stats(info.name);
      s.count++;
      s.bytesToServer += 9;
      this.reqName = info.name;
      this.reqIsHello = cmd === RPC_CMD_HELLO;
      this.helloCaps = [];
      this.reqRemaining = Number(size);
      this.reqPending = info.reply ? { name: info.name, sentAt: null, blocking: true } : null;
      if (this.reqPending) this.pending.push(this.reqPending);
      if (this.reqRemaining === 0) this.requestDone(now);
    }
  }

  private requestDone(now: number): void {
    if (this.reqIsHello && this.helloCaps.some((b) => b !== 0)) {
      this.counter.note('HELLO offered RDMA capabilities: if both ends upgrade, traffic leaves this TCP path');
    }
    if (this.reqPending) this.reqPending.sentAt = now;
    this.reqPending = null;
  }

  fromServer(chunk: Uint8Array, now: number): void {
    this.counter.raw(0, chunk.length);
    if (this.broken) return;
    let i = 0;
    while (i < chunk.length) {
      if (this.rspRemaining > 0) {
        const n = Math.min(this.rspRemaining, chunk.length - i);
        this.counter.stats(this.rspFor!.name).bytesToClient += n;
        this.rspRemaining -= n;
        i += n;
        if (this.rspRemaining === 0) this.replyDone(now);
        continue;
      }
      const n = Math.min(8 - this.rspHeaderFill, chunk.length - i);
      this.rspHeader.set(chunk.subarray(i, i + n), this.rspHeaderFill);
      this.rspHeaderFill += n;
      i += n;
      if (this.rspHeaderFill < 8) break;
      this.rspHeaderFill = 0;
      const size = this.rspHeader.readBigUInt64LE(0);
      const p = this.pending.shift();
      if (!p) {
        this.fail(`a reply of ${size} bytes came with no request waiting for one; counting stopped for this connection`);
        return;
      }
      if (size > BigInt(Number.MAX_SAFE_INTEGER)) {
        this.fail(`reply to ${p.name} with absurd size ${size}; counting stopped for this connection`);
        return;
      }
      this.rspFor = p;
      this.counter.stats(p.name).bytesToClient += 8;
      this.rspRemaining = Number(size);
      if (this.rspRemaining === 0) this.replyDone(now);
    }
  }

  private replyDone(now: number): void {
    const p = this.rspFor!;
    this.rspFor = null;
    if (!p.blocking) return;
    const s = this.counter.stats(p.name);
    s.roundTrips++;
    if (p.sentAt !== null) s.waitMs += now - p.sentAt;
  }

  private fail(msg: string): void {
    this.broken = true;
    this.counter.note(msg);
  }
}

/** Renders a snapshot as a fixed-width table (for logs and benchmarks). */
export function formatRpcSnapshot(s: RpcTrafficSnapshot, perUnit = 1): string {
  const rows = Object.entries(s.commands).map(([name, c]) => [
    name,
    fmt(c.count / perUnit),
    fmt(c.roundTrips / perUnit),
    fmt(c.bytesToServer / perUnit),
    fmt(c.bytesToClient / perUnit),
  ]);
  rows.push(['TOTAL', fmt(s.totals.count / perUnit), fmt(s.totals.roundTrips / perUnit), fmt(s.totals.bytesToServer / perUnit), fmt(s.totals.bytesToClient / perUnit)]);
  const head = ['command', 'count', 'round trips', 'bytes ->server', 'bytes ->client'];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (r: string[]) => r.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ');
  return [line(head), ...rows.map(line)].join('\n');
}

function fmt(n: number): string {
  if (Number.isInteger(n)) return String(n);
  const s = n.toFixed(2);
  return s === '-0.00' ? '0.00' : s;
}
