// `mesh-inference plan --model FILE [--join TOKEN]...`: which node would get which layers if this machine
// joined with this model and this memory, computed by the product's `elect` (src/machines/plan-explain.ts).
// Without --join: the candidate alone. With --join: this process joins the mesh as an OBSERVER, a lite client
// with a fresh in-memory key (never the key file: that identity may be running here), which is never a
// candidate: a lite client joining changes no plan (the election's property (d)), so the host's llama-server
// keeps running. It waits until the view settles, previews, and leaves.
import { waitFor } from 'xstate';
import type { CliOptions } from '../io/host/cli-args.ts';
import { createLogger } from '../io/host/logger.ts';
import { ephemeralSecretKey } from '../io/host/secret-key.ts';
import { discoverPublicAddress } from '../io/host/stun.ts';
import { detectVram } from '../io/host/vram.ts';
import { readModelIdentity } from '../io/gguf/gguf-identity.ts';
import { readModelShape } from '../io/gguf/gguf-shape.ts';
import { createIrohEndpoint } from '../io/transport/iroh-transport.ts';
import { kvSizing } from '../machines/kv-cache.ts';
import { asEndpointId, PROTOCOL_VERSION, type Announcement, type View } from '../machines/mesh-types.ts';
import { previewPlan, withCandidate, type PlanPreview } from '../machines/plan-explain.ts';
import { formatSize as sizeOf } from '../machines/units.ts';
import { buildNode } from './build.ts';

/**
 * The candidate's id. Its real id is unknown until it starts (a fresh or remembered key); this one is the
 * greatest id, so the candidate loses every tie of memory (elect breaks ties by the smaller id): a preview
 * never promises a role that a tie could take away.
 */
export const CANDIDATE_ID = asEndpointId('f'.repeat(64));

export interface PlanReport {
  /** The candidate: this machine's model, memory and serving settings. */
  readonly candidate: Pick<Announcement, 'name' | 'role' | 'vramBytes' | 'model' | 'kv'>;
  /** The mesh as it runs now, from the observer's side (null without --join). */
  readonly now: PlanPreview | null;
  /** The plan if the candidate joined. */
  readonly withCandidate: PlanPreview;
  /** The mesh's nodes the observer saw (without --join: none). */
  readonly seen: number;
}

export async function planPreview(options: CliOptions, waitMs: number, env: { bindHost?: string } = {}): Promise<PlanReport> {
  const modelPath = options.model as string;
  const [model, shape, vram] = await Promise.all([readModelIdentity(modelPath), readModelShape(modelPath), detectVram({ maxVramBytes: options.maxVramBytes })]);
  const candidate: Announcement = {
    id: CANDIDATE_ID,
    epoch: 0,
    seq: 0,
    name: options.name,
    role: options.role,
    vramBytes: vram.bytes,
    model,
    version: PROTOCOL_VERSION,
    serving: false,
    addrs: [],
    connectedTo: [],
    kv: kvSizing(shape, options.serve),
  };
  const { id: _, epoch: _e, seq: _s, version: _v, serving: _sv, addrs: _a, connectedTo: _c, ...shown } = candidate;
  if (options.joins.length === 0 && (options.invites ?? []).length === 0) {
    return { candidate: shown, now: null, withCandidate: previewPlan({ self: candidate.id, announcements: { [candidate.id]: candidate } }), seen: 0 };
  }
  const view = await observe(options, waitMs, env.bindHost ?? '0.0.0.0');
  return { candidate: shown, now: previewPlan(view), withCandidate: previewPlan(withCandidate(view, candidate)), seen: Object.keys(view.announcements).length - 1 };
}

/** Joins as an observer (a lite client), waits for the view to settle, and leaves; returns the view. */
async function observe(options: CliOptions, waitMs: number, bindHost: string): Promise<View> {
  const node = buildNode(
    {
      name: `${options.name} (plan preview)`,
      role: 'client',
      joins: options.joins,
      invites: options.invites,
      bindPort: null,
      dataPort: null,
      dataPath: 'quic',
      stun: [],
      relay: options.relay,
      apiHost: '127.0.0.1',
      port: 0,
      apiKey: null,
      bindHost,
      countRpc: false,
    },
    {
      logger: createLogger({ level: options.logLevel }),
      holdings: { secretKey: ephemeralSecretKey(), model: null, vram: null },
      net: { stun: discoverPublicAddress, bind: createIrohEndpoint },
      processes: () => ({}),
    },
  );
  const started = await node.start();
  try {
    const { actor } = started;
    const deadline = Date.now() + waitMs;
    // Admitted and linked to someone first...
    await waitFor(actor, (s) => s.context.links.length > 0, { timeout: waitMs }).catch(() => {
      throw new Error(`could not reach the mesh within ${waitMs / 1000} s (is the inviting node running and reachable? --wait gives it longer)`);
    });
    // ...then until the view has not changed for a while (gossip settles in a few rounds), bounded.
    let last = '';
    let stableSince = Date.now();
    while (Date.now() < deadline) {
      const v = actor.getSnapshot().context.view;
      const sig = Object.values(v.announcements).map((a) => `${a.id}:${a.epoch}:${a.seq}`).sort().join(',');
      if (sig !== last) {
        last = sig;
        stableSince = Date.now();
      } else if (Date.now() - stableSince >= SETTLE_MS) {
        break;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    return actor.getSnapshot().context.view;
  } finally {
    await node.stop('plan preview done');
  }
}

/** How long the view must stay unchanged before the preview is taken. */
const SETTLE_MS = 1_500;

/** The report for people. */
export function formatPlanReport(r: PlanReport): string {
  const out: string[] = [];
  const c = r.candidate;
  out.push(`this machine: ${c.name}, model ${c.model?.name}, offering ${sizeOf(c.vramBytes)}${c.kv ? `; serving ctx ${c.kv.ctxSize} x ${c.kv.parallel} slot(s), KV cache ${c.kv.cacheType} (${sizeOf(c.kv.bytes)}), flash attention ${c.kv.flashAttn}` : ''}`);
  if (r.now !== null) {
    out.push('', `the mesh now (${r.seen} node(s) seen; this preview joined as an observer, never a candidate):`);
    out.push(...r.now.lines.map((l) => `  ${l}`));
  }
  out.push('', r.now === null ? 'the plan with this machine alone:' : 'the plan if this machine joined:');
  out.push(...r.withCandidate.lines.map((l) => `  ${l}`));
  return `${out.join('\n').replaceAll(`(${CANDIDATE_ID.slice(0, 10)})`, '(this machine)')}\n`;
}

