// One mesh node from explicit parts. `buildNode(config, components)` acquires nothing; `start()` acquires
// step by step (the inspector, STUN, the endpoint, the node's parts on it, the API's port, the node actor),
// each step pushing the release of what it got onto ONE DisposalStack; `stop()`, a failed step and a node
// machine that ends by itself all run that stack, newest first. The node machine (src/machines) gets the
// real network actor on the endpoint and the process slots of the components; the tunnels follow the node
// through the one subscription the built node owns; the API routes each request with a proxy machine.
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { createActor, waitFor, type Actor, type AnyActorLogic, type InspectionEvent, type Observer } from 'xstate';
import { meshUpstreamResolver } from '../actors/api-server.actor.ts';
import { createMeshNetworkLogic } from '../actors/mesh-network.actor.ts';
import { NodeTunnels } from '../actors/tunnels.actor.ts';
import type { CliOptions } from '../io/host/cli-args.ts';
import { componentLogger, type Logger } from '../io/host/logger.ts';
import { chooseMesh, type MeshChoice, type RememberedMesh } from '../io/host/mesh-memory.ts';
import type { StunInit, StunResult } from '../io/host/stun.ts';
import type { VramInfo } from '../io/host/vram.ts';
import { allowedHostNames } from '../io/http/api-access.ts';
import { buildApiServer } from '../io/http/api-server.ts';
import { MeshNetwork } from '../io/mesh/mesh-network.ts';
import { stopAll } from '../io/llama/processes.ts';
import type { IrohMeshEndpoint, IrohTransportComponents, IrohTransportInit } from '../io/transport/iroh-transport.ts';
import { encodeExpiringInvite, encodeInviteToken, inviteAddrs } from '../io/wire/invite-token.ts';
import { announcementAuthority } from '../io/wire/announcement-signature.ts';
import type { KvSizing } from '../machines/kv-cache.ts';
import { PROTOCOL_VERSION, type Announcement, type EndpointId, type ModelIdentity } from '../machines/mesh-types.ts';
import { DRAIN_TIMEOUT_MS, nodeMachine } from '../machines/node.machine.ts';
import { previewPlan } from '../machines/plan-explain.ts';
import { DisposalStack } from './disposal.ts';
import { MeshEventHub, readMeshState, type LoadProgress } from './event-hub.ts';
import { follower } from './follower.ts';
import { logMeshChoice, MeshKeyBox, rememberMesh, rotateMesh } from './membership.ts';
import { nodeStatus, type NodeStatus } from './status.ts';

/** What the node is asked to be: the command line's part of it (`role` as announced), plus where the endpoint binds. */
export type NodeConfig = Pick<CliOptions, 'name' | 'role' | 'joins' | 'invites' | 'bindPort' | 'dataPort' | 'dataPath' | 'stun' | 'relay' | 'apiHost' | 'port' | 'apiKey'> & {
  /** Where the QUIC endpoint binds: 0.0.0.0, or 127.0.0.1 (the demo and tests). */
  readonly bindHost: string;
  /** On the host, a counting proxy in front of every worker's tunnel: its figures appear in /api/status. */
  readonly countRpc: boolean;
  /** Where peers dial our data port instead of our own addresses ("ip" or "ip:port"): tests, the WAN lab. */
  readonly dataAdvertise?: readonly string[];
  /** `--allowed-host` names the API answers to besides loopback names and its own addresses. */
  readonly allowedHosts?: readonly string[];
  /** `--new-mesh`: a fresh mesh even where the mesh file remembers one. */
  readonly newMesh?: boolean;
};

/** What this node holds, read before it is built (nothing to release). A lite client: no model, no VRAM. */
export interface NodeHoldings {
  readonly secretKey: Uint8Array;
  readonly model: ModelIdentity | null;
  readonly vram: VramInfo | null;
  /** The KV cache of the plans this node would host (src/machines/kv-cache.ts), announced; null/absent: none. */
  readonly kv?: KvSizing | null;
}

/** The acquisitions that reach the network (tests make each of them fail here). */
export interface NodeNet {
  readonly stun: (init: StunInit) => Promise<StunResult>;
  readonly bind: (init: IrohTransportInit, components: IrohTransportComponents) => Promise<IrohMeshEndpoint>;
  /** The node machine's `network` slot on the bound endpoint; default: the real MeshNetwork. */
  readonly network?: typeof createMeshNetworkLogic;
}

/** The node machine's process slots, given the one tunnel capability llama-server needs. A lite client: {}. */
export type NodeProcessSlots = (tunnels: Pick<NodeTunnels, 'rpcAddressFor' | 'directRpcFor'>) => {
  readonly rpcServer?: AnyActorLogic;
  readonly llamaServer?: AnyActorLogic;
  /** The current llama-server's weights sent as bytes after a GGUF refusal, by stage (status.ts). */
  readonly weightsOverWire?: () => NodeStatus['weightsOverWire'];
  /** llama-server's load progress, latest generation (the console's events). */
  readonly loadProgress?: () => LoadProgress | null;
};

export interface NodeInspector {
  readonly inspect: Observer<InspectionEvent>;
  stop(): void;
}

export interface NodeComponents {
  readonly logger: Logger;
  readonly holdings: NodeHoldings;
  readonly net: NodeNet;
  readonly processes: NodeProcessSlots;
  /** Opened first by start() (a connection), closed last; null or absent: not inspected. */
  readonly inspector?: () => NodeInspector | null;
  /** The key file's mesh file (src/io/host/mesh-memory.ts); absent for an ephemeral key: nothing remembered. */
  readonly memory?: NodeMeshMemory | null;
}

/** Where this node remembers its mesh, and what it remembered when it was read. */
export interface NodeMeshMemory {
  readonly path: string;
  readonly remembered: RememberedMesh | null;
}

/** A started node: what its handle and the tests read. */
export interface StartedNode {
  readonly id: EndpointId;
  /** The invite token (mi1: it carries the secret) that lets others join this node's mesh; null while the
   * node joins with an expiring invite and holds no secret yet. */
  readonly token: string | null;
  /** An expiring invite (mi2, 24 h) made at start, which only this node admits with; null as `token`. */
  readonly invite: string | null;
  readonly meshId: string;
  /** "http://127.0.0.1:PORT" of this node's API. */
  readonly apiUrl: string;
  readonly apiPort: number;
  /** The direct data path's TCP port; null with --data-path quic. */
  readonly dataPort: number | null;
  readonly endpoint: IrohMeshEndpoint;
  readonly actor: Actor<typeof nodeMachine>;
  readonly api: FastifyInstance;
  /** Where incoming http tunnels end (loopback, no key: admission authenticates): served locally or refused. */
  readonly meshApi: FastifyInstance;
  readonly tunnels: NodeTunnels;
  /** What GET /api/status answers. */
  status(): NodeStatus;
}

export interface BuiltNode {
  /** Acquires everything, in order; on a failure releases what it acquired and throws (a one-line message). */
  start(): Promise<StartedNode>;
  /** Graceful stop: leaving to every peer, processes stopped, API and endpoint closed. Idempotent. */
  stop(reason?: string): Promise<void>;
  /** Resolves once the node has released everything (by stop(), a failed start, or its machine ending). */
  readonly stopped: Promise<void>;
}

export function buildNode(config: NodeConfig, components: NodeComponents): BuiltNode {
  const log = componentLogger(components.logger, 'node');
  const stack = new DisposalStack((name, err) => log.warn({ err: String(err), release: name }, 'a release failed'));
  let reason = 'stopped';
  let stopping: Promise<void> | null = null;
  let resolveStopped!: () => void;
  const stopped = new Promise<void>((r) => (resolveStopped = r));
  const stop = (why = 'stopped'): Promise<void> => (stopping ??= ((reason = why), stack.dispose().then(resolveStopped)));

  async function start(): Promise<StartedNode> {
    try {
      const inspector = openInspector(stack, components.inspector);
      // Whatever a process slot's cleanup only started to stop: wait for it, SIGKILL after the grace.
      stack.defer('child processes', () => stopAll(3_000));
      const publicAddr = await discoverPublicAddr(config, components.net, log);
      const endpoint = await bindEndpoint(stack, config, components);
      const parts = assemble(stack, config, components, endpoint, publicAddr, inspector);
      const dataPort = await listenData(parts.tunnels, config, log);
      // The API port before the actor: when it is taken, no process has started that would have to stop.
      const apiPort = await listenApi(parts.api, config);
      await listenMeshApi(stack, parts, log);
      if (config.apiHost !== '127.0.0.1' && !config.apiKey) {
        log.warn(`--listen-all without --api-key: anyone on the network who reaches port ${apiPort} can use this API, and through it the mesh's GPUs; set --api-key`);
      }
      startActor(stack, parts, log, () => reason, () => void stop('the node machine stopped'));
      parts.flushMeshFile = await rememberMesh(stack, parts, components.memory ?? null, log);
      const apiUrl = `http://${config.apiHost === '0.0.0.0' ? '127.0.0.1' : config.apiHost}:${apiPort}`;
      return { id: endpoint.id, endpoint, apiPort, apiUrl, dataPort, ...parts };
    } catch (err) {
      await stop('the start failed');
      throw err;
    }
  }
  return { start, stop, stopped };
}

// ---- the steps of start(), in order --------------------------------------------------------------------

function openInspector(stack: DisposalStack, open: NodeComponents['inspector']): Observer<InspectionEvent> | undefined {
  const inspector = open?.() ?? null;
  if (inspector === null) return undefined;
  stack.defer('inspector', () => inspector.stop());
  return inspector.inspect;
}

/** "ip:port" as a STUN server sees the bind port, or null; no answer is no failure (LAN addresses only). */
async function discoverPublicAddr(config: NodeConfig, net: NodeNet, log: Logger): Promise<string | null> {
  if (config.bindPort === null || (config.stun !== null && config.stun.length === 0)) return null;
  // STUN from the very port QUIC will use, before QUIC takes it: the router's mapping is the one peers see.
  try {
    const r = await net.stun({ servers: config.stun ?? undefined, localPort: config.bindPort, timeoutMs: 3_000 });
    log.info({ publicAddr: `${r.address}:${r.port}`, server: r.server }, 'public address (STUN)');
    return `${r.address}:${r.port}`;
  } catch (err) {
    log.warn({ err: (err as Error).message }, 'no public address from STUN; the token carries LAN addresses only');
    return null;
  }
}

function bindEndpoint(stack: DisposalStack, config: NodeConfig, components: NodeComponents): Promise<IrohMeshEndpoint> {
  const init: IrohTransportInit = {
    secretKey: components.holdings.secretKey,
    bindHost: config.bindHost,
    bindPort: config.bindPort ?? undefined,
    relay: config.relay.kind === 'custom' ? { url: config.relay.url } : config.relay.kind,
  };
  return stack.use(
    'endpoint',
    () => components.net.bind(init, { log: componentLogger(components.logger, 'transport') }),
    async (endpoint) => {
      // The network's `leaving` frames need a moment on the wire before the connections go.
      await new Promise((r) => setTimeout(r, 200));
      await endpoint.close();
    },
  );
}

/** How long the invite printed at start admits. */
export const START_INVITE_TTL_MS = 24 * 3600_000;

type Parts = Pick<StartedNode, 'token' | 'invite' | 'meshId' | 'actor' | 'api' | 'meshApi' | 'tunnels' | 'status'> & {
  readonly mesh: MeshChoice;
  /** The secret as it is now (a welcome fills it in, a rotation replaces it); the mesh file follows it. */
  readonly keys: MeshKeyBox;
  /** Writes the mesh file now (set once it is followed; null for an ephemeral key): an admin answer waits for it. */
  flushMeshFile: (() => Promise<void>) | null;
  /** This node's addresses as a token carries them: the mesh file keeps them for `mesh-inference invite`. */
  readonly selfAddrs: readonly string[];
};

/** On the bound endpoint: the tunnels, the provided node machine's actor (not started) and the API app. */
function assemble(
  stack: DisposalStack,
  config: NodeConfig,
  components: NodeComponents,
  endpoint: IrohMeshEndpoint,
  publicAddr: string | null,
  inspect: Observer<InspectionEvent> | undefined,
): Parts {
  const logger = components.logger;
  const mesh = chooseMesh(config.joins, components.memory?.remembered ?? null, config.newMesh ?? false, endpoint.id, config.invites ?? []);
  const { meshId } = mesh;
  const nodeLog = componentLogger(logger, 'node');
  logMeshChoice(nodeLog, mesh, components.memory ?? null);
  const tokenAddrs = inviteAddrs(endpoint.addrs().filter((a) => !/^https?:/.test(a)), publicAddr);
  const token = mesh.secret === null ? null : encodeInviteToken({ meshId, secret: mesh.secret, inviter: endpoint.id, addrs: tokenAddrs });
  const invite = mesh.secret === null ? null : encodeExpiringInvite({ meshId, secret: mesh.secret, secretKey: components.holdings.secretKey, addrs: tokenAddrs, ttlMs: START_INVITE_TTL_MS });
  const keys = new MeshKeyBox(mesh, components.memory?.remembered ?? null);
  if (mesh.secret === null) {
    for (const invite of mesh.invites) {
      if (invite.expiresAt <= Date.now()) nodeLog.warn({ expiresAt: new Date(invite.expiresAt).toISOString() }, `the --join invite expired at ${new Date(invite.expiresAt).toISOString()} (by this machine's clock); its inviter will refuse it: ask a member for a new one (mesh-inference invite)`);
    }
  }
  const self = announcement(config, components.holdings, endpoint);

  const tunnels = new NodeTunnels(
    { countRpc: config.countRpc, dataPath: config.dataPath, dataHost: config.bindHost, dataPort: config.dataPort ?? config.bindPort ?? 0 },
    { endpoint, log: componentLogger(logger, 'tunnel'), advertise: () => config.dataAdvertise ?? dataAddresses(config.bindHost, endpoint.addrs(), publicAddr) },
  );
  stack.defer('tunnels', () => tunnels.close());
  // The network's instance, for the owner's rotation (the node machine owns its lifetime, through its actor).
  let meshNetwork: MeshNetwork | null = null;
  const network = (components.net.network ?? createMeshNetworkLogic)(
    {
      secret: mesh.secret,
      key: mesh.key,
      meshId,
      invites: mesh.invites,
      signingKey: components.holdings.secretKey,
      hello: { role: self.role, vramBytes: self.vramBytes, model: self.model },
      onWelcome: ({ meshId: _, ...key }) => keys.take(key, 'welcome'),
      onRekey: ({ meshId: _, ...key }) => keys.take(key, 'rekey'),
    },
    { endpoint, logger: componentLogger(logger, 'network') },
    (init, netComponents) => (meshNetwork = new MeshNetwork(init, netComponents)),
  );
  const { weightsOverWire, loadProgress, ...processes } = components.processes({
    rpcAddressFor: (peer, planId) => tunnels.rpcAddressFor(peer, planId),
    directRpcFor: (peer, planId) => tunnels.directRpcFor(peer, planId),
  });
  const machine = nodeMachine.provide({ actors: { network, ...(processes as object) } });
  const actor = createActor(machine, {
    input: {
      self,
      bootstrap: mesh.bootstrap.map((p) => ({ id: p.id, addrs: p.addrs })),
      facts: announcementAuthority(components.holdings.secretKey, meshId),
    },
    inspect,
  });

  // Hung stages and evidence about peers, as the tunnels see them (src/machines/stage-health.ts, peer.machine.ts).
  tunnels.reportTo((event) => {
    if (actor.getSnapshot().status === 'active') actor.send(event);
  });
  // Requests being answered on both APIs: the node machine drains them before a planned change.
  let inFlight = 0;
  const countInFlight = (delta: 1 | -1) => {
    inFlight += delta;
    if (actor.getSnapshot().status === 'active') actor.send({ type: 'requests.inflight', count: inFlight });
  };
  // GET /api/events and the console: the mesh as this node sees it, one event per change.
  const events = new MeshEventHub({
    read: () => readMeshState({ actor, meshId, connection: (id) => endpoint.connection(id), tunnels: () => tunnels.stats(), load: () => loadProgress?.() ?? null }),
    follow: (onChange) => {
      const sub = actor.subscribe({ next: onChange, error: () => {} });
      return () => sub.unsubscribe();
    },
  });
  events.start();
  stack.defer('events', () => events.stop());
  const status = (): NodeStatus => nodeStatus(actor, { meshId, key: keys.current, tunnels: tunnels.stats(), rpcTraffic: tunnels.traffic(), weightsOverWire: weightsOverWire?.() });
  const api = buildApiServer({
    upstream: meshUpstreamResolver({
      node: actor as never,
      remoteBaseUrl: (host) => tunnels.httpBaseUrl(host),
      system: inspect === undefined ? undefined : { rootId: actor.sessionId, inspect },
    }),
    status,
    // What elect gives on this node's view now, explained (src/machines/plan-explain.ts).
    plan: () => previewPlan(actor.getSnapshot().context.view),
    apiKey: config.apiKey,
    allowedHosts: allowedHostNames(config.apiHost, config.allowedHosts),
    logger: componentLogger(logger, 'api'),
    survival: { onRequest: events.request },
    console: { snapshot: () => events.snapshot(), subscribe: (listener) => events.subscribe(listener) },
    onInFlight: countInFlight,
    // Only a node with a key file has an owner who can sign admin requests (src/io/wire/admin-proof.ts).
    ...(components.memory
      ? { admin: { owner: endpoint.id, rotate: (remove: readonly string[]) => rotateMesh({ network: meshNetwork, actor, meshId, meshFile: components.memory?.path ?? null, flush: parts.flushMeshFile }, remove) } }
      : {}),
  });
  stack.defer('api', () => api.close());
  // The end of incoming http tunnels: the same API, marked by its listener (never by a header), whose
  // resolver serves locally or refuses; no key (admission authenticates mesh traffic); loopback names only.
  const meshApi = buildApiServer({
    upstream: meshUpstreamResolver({ node: actor as never, origin: 'mesh', remoteBaseUrl: () => Promise.reject(new Error('a mesh request is never forwarded')) }),
    status,
    llamaRoutes: true,
    onInFlight: countInFlight,
    logger: componentLogger(logger, 'api-mesh'),
  });
  stack.defer('mesh api', () => meshApi.close());
  const parts: Parts = { token, invite, meshId, actor, api, meshApi, tunnels, status, mesh, keys, flushMeshFile: null, selfAddrs: tokenAddrs };
  return parts;
}

/**
 * The mesh API on a Unix socket in a folder of its own (0700): incoming http tunnels end there from now on.
 * Not a loopback port: that would let any local user past `--api-key` to the model (SECURITY.md).
 */
async function listenMeshApi(stack: DisposalStack, parts: Parts, log: Logger): Promise<void> {
  const base = tmpdir().length > 60 ? '/tmp' : tmpdir(); // a socket path has ~100 bytes at most
  const dir = await mkdtemp(join(base, 'mesh-inference-'));
  stack.defer('mesh api socket', () => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'mesh-api.sock');
  await parts.meshApi.listen({ path });
  await chmod(path, 0o600);
  parts.tunnels.serveHttpAt({ path });
  log.debug({ path }, 'mesh API (the end of incoming http tunnels) listening on a private Unix socket');
}

/** The direct data path's TCP port (`--data-path auto`), on the endpoint's bind address. */
async function listenData(tunnels: NodeTunnels, config: NodeConfig, log: Logger): Promise<number | null> {
  const port = await tunnels.listenData();
  if (port === null) {
    log.info('data path: QUIC only (--data-path quic)');
    return null;
  }
  const forward = config.bindPort !== null ? `; a port forward needs TCP ${port} as well as UDP ${config.bindPort}` : '';
  log.info({ dataPort: port }, `data port: TCP ${port} (direct TLS between nodes that reach each other${forward})`);
  return port;
}

async function listenApi(api: FastifyInstance, config: NodeConfig): Promise<number> {
  try {
    await api.listen({ host: config.apiHost, port: config.port });
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new Error(e.code === 'EADDRINUSE' ? `port ${config.port} is already in use (another mesh-inference? pick one with --port)` : `the API could not listen: ${e.message}`);
  }
  const addr = api.server.address();
  return typeof addr === 'object' && addr !== null ? addr.port : config.port;
}

/** Subscribes the node's one follower, then starts the actor; a machine that ends at once fails the start. */
function startActor(stack: DisposalStack, parts: Parts, log: Logger, reason: () => string, onEnd: () => void): void {
  const { actor } = parts;
  const sub = actor.subscribe({ next: follower(parts.tunnels, log), error: (err) => log.error({ err: String(err) }, 'node machine failed'), complete: onEnd });
  stack.defer('node subscription', () => sub.unsubscribe());
  stack.defer('node actor', async () => {
    if (actor.getSnapshot().status === 'active') {
      actor.send({ type: 'node.stop', reason: reason() });
      // leaving -> stopped: peers told, processes stopped (bounded by the machine's leaveTimeout).
      await waitFor(actor, (s) => s.status !== 'active', { timeout: DRAIN_TIMEOUT_MS + 15_000 }).catch(() => {});
    }
    actor.stop();
  });
  actor.start();
  const snap = actor.getSnapshot();
  if (snap.status !== 'active') {
    throw new Error(`the node machine stopped as it started: ${snap.status === 'error' ? String(snap.error) : (snap.context.stopReason ?? snap.status)}`);
  }
}

// ---- helpers --------------------------------------------------------------------------------------------

function announcement(config: NodeConfig, holdings: NodeHoldings, endpoint: IrohMeshEndpoint): Announcement {
  return {
    id: endpoint.id,
    epoch: Date.now(),
    seq: 0,
    name: config.name,
    role: config.role,
    vramBytes: holdings.vram?.bytes ?? 0,
    model: holdings.model,
    version: PROTOCOL_VERSION,
    serving: false,
    addrs: endpoint.addrs(),
    connectedTo: [],
    ...(holdings.kv ? { kv: holdings.kv } : {}),
  };
}

/**
 * The IPs our data port can be dialed on: the bind address when it is one, else the endpoint's own
 * addresses (IPv4: the port listens on 0.0.0.0) and the public one STUN saw.
 */
export function dataAddresses(bindHost: string, endpointAddrs: readonly string[], publicAddr: string | null): string[] {
  if (bindHost !== '0.0.0.0') return [bindHost];
  const ips = [...endpointAddrs, ...(publicAddr === null ? [] : [publicAddr])]
    .map((a) => /^(\d{1,3}(?:\.\d{1,3}){3}):\d+$/.exec(a)?.[1])
    .filter((ip): ip is string => ip !== undefined);
  return [...new Set(ips)];
}
