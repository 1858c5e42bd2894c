// The wire format of a tunnel stream, without I/O: the header that opens it (the codec byte, and on an rpc
// stream the plan id its opener runs), the frames of the deflate codec (decoders take chunks, cap their frames
// and throw TunnelProtocolError), and its reset codes.
import { constants as zconst, deflateRawSync, inflateRawSync } from 'node:zlib';
import type { TunnelKind } from '../../machines/tunnel-policy.ts';
import { TransportError, firstLine } from './transport.ts';

/** Reset code of a refused tunnel stream. */
export const TUNNEL_REFUSED = 0x10;
/** Reset code when the local TCP side failed (target down, socket error). */
export const TUNNEL_TCP_FAILED = 0x11;
/** Reset code of tunnels closed by closeFrom() (the hand-off). */
export const TUNNEL_CLOSED = 0x12;

/**
 * How a tunnel stream carries its bytes: the opener's first byte after the stream kind says which, and both
 * directions use it. `raw`: the TCP bytes as they are. `deflate`: frames, each stored or deflated.
 */
export type TunnelCodec = 'raw' | 'deflate';
export const CODEC_BYTES: Record<TunnelCodec, number> = { raw: 0, deflate: 1 };

export class TunnelProtocolError extends TransportError {
  override name = 'TunnelProtocolError';
}

/** Frame header of the deflate codec: type u8 (0 stored, 1 deflated), payload bytes u32 LE, original bytes u32 LE. */
const FRAME_HEADER = 9;
/** Bigger frames are a protocol error (ours never exceed highWater plus one socket read). */
export const MAX_FRAME_BYTES = 16 * 1024 * 1024;
/** Below this, deflate's fixed cost is more than the bytes it could save. */
const MIN_DEFLATE_BYTES = 512;
/** A deflated frame is sent only when it is at most this fraction of the original. */
const DEFLATE_WORTH = 0.8;
/** After a chunk that did not compress, this many chunks go stored before deflate is tried again. */
const DEFLATE_BACKOFF = 16;

/**
 * Turns chunks into frames of the deflate codec. Whether compressing pays is decided per chunk, with a
 * back-off so that incompressible traffic (float activations, the worker's replies) costs one try in 17.
 */
export class FrameEncoder {
  private skip = 0;

  encode(chunk: Uint8Array): Buffer {
    if (chunk.length >= MIN_DEFLATE_BYTES && this.skip === 0) {
      const z = deflateRawSync(chunk, { level: 1, strategy: zconst.Z_DEFAULT_STRATEGY });
      if (z.length <= chunk.length * DEFLATE_WORTH) return frame(1, z, chunk.length);
      this.skip = DEFLATE_BACKOFF;
    } else if (this.skip > 0 && chunk.length >= MIN_DEFLATE_BYTES) {
      this.skip--;
    }
    return frame(0, chunk, chunk.length);
  }
}

function frame(type: 0 | 1, payload: Uint8Array, original: number): Buffer {
  const out = Buffer.allocUnsafe(FRAME_HEADER + payload.length);
  out[0] = type;
  out.writeUInt32LE(payload.length, 1);
  out.writeUInt32LE(original, 5);
  out.set(payload, FRAME_HEADER);
  return out;
}

/**
 * Turns stream reads (split anywhere) back into bytes; throws TunnelProtocolError. A stored frame's bytes
 * are passed on as they arrive (a 1 MiB frame need not be complete first); a deflated one is inflated once
 * all of it is there.
 */
export class FrameDecoder {
  private header = Buffer.alloc(FRAME_HEADER);
  private headerFill = 0;
  /** The frame being received, if any. */
  private frame: { type: 0 | 1; remaining: number; original: number; parts: Buffer[]; len: number } | null = null;

  push(chunk: Uint8Array): Buffer[] {
    const buf = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length);
    const out: Buffer[] = [];
    let o = 0;
    while (o < buf.length) {
      if (this.frame === null) {
        const n = Math.min(FRAME_HEADER - this.headerFill, buf.length - o);
        buf.copy(this.header, this.headerFill, o, o + n);
        this.headerFill += n;
        o += n;
        if (this.headerFill < FRAME_HEADER) break;
        this.headerFill = 0;
        this.frame = this.parseHeader();
      }
      const f = this.frame;
      const n = Math.min(f.remaining, buf.length - o);
      const piece = buf.subarray(o, o + n);
      o += n;
      f.remaining -= n;
      if (f.type === 0) {
        if (n > 0) out.push(piece);
      } else {
        f.parts.push(piece);
      }
      if (f.remaining === 0) {
        this.frame = null;
        if (f.type === 1) out.push(inflate(f.parts.length === 1 ? f.parts[0]! : Buffer.concat(f.parts, f.len), f.original));
      }
    }
    return out;
  }

  private parseHeader(): { type: 0 | 1; remaining: number; original: number; parts: Buffer[]; len: number } {
    const type = this.header[0]!;
    const len = this.header.readUInt32LE(1);
    const original = this.header.readUInt32LE(5);
    if (type > 1) throw new TunnelProtocolError(`unknown frame type ${type}`);
    if (len > MAX_FRAME_BYTES || original > MAX_FRAME_BYTES) {
      throw new TunnelProtocolError(`frame of ${Math.max(len, original)} bytes is over the ${MAX_FRAME_BYTES} cap`);
    }
    if (type === 0 && original !== len) throw new TunnelProtocolError('stored frame with a wrong length');
    return { type: type as 0 | 1, remaining: len, original, parts: [], len };
  }

  /** Bytes of an incomplete frame at the end of the stream are a protocol error. */
  get midFrame(): boolean {
    return this.frame !== null || this.headerFill > 0;
  }
}

function inflate(payload: Buffer, original: number): Buffer {
  let plain: Buffer;
  try {
    // The cap makes a deflate bomb fail instead of filling memory.
    plain = inflateRawSync(payload, { maxOutputLength: Math.max(1, original) });
  } catch (err) {
    throw new TunnelProtocolError(`bad deflated frame: ${firstLine(err)}`);
  }
  if (plain.length !== original) throw new TunnelProtocolError('deflated frame with a wrong length');
  return plain;
}

export function decodeCodec(byte: number): TunnelCodec | undefined {
  return (Object.keys(CODEC_BYTES) as TunnelCodec[]).find((k) => CODEC_BYTES[k] === byte);
}

/** A plan id on the wire is at most this many UTF-8 bytes (its length is one byte). */
export const MAX_PLAN_ID_BYTES = 255;

/**
 * A plan id as it travels (protocol 2: an rpc stream's header, and a `direct` offer of the rpc kind):
 * length u8 | UTF-8 bytes. Length 0: no plan (a worker refuses such an rpc stream). Throws over 255 bytes.
 */
export function encodePlanId(planId: string | null): Buffer {
  const bytes = Buffer.from(planId ?? '', 'utf8');
  if (bytes.length > MAX_PLAN_ID_BYTES) throw new TunnelProtocolError(`a plan id of ${bytes.length} bytes is over the ${MAX_PLAN_ID_BYTES} cap`);
  return Buffer.concat([Uint8Array.of(bytes.length), bytes]);
}

const UTF8 = new TextDecoder('utf-8', { fatal: true });

/**
 * The plan id at `offset` of `b`: null while `b` holds only a part of it; `planId` null for length 0.
 * Throws TunnelProtocolError on bytes that are not UTF-8.
 */
export function decodePlanId(b: Uint8Array, offset: number): { planId: string | null; end: number } | null {
  if (b.length <= offset) return null;
  const n = b[offset]!;
  const end = offset + 1 + n;
  if (b.length < end) return null;
  if (n === 0) return { planId: null, end };
  try {
    return { planId: UTF8.decode(b.subarray(offset + 1, end)), end };
  } catch {
    throw new TunnelProtocolError('a plan id that is not UTF-8');
  }
}

/**
 * What the opener writes right after the stream kind byte: `codec u8`, and on an rpc stream then the plan id
 * of the plan its llama-server runs (`length u8 | UTF-8`, encodePlanId). An http stream carries no plan id.
 */
export function encodeTunnelHeader(kind: TunnelKind, codec: TunnelCodec, planId: string | null): Uint8Array {
  const c = Uint8Array.of(CODEC_BYTES[codec]);
  return kind === 'rpc' ? Buffer.concat([c, encodePlanId(planId)]) : c;
}

/** The longest header a stream of either kind opens with. */
export const MAX_TUNNEL_HEADER_BYTES = 2 + MAX_PLAN_ID_BYTES;

/**
 * The header at the start of an incoming stream's bytes: null while `b` holds only a part of it; `end` is where
 * the codec's bytes start. Throws TunnelProtocolError on an unknown codec or a plan id that is not UTF-8.
 */
export function decodeTunnelHeader(kind: TunnelKind, b: Uint8Array): { codec: TunnelCodec; planId: string | null; end: number } | null {
  if (b.length === 0) return null;
  const codec = decodeCodec(b[0]!);
  if (codec === undefined) throw new TunnelProtocolError(`unknown tunnel codec ${b[0]}`);
  if (kind === 'http') return { codec, planId: null, end: 1 };
  const plan = decodePlanId(b, 1);
  return plan === null ? null : { codec, planId: plan.planId, end: plan.end };
}
