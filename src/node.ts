// One whole mesh node, composed: the node machine (src/machines) provided with the real actors (network on
// an iroh endpoint, rpc-server and llama-server processes), the TCP<->QUIC tunnels that follow the machine's
// state, and the OpenAI-compatible API routed by one proxy machine per request. `startNode` is used by the
// CLI, the demo and the end-to-end tests; it returns a handle that stops everything it started.
//
// The tunnels follow the node machine's context (src/actors/tunnels.actor.ts): the host's loopback port per
// remote worker for `--rpc`, the worker's accept policy and the hand-off, http tunnels to the host's
// llama-server, and a dead link's tunnels failed at once.
import { createActor, waitFor, type Actor, type InspectionEvent, type Observer } from 'xstate';
import { createSkyInspector, createWebSocketInspector } from '@statelyai/inspect';
import type { FastifyInstance } from 'fastify';
import { llamaServerProcessLogic, waitLlamaHealthyLogic } from './actors/llama-server.actor.ts';
import { createMeshNetworkLogic } from './actors/mesh-network.actor.ts';
import { meshUpstreamResolver } from './actors/api-server.actor.ts';
import { rpcServerProcessLogic, waitRpcServerListeningLogic } from './actors/rpc-server.actor.ts';
import { NodeTunnels } from './actors/tunnels.actor.ts';
import { buildApiServer } from './io/http/api-server.ts';
import type { CliOptions } from './io/host/cli-args.ts';
import { readModelIdentity } from './io/gguf/gguf-identity.ts';
import { createIrohEndpoint, type IrohMeshEndpoint } from './io/transport/iroh-transport.ts';
import { createMeshId, createMeshSecret, encodeInviteToken, inviteAddrs } from './io/wire/invite-token.ts';
import { findLlamaBinaries, type LlamaBinaries } from './io/llama/llama-binaries.ts';
import { componentLogger, createLogger, type Logger } from './io/host/logger.ts';
import { liveProcesses, stopAll } from './io/llama/processes.ts';
import type { RpcTrafficSnapshot } from './io/llama/rpc-traffic.ts';
import { ephemeralSecretKey, loadOrCreateSecretKey } from './io/host/secret-key.ts';
import { discoverPublicAddress } from './io/host/stun.ts';
import { detectVram, formatBytes, type VramInfo } from './io/host/vram.ts';
import { llamaServerMachine } from './machines/llama-server.machine.ts';
import { PROTOCOL_VERSION, type Announcement, type EndpointId, type ModelIdentity } from './machines/mesh-types.ts';
import { nodeMachine, runningRole, type NodeContext } from './machines/node.machine.ts';
import { rpcServerMachine } from './machines/rpc-server.machine.ts';

/** SIGTERM -> SIGKILL grace for llama-server (see where it is used). */
const LLAMA_KILL_GRACE_MS = 1_000;

/** What startNode needs beyond the command line: knobs for the demo, tests and benchmarks. */
export interface NodeExtras {
  /** The root logger; default one made from options.logLevel. */
  readonly logger?: Logger;
  /** Where the QUIC endpoint binds; default 0.0.0.0 (the demo and tests: 127.0.0.1). */
  readonly bindHost?: string;
  /** A fresh identity each run instead of the key file (tests). */
  readonly ephemeralKey?: boolean;
  /** The llama.cpp binaries; default: findLlamaBinaries() (MESH_LLAMA_BIN_DIR, then native/build.sh's). */
  readonly binaries?: LlamaBinaries;
  /** CPU threads of rpc-server and llama-server (-t); default llama.cpp's. */
  readonly threads?: number;
  /** llama-server's context size (-c). */
  readonly ctxSize?: number;
  /** llama-server's slots (-np). */
  readonly parallel?: number;
  /** On the host, a counting proxy in front of every worker's tunnel: its figures appear in /api/status. */
  readonly countRpc?: boolean;
  /** An inspection observer of our own (tests); otherwise options.inspect decides. */
  readonly inspect?: Observer<InspectionEvent>;
  /** Overrides of the node machine's delays (tests). */
  readonly nodeDelays?: Partial<Record<'electionQuiet' | 'joinTimeout' | 'leaveTimeout', number>>;
}

export interface NodeHandle {
  readonly id: EndpointId;
  readonly name: string;
  /** The invite token that lets others join this node's mesh. */
  readonly token: string;
  readonly meshId: string;
  /** "http://127.0.0.1:PORT" of this node's API. */
  readonly apiUrl: string;
  readonly apiPort: number;
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

export interface NodeStatus {
  readonly node: {
    readonly id: EndpointId;
    readonly name: string;
    readonly rolePreference: string;
    readonly state: unknown;
    readonly role: string;
    readonly model: ModelIdentity | null;
    readonly vramBytes: number;
    readonly meshId: string;
    readonly stopReason: string | null;
  };
  readonly plan: NodeContext['running'];
  readonly electedPlan: NodeContext['plan'];
  readonly view: readonly {
    readonly id: EndpointId;
    readonly name: string;
    readonly role: string;
    readonly vramBytes: number;
    readonly model: string | null;
    readonly serving: boolean;
    readonly connectedTo: readonly EndpointId[];
  }[];
  readonly links: readonly EndpointId[];
  readonly machines: {
    readonly node: unknown;
    readonly election: unknown;
    readonly rpcServer: unknown;
    readonly llamaServer: unknown;
    readonly peers: Readonly<Record<string, unknown>>;
  };
  readonly processes: {
    readonly rpcServer: { readonly state: string; readonly port: number | null };
    readonly llamaServer: { readonly state: string; readonly port: number | null; readonly generation: number };
  };
  readonly tunnels: { readonly pipes: number; readonly listeners: number };
  /** Host with countRpc: RPC traffic to each worker through its tunnel, cumulated over generations. */
  readonly rpcTraffic: Readonly<Record<string, RpcTrafficSnapshot>>;
}

/** Starts a node. Throws (with a one-line message) when something it needs is missing or broken. */
export async function startNode(options: CliOptions, extras: NodeExtras = {}): Promise<NodeHandle> {
  const logger = extras.logger ?? createLogger({ level: options.logLevel });
  const log = componentLogger(logger, 'node');
  const isClient = options.role === 'client' || options.model === null;

  // ---- what this node holds -------------------------------------------------------------------------
  const model = isClient ? null : await readModelIdentity(options.model!);
  const vram = isClient ? null : await detectVram({ maxVramBytes: options.maxVramBytes });
  const binaries = isClient ? null : (extras.binaries ?? (await findLlamaBinaries()));
  if (model !== null) log.info({ model: model.name, bytes: model.bytes, fingerprint: model.fingerprint }, 'model');
  if (vram !== null) log.info({ bytes: vram.bytes, source: vram.source }, `offering ${formatBytes(vram.bytes)} (${vram.detail})`);
  if (binaries !== null) log.info({ dir: binaries.dir, patches: binaries.patches }, 'llama.cpp binaries');

  // ---- identity and endpoint ------------------------------------------------------------------------
  const secretKey = extras.ephemeralKey ? ephemeralSecretKey() : (await loadOrCreateSecretKey({ keyFile: options.keyFile ?? undefined })).key;
  let publicAddr: string | null = null;
  if (options.bindPort !== null && (options.stun === null || options.stun.length > 0)) {
    // STUN from the very port QUIC will use, before QUIC takes it: the router's mapping is the one peers see.
    try {
      const r = await discoverPublicAddress({ servers: options.stun ?? undefined, localPort: options.bindPort, timeoutMs: 3_000 });
      publicAddr = `${r.address}:${r.port}`;
      log.info({ publicAddr, server: r.server }, 'public address (STUN)');
    } catch (err) {
      log.warn({ err: (err as Error).message }, 'no public address from STUN; the token carries LAN addresses only');
    }
  }
  const endpoint = await createIrohEndpoint(
    {
      secretKey,
      bindHost: extras.bindHost ?? '0.0.0.0',
      bindPort: options.bindPort ?? undefined,
      relay: options.relay.kind === 'custom' ? { url: options.relay.url } : options.relay.kind,
    },
    { log: componentLogger(logger, 'transport') },
  );

  const invite = options.joins[0] ?? null;
  const secret = invite?.secret ?? createMeshSecret();
  const meshId = invite?.meshId ?? createMeshId();
  const tokenAddrs = inviteAddrs(endpoint.addrs().filter((a) => !/^https?:/.test(a)), publicAddr);
  const token = encodeInviteToken({ meshId, secret, inviter: endpoint.id, addrs: tokenAddrs });

  const self: Announcement = {
    id: endpoint.id,
    epoch: Date.now(),
    seq: 0,
    name: options.name,
    role: isClient ? 'client' : options.role,
    vramBytes: vram?.bytes ?? 0,
    model,
    version: PROTOCOL_VERSION,
    serving: false,
    addrs: endpoint.addrs(),
    connectedTo: [],
  };

  // ---- inspector --------------------------------------------------------------------------------------
  let inspectorStop: (() => void) | null = null;
  let inspect: Observer<InspectionEvent> | undefined = extras.inspect;
  if (inspect === undefined && options.inspect !== null) {
    // The first actors start before the socket is open: keep their events until it is (default: 200).
    const inspectorOptions = { sanitizeContext: sanitizeForInspector, sanitizeEvent: sanitizeForInspector as never, maxDeferredEvents: 10_000 };
    const inspector =
      options.inspect.kind === 'sky'
        ? createSkyInspector({ ...inspectorOptions, onerror: (e: unknown) => log.warn({ err: String(e) }, 'inspector connection failed') })
        : createWebSocketInspector({ ...inspectorOptions, url: options.inspect.url });
    inspect = inspector.inspect;
    inspectorStop = () => inspector.stop();
    log.info({ target: options.inspect.kind === 'sky' ? 'stately.ai (link printed above)' : options.inspect.url }, 'sending the live actors to the inspector');
  }

  // ---- tunnels ---------------------------------------------------------------------------------------
  // `actorRef` is set right below; the policy only runs once streams arrive, after that.
  let actorRef: Actor<typeof nodeMachine> | null = null;
  const tunnels = new NodeTunnels(
    { countRpc: extras.countRpc },
    { endpoint, log: componentLogger(logger, 'tunnel'), context: () => actorRef?.getSnapshot().context ?? null },
  );

  // ---- the machine, provided ---------------------------------------------------------------------------
  const network = createMeshNetworkLogic(
    { secret, hello: { role: self.role, vramBytes: self.vramBytes, model: self.model } },
    { endpoint, logger: componentLogger(logger, 'network') },
  );
  // ggml's abort handler attaches gdb for a backtrace: seconds during which a crash is not yet an exit (and
  // llama-server aborts whenever an rpc-server goes away under it). MESH_INFERENCE_BACKTRACE=1 keeps it.
  const crashEnv: Record<string, string> = process.env['MESH_INFERENCE_BACKTRACE'] === '1' ? {} : { GGML_NO_BACKTRACE: '1' };
  // A lite client never runs either process: its slots keep the defaults, which fail loudly if ever asked.
  const processSlots =
    binaries === null
      ? {}
      : {
          rpcServer: rpcServerMachine.provide({
            actors: {
              rpcServerProcess: rpcServerProcessLogic({
                binary: binaries.rpcServer,
                gguf: options.model,
                ggufSupported: binaries.setTensorGguf,
                threads: extras.threads,
                env: crashEnv,
                logger: componentLogger(logger, 'rpc-server'),
              }),
              waitRpcServerListening: waitRpcServerListeningLogic,
            },
          }),
          llamaServer: llamaServerMachine.provide({
            actors: {
              llamaServerProcess: llamaServerProcessLogic({
                binary: binaries.llamaServer,
                model: options.model!,
                rpcAddressFor: (stage) => tunnels.rpcAddressFor(stage.id),
                threads: extras.threads,
                ctxSize: extras.ctxSize,
                parallel: extras.parallel,
                env: crashEnv,
                // In llama.cpp's router-child mode llama-server does not exit on SIGTERM while its stdin (the
                // watchdog pipe) stays open: it hangs in "cleaning up before exit" until SIGKILL. It holds no
                // state worth a graceful exit, so a short grace keeps every mesh change from costing 5 s.
                killGraceMs: LLAMA_KILL_GRACE_MS,
                logger: componentLogger(logger, 'llama-server'),
              }),
              waitLlamaHealthy: waitLlamaHealthyLogic,
            },
          }),
        };
  const machine = nodeMachine.provide({
    actors: { network, ...(processSlots as object) },
    ...(extras.nodeDelays ? { delays: extras.nodeDelays } : {}),
  });
  const actor = createActor(machine, {
    input: { self, bootstrap: options.joins.map((j) => ({ id: j.inviter, addrs: j.addrs })) },
    inspect,
  });
  actorRef = actor;

  // ---- follow the machine: tunnels (hand-off, dead links, listeners), logs -------------------------------
  let lastState = '';
  let lastPlanId: string | null = null;
  const sub = actor.subscribe({
    next: (snap) => {
      const c = snap.context;
      tunnels.follow(c);
      const state = JSON.stringify(snap.value);
      if (state !== lastState) {
        lastState = state;
        log.debug({ state: snap.value, role: runningRole(c) }, 'node state');
      }
      if (c.running !== null && c.running.id !== lastPlanId) {
        lastPlanId = c.running.id;
        const plan = c.running;
        if (plan.kind === 'ready') {
          const names = plan.stages.map((s) => `${nameOf(c, s.id)} ${(s.share * 100).toFixed(0)}%`).join(', ');
          log.info({ plan: plan.id, host: nameOf(c, plan.host), role: runningRole(c) }, `plan: host ${nameOf(c, plan.host)}; layers: ${names}`);
        } else {
          log.warn({ plan: plan.id }, `waiting: ${plan.reason}`);
        }
      }
    },
    error: (err) => log.error({ err: String(err) }, 'node machine failed'),
  });

  // ---- the API ---------------------------------------------------------------------------------------
  const status = (): NodeStatus => nodeStatus(actor, { meshId, tunnels: tunnels.stats(), rpcTraffic: tunnels.traffic() });
  const api: FastifyInstance = buildApiServer({
    upstream: meshUpstreamResolver({
      node: actor as never,
      remoteBaseUrl: (host) => tunnels.httpBaseUrl(host),
      inspect,
    }),
    status,
    apiKey: options.apiKey,
    logger: componentLogger(logger, 'api'),
  });

  // The API port first: when it is taken, nothing has started yet that would have to be stopped.
  let apiPort: number;
  try {
    await api.listen({ host: options.apiHost, port: options.port });
    const addr = api.server.address();
    apiPort = typeof addr === 'object' && addr !== null ? addr.port : options.port;
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    sub.unsubscribe();
    await api.close().catch(() => {});
    await tunnels.close().catch(() => {});
    await endpoint.close().catch(() => {});
    inspectorStop?.();
    throw new Error(e.code === 'EADDRINUSE' ? `port ${options.port} is already in use (another mesh-inference? pick one with --port)` : `the API could not listen: ${e.message}`);
  }
  actor.start();
  const apiUrl = `http://${options.apiHost === '0.0.0.0' ? '127.0.0.1' : options.apiHost}:${apiPort}`;

  let stopping: Promise<void> | null = null;
  let resolveStopped!: () => void;
  const stopped = new Promise<void>((r) => (resolveStopped = r));
  async function teardown(reason: string): Promise<void> {
    if (actor.getSnapshot().status === 'active') {
      actor.send({ type: 'node.stop', reason });
      // leaving -> stopped: peers told, processes stopped (bounded by the machine's leaveTimeout).
      await waitFor(actor, (s) => s.status !== 'active', { timeout: 15_000 }).catch(() => {});
    }
    sub.unsubscribe();
    actor.stop();
    await api.close().catch(() => {});
    await tunnels.close().catch(() => {});
    // The network's `leaving` frames need a moment on the wire before the connections go.
    await new Promise((r) => setTimeout(r, 200));
    await endpoint.close().catch(() => {});
    // Whatever a slot's cleanup only started to stop: wait for it, SIGKILL after the grace.
    await stopAll(3_000);
    inspectorStop?.();
    resolveStopped();
  }
  const stop = (reason = 'stopped') => (stopping ??= teardown(reason));
  // The machine may end by itself (its network failed): then clean up as for a stop.
  actor.subscribe({ complete: () => void stop('the node machine stopped') });

  return {
    id: endpoint.id,
    name: options.name,
    token,
    meshId,
    apiUrl,
    apiPort,
    model,
    vram,
    endpoint,
    actor,
    status,
    stop,
    stopped,
  };
}

function nameOf(c: NodeContext, id: EndpointId): string {
  return c.view.announcements[id]?.name ?? id.slice(0, 10);
}

type Snapshotted = { getSnapshot(): { value?: unknown; status?: string } } | undefined;
const valueOf = (ref: Snapshotted): unknown => ref?.getSnapshot().value ?? null;

function nodeStatus(
  actor: Actor<typeof nodeMachine>,
  extra: { meshId: string; tunnels: { pipes: number; listeners: number }; rpcTraffic: Record<string, RpcTrafficSnapshot> },
): NodeStatus {
  const snap = actor.getSnapshot();
  const c = snap.context;
  const children = snap.children as Record<string, Snapshotted>;
  const peers: Record<string, unknown> = {};
  for (const [id, ref] of Object.entries(c.peers)) peers[id] = valueOf(ref as Snapshotted);
  return {
    node: {
      id: c.self.id,
      name: c.self.name,
      rolePreference: c.self.role,
      state: snap.value,
      role: runningRole(c),
      model: c.self.model,
      vramBytes: c.self.vramBytes,
      meshId: extra.meshId,
      stopReason: c.stopReason,
    },
    plan: c.running,
    electedPlan: c.plan,
    view: Object.values(c.view.announcements).map((a) => ({
      id: a.id,
      name: a.name,
      role: a.role,
      vramBytes: a.vramBytes,
      model: a.model?.name ?? null,
      serving: a.serving,
      connectedTo: a.connectedTo,
    })),
    links: c.links,
    machines: {
      node: snap.value,
      election: valueOf(children['election']),
      rpcServer: valueOf(children['rpcServer']),
      llamaServer: valueOf(children['llamaServer']),
      peers,
    },
    processes: {
      rpcServer: { state: c.rpc, port: c.rpcPort },
      llamaServer: { state: c.llama, port: c.llamaPort, generation: c.generation },
    },
    tunnels: extra.tunnels,
    rpcTraffic: extra.rpcTraffic,
  };
}

/**
 * What the inspector may see of a context or event: actor refs become their ids (a ref drags the whole
 * actor system into the serialiser), byte arrays their length.
 */
export function sanitizeForInspector<T>(value: T): T {
  return sanitize(value, 0) as T;
}

function sanitize(v: unknown, depth: number): unknown {
  if (v === null || typeof v !== 'object') return v;
  if (depth > 6) return '…';
  if (v instanceof Uint8Array) return `<${v.length} bytes>`;
  const o = v as Record<string, unknown>;
  if (typeof o['send'] === 'function' && typeof o['getSnapshot'] === 'function') return `<actor ${String(o['id'] ?? '')}>`;
  if (Array.isArray(v)) return v.map((x) => sanitize(x, depth + 1));
  const out: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(o)) out[k] = sanitize(x, depth + 1);
  return out;
}

/** Every child process this node (this Node.js process) still runs: tests check it is empty after stop. */
export function runningChildren(): number {
  return liveProcesses().length;
}
