// Parses and validates the `mesh-inference` command line (plus the environment variables and files it
// names) into one options object; any bad input becomes a single clear line, never a stack trace.
import { readFileSync, statSync } from 'node:fs';
import { resolve } from 'node:path';
import { parseArgs } from 'node:util';
import type { LevelWithSilent } from 'pino';
import type { ServeSettings } from '../../machines/kv-cache.ts';
import type { RolePreference } from '../../machines/mesh-types.ts';
import { decodeExpiringInvite, decodeInviteToken, EXPIRING_INVITE_VERSION, InviteTokenError, type ExpiringInvite, type InviteToken } from '../wire/invite-token.ts';
import { API_KEY_ENV, DEFAULT_API_PORT, HELP_TEXT, JOIN_ENV } from './cli-help.ts';
import {
  CliUsageError,
  expandHome,
  nonEmpty,
  parseAllowedHosts,
  parseDataPath,
  parseDuration,
  parseInspect,
  parseMaxVram,
  parseName,
  parsePort,
  parseRelay,
  parseRole,
  parseServe,
  parseStun,
  type DataPathMode,
  type InspectTarget,
  type RelayMode,
} from './cli-values.ts';
import { isLogLevel, LOG_LEVELS } from './logger.ts';

// The help text and the value parsers live in cli-help.ts and cli-values.ts; their readers may import them from here too.
export { API_KEY_ENV, DEFAULT_API_PORT, HELP_TEXT, JOIN_ENV } from './cli-help.ts';
export { CliUsageError, parseByteSize, parseDuration, type DataPathMode, type InspectTarget, type RelayMode } from './cli-values.ts';

export interface CliOptions {
  /** Absolute path of a readable GGUF file; null for a lite client. */
  readonly model: string | null;
  /** Decoded invite tokens, from `--join`, then `--join-file`, then the environment; duplicates dropped. */
  readonly joins: readonly InviteToken[];
  /** Expiring invites (`mi2`, no secret inside) from the same sources; absent when there are none. */
  readonly invites?: readonly ExpiringInvite[];
  readonly role: RolePreference;
  /** API port (0 = any free port, for tests). */
  readonly port: number;
  /** Where the API listens: loopback unless `--listen-all`. */
  readonly apiHost: '127.0.0.1' | '0.0.0.0';
  /** Fixed UDP port for QUIC, so a router's port-forward works; null = any. */
  readonly bindPort: number | null;
  /** TCP port of the direct data path (TLS); null = the --bind-port number when given, else any. */
  readonly dataPort: number | null;
  /** `auto`: tunnels try a direct TCP + TLS connection first and fall back to QUIC; `quic`: QUIC only. */
  readonly dataPath: DataPathMode;
  /** Overrides detected VRAM; null = detect. */
  readonly maxVramBytes: number | null;
  readonly name: string;
  readonly apiKey: string | null;
  /** Extra names the API answers to in `Host` (`--allowed-host`, repeatable); loopback names always. */
  readonly allowedHosts: readonly string[];
  readonly logLevel: LevelWithSilent;
  readonly inspect: InspectTarget | null;
  readonly relay: RelayMode;
  readonly keyFile: string | null;
  /** `--new-mesh`: start a fresh mesh even where the key file's mesh file remembers one. */
  readonly newMesh: boolean;
  /** `--show-secret-token`: also print the mi1 token at start (it carries the mesh secret and never expires). */
  readonly showSecretToken: boolean;
  /** STUN servers ("host:port") to ask for the public address; empty = none (`--stun none`); null = the defaults. */
  readonly stun: readonly string[] | null;
  /** `--ctx-size`, `--parallel`, `--flash-attn`, `--cache-type`: how this node's llama-server would serve (and the KV cache it sizes plans for). */
  readonly serve: ServeSettings;
}

/** $MESH_INFERENCE_CTX: the default of --ctx-size (the demo, tests and benchmarks set it). */
export const CTX_ENV = 'MESH_INFERENCE_CTX';

export type CliParse =
  | { readonly kind: 'run'; readonly options: CliOptions }
  /** `mesh-inference invite`: print an expiring invite made from the key file and its mesh file. */
  | { readonly kind: 'invite'; readonly keyFile: string | null; readonly ttlMs: number }
  /** `mesh-inference rotate`: ask the running node to rotate the mesh secret, removing the named members. */
  | { readonly kind: 'rotate'; readonly keyFile: string | null; readonly port: number; readonly apiKey: string | null; readonly remove: readonly string[] }
  /**
   * `mesh-inference plan --model FILE [--join TOKEN]...`: which node would get which layers if this machine
   * joined (src/node/plan-preview.ts); with --join it looks at the mesh as an observer that is never a candidate.
   */
  | { readonly kind: 'plan'; readonly options: CliOptions; readonly json: boolean; readonly waitMs: number }
  /** `mesh-inference inspector [--port N]`: a local relay for `--inspect ws://127.0.0.1:N` (src/io/host/inspector-command.ts). */
  | { readonly kind: 'inspector'; readonly port: number }
  /** No arguments at all: the composition root runs the local demo mesh. */
  | { readonly kind: 'demo' }
  | { readonly kind: 'help'; readonly text: string }
  /** One line for the user; the CLI prints it to stderr and exits with status 2. */
  | { readonly kind: 'error'; readonly message: string };

const OPTIONS = {
  model: { type: 'string' },
  join: { type: 'string', multiple: true },
  'join-file': { type: 'string' },
  role: { type: 'string' },
  client: { type: 'boolean' },
  port: { type: 'string' },
  'bind-port': { type: 'string' },
  'data-port': { type: 'string' },
  'data-path': { type: 'string' },
  'max-vram': { type: 'string' },
  name: { type: 'string' },
  'listen-all': { type: 'boolean' },
  'api-key': { type: 'string' },
  'allowed-host': { type: 'string', multiple: true },
  'log-level': { type: 'string' },
  inspect: { type: 'string' },
  relay: { type: 'string' },
  'key-file': { type: 'string' },
  'new-mesh': { type: 'boolean' },
  'show-secret-token': { type: 'boolean' },
  stun: { type: 'string', multiple: true },
  'ctx-size': { type: 'string' },
  parallel: { type: 'string' },
  'flash-attn': { type: 'string' },
  'cache-type': { type: 'string' },
  help: { type: 'boolean', short: 'h' },
} as const;

/** `plan`'s own flags, besides the node's. */
const PLAN_OPTIONS = { ...OPTIONS, json: { type: 'boolean' }, wait: { type: 'string' } } as const;

/** Parses `argv` (without node and script). Never throws: every problem comes back as `kind: 'error'`. */
export function parseCliArgs(argv: readonly string[], env: NodeJS.ProcessEnv = process.env): CliParse {
  try {
    return parseOrThrow(argv, env);
  } catch (err) {
    if (err instanceof CliUsageError) return { kind: 'error', message: err.message };
    throw err;
  }
}

function parseOrThrow(argv: readonly string[], env: NodeJS.ProcessEnv): CliParse {
  if (argv.length === 0) return { kind: 'demo' };
  if (argv[0] === 'invite') return parseInviteCommand(argv.slice(1));
  if (argv[0] === 'rotate') return parseRotateCommand(argv.slice(1), env);
  if (argv[0] === 'plan') return parsePlanCommand(argv.slice(1), env);
  if (argv[0] === 'inspector') return parseInspectorCommand(argv.slice(1));
  let values: ReturnType<typeof parseArgs<{ options: typeof OPTIONS; strict: true; allowPositionals: false }>>['values'];
  try {
    ({ values } = parseArgs({ args: withInspectValue(argv), options: OPTIONS, strict: true, allowPositionals: false }));
  } catch (err) {
    throw new CliUsageError(`${describeParseArgsError(err)} (see --help)`);
  }
  if (values.help) return { kind: 'help', text: HELP_TEXT };
  return { kind: 'run', options: runOptions(values, env) };
}

function parseInspectorCommand(argv: readonly string[]): CliParse {
  let values: { port?: string; help?: boolean };
  try {
    ({ values } = parseArgs({ args: [...argv], options: { port: { type: 'string' }, help: { type: 'boolean', short: 'h' } }, strict: true, allowPositionals: false }));
  } catch (err) {
    throw new CliUsageError(`inspector: ${describeParseArgsError(err)} (it takes --port N)`);
  }
  if (values.help) return { kind: 'help', text: HELP_TEXT };
  return { kind: 'inspector', port: values.port === undefined ? 8080 : parsePort('--port', values.port, 1) };
}

type RunValues = ReturnType<typeof parseArgs<{ options: typeof OPTIONS; strict: true; allowPositionals: false }>>['values'];

/** `mesh-inference plan --model FILE [--join TOKEN]... [--max-vram SIZE] [--ctx-size N]... [--json] [--wait 20s]`. */
function parsePlanCommand(argv: readonly string[], env: NodeJS.ProcessEnv): CliParse {
  let values: ReturnType<typeof parseArgs<{ options: typeof PLAN_OPTIONS; strict: true; allowPositionals: false }>>['values'];
  try {
    ({ values } = parseArgs({ args: [...argv], options: PLAN_OPTIONS, strict: true, allowPositionals: false }));
  } catch (err) {
    throw new CliUsageError(`plan: ${describeParseArgsError(err)} (see --help)`);
  }
  if (values.help) return { kind: 'help', text: HELP_TEXT };
  if (values.model === undefined) throw new CliUsageError('plan: --model FILE is required (the model this machine would serve)');
  if (values.client || values.role === 'client') throw new CliUsageError('plan: a lite client takes no layers; preview a node with --model');
  // Its own output is the report: the observer's logs only from warnings up unless asked.
  const { json, wait, ...rest } = { ...values, 'log-level': values['log-level'] ?? 'warn' };
  const waitMs = wait === undefined ? 20_000 : parseDuration('--wait', wait);
  return { kind: 'plan', options: runOptions(rest as RunValues, env), json: json ?? false, waitMs };
}

function runOptions(values: RunValues, env: NodeJS.ProcessEnv): CliOptions {

  const role = parseRole(values.role, values.client ?? false);
  const model = values.model === undefined ? null : checkModelPath(values.model);
  const { joins, invites } = collectJoins(values.join ?? [], values['join-file'], env[JOIN_ENV]);

  if (role === 'client') {
    if (model !== null) throw new CliUsageError('--model: a lite client (--client / --role client) holds no model; drop one of them');
    if (joins.length === 0 && invites.length === 0) throw new CliUsageError(`a lite client needs a mesh to join: pass --join TOKEN (or set ${JOIN_ENV})`);
  } else if (model === null) {
    throw new CliUsageError(`--model PATH is required for --role ${role} (a node without the model is a lite client: --client)`);
  }

  const apiKey = values['api-key'] ?? env[API_KEY_ENV] ?? null;
  if (apiKey !== null && apiKey.trim() === '') throw new CliUsageError('--api-key: the key is empty');

  const logLevel = values['log-level'] ?? 'info';
  if (!isLogLevel(logLevel)) throw new CliUsageError(`--log-level: "${logLevel}" is not one of ${LOG_LEVELS.join(', ')}`);

  const options: CliOptions = {
    model,
    joins,
    role,
    port: values.port === undefined ? DEFAULT_API_PORT : parsePort('--port', values.port, 0),
    apiHost: values['listen-all'] ? '0.0.0.0' : '127.0.0.1',
    bindPort: values['bind-port'] === undefined ? null : parsePort('--bind-port', values['bind-port'], 1),
    dataPort: values['data-port'] === undefined ? null : parsePort('--data-port', values['data-port'], 1),
    dataPath: parseDataPath(values['data-path']),
    maxVramBytes: values['max-vram'] === undefined ? null : parseMaxVram(values['max-vram']),
    name: parseName(values.name),
    apiKey,
    allowedHosts: parseAllowedHosts(values['allowed-host'] ?? []),
    logLevel,
    inspect: parseInspect(values.inspect),
    relay: parseRelay(values.relay),
    keyFile: values['key-file'] === undefined ? null : resolve(nonEmpty('--key-file', values['key-file'])),
    stun: parseStun(values.stun),
    newMesh: values['new-mesh'] ?? false,
    showSecretToken: values['show-secret-token'] ?? false,
    serve: parseServe({ ctx: values['ctx-size'], parallel: values.parallel, flashAttn: values['flash-attn'], cacheType: values['cache-type'] }, env[CTX_ENV]),
    ...(invites.length > 0 ? { invites } : {}),
  };
  if (options.newMesh && (joins.length > 0 || invites.length > 0)) throw new CliUsageError('--new-mesh contradicts --join: a node starts a fresh mesh or joins one');
  return options;
}

/**
 * `--inspect` takes an optional value, which parseArgs cannot express: a bare `--inspect` (followed by
 * nothing or by another flag) becomes `--inspect=sky`; `--inspect URL` and `--inspect=URL` keep the URL.
 */
function withInspectValue(argv: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--inspect') {
      const next = argv[i + 1];
      if (next !== undefined && !next.startsWith('-')) {
        out.push(`--inspect=${next}`);
        i++;
      } else {
        out.push('--inspect=sky');
      }
    } else {
      out.push(arg);
    }
  }
  return out;
}

function describeParseArgsError(err: unknown): string {
  const e = err as { code?: string; message?: string };
  const msg = String(e.message ?? err).split('\n')[0]!;
  switch (e.code) {
    case 'ERR_PARSE_ARGS_UNKNOWN_OPTION': {
      const flag = /'([^']+)'/.exec(msg)?.[1] ?? msg;
      return `unknown option ${flag}`;
    }
    case 'ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL': {
      const arg = /'([^']+)'/.exec(msg)?.[1] ?? msg;
      return `unexpected argument "${arg}" (every value follows its flag, e.g. --model PATH)`;
    }
    case 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE': {
      const flag = /Option '([^' ]+)/.exec(msg)?.[1];
      if (flag !== undefined && msg.includes('argument missing')) return `${flag.replace(/^-h, /, '')} needs a value`;
      if (flag !== undefined && msg.includes('does not take an argument')) return `${flag} takes no value`;
      return msg;
    }
    default:
      return msg;
  }
}

function checkModelPath(raw: string): string {
  const path = resolve(expandHome(nonEmpty('--model', raw)));
  let st;
  try {
    st = statSync(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new CliUsageError(`--model: ${code === 'ENOENT' ? 'no such file' : `cannot read (${code})`}: ${path}`);
  }
  if (!st.isFile()) throw new CliUsageError(`--model: not a file: ${path}`);
  return path;
}

function collectJoins(flags: readonly string[], file: string | undefined, envValue: string | undefined): { joins: InviteToken[]; invites: ExpiringInvite[] } {
  const sources: { text: string; from: string }[] = [];
  for (const t of flags) sources.push({ text: t, from: '--join' });
  if (file !== undefined) {
    const path = resolve(expandHome(nonEmpty('--join-file', file)));
    let text: string;
    try {
      text = readFileSync(path, 'utf8');
    } catch (err) {
      throw new CliUsageError(`--join-file: cannot read ${path} (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
    }
    const tokens = text
      .split('\n')
      .map((l) => l.replace(/#.*/, '').trim())
      .filter((l) => l !== '');
    if (tokens.length === 0) throw new CliUsageError(`--join-file: no token in ${path}`);
    for (const t of tokens) sources.push({ text: t, from: `--join-file ${path}` });
  }
  if (envValue !== undefined && envValue.trim() !== '') {
    for (const t of envValue.split(/[\s,]+/).filter((s) => s !== '')) sources.push({ text: t, from: `$${JOIN_ENV}` });
  }
  const seen = new Set<string>();
  const joins: InviteToken[] = [];
  const invites: ExpiringInvite[] = [];
  let meshId: string | null = null;
  for (const { text, from } of sources) {
    const trimmed = text.trim();
    if (seen.has(trimmed)) continue;
    seen.add(trimmed);
    let invite: InviteToken | ExpiringInvite;
    try {
      invite = trimmed.startsWith(`mi${EXPIRING_INVITE_VERSION}`) ? decodeExpiringInvite(trimmed) : decodeInviteToken(trimmed);
    } catch (err) {
      if (err instanceof InviteTokenError) throw new CliUsageError(`${from}: ${err.message}`);
      throw err;
    }
    if (meshId !== null && meshId !== invite.meshId) {
      throw new CliUsageError(`${from}: this token is for another mesh (${invite.meshId.slice(0, 8)}…, not ${meshId.slice(0, 8)}…); a node joins one mesh`);
    }
    meshId = invite.meshId;
    if (invite.version === EXPIRING_INVITE_VERSION) invites.push(invite as ExpiringInvite);
    else joins.push(invite as InviteToken);
  }
  return { joins, invites };
}

/** `mesh-inference invite [--ttl DURATION] [--key-file PATH]`. */
function parseInviteCommand(argv: readonly string[]): CliParse {
  let values: { ttl?: string; 'key-file'?: string; help?: boolean };
  try {
    ({ values } = parseArgs({ args: [...argv], options: { ttl: { type: 'string' }, 'key-file': { type: 'string' }, help: { type: 'boolean', short: 'h' } }, strict: true, allowPositionals: false }));
  } catch (err) {
    throw new CliUsageError(`invite: ${describeParseArgsError(err)} (it takes --ttl DURATION and --key-file PATH)`);
  }
  if (values.help) return { kind: 'help', text: HELP_TEXT };
  const ttlMs = values.ttl === undefined ? 24 * 3600_000 : parseDuration('--ttl', values.ttl);
  if (ttlMs < 1_000 || ttlMs > 365 * 24 * 3600_000) throw new CliUsageError(`--ttl: an invite lives between 1s and 365d (got "${values.ttl}")`);
  return { kind: 'invite', keyFile: values['key-file'] === undefined ? null : resolve(expandHome(nonEmpty('--key-file', values['key-file']))), ttlMs };
}

/** `mesh-inference rotate [--remove ID|NAME]... [--key-file PATH] [--port N] [--api-key KEY]`. */
function parseRotateCommand(argv: readonly string[], env: NodeJS.ProcessEnv): CliParse {
  let values: { remove?: string[]; 'key-file'?: string; port?: string; 'api-key'?: string; help?: boolean };
  try {
    ({ values } = parseArgs({
      args: [...argv],
      options: { remove: { type: 'string', multiple: true }, 'key-file': { type: 'string' }, port: { type: 'string' }, 'api-key': { type: 'string' }, help: { type: 'boolean', short: 'h' } },
      strict: true,
      allowPositionals: false,
    }));
  } catch (err) {
    throw new CliUsageError(`rotate: ${describeParseArgsError(err)} (it takes --remove ID|NAME, --key-file PATH, --port N and --api-key KEY)`);
  }
  if (values.help) return { kind: 'help', text: HELP_TEXT };
  return {
    kind: 'rotate',
    keyFile: values['key-file'] === undefined ? null : resolve(expandHome(nonEmpty('--key-file', values['key-file']))),
    port: values.port === undefined ? DEFAULT_API_PORT : parsePort('--port', values.port, 1),
    apiKey: values['api-key'] ?? env[API_KEY_ENV] ?? null,
    remove: (values.remove ?? []).map((r) => nonEmpty('--remove', r)),
  };
}

/**
 * For the composition root: returns what to run, or prints help (stdout, exit 0) or the one-line error
 * (stderr, exit 2, the usual status for a usage error) and exits.
 */
export function parseCliArgsOrExit(argv: readonly string[], env: NodeJS.ProcessEnv = process.env): Exclude<CliParse, { kind: 'help' } | { kind: 'error' }> {
  const parsed = parseCliArgs(argv, env);
  if (parsed.kind === 'help') {
    process.stdout.write(parsed.text);
    process.exit(0);
  }
  if (parsed.kind === 'error') {
    process.stderr.write(`mesh-inference: ${parsed.message}\n`);
    process.exit(2);
  }
  return parsed;
}
