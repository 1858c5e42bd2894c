// Where llama.cpp RPC messages end: the tunnel sends a message's pieces as one QUIC write, holds
// fire-and-forget commands for the next command that needs a reply, and gives up on anything that is not RPC.
import { describe, expect, it } from 'vitest';
import { RpcBoundaryScanner } from '../src/io/transport/rpc-boundary.ts';

function request(cmd: number, payload: number): Buffer {
  const b = Buffer.alloc(9 + payload, 0xab);
  b[0] = cmd;
  b.writeBigUInt64LE(BigInt(payload), 1);
  return b;
}
function reply(payload: number): Buffer {
  const b = Buffer.alloc(8 + payload, 0xcd);
  b.writeBigUInt64LE(BigInt(payload), 0);
  return b;
}

describe('RPC boundary scanner', () => {
  it('holds fire-and-forget requests and flags the command that waits for a reply', () => {
    const s = new RpcBoundaryScanner('requests');
    // One token: SET_TENSOR x2, GRAPH_RECOMPUTE, then GET_TENSOR.
    expect(s.scan(request(6, 3000))).toBe(false);
    expect(s.scan(request(6, 40))).toBe(false);
    expect(s.scan(request(16, 4))).toBe(false);
    expect(s.scan(request(8, 300))).toBe(true);
    expect(s.off).toBe(false);
  });

  it('finds the end of a message split anywhere, header included', () => {
    const s = new RpcBoundaryScanner('requests');
    const wire = Buffer.concat([request(6, 100), request(8, 50), request(14, 0)]);
    const flags: boolean[] = [];
    for (let i = 0; i < wire.length; i += 7) flags.push(s.scan(wire.subarray(i, i + 7)));
    // GET_TENSOR ends at byte 109 + 59 = 168 (chunk 24), HELLO (no payload) at 177 (chunk 25).
    expect(flags.map((f, i) => (f ? i : -1)).filter((i) => i >= 0)).toEqual([23, 25]);
  });

  it('flags every complete reply, including one whose size and payload come in two pieces', () => {
    const s = new RpcBoundaryScanner('replies');
    const r = reply(3072);
    expect(s.scan(r.subarray(0, 8))).toBe(false);
    expect(s.scan(r.subarray(8))).toBe(true);
    expect(s.scan(Buffer.concat([reply(4), reply(0)]))).toBe(true);
  });

  it('turns itself off on bytes that are not RPC, and then flags everything', () => {
    const s = new RpcBoundaryScanner('requests');
    expect(s.scan(Buffer.from('GET / HTTP/1.1\r\n'))).toBe(true);
    expect(s.off).toBe(true);
    expect(s.scan(request(6, 10))).toBe(true);
    const r = new RpcBoundaryScanner('replies');
    expect(r.scan(Buffer.alloc(8, 0xff))).toBe(true);
    expect(r.off).toBe(true);
  });
});
