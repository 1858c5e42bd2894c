// A whole mesh node for membership tests, in its own process, built by `buildNode` (src/node/build.ts): the
// node machine with the real network actor on a real iroh endpoint (loopback, no relays). It runs NO model: the rpc-server and
// llama-server slots get `noModel*` stand-ins that start nothing. Nodes here hold no model, so their
// plans wait and nothing would start anyway; the stand-ins make sure of it.
//
//   npx tsx test/harness/mesh-node.ts '{"name":"n1","token":"mi1..."}'
//   stdout: {"ev":"ready","id","addrs","token"}, then {"ev":"state","t","state","links","peers","view"} on each change
//           (view: how many announcements the node's gossip view holds)
//   stderr: pino JSON lines
//   stdin:  {"cmd":"stop","reason":"..."} (graceful: leaving to every peer) | {"cmd":"exit"}
//           | {"cmd":"paths"}: prints {"ev":"paths","paths":{peerId: [{remoteAddr,selected,relay,rttMs}]}} (the WAN lab)
//   config: bindHost (default 127.0.0.1; the WAN lab binds 0.0.0.0 in a namespace), bindPort
import { randomBytes } from 'node:crypto';
import { createInterface } from 'node:readline';
import { pino, type LevelWithSilent } from 'pino';
import { fromCallback } from 'xstate';
import { discoverPublicAddress } from '../../src/io/host/stun.ts';
import { createIrohEndpoint } from '../../src/io/transport/iroh-transport.ts';
import { decodeInviteToken } from '../../src/io/wire/invite-token.ts';
import { buildNode } from '../../src/node.ts';
import type { RpcServerCommand } from '../../src/machines/rpc-server.machine.ts';
import type { LlamaServerCommand } from '../../src/machines/llama-server.machine.ts';

interface Config {
  name?: string;
  token?: string;
  logLevel?: LevelWithSilent;
  bindHost?: string;
  bindPort?: number;
}

const config = JSON.parse(process.argv[2] ?? '{}') as Config;
const logger = pino({ level: config.logLevel ?? 'info', base: { node: config.name } }, pino.destination({ fd: 2, sync: true }));
const out = (value: unknown): void => void process.stdout.write(JSON.stringify(value) + '\n');

/** Membership tests only: an rpc-server slot that runs no process and never says ready. */
const noModelRpcServerLogic = fromCallback<RpcServerCommand>(({ receive, sendBack }) => {
  receive((cmd) => {
    if (cmd.type === 'rpc.start') logger.warn('no-model harness: rpc-server not started');
    else sendBack({ type: 'rpc.stopped' });
  });
});

/** Membership tests only: a llama-server slot that runs no process and never says ready. */
const noModelLlamaServerLogic = fromCallback<LlamaServerCommand>(({ receive, sendBack }) => {
  receive((cmd) => {
    if (cmd.type === 'llama.start') logger.warn('no-model harness: llama-server not started');
    else sendBack({ type: 'llama.stopped', planId: null });
  });
});

const invite = config.token ? decodeInviteToken(config.token) : null;
const node = buildNode(
  {
    name: config.name ?? 'node',
    role: 'auto',
    joins: invite ? [invite] : [],
    bindHost: config.bindHost ?? '127.0.0.1',
    bindPort: config.bindPort ?? null,
    dataPort: null,
    dataPath: 'quic',
    stun: [],
    relay: { kind: 'none' },
    apiHost: '127.0.0.1',
    port: 0,
    apiKey: null,
    countRpc: false,
  },
  {
    logger,
    holdings: { secretKey: new Uint8Array(randomBytes(32)), model: null, vram: null },
    net: { stun: discoverPublicAddress, bind: createIrohEndpoint },
    processes: () => ({ rpcServer: noModelRpcServerLogic as never, llamaServer: noModelLlamaServerLogic as never }),
  },
);
const { actor, endpoint, token } = await node.start();

let last = '';
/** Prints the node's state, its links and every peer machine's state, when any of them changed. */
function reportState(snap: ReturnType<typeof actor.getSnapshot>): void {
  const peers: Record<string, unknown> = {};
  for (const [id, ref] of Object.entries(snap.context.peers)) peers[id] = (ref as { getSnapshot(): { value: unknown } }).getSnapshot().value;
  const report = { state: snap.value, links: snap.context.links, peers, view: Object.keys(snap.context.view.announcements).length };
  const key = JSON.stringify(report);
  if (key !== last) {
    last = key;
    out({ ev: 'state', t: Date.now(), ...report });
  }
}
actor.subscribe({ next: reportState, error: () => {} }); // the built node logs a failure
reportState(actor.getSnapshot());
// Peer machines change state on their own timers: poll their states too (cheap, and only for the test's eyes).
const poll = setInterval(() => reportState(actor.getSnapshot()), 100);

out({ ev: 'ready', id: endpoint.id, addrs: endpoint.addrs(), token });

let exiting = false;
async function exit(reason: string): Promise<void> {
  if (exiting) return;
  exiting = true;
  clearInterval(poll);
  // leaving to every peer, then the node's parts released (the endpoint after the leaving frames went out).
  await node.stop(reason);
  process.exit(0);
}

createInterface({ input: process.stdin })
  .on('line', (line) => {
    try {
      const msg = JSON.parse(line) as { cmd: string; reason?: string };
      if (msg.cmd === 'stop' || msg.cmd === 'exit') void exit(msg.reason ?? 'harness exit');
      if (msg.cmd === 'paths') out({ ev: 'paths', paths: Object.fromEntries(endpoint.connections().map((c) => [c.remoteId, c.paths()])) });
    } catch {
      logger.error({ line }, 'harness: not JSON');
    }
  })
  .on('close', () => void exit('stdin closed'));
process.on('SIGTERM', () => void exit('SIGTERM'));
