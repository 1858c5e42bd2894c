// Support for the end-to-end tests: real `mesh-inference` nodes (bin/mesh-inference.js, each in its own
// process) on loopback, generated models, status polling, the official `openai` client, and cleanup.
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import OpenAI from 'openai';
import { generateLlamaGguf, type LlamaModelSpec } from '../src/io/gguf/gguf-writer.ts';
import { readModelIdentity } from '../src/io/gguf/gguf-identity.ts';
import { readModelShape } from '../src/io/gguf/gguf-shape.ts';
import { DEFAULT_SERVE, kvCacheBytes } from '../src/machines/kv-cache.ts';
import { locateLlamaBinaries } from '../src/io/llama/llama-binaries.ts';
import { spawnManaged, type ManagedProcess } from '../src/io/llama/processes.ts';
import type { NodeStatus } from '../src/node.ts';
import { greedyCompletion, startLlamaServer } from './helpers/llama.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const BIN = join(ROOT, 'bin/mesh-inference.js');

/**
 * The llama.cpp binaries every node and reference server of a test uses (the same ones: greedy output is
 * compared across them), as llama-binaries.ts finds them: $MESH_LLAMA_BIN_DIR, else our patched build.
 */
export function e2eBinDir(): string {
  return locateLlamaBinaries().dir;
}
// test/helpers/llama.ts (the reference servers) reads the same variable.
process.env['MESH_LLAMA_BIN_DIR'] = e2eBinDir();

/** The nodes' --ctx-size default ($MESH_INFERENCE_CTX). */
export const E2E_CTX = 1024;

/** 8 layers of width 128: ~20 MB, fast on two cores, wide enough that greedy output varies. */
export const E2E_MODEL: LlamaModelSpec = { layers: 8, embd: 128, ff: 384, type: 'f16', seed: 11 };

export interface E2eModel {
  readonly path: string;
  readonly bytes: number;
  readonly dir: string;
  /** Its KV cache at the tests' context ($MESH_INFERENCE_CTX 1024, one slot, f16). */
  readonly kvBytes: number;
  /**
   * `share` of the model's bytes plus its KV cache, as a --max-vram value: a plan needs 1.1 x the model + the
   * KV cache, so shares summing to 1.1 still hold one (the tests' splits were chosen before the KV term).
   */
  vram(share: number): string;
  remove(): Promise<void>;
}

export async function makeE2eModel(spec: LlamaModelSpec = E2E_MODEL): Promise<E2eModel> {
  const dir = await mkdtemp(join(tmpdir(), 'mesh-e2e-'));
  const path = join(dir, 'model.gguf');
  await generateLlamaGguf(path, spec);
  const { bytes } = await readModelIdentity(path);
  const kvBytes = kvCacheBytes(await readModelShape(path), { ...DEFAULT_SERVE, ctxSize: E2E_CTX });
  return {
    path,
    bytes,
    kvBytes,
    dir,
    vram: (share) => String(Math.max(1024 ** 2, Math.floor((bytes + kvBytes) * share))),
    remove: () => rm(dir, { recursive: true, force: true }),
  };
}

export interface NodeOptions {
  readonly name: string;
  /** The model, or null for a lite client. */
  readonly model: E2eModel | null;
  /** Share of the model's bytes this node offers (--max-vram). */
  readonly vram?: number;
  readonly join?: string;
  readonly role?: 'auto' | 'host' | 'worker';
  readonly extraArgs?: readonly string[];
  /** Print the mi1 token (--show-secret-token, the default here); false: the banner as a user sees it. */
  readonly showSecretToken?: boolean;
  readonly env?: Readonly<Record<string, string>>;
  /** Key files live here (a fresh identity per node). */
  readonly dir: string;
  /** A command that runs the node, e.g. `ip netns exec NS` (the WAN lab, test/support/wan-lab.ts). */
  readonly exec?: readonly string[];
  /** Reach the API at this host instead of the one the node prints (a node in a namespace, --listen-all). */
  readonly apiHost?: string;
}

export interface E2eNode {
  readonly name: string;
  readonly proc: ManagedProcess;
  /** The mi1 token it printed (--show-secret-token); '' for a node that joined with an expiring invite (it prints none at start). */
  readonly token: string;
  /** The expiring invite (mi2) it printed at start; '' as `token`. */
  readonly invite: string;
  readonly api: string;
  readonly id: string;
  status(): Promise<NodeStatus>;
  /** Polls /api/status until `pred` holds; throws with the last status on timeout. */
  waitStatus(pred: (s: NodeStatus) => boolean, timeoutMs?: number, what?: string): Promise<NodeStatus>;
  client(timeoutMs?: number): OpenAI;
  /** Graceful stop (SIGTERM), waits for the exit. */
  stop(): Promise<void>;
  /** SIGKILL to the node process (its children die by the watchdog). */
  kill(): void;
  /** Every output line so far (stdout and stderr). */
  lines(): readonly string[];
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function startE2eNode(o: NodeOptions): Promise<E2eNode> {
  const args = [
    BIN,
    ...(o.model ? ['--model', o.model.path, '--max-vram', o.model.vram(o.vram ?? 2)] : ['--client']),
    ...(o.join ? ['--join', o.join] : []),
    ...(o.role ? ['--role', o.role] : []),
    '--port', '0',
    '--relay', 'none',
    '--stun', 'none',
    '--key-file', join(o.dir, `${o.name}.key`),
    '--name', o.name,
    '--log-level', 'info',
    // The tests join by the mi1 token unless they test expiring invites (the banner's default).
    ...(o.showSecretToken === false ? [] : ['--show-secret-token']),
    ...(o.extraArgs ?? []),
  ];
  const all: string[] = [];
  let token: string | null = null;
  let invite = '';
  let api: string | null = null;
  const [file, ...before] = o.exec && o.exec.length > 0 ? [...o.exec, process.execPath] : [process.execPath];
  const proc = spawnManaged({
    name: o.name,
    file: file!,
    args: [...before, ...args],
    env: {
      MESH_LLAMA_BIN_DIR: e2eBinDir(),
      MESH_INFERENCE_BIND_HOST: '127.0.0.1',
      MESH_INFERENCE_THREADS: '1',
      MESH_INFERENCE_COUNT_RPC: '1',
      MESH_INFERENCE_CTX: String(E2E_CTX),
      ...o.env,
    },
    tailLines: 400,
  });
  proc.onLine((line, stream) => {
    all.push(line);
    if (stream === 'stdout') {
      // A joiner by expiring invite (mi2) holds no secret at start, so it prints no mi1 token: ''.
      token ??= /^\s*(mi1[A-Za-z0-9_-]+)\s*$/.exec(line)?.[1] ?? (/invite: none yet/.test(line) || (o.showSecretToken === false && /^\s*mi2/.test(line)) ? '' : null);
      invite ||= /^\s*(mi2[A-Za-z0-9_-]+)\s*$/.exec(line)?.[1] ?? '';
      api ??= /API: (http:\/\/\S+)/.exec(line)?.[1] ?? null;
    }
  });
  const deadline = Date.now() + 30_000;
  while (token === null || api === null) {
    const exit = proc.exitInfo();
    if (exit !== null) throw new Error(`${o.name} exited (${exit.signal ?? exit.code}) before it printed its token:\n${proc.tail().slice(-30).join('\n')}`);
    if (Date.now() > deadline) {
      await proc.stop(2_000);
      throw new Error(`${o.name} printed no token/API within 30 s:\n${proc.tail().slice(-30).join('\n')}`);
    }
    await sleep(50);
  }
  const apiUrl: string = o.apiHost === undefined ? api : (api as string).replace(/^http:\/\/[^/]+:(\d+)/, `http://${o.apiHost}:$1`);
  const status = async (): Promise<NodeStatus> => {
    const res = await fetch(`${apiUrl}/api/status`, { signal: AbortSignal.timeout(5_000) });
    return (await res.json()) as NodeStatus;
  };
  const first = await status();
  const node: E2eNode = {
    name: o.name,
    proc,
    token,
    invite,
    api: apiUrl,
    id: first.node.id,
    status,
    async waitStatus(pred, timeoutMs = 90_000, what = 'the expected state') {
      const end = Date.now() + timeoutMs;
      let last: NodeStatus | null = null;
      for (;;) {
        if (proc.exitInfo() !== null) throw new Error(`${o.name} exited while waiting for ${what}:\n${proc.tail().slice(-30).join('\n')}`);
        try {
          last = await status();
          if (pred(last)) return last;
        } catch {
          // between states, or busy: poll again
        }
        if (Date.now() > end) {
          throw new Error(`${o.name}: no ${what} within ${timeoutMs} ms; last status: ${JSON.stringify(summary(last))}\n${proc.tail().slice(-20).join('\n')}`);
        }
        await sleep(200);
      }
    },
    client: (timeoutMs = 120_000) => new OpenAI({ baseURL: `${apiUrl}/v1`, apiKey: 'none', maxRetries: 0, timeout: timeoutMs }),
    stop: async () => void (await proc.stop(15_000)),
    kill: () => proc.kill('SIGKILL'),
    lines: () => all,
  };
  return node;
}

/** Waits until `n` has `id` in its view and a live link to it (60 s). */
export function waitLinked(n: E2eNode, id: string): Promise<NodeStatus> {
  return n.waitStatus((s) => s.view.some((v) => v.id === id) && s.links.includes(id as never), 60_000, `a link to ${id.slice(0, 10)}`);
}

/** The parts of a status worth printing when a wait fails. */
export function summary(s: NodeStatus | null): unknown {
  if (s === null) return null;
  return {
    state: s.node.state,
    role: s.node.role,
    plan: s.plan?.kind === 'ready' ? { host: s.plan.host.slice(0, 8), stages: s.plan.stages.map((x) => [x.id.slice(0, 8), x.share]) } : s.plan,
    links: s.links.map((l) => l.slice(0, 8)),
    processes: s.processes,
  };
}

/** The node serves (state `serving`) a ready plan with exactly these stage ids in order (host last). */
export function servesPlan(stages: readonly string[]) {
  return (s: NodeStatus): boolean =>
    s.node.state === 'serving' &&
    s.plan?.kind === 'ready' &&
    s.plan.stages.length === stages.length &&
    s.plan.stages.every((x, i) => x.id === stages[i]);
}

/** The host serves: its llama-server is ready under a ready plan. */
export function hostServing(s: NodeStatus): boolean {
  return s.node.state === 'serving' && s.node.role === 'host' && s.processes.llamaServer.state === 'ready';
}

/** The node hosts and serves (hostServing) a ready plan with exactly these stage ids in order (host last). */
export function hostServesPlan(stages: readonly string[]) {
  const plan = servesPlan(stages);
  return (s: NodeStatus): boolean => hostServing(s) && plan(s);
}

/**
 * The reference a mesh's answers are compared with: the token ids of a greedy completion by a solo
 * llama-server (same binaries, flash attention off on both sides) on the model, stopped afterwards.
 */
export async function soloReferenceTokens(model: E2eModel, prompt: string, nTokens: number): Promise<number[]> {
  const solo = await startLlamaServer({ model: model.path });
  try {
    return (await greedyCompletion(solo, prompt, nTokens)).tokens as number[];
  } finally {
    await solo.stop();
  }
}

/** Greedy, exact-token request body for /v1/completions (llama-server extras: token ids in __verbose). */
export function greedyBody(prompt: string, maxTokens: number): Record<string, unknown> {
  return { model: 'mesh', prompt, max_tokens: maxTokens, temperature: 0, top_k: 1, seed: 1, cache_prompt: false, return_tokens: true, verbose: true };
}

/** Token ids of a greedy completion through an API (OpenAI client, extra llama-server fields passed through). */
export async function greedyTokens(node: E2eNode, prompt: string, maxTokens: number): Promise<{ tokens: number[]; text: string }> {
  const res = (await node.client().completions.create(greedyBody(prompt, maxTokens) as never)) as unknown as {
    choices: { text: string }[];
    __verbose?: { tokens?: number[] };
  };
  const tokens = res.__verbose?.tokens;
  if (!Array.isArray(tokens)) throw new Error(`no token ids in the answer: ${JSON.stringify(res).slice(0, 400)}`);
  return { tokens, text: res.choices[0]?.text ?? '' };
}

/** Every process below `pid` (children, grandchildren...), read from /proc: name and pid. */
export function descendants(pid: number): { pid: number; name: string }[] {
  const parent = new Map<number, number>();
  const names = new Map<number, string>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      // "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ')' ends it.
      const close = stat.lastIndexOf(')');
      const rest = stat.slice(close + 2).split(' ');
      parent.set(Number(entry), Number(rest[1]));
      names.set(Number(entry), stat.slice(stat.indexOf('(') + 1, close));
    } catch {
      // gone meanwhile
    }
  }
  const out: { pid: number; name: string }[] = [];
  const walk = (p: number) => {
    for (const [child, pp] of parent) {
      if (pp === p) {
        out.push({ pid: child, name: names.get(child) ?? '?' });
        walk(child);
      }
    }
  };
  walk(pid);
  return out;
}

/** The llama.cpp processes (llama-server, ggml-rpc-server) a node runs right now. */
export function llamaChildren(node: E2eNode): { pid: number; name: string }[] {
  return descendants(node.proc.pid).filter((p) => /llama-server|ggml-rpc-serv/.test(p.name));
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

export async function stopAllNodes(nodes: readonly E2eNode[]): Promise<void> {
  await Promise.all(nodes.map((n) => n.stop().catch(() => {})));
}

/** A node of an E2eMesh: the mesh's model (or null for a lite client), its key file in the model's dir. */
export type MeshNodeOptions = Omit<NodeOptions, 'model' | 'dir'> & { readonly model?: null };

/** One test's generated model and every node started on it, cleaned up together. */
export interface E2eMesh {
  readonly model: E2eModel;
  /** Starts a node (startE2eNode) on the mesh's model; cleanup() stops it. */
  start(o: MeshNodeOptions): Promise<E2eNode>;
  /** Stops every node started (stopAllNodes), then removes the model. */
  cleanup(): Promise<void>;
}

export async function makeE2eMesh(spec: LlamaModelSpec = E2E_MODEL): Promise<E2eMesh> {
  const model = await makeE2eModel(spec);
  const nodes: E2eNode[] = [];
  return {
    model,
    async start(o) {
      const node = await startE2eNode({ ...o, model: o.model === null ? null : model, dir: model.dir });
      nodes.push(node);
      return node;
    },
    async cleanup() {
      await stopAllNodes(nodes);
      await model.remove();
    },
  };
}
