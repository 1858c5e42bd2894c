// Membership with real processes: five nodes (test/harness/mesh-node.ts: the node machine + the real network
// actor on iroh loopback, no model and no llama processes) form a full mesh from one token; a SIGKILLed and
// a SIGSTOPped node are detected by heartbeats within the bound and the rest re-converge; the stopped one
// comes back when continued; a graceful leave is seen at once. Detection times are printed for the benchmark, not asserted tightly.
import { afterAll, describe, expect, it } from 'vitest';
import { HarnessProc, until } from './harness/proc.ts';

const HARNESS = './mesh-node.ts';
/** The peer machine's goneAfter is 2.5 s; the ceiling leaves room for a loaded 2-core machine. */
const DETECTION_CEILING_MS = 15_000;

interface Ready {
  id: string;
  addrs: string[];
  token: string;
}
interface StateLine {
  ev: 'state';
  t: number;
  links: string[];
  peers: Record<string, unknown>;
}

const procs: HarnessProc[] = [];
afterAll(async () => {
  for (const p of procs) if (p.alive) p.kill('SIGCONT');
  await Promise.all(procs.map((p) => p.stop()));
});

function latest(p: HarnessProc): StateLine | undefined {
  for (let i = p.lines.length - 1; i >= 0; i--) if (p.lines[i]!.ev === 'state') return p.lines[i] as unknown as StateLine;
  return undefined;
}

const linksOf = (p: HarnessProc): string[] => [...(latest(p)?.links ?? [])].sort();

async function converged(group: { p: HarnessProc; id: string }[], ms: number, what: string): Promise<void> {
  await until(
    () => {
      for (const n of group) {
        const want = group.filter((m) => m !== n).map((m) => m.id).sort();
        if (JSON.stringify(linksOf(n.p)) !== JSON.stringify(want)) return undefined;
      }
      return true;
    },
    ms,
    `${what}: ${group.map((n) => `${n.id.slice(0, 6)}->[${linksOf(n.p).map((l) => l.slice(0, 6)).join(',')}]`).join(' ')}`,
  );
}

describe('mesh membership (5 processes, real iroh on loopback, no model)', () => {
  it('forms a full mesh from one token, detects a killed and a stopped node, and re-converges', async () => {
    const first = new HarnessProc(HARNESS, { name: 'n1' });
    procs.push(first);
    const r1 = await first.waitLine<Ready>((l) => l.ev === 'ready', 30_000, 'n1 ready');
    const nodes = [{ p: first, id: r1.id }];
    for (let i = 2; i <= 5; i++) {
      const p = new HarnessProc(HARNESS, { name: `n${i}`, token: r1.token });
      procs.push(p);
      nodes.push({ p, id: '' });
    }
    for (const n of nodes.slice(1)) n.id = (await n.p.waitLine<Ready>((l) => l.ev === 'ready', 30_000, 'ready')).id;

    await converged(nodes, 60_000, 'full mesh of 5');

    // SIGKILL n5: no leaving, no QUIC close; only heartbeats can tell.
    const killed = nodes[4]!;
    const rest4 = nodes.slice(0, 4);
    const t0 = Date.now();
    killed.p.kill('SIGKILL');
    const killTimes = await Promise.all(
      rest4.map(async (n) => {
        await until(() => (linksOf(n.p).includes(killed.id) ? undefined : true), DETECTION_CEILING_MS + 5_000, 'kill detected');
        return Date.now() - t0;
      }),
    );
    console.log(`SIGKILL detected after ${killTimes.join(', ')} ms (bound 2500 ms)`);
    for (const t of killTimes) expect(t).toBeLessThan(DETECTION_CEILING_MS);
    await converged(rest4, 20_000, 'four after the kill');

    // SIGSTOP n4: the process hangs with its sockets open.
    const frozen = nodes[3]!;
    const rest3 = nodes.slice(0, 3);
    const t1 = Date.now();
    frozen.p.kill('SIGSTOP');
    const stopTimes = await Promise.all(
      rest3.map(async (n) => {
        await until(() => (linksOf(n.p).includes(frozen.id) ? undefined : true), DETECTION_CEILING_MS + 5_000, 'stop detected');
        return Date.now() - t1;
      }),
    );
    console.log(`SIGSTOP detected after ${stopTimes.join(', ')} ms (bound 2500 ms)`);
    for (const t of stopTimes) expect(t).toBeLessThan(DETECTION_CEILING_MS);
    await converged(rest3, 20_000, 'three after the stop');
    for (const n of rest3) expect(n.p.alive).toBe(true);

    // SIGCONT: the frozen node returns and the four re-converge (redial with backoff, at most 16 s apart).
    frozen.p.kill('SIGCONT');
    await converged(rest4, 45_000, 'four after the stopped node returned');

    // A graceful leave is announced (`leaving`) and seen at once, well inside the heartbeat bound.
    const leaver = nodes[2]!;
    const stay = [nodes[0]!, nodes[1]!, nodes[3]!];
    const t2 = Date.now();
    leaver.p.send({ cmd: 'stop', reason: 'operator stop' });
    const leaveTimes = await Promise.all(
      stay.map(async (n) => {
        await until(() => (linksOf(n.p).includes(leaver.id) ? undefined : true), 10_000, 'leave seen');
        return Date.now() - t2;
      }),
    );
    console.log(`graceful leave seen after ${leaveTimes.join(', ')} ms`);
    for (const t of leaveTimes) expect(t).toBeLessThan(2_500);
    await converged(stay, 10_000, 'three after the graceful leave');
    for (const n of stay) {
      await n.p.waitLog((l) => typeof l.msg === 'string' && l.msg.startsWith('peer is leaving: operator stop'), 5_000, 'leaving logged');
    }
  }, 240_000);
});
