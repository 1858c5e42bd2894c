// Actor logic around the API: the proxy machine's `watchMesh` slot, the upstream resolver that runs one
// proxy machine per request (src/machines/proxy.machine.ts) and turns its Route into an Upstream, and the
// API server itself as a long-lived actor (listen on start, close on stop).
import { createActor, fromCallback, type EventObject, type InspectionEvent, type Observer } from 'xstate';
import type { EndpointId } from '../machines/mesh-types.ts';
import { proxyMachine, routeFacts, type ProxyEvent, type Route } from '../machines/proxy.machine.ts';
import { buildApiServer, type ApiServerInit, type Upstream, type UpstreamResolver } from '../io/http/api-server.ts';

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
  /** Each request's proxy actor, for the inspector (`inspect` of createActor). */
  readonly inspect?: Observer<InspectionEvent> | ((event: InspectionEvent) => void);
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
  return async ({ signal }) => {
    const actor = createActor(machine, { input: { facts: routeFacts(init.node.getSnapshot()) }, inspect: init.inspect });
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
    return routeToUpstream(route, init.remoteBaseUrl, signal);
  };
}

/** A decided Route as an Upstream for the API. */
export async function routeToUpstream(
  route: Route,
  remoteBaseUrl: MeshResolverInit['remoteBaseUrl'],
  signal: AbortSignal,
): Promise<Upstream> {
  switch (route.kind) {
    case 'local':
      return { kind: 'url', baseUrl: `http://127.0.0.1:${route.port}` };
    case 'remote':
      return { kind: 'url', baseUrl: await remoteBaseUrl(route.host, signal) };
    case 'refused':
      return { kind: 'unavailable', reason: route.reason, retryAfterS: route.retryAfterS };
  }
}

export interface ApiServerActorInput {
  readonly host: string;
  readonly port: number;
}

export type ApiServerActorEvent =
  | { readonly type: 'api.listening'; readonly url: string; readonly port: number }
  | { readonly type: 'api.failed'; readonly reason: string };

/** The API as an actor: listens on start (`api.listening` / `api.failed` to its parent), closes on stop. */
export function apiServerLogic(init: ApiServerInit) {
  return fromCallback<EventObject, ApiServerActorInput>(({ input, sendBack }) => {
    const app = buildApiServer(init);
    const send = (event: ApiServerActorEvent) => sendBack(event);
    let closed = false;
    app.listen({ host: input.host, port: input.port }).then(
      () => {
        if (closed) return;
        const addr = app.server.address();
        const port = typeof addr === 'object' && addr !== null ? addr.port : input.port;
        send({ type: 'api.listening', url: `http://${input.host === '0.0.0.0' ? '127.0.0.1' : input.host}:${port}`, port });
      },
      (err: NodeJS.ErrnoException) => {
        if (closed) return;
        const reason = err.code === 'EADDRINUSE' ? `port ${input.port} is already in use (another mesh-inference? pick one with --port)` : err.message;
        send({ type: 'api.failed', reason });
      },
    );
    return () => {
      closed = true;
      void app.close();
    };
  });
}
