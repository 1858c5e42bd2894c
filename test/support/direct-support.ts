// Loopback pieces the direct-data-path tests share: a target that echoes and counts its connections, and a
// raw TLS 1.3 PSK attempt at a data port (what a peer with some identity and key gets back).
import { createServer, type Server } from 'node:net';
import { connect as tlsConnect } from 'node:tls';

export interface CountingEcho {
  readonly server: Server;
  readonly port: number;
  /** Connections the echo has accepted so far. */
  connections(): number;
  close(): Promise<void>;
}

/** An echo server on 127.0.0.1 (a stand-in for an rpc-server) that counts the connections it gets. */
export async function countingEcho(): Promise<CountingEcho> {
  let n = 0;
  const server = createServer((s) => {
    n++;
    s.on('error', () => {});
    s.pipe(s);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    server,
    port: (server.address() as { port: number }).port,
    connections: () => n,
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}

/**
 * A TLS 1.3 PSK client at 127.0.0.1:`port` with this identity and key that sends `probe` once connected:
 * `answered` only if the handshake completes and bytes come back, else `refused` (bounded: 5 s).
 */
export function tlsAttempt(port: number, identity: string, key: Buffer, probe: Buffer | string = 'hello'): Promise<'answered' | 'refused'> {
  return new Promise((resolve) => {
    const s = tlsConnect({
      host: '127.0.0.1',
      port,
      ciphers: 'TLS_AES_128_GCM_SHA256',
      minVersion: 'TLSv1.3',
      maxVersion: 'TLSv1.3',
      checkServerIdentity: () => undefined,
      pskCallback: () => ({ psk: key, identity }),
    });
    const timer = setTimeout(() => done('refused'), 5_000);
    const done = (r: 'answered' | 'refused') => {
      clearTimeout(timer);
      s.destroy();
      resolve(r);
    };
    s.once('secureConnect', () => s.write(probe));
    s.once('data', () => done('answered'));
    s.once('error', () => done('refused'));
    s.once('close', () => done('refused'));
  });
}
