// The fault benchmark's mesh: 4 model nodes and 1 lite client, like test/e2e-survival.test.ts (VRAM caps a .70,
// b .60, d .58, e .56 of the model, 1.1 x needed: any two hold it; a hosts with b), on loopback or, for the
// link cut, each in a WAN-lab site (test/support/wan-lab.ts). And the faults themselves.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { hostServesPlan, llamaChildren, startE2eNode, stopAllNodes, type E2eModel, type E2eNode, type NodeOptions } from '../../test/e2e-support.ts';
import { createWanLab, startWanNode, type WanLab, type WanSite } from '../../test/support/wan-lab.ts';
import type { UdpRelay } from '../../test/support/link-emulator.ts';

export interface FaultMesh {
  readonly a: E2eNode;
  readonly b: E2eNode;
  readonly c: E2eNode;
  readonly d: E2eNode;
  readonly e: E2eNode;
  readonly lab: WanLab | null;
  close(): Promise<void>;
}

export async function startFaultMesh(model: E2eModel, inLab: boolean): Promise<FaultMesh> {
  const dir = await mkdtemp(join(tmpdir(), 'mesh-faults-'));
  const lab = inLab ? await createWanLab(5) : null;
  const nodes: E2eNode[] = [];
  const start = async (i: number, o: Omit<NodeOptions, 'dir' | 'model'> & { model?: null }) => {
    const opts = { ...o, model: o.model === null ? null : model, dir };
    const n = lab ? await startWanNode(lab.sites[i]!, opts) : await startE2eNode(opts);
    nodes.push(n);
    return n;
  };
  const close = async () => {
    for (const n of nodes) {
      try {
        process.kill(n.proc.pid, 'SIGCONT');
      } catch {
        // gone
      }
    }
    await stopAllNodes(nodes);
    await lab?.close();
    await rm(dir, { recursive: true, force: true });
  };
  try {
    const a = await start(0, { name: 'a', vram: 0.7 });
    const b = await start(1, { name: 'b', vram: 0.6, join: a.token });
    const d = await start(2, { name: 'd', vram: 0.58, join: a.token });
    const e = await start(3, { name: 'e', vram: 0.56, join: a.token });
    const c = await start(4, { name: 'c', model: null, join: a.token });
    await a.waitStatus((s) => hostServesPlan([b.id, a.id])(s) && s.links.length === 4, 180_000, 'a hosting with b, all linked');
    await c.waitStatus((s) => s.plan?.kind === 'ready' && s.plan.host === a.id && s.links.includes(a.id as never), 60_000, 'c routed to a');
    await b.waitStatus((s) => s.plan?.kind === 'ready' && s.plan.host === a.id, 60_000, 'b serving a');
    return { a, b, c, d, e, lab, close };
  } catch (err) {
    await close();
    throw err;
  }
}

export interface Fault {
  readonly name: string;
  /** The worker b is the victim (or its node is stopped): requests enter through c only. */
  readonly victimIsEntryWorker: boolean;
  readonly inLab: boolean;
  /** Does it; returns what is left to undo later (SIGCONT, restore), with the delay before it. */
  inject(m: FaultMesh): { undoAfterMs: number; undo: () => void; what: string } | null;
}

const signal = (pid: number, sig: NodeJS.Signals) => {
  try {
    process.kill(pid, sig);
  } catch {
    // gone already
  }
};

function child(node: E2eNode, re: RegExp): number {
  const p = llamaChildren(node).find((x) => re.test(x.name));
  if (!p) throw new Error(`${node.name} runs no ${re} (${JSON.stringify(llamaChildren(node))})`);
  return p.pid;
}

/** Every datagram between `relay`'s target and the site `other` is dropped (per source; the rest still crosses). */
function cutSource(relay: UdpRelay, other: WanSite): () => void {
  const r = relay as unknown as { send(line: unknown, msg: Buffer): void; mappings: Map<string, { client: { address: string }; toTarget: unknown; toClient: unknown }> };
  const original = r.send.bind(r);
  const blocked = new Set([other.publicIp, other.vethIp]);
  r.send = (line, msg) => {
    for (const m of r.mappings.values()) if ((m.toTarget === line || m.toClient === line) && blocked.has(m.client.address)) return;
    original(line, msg);
  };
  return () => {
    r.send = original;
  };
}

export const FAULTS: readonly Fault[] = [
  { name: 'SIGKILL the host (a)', victimIsEntryWorker: false, inLab: false, inject: (m) => (m.a.kill(), null) },
  { name: 'SIGKILL a worker (b)', victimIsEntryWorker: true, inLab: false, inject: (m) => (m.b.kill(), null) },
  {
    name: 'SIGSTOP a worker (b), SIGCONT after 15 s',
    victimIsEntryWorker: true,
    inLab: false,
    inject: (m) => (signal(m.b.proc.pid, 'SIGSTOP'), { undoAfterMs: 15_000, undo: () => signal(m.b.proc.pid, 'SIGCONT'), what: 'SIGCONT b' }),
  },
  { name: "SIGKILL a worker's rpc-server (b's)", victimIsEntryWorker: false, inLab: false, inject: (m) => (signal(child(m.b, /rpc/), 'SIGKILL'), null) },
  {
    name: "SIGSTOP the host's llama-server (SIGCONT after 30 s if alive)",
    victimIsEntryWorker: false,
    inLab: false,
    inject: (m) => {
      const pid = child(m.a, /llama-server/);
      signal(pid, 'SIGSTOP');
      return { undoAfterMs: 30_000, undo: () => signal(pid, 'SIGCONT'), what: 'SIGCONT the old llama-server' };
    },
  },
  { name: "SIGKILL the host's llama-server", victimIsEntryWorker: false, inLab: false, inject: (m) => (signal(child(m.a, /llama-server/), 'SIGKILL'), null) },
  {
    name: 'cut the link host (a) - worker (b), WAN lab, restored after 30 s',
    victimIsEntryWorker: false,
    inLab: true,
    inject: (m) => {
      const [sa, sb] = [m.lab!.sites[0]!, m.lab!.sites[1]!];
      // QUIC both ways (whichever side dialed: a's relay from b, b's relay from a) and b's data port (only a dials it).
      const undo = [cutSource(sa.quicRelay, sb), cutSource(sb.quicRelay, sa)];
      sb.dataRelay.cut();
      return { undoAfterMs: 30_000, undo: () => (undo.forEach((u) => u()), sb.dataRelay.restore()), what: 'restore the link' };
    },
  },
];
