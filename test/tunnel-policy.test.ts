// The tunnel policy: an admitted http stream ends at the host's own API (its mesh listener), never at
// llama-server's port, and only while this node hosts its running plan; an rpc stream reaches the rpc-server
// only from the host of rpcTunnelPolicy, for its plan id (the one the stream carries, protocol 2).
import { describe, expect, it } from 'vitest';
import { asEndpointId, type Plan } from '../src/machines/mesh-types.ts';
import type { NodeContext } from '../src/machines/node-context.ts';
import { tunnelDecision } from '../src/machines/tunnel-policy.ts';
import { MODEL } from './machine-fakes.ts';

const ME = asEndpointId('me');
const PEER = asEndpointId('peer');
const plan = (host: string): Plan => ({ kind: 'ready', id: `p-${host}`, host: asEndpointId(host), stages: [{ id: asEndpointId(host), share: 1 }], model: MODEL });
const ctx = (running: Plan | null, extra: Partial<NodeContext> = {}) =>
  ({ self: { id: ME }, running, llama: 'ready', llamaPort: 8081, rpc: 'ready', rpcPort: 5000, rpcTunnelPolicy: null, ...extra }) as unknown as NodeContext;
const API = { host: '127.0.0.1', port: 40001 };

describe('tunnelDecision (http)', () => {
  it("the host sends an http stream to its mesh API, never to llama-server's port", () => {
    expect(tunnelDecision(ctx(plan('me')), PEER, 'http', null, API)).toEqual(API);
    // Even while llama-server restarts: the API waits for it (bounded) and answers 503 itself.
    expect(tunnelDecision(ctx(plan('me'), { llama: 'starting', llamaPort: null } as Partial<NodeContext>), PEER, 'http', null, API)).toEqual(API);
  });
  it('refuses while the mesh API does not listen, on a node that does not host, and before the first snapshot', () => {
    expect(tunnelDecision(ctx(plan('me')), PEER, 'http', null, null)).toMatchObject({ refuse: expect.stringMatching(/mesh API/) });
    expect(tunnelDecision(ctx(plan('peer')), PEER, 'http', null, API)).toMatchObject({ refuse: expect.any(String) });
    expect(tunnelDecision(ctx(null), PEER, 'http', null, API)).toMatchObject({ refuse: expect.any(String) });
    expect(tunnelDecision(null, PEER, 'http', null, API)).toEqual({ refuse: 'the node is starting' });
  });
});

describe('tunnelDecision (rpc)', () => {
  const POLICY = { host: PEER, planId: 'p-new' };
  it("admits the policy's host for the policy's plan, to the ready rpc-server", () => {
    expect(tunnelDecision(ctx(plan('peer'), { rpcTunnelPolicy: POLICY }), PEER, 'rpc', 'p-new')).toEqual({ host: '127.0.0.1', port: 5000 });
  });
  it('refuses a stream for another plan, or one that carries none, with a reason that names both plans', () => {
    const c = ctx(plan('peer'), { rpcTunnelPolicy: POLICY });
    expect(tunnelDecision(c, PEER, 'rpc', 'p-old')).toEqual({ refuse: "rpc tunnel for plan p-old, but this node's rpc-server serves plan p-new" });
    expect(tunnelDecision(c, PEER, 'rpc', null)).toEqual({ refuse: "rpc tunnel for plan (none), but this node's rpc-server serves plan p-new" });
  });
  it('refuses another host, no policy, an rpc-server that is not ready, and before the first snapshot', () => {
    expect(tunnelDecision(ctx(plan('peer'), { rpcTunnelPolicy: POLICY }), asEndpointId('other'), 'rpc', 'p-new')).toMatchObject({ refuse: expect.stringMatching(/only from this node's host/) });
    expect(tunnelDecision(ctx(plan('peer')), PEER, 'rpc', 'p-new')).toMatchObject({ refuse: expect.stringMatching(/only from this node's host \(none\)/) });
    expect(tunnelDecision(ctx(plan('peer'), { rpcTunnelPolicy: POLICY, rpc: 'starting', rpcPort: null } as Partial<NodeContext>), PEER, 'rpc', 'p-new')).toEqual({
      refuse: 'the rpc-server is not ready',
    });
    expect(tunnelDecision(null, PEER, 'rpc', 'p-new')).toEqual({ refuse: 'the node is starting' });
  });
});
