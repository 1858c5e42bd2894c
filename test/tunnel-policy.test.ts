// The tunnel policy's http rule: an admitted http stream ends at the host's own API (its mesh listener),
// never at llama-server's port, and only while this node hosts its running plan.
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
    expect(tunnelDecision(ctx(plan('me')), PEER, 'http', API)).toEqual(API);
    // Even while llama-server restarts: the API waits for it (bounded) and answers 503 itself.
    expect(tunnelDecision(ctx(plan('me'), { llama: 'starting', llamaPort: null } as Partial<NodeContext>), PEER, 'http', API)).toEqual(API);
  });
  it('refuses while the mesh API does not listen, on a node that does not host, and before the first snapshot', () => {
    expect(tunnelDecision(ctx(plan('me')), PEER, 'http', null)).toMatchObject({ refuse: expect.stringMatching(/mesh API/) });
    expect(tunnelDecision(ctx(plan('peer')), PEER, 'http', API)).toMatchObject({ refuse: expect.any(String) });
    expect(tunnelDecision(ctx(null), PEER, 'http', API)).toMatchObject({ refuse: expect.any(String) });
    expect(tunnelDecision(null, PEER, 'http', API)).toEqual({ refuse: 'the node is starting' });
  });
});
