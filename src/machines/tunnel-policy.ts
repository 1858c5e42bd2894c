// Which incoming tunnel stream may reach a local process: a pure rule over the node machine's context, used
// by the tunnel layer (src/actors/tunnels.actor.ts) and by the churn simulator (model-tests/sim), so both run
// the same rule.
import type { EndpointId } from './mesh-types.ts';
import { runningRole, type NodeContext } from './node-context.ts';

/** The two stream kinds a tunnel carries: llama.cpp's rpc protocol, and http to the host's API. */
export type TunnelKind = 'rpc' | 'http';

/** A local address an admitted tunnel connects to: a loopback TCP port, or a Unix socket (the host's mesh API). */
export type TunnelTarget = { readonly host: string; readonly port: number } | { readonly path: string };

/** Where an incoming stream goes, or why it is refused (logged on both sides). */
export type TunnelDecision = TunnelTarget | { readonly refuse: string };

/**
 * What the node machine's context allows for an incoming stream of `kind` from `remote`.
 * An rpc stream is admitted from the host that `rpcTunnelPolicy` names, for the plan it names: `planId` is the
 * plan id the opener sent when it opened the stream (protocol 2: the rpc stream's header, or the `direct`
 * offer of the rpc kind; null when it sent none), the plan its llama-server runs. A host whose llama-server
 * still runs an older plan (or a newer one this worker has not told it `rpc-ready` for) is refused. The
 * hand-off (closing a host's tunnels when the policy changes, host or plan) is the tunnel layer's.
 * An http stream carries no plan id (`planId` is ignored). It ends at `meshApi`, the host's own API on its
 * mesh listener (never at llama-server): there the API's limits, bounds and logging apply, and a request is
 * served locally or refused, never forwarded again. It is admitted while this node hosts its running plan;
 * the API waits (bounded) for llama-server.
 */
export function tunnelDecision(
  c: NodeContext | null,
  remote: EndpointId,
  kind: TunnelKind,
  planId: string | null,
  meshApi: TunnelTarget | null = null,
): TunnelDecision {
  if (c === null) return { refuse: 'the node is starting' };
  if (kind === 'rpc') {
    // The hand-off: only the host of this worker's current plan reaches its rpc-server, for that plan only.
    const policy = c.rpcTunnelPolicy;
    if (policy === null || policy.host !== remote) {
      return { refuse: `rpc tunnels are accepted only from this node's host (${policy?.host.slice(0, 10) ?? 'none'})` };
    }
    if (planId !== policy.planId) {
      return { refuse: `rpc tunnel for plan ${planId ?? '(none)'}, but this node's rpc-server serves plan ${policy.planId}` };
    }
    if (c.rpc !== 'ready' || c.rpcPort === null) return { refuse: 'the rpc-server is not ready' };
    return { host: '127.0.0.1', port: c.rpcPort };
  }
  if (runningRole(c) !== 'host') return { refuse: 'this node does not serve the model right now' };
  if (meshApi === null) return { refuse: "this node's mesh API is not listening yet" };
  return meshApi;
}
