// Control-stream framing: a 4-byte big-endian length, then one msgpack value. FrameDecoder takes chunks
// of any size and returns whole, validated messages; it never throws and never buffers past the cap.
import { Packr, Unpackr } from 'msgpackr';
import type { MeshMessage } from '../../machines/protocol.ts';
import { parseMessage, WireError } from './messages.ts';

export { WireError } from './messages.ts';

/** Default cap on one frame's msgpack payload. Gossip of a big mesh is a few KB; anything near this is hostile. */
export const DEFAULT_MAX_FRAME_BYTES = 1024 * 1024;
const PREFIX_BYTES = 4;

/** A length prefix (or an outgoing message) over the cap: the stream cannot be trusted further. */
export class FrameTooLargeError extends WireError {
  override readonly name = 'FrameTooLargeError';
  constructor(
    readonly frameBytes: number,
    readonly maxFrameBytes: number,
  ) {
    super('frame-too-large', `frame of ${frameBytes} bytes is over the cap of ${maxFrameBytes} bytes`);
  }
}

/** The frame's payload is not exactly one msgpack value (or one of a kind we refuse, such as a map with non-string keys). */
export class MalformedMsgpackError extends WireError {
  override readonly name = 'MalformedMsgpackError';
  constructor(readonly detail: string) {
    super('malformed-msgpack', `malformed msgpack frame: ${detail}`);
  }
}

/** The stream ended in the middle of a frame. */
export class TruncatedFrameError extends WireError {
  override readonly name = 'TruncatedFrameError';
  constructor(readonly bufferedBytes: number) {
    super('truncated-frame', `stream ended inside a frame (${bufferedBytes} bytes of it received)`);
  }
}

export interface FrameCodecOptions {
  /** Cap on one frame's payload in bytes (the 4-byte prefix not counted). */
  readonly maxFrameBytes?: number;
}

/** What one push yields: the whole messages it completed, then at most one error that ends the stream. */
export interface DecodeResult {
  readonly messages: MeshMessage[];
  /** Set once the stream is broken; every later push returns it again, with no messages. */
  readonly error: WireError | null;
}

// Plain msgpack maps both ways (msgpackr's record extension is for msgpackr-only peers and state we do not want).
const packr = new Packr({ useRecords: false });
const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: true });

/** One frame (prefix + msgpack) for `message`. Throws FrameTooLargeError when it exceeds the cap: our own bug, not a peer's. */
export function encodeFrame(message: MeshMessage, options: FrameCodecOptions = {}): Uint8Array {
  const max = options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
  const body = packr.pack(message);
  if (body.length > max) throw new FrameTooLargeError(body.length, max);
  const frame = new Uint8Array(PREFIX_BYTES + body.length);
  new DataView(frame.buffer).setUint32(0, body.length);
  frame.set(body, PREFIX_BYTES);
  return frame;
}

/** Streaming decoder for one control stream. It copies what it keeps, so callers may reuse their chunk buffers. */
export class FrameDecoder {
  private readonly maxFrameBytes: number;
  private chunks: Uint8Array[] = [];
  private buffered = 0;
  private failure: WireError | null = null;

  constructor(options: FrameCodecOptions = {}) {
    this.maxFrameBytes = options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
    if (!Number.isSafeInteger(this.maxFrameBytes) || this.maxFrameBytes < 1 || this.maxFrameBytes > 0xffffffff) {
      throw new RangeError(`maxFrameBytes must be an integer from 1 to 2^32-1, got ${this.maxFrameBytes}`);
    }
  }

  /** The error that broke the stream, if any. */
  get error(): WireError | null {
    return this.failure;
  }

  /** Feeds bytes; returns the messages completed by them and, if the stream broke, why. */
  push(chunk: Uint8Array): DecodeResult {
    if (this.failure !== null) return { messages: [], error: this.failure };
    if (chunk.length > 0) {
      this.chunks.push(new Uint8Array(chunk));
      this.buffered += chunk.length;
    }
    const messages: MeshMessage[] = [];
    while (this.buffered >= PREFIX_BYTES) {
      const length = this.peekLength();
      // Judge the prefix before waiting for the body, so a hostile length never makes us buffer it.
      if (length > this.maxFrameBytes) return this.fail(messages, new FrameTooLargeError(length, this.maxFrameBytes));
      if (this.buffered < PREFIX_BYTES + length) break;
      const body = this.take(PREFIX_BYTES + length).subarray(PREFIX_BYTES);
      const decoded = unpackOne(body);
      if (!decoded.ok) return this.fail(messages, decoded.error);
      const parsed = parseMessage(decoded.value);
      if (!parsed.ok) return this.fail(messages, parsed.error);
      messages.push(parsed.message);
    }
    return { messages, error: null };
  }

  /** Call at the end of the stream: a TruncatedFrameError if it stopped inside a frame, else the earlier error or null. */
  end(): WireError | null {
    if (this.failure === null && this.buffered > 0) this.failure = new TruncatedFrameError(this.buffered);
    return this.failure;
  }

  private fail(messages: MeshMessage[], error: WireError): DecodeResult {
    this.failure = error;
    this.chunks = [];
    this.buffered = 0;
    return { messages, error };
  }

  private peekLength(): number {
    let length = 0;
    let need = PREFIX_BYTES;
    for (const c of this.chunks) {
      for (let i = 0; i < c.length && need > 0; i++, need--) length = length * 256 + (c[i] as number);
      if (need === 0) break;
    }
    return length;
  }

  // Removes the first n buffered bytes; copies only when a frame spans chunks.
  private take(n: number): Uint8Array {
    const first = this.chunks[0] as Uint8Array;
    let out: Uint8Array;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      out = new Uint8Array(n);
      let filled = 0;
      while (filled < n) {
        const c = this.chunks[0] as Uint8Array;
        const part = Math.min(c.length, n - filled);
        out.set(c.subarray(0, part), filled);
        filled += part;
        if (part === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(part);
      }
    }
    this.buffered -= n;
    return out;
  }
}

// msgpackr throws plain Errors (and may, on hostile input, throw RangeErrors); all become one typed error.
function unpackOne(body: Uint8Array): { ok: true; value: unknown } | { ok: false; error: MalformedMsgpackError } {
  if (body.length === 0) return { ok: false, error: new MalformedMsgpackError('empty frame') };
  try {
    return { ok: true, value: unpackr.unpack(body) };
  } catch (error) {
    return { ok: false, error: new MalformedMsgpackError(error instanceof Error ? error.message.slice(0, 200) : String(error)) };
  }
}
