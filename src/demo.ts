// `npm start` with no arguments: a local 3-node mesh on loopback, each node a child process running the real
// CLI, with a generated random-weight model (cached) and VRAM caps that no two nodes meet together, so the
// layers really are split across all three. The first node serves the API on :9337. Ctrl-C stops it all.
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DEFAULT_API_PORT } from './io/host/cli-args.ts';
import { generateLlamaGguf, planLlamaModel, type LlamaModelSpec } from './io/gguf/gguf-writer.ts';
import { readModelIdentity } from './io/gguf/gguf-identity.ts';
import { readModelShape } from './io/gguf/gguf-shape.ts';
import { DEFAULT_SERVE, kvCacheBytes } from './machines/kv-cache.ts';
import { findLlamaBinaries, LlamaBinariesError } from './io/llama/llama-binaries.ts';
import { spawnManaged, type ManagedProcess } from './io/llama/processes.ts';
import { formatBytes } from './io/host/vram.ts';

/** The demo's model: small enough to generate in seconds and answer fast on two cores. */
export const DEMO_MODEL: LlamaModelSpec = { layers: 8, embd: 256, ff: 768, type: 'f16', seed: 7, name: 'mesh-inference-demo (random weights)' };
/**
 * Each node offers this share of the model's bytes plus its KV cache (default settings: ctx 4096, f16): any two
 * hold 0.85 x, all three 1.2 x, and a plan needs 1.1 x the model + the KV cache, so it takes all three.
 */
export const DEMO_VRAM_SHARES = [0.45, 0.4, 0.35] as const;
export const DEMO_PORT_ENV = 'MESH_INFERENCE_DEMO_PORT';

const BIN = fileURLToPath(new URL('../bin/mesh-inference.js', import.meta.url));

/** `$XDG_CACHE_HOME/mesh-inference`, else `~/.cache/mesh-inference`. */
export function cacheDir(env: NodeJS.ProcessEnv = process.env): string {
  const xdg = env['XDG_CACHE_HOME'];
  return join(xdg && xdg.startsWith('/') ? xdg : join(env['HOME'] ?? homedir(), '.cache'), 'mesh-inference');
}

/** The demo model's path, generated on first use. */
export async function ensureDemoModel(say: (line: string) => void = () => {}): Promise<string> {
  const dir = cacheDir();
  const s = DEMO_MODEL;
  const path = join(dir, `demo-${s.layers}x${s.embd}-ff${s.ff}-${s.type}-seed${s.seed}.gguf`);
  if (existsSync(path)) return path;
  await mkdir(dir, { recursive: true });
  const plan = await planLlamaModel(s);
  say(`generating the demo model (${formatBytes(plan.fileBytes)}, random weights) into ${path} ...`);
  await generateLlamaGguf(path, s);
  return path;
}

interface DemoNode {
  readonly name: string;
  readonly proc: ManagedProcess;
  token: string | null;
  api: string | null;
}

export async function runDemo(): Promise<void> {
  const say = (line = '') => process.stdout.write(`${line}\n`);
  say('mesh-inference demo: a 3-node mesh on this machine (loopback), serving an OpenAI-compatible API.');
  try {
    await findLlamaBinaries();
  } catch (err) {
    if (err instanceof LlamaBinariesError) {
      process.stderr.write(`mesh-inference demo: ${err.message}\n`);
      process.exit(1);
    }
    throw err;
  }
  const model = await ensureDemoModel(say);
  const identity = await readModelIdentity(model);
  const kvBytes = kvCacheBytes(await readModelShape(model), DEFAULT_SERVE);
  const port = Number(process.env[DEMO_PORT_ENV] ?? DEFAULT_API_PORT);
  const keys = await mkdtemp(join(tmpdir(), 'mesh-demo-'));
  const nodes: DemoNode[] = [];
  let stopping = false;

  const stopAllNodes = async (code: number): Promise<never> => {
    if (!stopping) {
      stopping = true;
      await Promise.all(nodes.map((n) => n.proc.stop(10_000)));
      await rm(keys, { recursive: true, force: true });
    }
    process.exit(code);
  };
  process.on('SIGINT', () => {
    if (stopping) return;
    say('\nstopping the demo mesh ...');
    void stopAllNodes(0);
  });
  process.on('SIGTERM', () => void stopAllNodes(0));

  const start = (i: number, token: string | null): DemoNode => {
    const name = `demo-${i + 1}`;
    const vram = Math.floor((identity.bytes + kvBytes) * DEMO_VRAM_SHARES[i]!);
    const args = [
      BIN,
      '--model', model,
      '--max-vram', String(vram),
      '--port', String(i === 0 ? port : 0),
      '--relay', 'none',
      '--stun', 'none',
      '--key-file', join(keys, `${name}.key`),
      '--name', name,
      '--log-level', 'info',
      ...(token ? ['--join', token] : []),
    ];
    const proc = spawnManaged({
      name,
      file: process.execPath,
      args,
      env: { MESH_INFERENCE_BIND_HOST: '127.0.0.1', MESH_INFERENCE_THREADS: '1' },
    });
    const node: DemoNode = { name, proc, token: null, api: null };
    proc.onLine((line, stream) => {
      if (stream === 'stdout') {
        node.token ??= /^\s*(mi2[A-Za-z0-9_-]+)\s*$/.exec(line)?.[1] ?? null;
        node.api ??= /API: (http:\/\/\S+)/.exec(line)?.[1] ?? null;
        return;
      }
      const shown = showLogLine(line);
      if (shown !== null) say(`  [${name}] ${shown}`);
    });
    void proc.exited.then((exit) => {
      if (stopping) return;
      const portTaken = exit.tail.some((l) => /already in use/.test(l));
      process.stderr.write(
        portTaken
          ? `mesh-inference demo: port ${port} is already in use; stop what holds it, or pick another: ${DEMO_PORT_ENV}=9400 npm start\n`
          : `mesh-inference demo: ${name} exited (${exit.signal ?? `status ${exit.code}`}); last output:\n${exit.tail.slice(-15).join('\n')}\n`,
      );
      void stopAllNodes(1);
    });
    nodes.push(node);
    say(`started ${name}: offers ${formatBytes(vram)} for the ${formatBytes(identity.bytes)} model and its ${formatBytes(kvBytes)} KV cache`);
    return node;
  };

  const first = start(0, null);
  const token = await until(() => first.token, 60_000, `${first.name} printed no invite token`);
  start(1, token);
  start(2, token);
  const api = await until(() => first.api, 30_000, `${first.name} printed no API address`);

  // Serving: the API answers /health, and the plan spans all three nodes.
  const plan = await until(async () => {
    try {
      const health = await fetch(`${api}/health`, { signal: AbortSignal.timeout(3_000) });
      if (health.status !== 200) return null;
      const status = (await (await fetch(`${api}/api/status`)).json()) as {
        plan: { kind: string; host: string; stages: { id: string; share: number }[] } | null;
        view: { id: string; name: string }[];
      };
      if (status.plan?.kind !== 'ready') return null;
      const names = new Map(status.view.map((v) => [v.id, v.name]));
      return { ...status.plan, names };
    } catch {
      return null;
    }
  }, 180_000, 'the mesh did not start serving within 3 minutes');

  const split = plan.stages.map((s) => `${plan.names.get(s.id) ?? s.id.slice(0, 8)}${s.id === plan.host ? ' (host)' : ''} ${(s.share * 100).toFixed(0)}%`).join(', ');
  say();
  say(`The demo mesh is serving. ${plan.stages.length} nodes share the layers: ${split}.`);
  say('No two nodes offer enough memory for the model alone, so llama-server runs it through every');
  say("node's rpc-server (over the mesh's QUIC tunnels), the host's own last.");
  say();
  say('NOTE: the demo model has RANDOM weights. It answers with fluent-looking nonsense: it exists to show');
  say('the mesh working (a real layer split across three processes), not to chat.');
  say();
  say(`API: ${api}   (every node serves one; this is ${first.name}'s)`);
  say(`Console: ${api}/   (open it in a browser: the three nodes, the layer split, each machine's state and`);
  say('         the requests with their tokens/s, live; its feed is GET /api/events)');
  say('Try:');
  say(`  curl ${api}/v1/chat/completions -H 'content-type: application/json' \\`);
  say(`       -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":32}'`);
  say(`  curl ${api}/api/status`);
  say();
  say('Ctrl-C stops the three nodes.');
  await new Promise<never>(() => {});
}

/** The few node log lines worth showing in the demo: plans, waits, warnings and errors. */
function showLogLine(line: string): string | null {
  let entry: { level?: number; msg?: string; component?: string };
  try {
    entry = JSON.parse(line) as typeof entry;
  } catch {
    return line.trim() === '' ? null : line;
  }
  const msg = entry.msg ?? '';
  if ((entry.level ?? 0) >= 40) return `${entry.level! >= 50 ? 'error' : 'warning'}: ${msg}`;
  if (/^plan: /.test(msg) || msg === 'peer admitted' || /^llama-server launched/.test(msg)) return msg;
  return null;
}

async function until<T>(get: () => T | null | Promise<T | null>, timeoutMs: number, what: string): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await get();
    if (v !== null) return v;
    if (Date.now() > deadline) {
      process.stderr.write(`mesh-inference demo: ${what}\n`);
      process.kill(process.pid, 'SIGTERM');
      await new Promise(() => {});
    }
    await new Promise((r) => setTimeout(r, 200));
  }
}
