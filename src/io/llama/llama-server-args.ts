// llama-server's command line and environment for one start (pure but for reading `--help` once per binary).
//
// Flags, and why (see llamaServerArgs):
//   --rpc A,B,...,OWN     the plan's stages in order; the host's own rpc-server last, so it holds the output
//                         layer and the logits (n_vocab floats per token) never cross the mesh
//   -dev RPC0,...,RPCn    every layer on the rpc-servers even where the host has a local GPU: one code path,
//                         and the host's GPU is reached through its own rpc-server like any worker's
//   -ngl 999              offload every layer (to those devices)
//   --tensor-split        the plan's shares, one per device in `--rpc` order (a stage with several devices
//                         has its share divided among them)
//   -lm none              no mmap (mmap crashes unified-memory machines with less VRAM than the model);
//                         `--no-mmap` on releases older than `--load-mode`
//   --cache-ram 0         no prompt cache in host RAM: it copies the KV back from the servers at each request
//   -fit off              the plan already sized everything; fitting asks every device for its free memory
//                         at start (an RPC round trip each) and may shrink the context behind our back
//   -fa off               CPU flash attention depends on thread counts, so split output would differ from
//                         solo output; off keeps "mesh == solo" exact (configurable for GPU meshes)
//   -c 4096               a bounded KV cache (default: the model's trained context, up to 128k+ tokens)
//   --metrics             /metrics for the status page and the benchmark; costs nothing per token
//   --alias NAME          the model's name in /v1/models and answers, not the host's file path
//   (warmup kept)         the empty warm-up decode runs the whole pipeline once before /health says ok, so a
//                         broken stage fails the start, not the first user's request
//   --api-key-file F      (added at launch: llama-server-process.ts) a random key per start that only this
//                         node knows (llamaServerKeyFor): the node's API adds it when it forwards; F is a
//                         0600 file in a 0700 temp dir, removed once the server is bound, so the key is
//                         never in argv (`ps` shows argv to every user).
//                         Releases without the flag get it as $LLAMA_API_KEY (readable by the same user only,
//                         like the file). /health stays open (llama.cpp's one public route besides the web UI)
//   --no-webui --no-agent --no-ui-mcp-proxy
//                         no web UI, no built-in tools/agent, no MCP CORS proxy (each only where this release
//                         has the flag); --tools and the MCP server lists are off by default and their
//                         environment variables are removed (below)
//   --cors-origins https://mesh-inference.invalid --no-cors-credentials
//                         no browser origin matches (the reserved .invalid TLD), so no web page may read its
//                         answers; llama.cpp's default is "*" with credentials
// Environment: every LLAMA_ARG_* variable (llama.cpp reads one per flag: LLAMA_ARG_TOOLS, LLAMA_ARG_AGENT,
// LLAMA_ARG_UI_MCP_PROXY... enable shell tools and a CORS proxy), LLAMA_API_KEY, HF_TOKEN and
// MTMD_BACKEND_DEVICE are removed from what it inherits (llamaServerEnv).
import { execFile } from 'node:child_process';
import { LlamaServerError } from './llama-server-output.ts';

/** What goes on llama-server's command line: the model, where its layers go, and how it runs. */
export interface LlamaServerCommand {
  /** The GGUF on this host. */
  readonly model: string;
  /** rpc-server addresses ("127.0.0.1:PORT": tunnels to the workers, then the host's own) in plan order. */
  readonly rpc: readonly string[];
  /**
   * No rpc-servers at all: every layer on this machine's own devices (`rpc` empty). Never a node's way to
   * run: the reference that tests and benchmarks compare a split against.
   */
  readonly solo?: boolean;
  /** One share per `rpc` entry (any positive scale); default equal shares. */
  readonly tensorSplit?: readonly number[];
  /** Devices each rpc-server exposes (default 1 each); a stage's share is divided among its devices. */
  readonly devicesPerServer?: readonly number[];
  /** Context size (-c); default 4096. */
  readonly ctxSize?: number;
  /** Default 'off' (see the header). */
  readonly flashAttention?: 'on' | 'off' | 'auto';
  /** CPU threads of the host's llama-server (-t); default llama.cpp's. */
  readonly threads?: number;
  /** Server slots (-np); default llama.cpp's (auto, with a unified KV cache). */
  readonly parallel?: number;
  /** The model's name in the API (`--alias`); default llama.cpp's: the host's file path. */
  readonly alias?: string;
  readonly extraArgs?: readonly string[];
}

const DEFAULT_CTX = 4096;

/** Which optional flags this llama-server knows, read once per binary from its `--help`. */
export interface LlamaServerFlags {
  readonly loadMode: boolean;
  readonly fit: boolean;
  readonly cacheRam: boolean;
  /** Hardening flags (false on releases without them): see the header. */
  readonly apiKeyFile?: boolean;
  readonly noWebui?: boolean;
  readonly noAgent?: boolean;
  readonly noMcpProxy?: boolean;
  readonly corsOrigins?: boolean;
  readonly noCorsCredentials?: boolean;
}

const flagCache = new Map<string, Promise<LlamaServerFlags>>();

export function detectLlamaServerFlags(binary: string): Promise<LlamaServerFlags> {
  let p = flagCache.get(binary);
  if (p === undefined) {
    p = new Promise((resolve, reject) => {
      execFile(binary, ['--help'], { timeout: 30_000, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
        const text = `${stdout}\n${stderr}`;
        if (err && !/--port/.test(text)) {
          reject(new LlamaServerError(`cannot run ${binary} --help: ${err.message.split('\n')[0]}`));
          return;
        }
        const has = (flag: string) => new RegExp(`(^|[\\s,])${flag}([\\s,=]|$)`, 'm').test(text);
        resolve({
          loadMode: has('--load-mode'),
          fit: has('--fit'),
          cacheRam: has('--cache-ram'),
          apiKeyFile: has('--api-key-file'),
          noWebui: has('--no-webui'),
          noAgent: has('--no-agent'),
          noMcpProxy: has('--no-ui-mcp-proxy'),
          corsOrigins: has('--cors-origins'),
          noCorsCredentials: has('--no-cors-credentials'),
        });
      });
    });
    flagCache.set(binary, p);
    p.catch(() => flagCache.delete(binary));
  }
  return p;
}

/** The command line for `init` on `port` (pure: the tests check it, the header explains it). */
export function llamaServerArgs(init: LlamaServerCommand, port: number, flags: LlamaServerFlags): string[] {
  if (init.solo === true) {
    if (init.rpc.length > 0) throw new RangeError('a solo llama-server takes no rpc-servers');
    return [...endpointArgs(init, port), '-ngl', '999', ...runtimeArgs(init, flags), ...(init.extraArgs ?? [])];
  }
  if (init.rpc.length === 0) throw new RangeError('llama-server needs at least one rpc-server (the host\'s own, last)');
  for (const a of init.rpc) {
    // llama.cpp cannot parse IPv6 `--rpc` entries; every entry we make is a loopback tunnel or server.
    if (!/^[0-9.]+:\d+$/.test(a) && !/^[a-z0-9.-]+:\d+$/i.test(a)) throw new RangeError(`not a host:port rpc address: ${a}`);
  }
  const devices = init.devicesPerServer ?? init.rpc.map(() => 1);
  if (devices.length !== init.rpc.length || devices.some((n) => !Number.isInteger(n) || n < 1)) {
    throw new RangeError('devicesPerServer needs one positive count per rpc-server');
  }
  const shares = init.tensorSplit ?? init.rpc.map(() => 1);
  if (shares.length !== init.rpc.length || shares.some((s) => !(s >= 0) || !Number.isFinite(s)) || !shares.some((s) => s > 0)) {
    throw new RangeError(`tensorSplit needs one non-negative share per rpc-server (${init.rpc.length}), not all zero`);
  }
  // RPC devices are numbered across servers in --rpc order: RPC0.. for the first server's devices, and so on.
  const deviceNames: string[] = [];
  const split: number[] = [];
  devices.forEach((n, i) => {
    for (let d = 0; d < n; d++) {
      deviceNames.push(`RPC${deviceNames.length}`);
      split.push(shares[i]! / n);
    }
  });
  return [
    ...endpointArgs(init, port),
    '--rpc', init.rpc.join(','),
    '-dev', deviceNames.join(','),
    '-ngl', '999',
    '--tensor-split', split.map(formatShare).join(','),
    ...runtimeArgs(init, flags),
    ...(init.extraArgs ?? []),
  ];
}

function endpointArgs(init: LlamaServerCommand, port: number): string[] {
  return ['-m', init.model, '--host', '127.0.0.1', '--port', String(port)];
}

/** Memory, caches, context, threads, slots, name: everything but where the layers go. */
function runtimeArgs(init: LlamaServerCommand, flags: LlamaServerFlags): string[] {
  return [
    ...(flags.loadMode ? ['-lm', 'none'] : ['--no-mmap']),
    ...(flags.cacheRam ? ['--cache-ram', '0'] : []),
    ...(flags.fit ? ['-fit', 'off'] : []),
    '-fa', init.flashAttention ?? 'off',
    '-c', String(init.ctxSize ?? DEFAULT_CTX),
    '--metrics',
    ...(init.threads !== undefined ? ['-t', String(init.threads)] : []),
    ...(init.parallel !== undefined ? ['-np', String(init.parallel)] : []),
    // Commas separate aliases for llama.cpp: a name with one would become two.
    ...(init.alias ? ['--alias', init.alias.replace(/,/g, ' ')] : []),
    ...hardeningArgs(flags),
  ];
}

/** No origin a browser can have, no credentials. */
export const LLAMA_CORS_ORIGIN = 'https://mesh-inference.invalid';

/** Web UI, agent tools, MCP proxy off; CORS closed (each where this release has the flag; see the header). */
function hardeningArgs(flags: LlamaServerFlags): string[] {
  return [
    ...(flags.noWebui ? ['--no-webui'] : []),
    ...(flags.noAgent ? ['--no-agent'] : []),
    ...(flags.noMcpProxy ? ['--no-ui-mcp-proxy'] : []),
    ...(flags.corsOrigins ? ['--cors-origins', LLAMA_CORS_ORIGIN] : []),
    ...(flags.noCorsCredentials ? ['--no-cors-credentials'] : []),
  ];
}

/** Variables llama.cpp reads as options (or secrets it does not need) that must not reach llama-server. */
export function isLlamaOptionVariable(name: string): boolean {
  return /^LLAMA_ARG_/i.test(name) || ['LLAMA_API_KEY', 'HF_TOKEN', 'MTMD_BACKEND_DEVICE'].includes(name.toUpperCase());
}

/**
 * llama-server's environment on top of this process's: `extra` without llama.cpp's option variables, and
 * every such variable this process has set to undefined, so the child does not inherit it (Node leaves
 * undefined values out of a child's environment).
 */
export function llamaServerEnv(extra: Readonly<Record<string, string>>, inherited: NodeJS.ProcessEnv = process.env): Record<string, string | undefined> {
  const env: Record<string, string | undefined> = {};
  for (const name of Object.keys(inherited)) if (isLlamaOptionVariable(name)) env[name] = undefined;
  for (const [name, value] of Object.entries(extra)) env[name] = isLlamaOptionVariable(name) ? undefined : value;
  return env;
}

function formatShare(s: number): string {
  // Enough digits for any realistic split, without exponents llama.cpp would not parse.
  return Number(s.toFixed(6)).toString();
}

