// The tunnels of one node, driven by its node machine's context (src/machines/node.machine.ts): which
// incoming rpc and http streams may reach local processes (the policy, which checks the plan id an rpc tunnel
// carries), the host's loopback port per remote worker and plan for llama-server's `--rpc` (or, with patch
// 0003, a ticket for llama-server to dial the worker's data port itself), a worker's or lite client's port to
// the host's API, the data port (the direct TLS path) and the hand-off. One owner: the built node
// (src/node/build.ts) creates it, feeds it every snapshot of the node actor through its one subscription
// (`follow()`), closes it, and hands the process slots and the API only the capability each needs
// (`rpcAddressFor`/`directRpcFor`, `httpBaseUrl`). The admission policy reads the context last followed:
// before the first snapshot, every stream is refused (the node is starting).
import type { Logger } from '../io/host/logger.ts';
import { startRpcTrafficProxy, type RpcTrafficProxy, type RpcTrafficSnapshot } from '../io/llama/rpc-traffic.ts';
import { DirectPathServer } from '../io/transport/direct-path.ts';
import { TunnelService, type TunnelInfo, type TunnelListener, type TunnelStats } from '../io/transport/tunnel.ts';
import type { MeshEndpoint } from '../io/transport/transport.ts';
import type { EndpointId } from '../machines/mesh-types.ts';
import { runningRole, type NodeContext, type RpcTunnelPolicy } from '../machines/node.machine.ts';
import { remoteWorkers } from '../machines/node-plan.ts';
import type { PeerEvidence } from '../machines/peer.machine.ts';
import type { StageHungEvent } from '../machines/stage-health.ts';
import { tunnelDecision, type TunnelTarget } from '../machines/tunnel-policy.ts';

/** What the tunnels tell the node machine (reportTo): a hung stage, evidence about a peer. */
export type TunnelsReport = StageHungEvent | PeerEvidence;

/** The patched rpc-server's extra command, for the counting proxy (native/patches/0001). */
const MESH_RPC_COMMANDS = { 18: { name: 'SET_TENSOR_GGUF', reply: true } } as const;

export interface NodeTunnelsInit {
  /** On the host, a counting proxy in front of every worker's tunnel (traffic() reports it). */
  readonly countRpc?: boolean;
  /**
   * `auto`: a data port answers peers' direct offers and our tunnels try the direct path first; `quic`: no
   * data port, iroh streams only. Default `quic`.
   */
  readonly dataPath?: 'auto' | 'quic';
  /** Where the data port listens (`auto` only): the endpoint's bind address, and a port (0: any). */
  readonly dataHost?: string;
  readonly dataPort?: number;
}

export interface NodeTunnelsComponents {
  readonly endpoint: MeshEndpoint;
  readonly log: Logger;
  /** The IPs peers may dial our data port on. */
  readonly advertise?: () => readonly string[];
}

/** What /api/status shows of the tunnels. */
export interface TunnelsStatus extends TunnelStats {
  readonly dataPath: 'auto' | 'quic';
  /** The data port's TCP port; null with `--data-path quic` (or before it listens). */
  readonly dataPort: number | null;
  readonly connections: readonly TunnelInfo[];
  /** Host: workers whose data port llama-server dials with TLS itself (patch 0003): no byte passes this node. */
  readonly llamaDialsDirect: readonly { readonly peer: EndpointId; readonly address: string }[];
}

interface RpcRoute {
  readonly peer: EndpointId;
  readonly planId: string;
  readonly listener: TunnelListener;
  readonly proxy: RpcTrafficProxy | null;
  readonly address: string;
}

export class NodeTunnels {
  private readonly service: TunnelService;
  private readonly log: Logger;
  private readonly countRpc: boolean;
  /**
   * Host side: one listener (and optional counting proxy) per remote worker and plan, keyed by routeKey: each
   * of its connections tells the worker the plan id (a worker refuses a stream for a plan not its own).
   */
  private readonly rpcRoutes = new Map<string, { readonly peer: EndpointId; readonly planId: string; readonly route: Promise<RpcRoute> }>();
  /** Every counting proxy ever made per worker: the traffic adds up over llama-server generations. */
  private readonly proxies = new Map<EndpointId, RpcTrafficProxy[]>();
  /** Worker and lite-client side: one http listener per host. */
  private readonly httpRoutes = new Map<EndpointId, Promise<TunnelListener>>();
  /** The node's context as of the last snapshot followed; null before the first. */
  private context: NodeContext | null = null;
  /** Where an admitted http tunnel ends: this node's mesh API listener (null until it listens). */
  private meshApi: TunnelTarget | null = null;
  private lastPolicy: RpcTunnelPolicy | null = null;
  private lastLinks: readonly EndpointId[] = [];
  private readonly dataPath: 'auto' | 'quic';
  /** Host: the data port each worker's current llama-server connection dials itself. */
  private readonly llamaDirect = new Map<EndpointId, string>();
  /** The data port (`auto`), listening once listenData() resolved. */
  private readonly direct: DirectPathServer | null;
  /** Where reports go (the node actor); none until reportTo(). */
  private sink: ((event: TunnelsReport) => void) | null = null;
  private lastQuarantined: readonly EndpointId[] = [];

  constructor(init: NodeTunnelsInit, components: NodeTunnelsComponents) {
    this.log = components.log;
    this.countRpc = init.countRpc ?? false;
    this.dataPath = init.dataPath ?? 'quic';
    const allow = (remote: EndpointId, kind: 'rpc' | 'http', planId: string | null) => tunnelDecision(this.context, remote, kind, planId, this.meshApi);
    this.direct =
      this.dataPath === 'auto'
        ? new DirectPathServer({ host: init.dataHost ?? '127.0.0.1', port: init.dataPort ?? 0 }, { allow, advertise: components.advertise ?? (() => [init.dataHost ?? '127.0.0.1']), log: components.log })
        : null;
    const report = {
      // Only the host's own llama-server connections are watched (the rpc listeners): a hung stage.
      stall: (s: { peer: EndpointId; planId: string | null; waitedMs: number; boundMs: number; p99Ms: number | null }) => {
        this.log.warn({ peer: s.peer.slice(0, 10), plan: s.planId, waitedMs: s.waitedMs, boundMs: s.boundMs, p99Ms: s.p99Ms }, 'hung stage: an rpc request got no reply byte within the bound');
        this.sink?.({ type: 'stage.hung', id: s.peer, planId: s.planId, waitedMs: s.waitedMs, boundMs: s.boundMs });
      },
      evidence: (peer: EndpointId, path: 'quic' | 'direct', why: string) => {
        this.log.debug({ peer: peer.slice(0, 10), path, why }, 'a tunnel ended from the far side');
        this.sink?.({ type: 'peer.evidence', id: peer, path, why });
      },
    };
    this.service = new TunnelService({ allow, dataPath: this.dataPath }, { endpoint: components.endpoint, log: components.log, direct: this.direct, report });
    this.service.start();
  }

  /** Opens the data port (`auto`); until then peers' offers are refused and they use QUIC. Throws a one-line error. */
  async listenData(): Promise<number | null> {
    if (this.direct === null) return null;
    await this.direct.start();
    return this.direct.port;
  }

  /** Incoming http tunnels end at this loopback address: the node's mesh API listener, never llama-server. */
  serveHttpAt(target: TunnelTarget): void {
    this.meshApi = target;
  }

  /** Reports (a hung stage, evidence about a peer) go to `send`: the node actor. */
  reportTo(send: (event: TunnelsReport) => void): void {
    this.sink = send;
  }

  /** Every snapshot of the node: the hand-off, dead links, listeners of workers that are no longer stages. */
  follow(c: NodeContext): void {
    this.context = c;
    if (c.quarantined !== this.lastQuarantined) {
      for (const id of c.quarantined) if (!this.lastQuarantined.includes(id)) this.log.warn({ peer: id.slice(0, 10) }, 'stage quarantined: it stayed silent after a restart; plans leave it out for a while');
      for (const id of this.lastQuarantined) if (!c.quarantined.includes(id)) this.log.info({ peer: id.slice(0, 10) }, 'stage quarantine over: plans may take it again');
      this.lastQuarantined = c.quarantined;
    }
    const last = this.lastPolicy;
    // Hand-off: the moment the policy leaves a host, nothing of that host may reach our rpc-server.
    if (last !== null && (c.rpcTunnelPolicy === null || c.rpcTunnelPolicy.host !== last.host || c.rpcTunnelPolicy.planId !== last.planId)) {
      this.closeTunnelsOf(last.host, 'hand-off: the rpc tunnel policy changed');
    }
    this.lastPolicy = c.rpcTunnelPolicy;
    // A peer whose link went down: its tunnels are dead; fail them now rather than at QUIC's idle timeout.
    for (const p of this.lastLinks) if (!c.links.includes(p)) this.closeTunnelsOf(p, 'the link went down');
    this.lastLinks = c.links;
    // Host: routes of workers that are no longer stages, and of plans other than the one running, go.
    const workers = runningRole(c) === 'host' ? remoteWorkers(c.running) : [];
    const planId = c.running?.id ?? null;
    for (const [key, r] of [...this.rpcRoutes]) if (!workers.includes(r.peer) || r.planId !== planId) this.dropRpcRoute(key);
    for (const peer of [...this.llamaDirect.keys()]) if (!workers.includes(peer)) this.llamaDirect.delete(peer);
  }

  /**
   * Host: "127.0.0.1:PORT" through which llama-server, running plan `planId`, reaches `peer`'s rpc-server:
   * a listener per (peer, plan), whose connections carry that plan id to the worker.
   */
  async rpcAddressFor(peer: EndpointId, planId: string): Promise<string> {
    const key = routeKey(peer, planId);
    let r = this.rpcRoutes.get(key);
    if (r === undefined) {
      const route = this.openRpcRoute(peer, planId);
      r = { peer, planId, route };
      this.rpcRoutes.set(key, r);
      const mine = r;
      route.catch(() => {
        if (this.rpcRoutes.get(key) === mine) this.rpcRoutes.delete(key);
      });
    }
    return (await r.route).address;
  }

  /**
   * Host: the worker's data port and a one-time key for llama-server to dial it with TLS itself (patch 0003),
   * once this node's own direct connection to it has worked (the device-count query before each launch);
   * null otherwise (and with the counting proxy, which must see the traffic), and llama-server uses
   * rpcAddressFor's tunnel. The ticket is bound to `planId`, the plan that llama-server runs.
   */
  async directRpcFor(peer: EndpointId, planId: string): Promise<{ address: string; keyLine: string } | null> {
    if (this.countRpc) return null;
    const t = await this.service.directTicket(peer, 'rpc', planId);
    if (t === null) {
      this.llamaDirect.delete(peer);
      return null;
    }
    this.llamaDirect.set(peer, t.address);
    return { address: t.address, keyLine: `${t.address} ${t.identity} ${t.key.toString('hex')}` };
  }

  /** Worker or lite client: "http://127.0.0.1:PORT" that reaches `host`'s API (its mesh listener). */
  async httpBaseUrl(host: EndpointId): Promise<string> {
    let r = this.httpRoutes.get(host);
    if (r === undefined) {
      r = this.service.listen(host, 'http');
      this.httpRoutes.set(host, r);
      r.catch(() => this.httpRoutes.delete(host));
    }
    return `http://127.0.0.1:${(await r).port}`;
  }

  stats(): TunnelsStatus {
    const port = this.direct?.port ?? 0;
    return {
      ...this.service.stats(),
      dataPath: this.dataPath,
      dataPort: port === 0 ? null : port,
      connections: this.service.tunnels(),
      llamaDialsDirect: [...this.llamaDirect].map(([peer, address]) => ({ peer, address })),
    };
  }

  /** Counting proxies only: RPC traffic to each worker, summed over its llama-server generations. */
  traffic(): Record<string, RpcTrafficSnapshot> {
    const out: Record<string, RpcTrafficSnapshot> = {};
    for (const [peer, list] of this.proxies) out[peer] = sumSnapshots(list.map((p) => p.snapshot()));
    return out;
  }

  async close(): Promise<void> {
    for (const key of [...this.rpcRoutes.keys()]) this.dropRpcRoute(key);
    this.llamaDirect.clear();
    await this.service.close();
    if (this.direct !== null && this.direct.port !== 0) await this.direct.close();
    await Promise.all([...this.proxies.values()].flat().map((p) => p.close().catch(() => {})));
  }

  private async openRpcRoute(peer: EndpointId, planId: string): Promise<RpcRoute> {
    const listener = await this.service.listen(peer, 'rpc', { planId });
    if (!this.countRpc) return { peer, planId, listener, proxy: null, address: `127.0.0.1:${listener.port}` };
    const proxy = await startRpcTrafficProxy({ target: { host: '127.0.0.1', port: listener.port }, extraCommands: MESH_RPC_COMMANDS });
    const list = this.proxies.get(peer) ?? [];
    list.push(proxy);
    this.proxies.set(peer, list);
    return { peer, planId, listener, proxy, address: proxy.address };
  }

  private dropRpcRoute(key: string): void {
    const r = this.rpcRoutes.get(key);
    if (r === undefined) return;
    this.rpcRoutes.delete(key);
    void r.route.then(
      async ({ listener, proxy }) => {
        await proxy?.close();
        await listener.close();
      },
      () => {},
    );
  }

  /** Closes every tunnel of `peer`, both ways, and forgets our listeners to it (closeFrom closes those). */
  private closeTunnelsOf(peer: EndpointId, why: string): void {
    this.llamaDirect.delete(peer);
    for (const [key, r] of [...this.rpcRoutes]) if (r.peer === peer) this.dropRpcRoute(key);
    this.httpRoutes.delete(peer);
    void this.service.closeFrom(peer).then((n) => {
      if (n > 0) this.log.info({ peer: peer.slice(0, 10), tunnels: n, why }, 'closed the tunnels of a peer');
    });
  }
}

function routeKey(peer: EndpointId, planId: string): string {
  return `${peer} ${planId}`;
}

/** One snapshot summing several (a worker's proxies over llama-server generations). */
function sumSnapshots(list: readonly RpcTrafficSnapshot[]): RpcTrafficSnapshot {
  type Stats = { count: number; bytesToServer: number; bytesToClient: number; roundTrips: number; waitMs: number };
  const zero = (): Stats => ({ count: 0, bytesToServer: 0, bytesToClient: 0, roundTrips: 0, waitMs: 0 });
  const add = (into: Stats, s: Stats) => {
    for (const k of Object.keys(into) as (keyof Stats)[]) into[k] += s[k];
  };
  const commands: Record<string, Stats> = {};
  const totals = zero();
  let rawBytesToServer = 0;
  let rawBytesToClient = 0;
  let connectionsOpened = 0;
  const notes: string[] = [];
  for (const s of list) {
    for (const [name, st] of Object.entries(s.commands)) add((commands[name] ??= zero()), st);
    add(totals, s.totals);
    rawBytesToServer += s.rawBytesToServer;
    rawBytesToClient += s.rawBytesToClient;
    connectionsOpened += s.connectionsOpened;
    notes.push(...s.notes.slice(0, 10));
  }
  return { commands, totals, rawBytesToServer, rawBytesToClient, connectionsOpened, notes };
}
