// One whole mesh node, composed from the command line: what it holds (model, VRAM, key, binaries), the real
// parts (STUN, the iroh endpoint, the rpc-server and llama-server processes, the inspector), then
// `buildNode` (src/node/build.ts) and its start. Used by the CLI; the tests build nodes of their own parts.
// The handle stops everything the start acquired, through the built node's one disposal stack.
import type { Actor } from 'xstate';
import type { CliOptions } from './io/host/cli-args.ts';
import { createLogger } from './io/host/logger.ts';
import { liveProcesses } from './io/llama/processes.ts';
import { discoverPublicAddress } from './io/host/stun.ts';
import type { VramInfo } from './io/host/vram.ts';
import { createIrohEndpoint, type IrohMeshEndpoint } from './io/transport/iroh-transport.ts';
import type { EndpointId, ModelIdentity } from './machines/mesh-types.ts';
import type { nodeMachine } from './machines/node.machine.ts';
import { buildNode } from './node/build.ts';
import { openInspector, processSlots, readHoldings } from './node/parts.ts';
import type { NodeStatus } from './node/status.ts';

export { buildNode, type BuiltNode, type NodeComponents, type NodeConfig, type StartedNode } from './node/build.ts';
export { sanitizeForInspector, type NodeStatus } from './node/status.ts';

/** What startNode needs beyond the command line: the CLI's environment knobs (demo, tests, benchmarks). */
export interface NodeExtras {
  /** Where the QUIC endpoint binds; default 0.0.0.0 (the demo and tests: 127.0.0.1). */
  readonly bindHost?: string;
  /** CPU threads of rpc-server and llama-server (-t); default llama.cpp's. */
  readonly threads?: number;
  /** On the host, a counting proxy in front of every worker's tunnel: its figures appear in /api/status. */
  readonly countRpc?: boolean;
  /** Where peers dial our data port instead of our own addresses (tests and the WAN lab put relays there). */
  readonly dataAdvertise?: readonly string[];
}

export interface NodeHandle {
  readonly id: EndpointId;
  readonly name: string;
  /** The invite token (mi1) that lets others join this node's mesh; null until a joiner by expiring invite is welcomed. */
  readonly token: string | null;
  /** An expiring invite (mi2, 24 h) that only this node admits with; null as `token`. */
  readonly invite: string | null;
  readonly meshId: string;
  /** "http://127.0.0.1:PORT" of this node's API. */
  readonly apiUrl: string;
  readonly apiPort: number;
  /** The direct data path's TCP port; null with --data-path quic. */
  readonly dataPort: number | null;
  readonly model: ModelIdentity | null;
  readonly vram: VramInfo | null;
  readonly endpoint: IrohMeshEndpoint;
  readonly actor: Actor<typeof nodeMachine>;
  /** What GET /api/status answers. */
  status(): NodeStatus;
  /** Graceful stop: leaving to every peer, processes stopped, API and endpoint closed. Idempotent. */
  stop(reason?: string): Promise<void>;
  /** Resolves once the node has stopped (by stop() or because its machine ended). */
  readonly stopped: Promise<void>;
}

/** Starts a node. Throws (with a one-line message) when something it needs is missing or broken. */
export async function startNode(options: CliOptions, extras: NodeExtras = {}): Promise<NodeHandle> {
  const logger = createLogger({ level: options.logLevel });
  const { binaries, memory, ...holdings } = await readHoldings(options, logger);
  // A node without a model is a lite client, whatever its role preference.
  const role = options.role === 'client' || options.model === null ? 'client' : options.role;
  const node = buildNode(
    { ...options, role, bindHost: extras.bindHost ?? '0.0.0.0', countRpc: extras.countRpc ?? false, dataAdvertise: extras.dataAdvertise },
    {
      logger,
      holdings,
      net: { stun: discoverPublicAddress, bind: createIrohEndpoint },
      processes: processSlots(options, { ...extras, serve: options.serve }, binaries, logger),
      inspector: () => openInspector(options.inspect, logger),
      memory,
    },
  );
  const started = await node.start();
  const { id, token, invite, meshId, apiUrl, apiPort, dataPort, endpoint, actor, status } = started;
  return { id, name: options.name, token, invite, meshId, apiUrl, apiPort, dataPort, model: holdings.model, vram: holdings.vram, endpoint, actor, status, stop: node.stop, stopped: node.stopped };
}

/** Every child process this node (this Node.js process) still runs: tests check it is empty after stop. */
export function runningChildren(): number {
  return liveProcesses().length;
}
