// The rpc-server and llama-server lifecycles with fake process slots on XState's SimulatedClock:
// stopped -> spawning -> loading -> ready -> stopping -> stopped, crashes, timeouts, and a missing slot.
import { createActor, fromCallback, fromPromise, SimulatedClock } from 'xstate';
import { describe, expect, it } from 'vitest';
import { llamaServerMachine, type LlamaServerNotice, type LlamaServerProcessInput, type ReadyPlan } from '../src/machines/llama-server.machine.ts';
import { asEndpointId } from '../src/machines/mesh-types.ts';
import { rpcServerMachine, type RpcServerNotice, type RpcServerProcessInput } from '../src/machines/rpc-server.machine.ts';
import type { ProcessKillCommand } from '../src/machines/process-slot.ts';
import { fakeProcess, flush, MODEL, readyAtOnce, type FakeProcess } from './machine-fakes.ts';

function owner<T>() {
  const notices: T[] = [];
  const ref = createActor(fromCallback<T & { type: string }>(({ receive }) => receive((n) => notices.push(n)))).start();
  return { ref, notices };
}

const PLAN: ReadyPlan = {
  kind: 'ready',
  id: 'plan-1',
  host: asEndpointId('h'),
  stages: [
    { id: asEndpointId('w'), share: 0.4 },
    { id: asEndpointId('h'), share: 0.6 },
  ],
  model: MODEL,
};

describe('rpc-server machine', () => {
  function harness(wait = readyAtOnce) {
    const clock = new SimulatedClock();
    const runs: FakeProcess<RpcServerProcessInput>[] = [];
    const o = owner<RpcServerNotice>();
    const machine = rpcServerMachine.provide({ actors: { rpcServerProcess: fakeProcess(runs), waitRpcServerListening: wait } });
    const actor = createActor(machine, { clock, input: { notify: o.ref } }).start();
    return { actor, clock, runs, notices: o.notices, state: () => actor.getSnapshot().value };
  }

  it('starts, becomes ready, and stops on request', async () => {
    const h = harness();
    expect(h.state()).toBe('stopped');
    h.actor.send({ type: 'rpc.start' });
    expect(h.state()).toEqual({ running: 'loading' });
    await flush();
    expect(h.state()).toEqual({ running: 'ready' });
    expect(h.notices).toEqual([{ type: 'rpc.ready', port: 30000 + h.runs[0]!.pid }]);
    h.actor.send({ type: 'rpc.stop' });
    expect(h.state()).toBe('stopped');
    expect(h.runs[0]!.alive).toBe(false);
    expect(h.notices.at(-1)).toEqual({ type: 'rpc.stopped' });
  });

  it('an exit it did not ask for is a crash, reported to the owner', async () => {
    const h = harness();
    h.actor.send({ type: 'rpc.start' });
    await flush();
    h.runs[0]!.crash('signal 11');
    expect(h.state()).toBe('crashed');
    expect(h.notices.at(-1)).toEqual({ type: 'rpc.crashed', reason: 'rpc-server exited: signal 11' });
    h.actor.send({ type: 'rpc.start' });
    expect(h.runs).toHaveLength(2);
    expect(h.runs[1]!.input.run).toBe(2);
  });

  it('a server that never listens crashes after loadTimeout', () => {
    const never = fromPromise<void, { port: number }>(() => new Promise(() => {}));
    const h = harness(never);
    h.actor.send({ type: 'rpc.start' });
    h.clock.increment(29_999);
    expect(h.state()).toEqual({ running: 'loading' });
    h.clock.increment(1);
    expect(h.state()).toBe('crashed');
    expect(h.runs[0]!.alive).toBe(false); // leaving `running` stopped the process actor
  });

  it('a process that ignores SIGTERM is left after killTimeout, and the slot cleanup kills it', async () => {
    const clock = new SimulatedClock();
    let killed = false;
    const o = owner<RpcServerNotice>();
    const stubborn = fromCallback<ProcessKillCommand, RpcServerProcessInput>(({ sendBack }) => {
      sendBack({ type: 'process.spawned', pid: 1, port: 2 });
      return () => {
        killed = true;
      };
    });
    const actor = createActor(rpcServerMachine.provide({ actors: { rpcServerProcess: stubborn, waitRpcServerListening: readyAtOnce } }), {
      clock,
      input: { notify: o.ref },
    }).start();
    actor.send({ type: 'rpc.start' });
    await flush();
    actor.send({ type: 'rpc.stop' });
    expect(actor.getSnapshot().value).toEqual({ running: 'stopping' });
    clock.increment(5_000);
    expect(actor.getSnapshot().value).toBe('stopped');
    expect(killed).toBe(true);
    expect(o.notices.at(-1)).toEqual({ type: 'rpc.stopped' });
  });

  it('a stop while stopped is still answered, so an owner can always wait for it', () => {
    const h = harness();
    h.actor.send({ type: 'rpc.stop' });
    expect(h.notices).toEqual([{ type: 'rpc.stopped' }]);
  });

  it('an unfilled slot fails loudly and names itself', () => {
    const o = owner<RpcServerNotice>();
    const actor = createActor(rpcServerMachine, { input: { notify: o.ref } }).start();
    actor.send({ type: 'rpc.start' });
    expect(actor.getSnapshot().value).toBe('crashed');
    expect(actor.getSnapshot().context.crashReason).toContain('actor slot "rpcServerProcess" was not provided');
  });
});

describe('llama-server machine', () => {
  function harness() {
    const clock = new SimulatedClock();
    const runs: FakeProcess<LlamaServerProcessInput>[] = [];
    const o = owner<LlamaServerNotice>();
    const machine = llamaServerMachine.provide({ actors: { llamaServerProcess: fakeProcess(runs), waitLlamaHealthy: readyAtOnce } });
    const actor = createActor(machine, { clock, input: { notify: o.ref } }).start();
    return { actor, clock, runs, notices: o.notices, state: () => actor.getSnapshot().value };
  }

  it('runs the plan it was given and reports ready with the plan id and generation', async () => {
    const h = harness();
    h.actor.send({ type: 'llama.start', plan: PLAN, generation: 3, ownRpcPort: 5555 });
    expect(h.runs[0]!.input).toEqual({ plan: PLAN, generation: 3, ownRpcPort: 5555 });
    await flush();
    expect(h.state()).toEqual({ running: 'ready' });
    expect(h.notices).toEqual([{ type: 'llama.ready', port: 30000 + h.runs[0]!.pid, planId: 'plan-1', generation: 3 }]);
  });

  it('stops gracefully, and reports a crash with its plan', async () => {
    const h = harness();
    h.actor.send({ type: 'llama.start', plan: PLAN, generation: 1, ownRpcPort: 1 });
    await flush();
    h.runs[0]!.crash('GGML_ASSERT');
    expect(h.notices.at(-1)).toEqual({ type: 'llama.crashed', reason: 'llama-server exited: GGML_ASSERT', planId: 'plan-1' });
    h.actor.send({ type: 'llama.start', plan: PLAN, generation: 2, ownRpcPort: 1 });
    await flush();
    h.actor.send({ type: 'llama.stop' });
    expect(h.state()).toBe('stopped');
    expect(h.runs.every((p) => !p.alive)).toBe(true);
    expect(h.notices.at(-1)).toEqual({ type: 'llama.stopped', planId: 'plan-1' });
  });

  it('a health probe that fails ends in crashed', async () => {
    const clock = new SimulatedClock();
    const runs: FakeProcess<LlamaServerProcessInput>[] = [];
    const o = owner<LlamaServerNotice>();
    const failing = fromPromise<void, { port: number }>(async () => {
      throw new Error('HTTP 503 loading model');
    });
    const actor = createActor(llamaServerMachine.provide({ actors: { llamaServerProcess: fakeProcess(runs), waitLlamaHealthy: failing } }), {
      clock,
      input: { notify: o.ref },
    }).start();
    actor.send({ type: 'llama.start', plan: PLAN, generation: 1, ownRpcPort: 1 });
    await flush();
    expect(actor.getSnapshot().value).toBe('crashed');
    expect(o.notices.at(-1)).toMatchObject({ type: 'llama.crashed', planId: 'plan-1' });
    expect(runs[0]!.alive).toBe(false);
  });
});
