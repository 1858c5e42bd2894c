// Actor logic around the API: the proxy machine's `watchMesh` slot, and the upstream resolver that runs one
// proxy machine per request (src/machines/proxy.machine.ts) and turns its Route into an Upstream. A local
// route carries the local llama-server's per-start API key (only this node knows it).
import { createActor, fromCallback, type EventObject, type InspectionEvent, type Observer } from 'xstate';
import type { EndpointId } from '../machines/mesh-types.ts';
import { NOT_HOST_REASON, proxyMachine, routeFacts, type ProxyEvent, type RequestOrigin, type Route } from '../machines/proxy.machine.ts';
import type { Upstream, UpstreamResolver } from '../io/http/api-proxy.ts';
import { llamaServerKeyFor } from '../io/llama/llama-server-process.ts';

/** What routing reads from the node actor: its snapshot, and updates to it. */
type NodeSnapshotLike = Parameters<typeof routeFacts>[0];
export interface NodeLike {
  getSnapshot(): NodeSnapshotLike;
  subscribe(observer: (snapshot: NodeSnapshotLike) => void): { unsubscribe(): void };
}

/** The proxy machine's `watchMesh` slot: every change of the node's snapshot as `mesh.updated`. */
export function watchMeshLogic(node: NodeLike) {
  return fromCallback<EventObject, Record<string, never>>(({ sendBack }) => {
    const send = (event: ProxyEvent) => sendBack(event);
    const sub = node.subscribe((snapshot) => send({ type: 'mesh.updated', facts: routeFacts(snapshot) }));
    return () => sub.unsubscribe();
  });
}

export interface MeshResolverInit {
  readonly node: NodeLike;
  /**
   * The local base URL ("http://127.0.0.1:PORT") of the mesh's http tunnel to `host`'s API. It may open the
   * tunnel listener on demand; it must honour `signal`.
   */
  readonly remoteBaseUrl: (host: EndpointId, signal: AbortSignal) => Promise<string>;
  /** Overrides the proxy machine's wait bound (ms), for tests. */
  readonly maxWaitMs?: number;
  /**
   * `mesh`: the resolver of the host's mesh listener (the end of the http tunnel): local or refused, never
   * remote. Default `client`.
   */
  readonly origin?: RequestOrigin;
  /** The local llama-server's API key for its port (default: the one this process started it with). */
  readonly llamaKeyFor?: (port: number) => string | null;
  /**
   * The node's actor system, when the node is inspected: each request's proxy actor reports to the node's
   * inspector as part of the node's tree (its events carry the node's root id).
   */
  readonly system?: NodeSystem;
}

/** The node actor's session (the root of its system's tree) and the inspector watching that system. */
export interface NodeSystem {
  readonly rootId: string;
  readonly inspect?: Observer<InspectionEvent>;
}

/**
 * Why not a child of the node actor: a child's done and error events go to its parent, so a request's route
 * (or a failure) would become an event of the node machine, one it has no transition for, and a failing
 * request could fail the node; and a child cannot be stopped by the API that started it. A request's proxy
 * is the API's to start and stop; the inspector still sees it where it belongs, under the node.
 */
function inspectUnder(system: NodeSystem | undefined): ((event: InspectionEvent) => void) | undefined {
  const observer = system?.inspect;
  if (observer === undefined) return undefined;
  return (event) => observer.next?.({ ...event, rootId: system!.rootId });
}

/**
 * The API's upstream resolver: one proxy machine per request decides local llama-server / remote host /
 * wait / refuse; the API proxies to what it says. A client that leaves stops the request's machine.
 */
export function meshUpstreamResolver(init: MeshResolverInit): UpstreamResolver {
  const machine = proxyMachine.provide({
    actors: { watchMesh: watchMeshLogic(init.node) },
    ...(init.maxWaitMs !== undefined ? { delays: { maxWait: init.maxWaitMs } } : {}),
  });
  const inspect = inspectUnder(init.system);
  return async ({ signal }) => {
    const actor = createActor(machine, { input: { facts: routeFacts(init.node.getSnapshot()), origin: init.origin ?? 'client' }, inspect });
    const route = await new Promise<Route | null>((resolve) => {
      const onAbort = () => resolve(null);
      signal.addEventListener('abort', onAbort, { once: true });
      actor.subscribe({
        complete: () => {
          signal.removeEventListener('abort', onAbort);
          resolve(actor.getSnapshot().output ?? null);
        },
        error: () => resolve(null),
      });
      actor.start();
    });
    actor.stop();
    if (route === null) return { kind: 'unavailable', reason: 'the request was cancelled while the mesh was not ready', retryAfterS: 5 };
    if (route.kind === 'remote' && init.origin === 'mesh') return { kind: 'unavailable', reason: NOT_HOST_REASON, retryAfterS: 2 };
    return routeToUpstream(route, init.remoteBaseUrl, signal, init.llamaKeyFor ?? llamaServerKeyFor);
  };
}

/** A decided Route as an Upstream for the API. */
export async function routeToUpstream(
  route: Route,
  remoteBaseUrl: MeshResolverInit['remoteBaseUrl'],
  signal: AbortSignal,
  llamaKeyFor: (port: number) => string | null = llamaServerKeyFor,
): Promise<Upstream> {
  switch (route.kind) {
    case 'local': {
      const key = llamaKeyFor(route.port);
      return { kind: 'url', baseUrl: `http://127.0.0.1:${route.port}`, ...(key !== null ? { headers: { authorization: `Bearer ${key}` } } : {}) };
    }
    case 'remote':
      return { kind: 'url', baseUrl: await remoteBaseUrl(route.host, signal) };
    case 'refused':
      return { kind: 'unavailable', reason: route.reason, retryAfterS: route.retryAfterS };
  }
}

