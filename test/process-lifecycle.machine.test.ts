// The rpc-server and llama-server lifecycles with fake process slots on XState's SimulatedClock:
// stopped -> spawning -> loading -> ready -> stopping -> stopped, crashes, timeouts, a missing slot; an
// unresponsive process killed; the same run crashing again backing off 1 s, 2 s, 4 s ... 60 s.
import { createActor, fromCallback, fromPromise, SimulatedClock } from 'xstate';
import { describe, expect, it } from 'vitest';
import { llamaServerMachine, type LlamaServerNotice, type LlamaServerProcessInput, type ReadyPlan } from '../src/machines/llama-server.machine.ts';
import { asEndpointId } from '../src/machines/mesh-types.ts';
import { rpcServerMachine, type RpcServerNotice, type RpcServerProcessInput } from '../src/machines/rpc-server.machine.ts';
import type { ProcessKillCommand } from '../src/machines/process-slot.ts';
import { backoffDelayMs } from '../src/machines/process-slot.ts';
import { fakeBackoff, fakeProcess, flush, MODEL, readyAtOnce, type FakeBackoff, type FakeProcess } from './machine-fakes.ts';

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
    expect(h.state()).toEqual({ crashed: 'idle' });
    expect(h.notices.at(-1)).toEqual({ type: 'rpc.crashed', reason: 'rpc-server exited: signal 11', crashes: 1 });
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
    expect(h.state()).toEqual({ crashed: 'idle' });
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
    expect(actor.getSnapshot().value).toEqual({ crashed: 'idle' });
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
    expect(h.notices.at(-1)).toEqual({ type: 'llama.crashed', reason: 'llama-server exited: GGML_ASSERT', planId: 'plan-1', crashes: 1 });
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
    expect(actor.getSnapshot().value).toEqual({ crashed: 'idle' });
    expect(o.notices.at(-1)).toMatchObject({ type: 'llama.crashed', planId: 'plan-1' });
    expect(runs[0]!.alive).toBe(false);
  });
});

describe('liveness and back-off', () => {
  const PLAN_2: ReadyPlan = { ...PLAN, id: 'plan-2' };

  function harness() {
    const clock = new SimulatedClock();
    const runs: FakeProcess<LlamaServerProcessInput>[] = [];
    const waits: FakeBackoff[] = [];
    const o = owner<LlamaServerNotice>();
    const machine = llamaServerMachine.provide({
      actors: { llamaServerProcess: fakeProcess(runs), waitLlamaHealthy: readyAtOnce, llamaServerBackoff: fakeBackoff(waits, () => 1_000_000 + clock.now()) },
    });
    const actor = createActor(machine, { clock, input: { notify: o.ref } }).start();
    let generation = 0;
    const start = (plan: ReadyPlan = PLAN) => actor.send({ type: 'llama.start', plan, generation: ++generation, ownRpcPort: 1 });
    return { actor, clock, runs, waits, notices: o.notices, start, state: () => actor.getSnapshot().value, ctx: () => actor.getSnapshot().context };
  }

  it('backoffDelayMs: none after one crash, then 1 s doubling, never above 60 s', () => {
    expect([1, 2, 3, 4, 5, 6, 7, 8, 9, 50].map((n) => backoffDelayMs(n))).toEqual([0, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000, 60_000]);
  });

  it('the same plan crashing again waits 1 s, 2 s, 4 s before the next start runs, with the reason, the count and the next attempt', async () => {
    const h = harness();
    h.start();
    await flush();
    h.runs[0]!.crash('could not load the model');
    // One crash: restarts as soon as the owner asks.
    expect(h.state()).toEqual({ crashed: 'idle' });
    expect(h.ctx().backoff).toBeNull();
    h.start();
    expect(h.runs).toHaveLength(2);
    for (const [i, delayMs] of [1_000, 2_000, 4_000].entries()) {
      await flush();
      h.runs.at(-1)!.crash('could not load the model');
      const crashes = i + 2;
      expect(h.state()).toEqual({ crashed: 'backingOff' });
      expect(h.notices.at(-1)).toEqual({ type: 'llama.crashed', reason: 'llama-server exited: could not load the model', planId: 'plan-1', crashes });
      const wait = h.waits.at(-1)!;
      expect(wait.input).toEqual({ name: 'llama-server', reason: 'llama-server exited: could not load the model', crashes, delayMs });
      expect(h.ctx().backoff).toEqual({ reason: 'llama-server exited: could not load the model', crashes, delayMs, nextAttemptAt: 1_000_000 + h.clock.now() + delayMs });
      // The owner's start waits for the back-off: no process meanwhile.
      const before = h.runs.length;
      h.start();
      expect(h.runs).toHaveLength(before);
      expect(h.state()).toEqual({ crashed: 'backingOff' });
      wait.elapse();
      expect(h.runs).toHaveLength(before + 1);
      expect(h.runs.at(-1)!.input.generation).toBe(before + 1); // the held start's own launch
      expect(h.state()).toEqual({ running: 'loading' });
      expect(h.ctx().backoff).toBeNull();
      expect(wait.live).toBe(false);
    }
    expect(h.ctx().crashes).toBe(4);
    expect(h.ctx().lastCrash).toBe('llama-server exited: could not load the model');
  });

  it('a back-off over with no start waiting leaves it idle; a start then runs at once', async () => {
    const h = harness();
    h.start();
    await flush();
    h.runs[0]!.crash('x');
    h.start();
    await flush();
    h.runs[1]!.crash('x');
    h.waits[0]!.elapse();
    expect(h.state()).toEqual({ crashed: 'idle' });
    h.start();
    expect(h.runs).toHaveLength(3);
  });

  it('another plan needs no back-off: it starts at once and counts from zero', async () => {
    const h = harness();
    h.start();
    await flush();
    h.runs[0]!.crash('x');
    h.start();
    await flush();
    h.runs[1]!.crash('x');
    expect(h.state()).toEqual({ crashed: 'backingOff' });
    h.start(PLAN_2);
    expect(h.runs).toHaveLength(3);
    expect(h.runs[2]!.input.plan.id).toBe('plan-2');
    expect(h.ctx().crashes).toBe(0);
    await flush();
    h.runs[2]!.crash('x');
    expect(h.notices.at(-1)).toMatchObject({ type: 'llama.crashed', planId: 'plan-2', crashes: 1 });
    expect(h.state()).toEqual({ crashed: 'idle' });
  });

  it('a stop during the back-off drops the waiting start and is answered', async () => {
    const h = harness();
    h.start();
    await flush();
    h.runs[0]!.crash('x');
    h.start();
    await flush();
    h.runs[1]!.crash('x');
    h.start();
    h.actor.send({ type: 'llama.stop' });
    expect(h.state()).toBe('stopped');
    expect(h.notices.at(-1)).toEqual({ type: 'llama.stopped', planId: 'plan-1' });
    expect(h.waits[0]!.live).toBe(false);
    expect(h.runs).toHaveLength(2);
    // Stopped and started again, the same plan still counts: its third crash in a row backs off 2 s.
    h.start();
    await flush();
    h.runs[2]!.crash('x');
    expect(h.waits.at(-1)!.input.delayMs).toBe(2_000);
  });

  it('ready for 60 s, the crashes in a row are forgotten; 59 s is not enough', async () => {
    const h = harness();
    h.start();
    await flush();
    h.runs[0]!.crash('x');
    h.start();
    await flush();
    h.clock.increment(59_000);
    h.runs[1]!.crash('x');
    expect(h.ctx().crashes).toBe(2);
    h.waits[0]!.elapse();
    h.start();
    await flush();
    expect(h.state()).toEqual({ running: 'ready' });
    h.clock.increment(60_000);
    expect(h.ctx().crashes).toBe(0);
    h.runs[2]!.crash('x');
    expect(h.ctx().crashes).toBe(1);
    expect(h.state()).toEqual({ crashed: 'idle' });
  });

  it('an unresponsive process is SIGKILLed and reported as a crash that says why', async () => {
    const h = harness();
    h.start();
    await flush();
    h.runs[0]!.hang('3 liveness probes failed in a row (/health: no answer within 2000 ms)');
    // The fake exits at once on the kill; the machine waited in running.killing for that exit.
    expect(h.runs[0]!.forced).toBe(true);
    expect(h.runs[0]!.alive).toBe(false);
    expect(h.state()).toEqual({ crashed: 'idle' });
    const reason = 'llama-server unresponsive, killed: 3 liveness probes failed in a row (/health: no answer within 2000 ms)';
    expect(h.notices.at(-1)).toEqual({ type: 'llama.crashed', reason, planId: 'plan-1', crashes: 1 });
    expect(h.ctx().lastCrash).toBe(reason);
  });

  it('a process that is also deaf to SIGKILL is left after killTimeout (crashed), and the cleanup kills it', async () => {
    const clock = new SimulatedClock();
    const o = owner<RpcServerNotice>();
    const kills: ProcessKillCommand[] = [];
    let cleaned = false;
    const deaf = fromCallback<ProcessKillCommand, RpcServerProcessInput>(({ sendBack, receive }) => {
      sendBack({ type: 'process.spawned', pid: 1, port: 2 });
      receive((k) => kills.push(k));
      return () => {
        cleaned = true;
      };
    });
    const actor = createActor(rpcServerMachine.provide({ actors: { rpcServerProcess: deaf, waitRpcServerListening: readyAtOnce } }), {
      clock,
      input: { notify: o.ref },
    }).start();
    actor.send({ type: 'rpc.start' });
    await flush();
    actor.send({ type: 'process.unresponsive', reason: 'process 1 is stopped' });
    expect(actor.getSnapshot().value).toEqual({ running: 'killing' });
    expect(kills).toEqual([{ type: 'process.kill', force: true }]);
    clock.increment(5_000);
    expect(actor.getSnapshot().value).toEqual({ crashed: 'idle' });
    expect(cleaned).toBe(true);
    expect(o.notices.at(-1)).toEqual({ type: 'rpc.crashed', reason: 'rpc-server unresponsive, killed: process 1 is stopped', crashes: 1 });
  });

  it('a stop while killing an unresponsive process is answered', async () => {
    const clock = new SimulatedClock();
    const o = owner<RpcServerNotice>();
    const deaf = fromCallback<ProcessKillCommand, RpcServerProcessInput>(({ sendBack }) => {
      sendBack({ type: 'process.spawned', pid: 1, port: 2 });
    });
    const actor = createActor(rpcServerMachine.provide({ actors: { rpcServerProcess: deaf, waitRpcServerListening: readyAtOnce } }), {
      clock,
      input: { notify: o.ref },
    }).start();
    actor.send({ type: 'rpc.start' });
    await flush();
    actor.send({ type: 'process.unresponsive', reason: 'x' });
    actor.send({ type: 'rpc.stop' });
    expect(actor.getSnapshot().value).toBe('stopped');
    expect(o.notices.at(-1)).toEqual({ type: 'rpc.stopped' });
  });
});
