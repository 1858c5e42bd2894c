// Where llama.cpp's RPC messages end in a tunnel's byte stream (llama.cpp's rpc protocol 6), so that the
// tunnel can choose when bytes leave. It never changes what they are.
/**
 * Where llama.cpp RPC messages end in a byte stream, so that a tunnel can send each message's pieces as one
 * QUIC write instead of one per TCP segment (llama.cpp writes a message in 2-3 send() calls, and a host
 * sends 7 commands per token: each QUIC write costs a wake-up of both processes).
 * Requests (host -> worker) are `cmd u8 | size u64 | payload`; fire-and-forget commands may wait for the
 * next command that needs a reply, which follows at once. Replies (worker -> host) are `size u64 | payload`.
 * Anything that does not parse as RPC turns the scanner off (every chunk is then sent at once): it only
 * ever decides *when* bytes leave, never what they are.
 */
export class RpcBoundaryScanner {
  private header = Buffer.alloc(9);
  private headerFill = 0;
  private payloadLeft = 0;
  private cmd = -1;
  /** Off: not RPC (or a version we do not know); every chunk is urgent. */
  off = false;
  /** Messages ended so far that someone waits for: requests that get a reply, or replies. */
  answered = 0;

  constructor(private readonly direction: 'requests' | 'replies') {}

  /** Feeds a chunk; true when it ends a message that someone waits for (flush now). */
  scan(b: Uint8Array): boolean {
    if (this.off) return true;
    const headerLen = this.direction === 'requests' ? 9 : 8;
    let urgent = false;
    let o = 0;
    while (o < b.length) {
      if (this.payloadLeft === 0 && this.headerFill < headerLen) {
        const n = Math.min(headerLen - this.headerFill, b.length - o);
        this.header.set(b.subarray(o, o + n), this.headerFill);
        this.headerFill += n;
        o += n;
        if (this.headerFill < headerLen) break;
        const sizeAt = this.direction === 'requests' ? 1 : 0;
        const size = this.header.readBigUInt64LE(sizeAt);
        this.cmd = this.direction === 'requests' ? this.header[0]! : -1;
        if (size > BigInt(Number.MAX_SAFE_INTEGER) || (this.direction === 'requests' && !RPC_COMMANDS_KNOWN.has(this.cmd))) {
          this.off = true;
          return true;
        }
        this.payloadLeft = Number(size);
        if (this.payloadLeft === 0) {
          urgent = this.complete() || urgent;
          continue;
        }
      }
      const n = Math.min(this.payloadLeft, b.length - o);
      this.payloadLeft -= n;
      o += n;
      if (this.payloadLeft === 0) urgent = this.complete() || urgent;
    }
    return urgent;
  }

  /** A message ended: urgent unless it is a request that gets no reply. */
  private complete(): boolean {
    this.headerFill = 0;
    const waited = this.direction === 'replies' || !RPC_FIRE_AND_FORGET.has(this.cmd);
    if (waited) this.answered++;
    return waited;
  }
}

/** RPC protocol 6 commands (FIELD-FACTS.md): 0..17, and our patch's SET_TENSOR_GGUF (18, answered: native/patches/0001). */
const RPC_COMMANDS_KNOWN = new Set(Array.from({ length: 19 }, (_, i) => i));
/** FREE_BUFFER, BUFFER_CLEAR, SET_TENSOR, GRAPH_COMPUTE, INIT_TENSOR, GRAPH_RECOMPUTE, MEMSET_TENSOR: no reply. */
const RPC_FIRE_AND_FORGET = new Set([4, 5, 6, 10, 12, 16, 17]);
/** The longest fire-and-forget bytes wait for a command that needs a reply. */
export const RPC_HOLD_MS = 2;
