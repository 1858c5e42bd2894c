// The composition root of `mesh-inference`: parses the command line, runs the demo when there are no
// arguments, otherwise starts one node (src/node.ts), prints its invite token and API address, and stops it
// cleanly on SIGINT / SIGTERM (children included: none is left behind, however the node ends).
import { parseCliArgsOrExit } from './io/host/cli-args.ts';
import { makeInviteFromFiles } from './io/host/invite-command.ts';
import { rotateThroughApi } from './io/host/rotate-command.ts';
import type { RotationAnswer } from './io/wire/admin-proof.ts';
import { formatBytes } from './io/host/vram.ts';
import { killAllSync } from './io/llama/processes.ts';
import { startNode, type NodeHandle } from './node.ts';

/** Environment knobs for the demo, tests and benchmarks (documented in docs/node.md). */
export const BIND_HOST_ENV = 'MESH_INFERENCE_BIND_HOST';
export const THREADS_ENV = 'MESH_INFERENCE_THREADS';
export const COUNT_RPC_ENV = 'MESH_INFERENCE_COUNT_RPC';
export { CTX_ENV } from './io/host/cli-args.ts';
/** Where peers dial this node's data port instead of its own addresses ("ip" or "ip:port", comma-separated): tests and the WAN lab put relays there. */
export const DATA_ADVERTISE_ENV = 'MESH_INFERENCE_DATA_ADVERTISE';

async function main(): Promise<void> {
  const parsed = parseCliArgsOrExit(process.argv.slice(2));
  if (parsed.kind === 'demo') {
    const { runDemo } = await import('./demo.ts');
    await runDemo();
    return;
  }
  if (parsed.kind === 'invite') {
    try {
      const made = await makeInviteFromFiles({ keyFile: parsed.keyFile, ttlMs: parsed.ttlMs });
      process.stderr.write(
        `mesh-inference: an invite to mesh ${made.meshId.slice(0, 8)} from node ${made.inviter.slice(0, 10)}, valid until ${new Date(made.expiresAt).toISOString()}` +
          `${made.addrs.length === 0 ? ' (no addresses known: the joiner needs a relay to reach this node)' : ''}; that node must be running to admit the joiner:\n`,
      );
      process.stdout.write(`${made.token}\n`);
      process.exit(0);
    } catch (err) {
      process.stderr.write(`mesh-inference invite: ${(err as Error).message.split('\n')[0]}\n`);
      process.exit(1);
    }
  }
  if (parsed.kind === 'rotate') {
    try {
      const done = await rotateThroughApi(parsed);
      const names = (list: RotationAnswer['told']) => list.map((m) => `${m.name} (${m.id.slice(0, 10)})`).join(', ');
      process.stdout.write(
        `mesh ${done.meshId.slice(0, 8)}: secret rotated to key epoch ${done.keyEpoch}; sent to ${done.told.length} member(s)${done.told.length > 0 ? `: ${names(done.told)}` : ''}\n` +
          (done.removed.length > 0 ? `removed: ${names(done.removed)} (every member refuses them from now on)\n` : '') +
          `invites and tokens made before no longer admit anyone; a member offline now needs a new invite: mesh-inference invite${done.meshFile === null ? '' : ` (the new secret is in ${done.meshFile})`}\n`,
      );
      process.exit(0);
    } catch (err) {
      process.stderr.write(`mesh-inference rotate: ${(err as Error).message.split('\n')[0]}\n`);
      process.exit(1);
    }
  }
  if (parsed.kind === 'inspector') {
    const { runInspectorRelay } = await import('./io/host/inspector-command.ts');
    const relay = runInspectorRelay(parsed.port, (line) => process.stdout.write(`${line}\n`));
    for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => (relay.stop(), process.exit(0)));
    return;
  }
  if (parsed.kind === 'plan') {
    try {
      const { planPreview, formatPlanReport } = await import('./node/plan-preview.ts');
      const report = await planPreview(parsed.options, parsed.waitMs, { bindHost: process.env[BIND_HOST_ENV] || undefined });
      process.stdout.write(parsed.json ? `${JSON.stringify(report, null, 2)}\n` : formatPlanReport(report));
      process.exit(0);
    } catch (err) {
      process.stderr.write(`mesh-inference plan: ${(err as Error).message.split('\n')[0]}\n`);
      process.exit(1);
    }
  }
  const options = parsed.options;
  const threads = positiveIntEnv(THREADS_ENV);
  let node: NodeHandle;
  try {
    node = await startNode(options, {
      bindHost: process.env[BIND_HOST_ENV] || undefined,
      threads,
      countRpc: process.env[COUNT_RPC_ENV] === '1',
      dataAdvertise: process.env[DATA_ADVERTISE_ENV]?.split(',').filter((a) => a !== ''),
    });
  } catch (err) {
    process.stderr.write(`mesh-inference: ${(err as Error).message.split('\n')[0]}\n`);
    process.exit(1);
  }

  const out = (line = '') => process.stdout.write(`${line}\n`);
  out(`mesh-inference node "${node.name}" (${node.id.slice(0, 10)}), mesh ${node.meshId.slice(0, 8)}`);
  if (node.model !== null && node.vram !== null) {
    out(`  model: ${node.model.name} (${formatBytes(node.model.bytes)}); offering ${formatBytes(node.vram.bytes)} (${node.vram.detail})`);
  } else {
    out('  lite client: no model here; requests go to the mesh\'s host');
  }
  if (node.invite !== null) {
    out('  invite (expires in 24 h; this node must be running to admit with it; more: mesh-inference invite --ttl 1h):');
    out(`    ${node.invite}`);
  } else {
    out('  invite: none yet (this node joins with an expiring invite; once admitted: mesh-inference invite)');
  }
  if (node.token !== null && options.showSecretToken) {
    out('  secret token (carries the mesh secret and never expires; void it with `mesh-inference rotate`):');
    out(`    ${node.token}`);
  }
  if (node.dataPort !== null) {
    const forward = options.bindPort !== null ? `; a port forward needs TCP ${node.dataPort} as well as UDP ${options.bindPort}` : '';
    out(`  data port: TCP ${node.dataPort} (direct TLS between nodes that reach each other${forward})`);
  }
  out(`  API: ${node.apiUrl}  (OpenAI-compatible: POST /v1/chat/completions, /v1/completions; GET /api/status)`);
  out(`  console: ${node.apiUrl}/  (open it in a browser: nodes, links, plan, machines, requests, live; feed: GET /api/events)`);

  let signals = 0;
  const onSignal = (sig: NodeJS.Signals) => {
    signals++;
    if (signals > 1) {
      // A second Ctrl-C: no more waiting.
      process.stderr.write('mesh-inference: stopping now\n');
      killAllSync('SIGKILL');
      process.exit(130);
    }
    process.stderr.write(`mesh-inference: ${sig}: leaving the mesh and stopping (Ctrl-C again to force)\n`);
    void node.stop(`${sig}`).then(() => process.exit(0));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('SIGHUP', onSignal);
  await node.stopped;
  process.exit(0);
}

function positiveIntEnv(name: string): number | undefined {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return undefined;
  const n = Number(raw);
  if (!Number.isInteger(n) || n <= 0) {
    process.stderr.write(`mesh-inference: ${name}="${raw}" is not a positive integer\n`);
    process.exit(2);
  }
  return n;
}

process.on('uncaughtException', (err) => {
  process.stderr.write(`mesh-inference: internal error: ${err.stack ?? String(err)}\n`);
  killAllSync('SIGKILL');
  process.exit(1);
});
process.on('unhandledRejection', (err) => {
  process.stderr.write(`mesh-inference: internal error (unhandled rejection): ${(err as Error)?.stack ?? String(err)}\n`);
  killAllSync('SIGKILL');
  process.exit(1);
});

await main();
