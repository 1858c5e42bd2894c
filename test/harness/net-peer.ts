// A mesh network node in its own process, for integration tests: one MeshNetwork on a real iroh endpoint
// (loopback, no relays), driven by JSON lines. No node machine and no llama processes: just the network layer.
//
//   npx tsx test/harness/net-peer.ts '<json config>'
//   config: { token?: string, join?: boolean, secretHex?: string, protocolVersion?: number,
//             dialTimeoutMs?: number, helloTimeoutMs?: number, logLevel?: string }
//   stdout: {"ev":"ready","id","addrs","token"} then {"ev":"net","event":NetworkEvent} per event
//   stderr: the node's pino log, one JSON object per line
//   stdin:  {"cmd":"net","command":NetworkCommand} | {"cmd":"peers"} (answers {"ev":"peers","peers"}) | {"cmd":"exit"}
import { randomBytes } from 'node:crypto';
import { createInterface } from 'node:readline';
import { pino, type LevelWithSilent } from 'pino';
import { createIrohEndpoint } from '../../src/io/transport/iroh-transport.ts';
import { MeshNetwork } from '../../src/io/mesh/mesh-network.ts';
import { createMeshId, createMeshSecret, decodeInviteToken, encodeInviteToken } from '../../src/io/wire/invite-token.ts';
import type { NetworkCommand } from '../../src/machines/protocol.ts';

interface Config {
  token?: string;
  join?: boolean;
  secretHex?: string;
  protocolVersion?: number;
  dialTimeoutMs?: number;
  helloTimeoutMs?: number;
  logLevel?: LevelWithSilent;
}

const config = JSON.parse(process.argv[2] ?? '{}') as Config;
const logger = pino({ level: config.logLevel ?? 'debug' }, pino.destination({ fd: 2, sync: true }));

const out = (value: unknown): void => {
  process.stdout.write(
    JSON.stringify(value, (_k, v: unknown) => (v instanceof Uint8Array ? { $hex: Buffer.from(v).toString('hex') } : v)) + '\n',
  );
};

const invite = config.token ? decodeInviteToken(config.token) : null;
const secret = invite?.secret ?? (config.secretHex ? new Uint8Array(Buffer.from(config.secretHex, 'hex')) : createMeshSecret());
const endpoint = await createIrohEndpoint(
  { secretKey: new Uint8Array(randomBytes(32)), bindHost: '127.0.0.1', relay: 'none' },
  { log: logger.child({ component: 'transport' }) },
);
const net = new MeshNetwork(
  {
    secret,
    hello: { role: 'auto', vramBytes: 0, model: null },
    ...(config.protocolVersion !== undefined ? { protocolVersion: config.protocolVersion } : {}),
    ...(config.dialTimeoutMs !== undefined ? { dialTimeoutMs: config.dialTimeoutMs } : {}),
    ...(config.helloTimeoutMs !== undefined ? { helloTimeoutMs: config.helloTimeoutMs } : {}),
  },
  { endpoint, logger: logger.child({ component: 'network' }) },
);
net.start((event) => out({ ev: 'net', event }));
const token = encodeInviteToken({ meshId: invite?.meshId ?? createMeshId(), secret, inviter: endpoint.id, addrs: endpoint.addrs() });
out({ ev: 'ready', id: endpoint.id, addrs: endpoint.addrs(), token });
if (invite && config.join) net.execute({ type: 'net.dial', id: invite.inviter, addrs: invite.addrs });

let exiting = false;
async function exit(): Promise<void> {
  if (exiting) return;
  exiting = true;
  await net.stop('harness exit');
  await endpoint.close();
  process.exit(0);
}

createInterface({ input: process.stdin }).on('line', (line) => {
  let msg: { cmd: string; command?: NetworkCommand };
  try {
    msg = JSON.parse(line) as typeof msg;
  } catch {
    logger.error({ line }, 'harness: not JSON');
    return;
  }
  if (msg.cmd === 'net' && msg.command) net.execute(msg.command);
  else if (msg.cmd === 'peers') out({ ev: 'peers', peers: net.peers() });
  else if (msg.cmd === 'exit') void exit();
}).on('close', () => void exit());
process.on('SIGTERM', () => void exit());
