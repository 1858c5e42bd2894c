// Parses and validates the `mesh-inference` command line (plus the environment variables and files it
// names) into one options object; any bad input becomes a single clear line, never a stack trace.
import { readFileSync, statSync } from 'node:fs';
import { hostname } from 'node:os';
import { resolve } from 'node:path';
import { parseArgs } from 'node:util';
import type { LevelWithSilent } from 'pino';
import type { RolePreference } from '../../machines/mesh-types.ts';
import { decodeExpiringInvite, decodeInviteToken, EXPIRING_INVITE_VERSION, InviteTokenError, type ExpiringInvite, type InviteToken } from '../wire/invite-token.ts';
import { isLogLevel, LOG_LEVELS } from './logger.ts';

export const DEFAULT_API_PORT = 9337;
/** Environment variables read for services, where flags end up in `ps` output or unit files. */
export const JOIN_ENV = 'MESH_INFERENCE_JOIN';
export const API_KEY_ENV = 'MESH_INFERENCE_API_KEY';

export type InspectTarget = { readonly kind: 'sky' } | { readonly kind: 'websocket'; readonly url: string };
export type DataPathMode = 'auto' | 'quic';
export type RelayMode = { readonly kind: 'default' } | { readonly kind: 'none' } | { readonly kind: 'custom'; readonly url: string };

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
  /** STUN servers ("host:port") to ask for the public address; empty = none (`--stun none`); null = the defaults. */
  readonly stun: readonly string[] | null;
}

export type CliParse =
  | { readonly kind: 'run'; readonly options: CliOptions }
  /** `mesh-inference invite`: print an expiring invite made from the key file and its mesh file. */
  | { readonly kind: 'invite'; readonly keyFile: string | null; readonly ttlMs: number }
  /** No arguments at all: the composition root runs the local demo mesh. */
  | { readonly kind: 'demo' }
  | { readonly kind: 'help'; readonly text: string }
  /** One line for the user; the CLI prints it to stderr and exits with status 2. */
  | { readonly kind: 'error'; readonly message: string };

export const HELP_TEXT = `mesh-inference: pool the GPUs (or CPUs) of several machines into one OpenAI-compatible LLM API.

Usage: mesh-inference [options]
       mesh-inference invite [--ttl 24h] [--key-file PATH]

  --model PATH          GGUF model file on this machine (every serving node needs its own copy)
  --join TOKEN          join the mesh of this invite token (repeatable; also $${JOIN_ENV},
                        several tokens separated by whitespace or commas): an mi2 token from
                        \`mesh-inference invite\` expires; an mi1 token carries the mesh secret forever
  --join-file PATH      read invite tokens from a file, one per line ('#' starts a comment)
  --role ROLE           auto | host | worker | client (default auto: may host or work)
  --client              short for --role client: a lite client with no model, it only proxies the API
  --port N              API port (default ${DEFAULT_API_PORT}; 0 picks a free one)
  --listen-all          serve the API on every interface instead of 127.0.0.1 (use --api-key too)
  --api-key KEY         require "Authorization: Bearer KEY" on every API route but /health
                        (also $${API_KEY_ENV})
  --allowed-host NAME   also answer requests whose Host header names NAME (repeatable); the API
                        answers only loopback names and the addresses it listens on, and refuses
                        others with 421 (a web page must not reach it by DNS rebinding)
  --bind-port N         fixed port for the mesh, so a router's port-forwarding rule can reach it:
                        forward UDP (QUIC) and TCP (the direct data path) on this port
  --data-port N         TCP port of the direct data path (default: the --bind-port number when
                        given, else any free port)
  --data-path MODE      auto (default: a direct TCP + TLS connection between two nodes where one can
                        reach the other, else QUIC) | quic (never use TCP)
  --max-vram SIZE       memory this node offers to the mesh, e.g. 8G, 512MiB, 24GB (default: detected)
  --name NAME           name shown to the other nodes (default: the host name)
  --relay MODE          default (iroh's public relays) | none (LAN and tests) | a relay URL
  --stun HOST:PORT      STUN server for the public address (repeatable; "none" to skip)
  --key-file PATH       where this node's secret key lives (default: in the user's config directory);
                        next to it, PATH.mesh.json remembers the mesh (id, secret, known peers), so the
                        same command line rejoins it after a restart
  --new-mesh            start a fresh mesh instead of rejoining the remembered one
  --log-level LEVEL     ${LOG_LEVELS.join(' | ')} (default info)
  --inspect [URL]       send the live state machines to the Stately inspector (online), or to the
                        WebSocket inspector at URL (ws://...)
  -h, --help            this text

\`mesh-inference invite\` prints an expiring invite (mi2) for the mesh this key file's node belongs to
(read from PATH.mesh.json; no running node needed): it carries no mesh secret, and after --ttl (default
24h; e.g. 30m, 2h, 7d) its inviter refuses it. The node that made it must be running to admit the joiner.

With no arguments at all it runs a demo: a 3-node mesh on loopback with a generated model whose
weights are random (so its answers are gibberish), serving the API on port ${DEFAULT_API_PORT}.

Examples:
  mesh-inference --model ~/models/glm.gguf                  # start a mesh; prints an invite token
  mesh-inference invite --ttl 1h                            # an invite that expires in an hour
  mesh-inference --model ~/models/glm.gguf --join mi2...    # add this machine's GPU to it
  mesh-inference --client --join mi1...                     # use it from a laptop without the model
  mesh-inference --model m.gguf --max-vram 6G --role worker # lend 6 GiB, never host
  curl localhost:${DEFAULT_API_PORT}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{"messages":[{"role":"user","content":"hi"}]}'
`;

/** A bad command line; `message` is the one line shown to the user. */
export class CliUsageError extends Error {
  override readonly name = 'CliUsageError';
}

const ROLES: readonly RolePreference[] = ['auto', 'host', 'worker', 'client'];

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
  stun: { type: 'string', multiple: true },
  help: { type: 'boolean', short: 'h' },
} as const;

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
  let values: ReturnType<typeof parseArgs<{ options: typeof OPTIONS; strict: true; allowPositionals: false }>>['values'];
  try {
    ({ values } = parseArgs({ args: withInspectValue(argv), options: OPTIONS, strict: true, allowPositionals: false }));
  } catch (err) {
    throw new CliUsageError(`${describeParseArgsError(err)} (see --help)`);
  }
  if (values.help) return { kind: 'help', text: HELP_TEXT };

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
    ...(invites.length > 0 ? { invites } : {}),
  };
  if (options.newMesh && (joins.length > 0 || invites.length > 0)) throw new CliUsageError('--new-mesh contradicts --join: a node starts a fresh mesh or joins one');
  return { kind: 'run', options };
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

function parseRole(role: string | undefined, client: boolean): RolePreference {
  if (role === undefined) return client ? 'client' : 'auto';
  if (!(ROLES as readonly string[]).includes(role)) {
    throw new CliUsageError(`--role: "${role}" is not one of ${ROLES.join(', ')}`);
  }
  if (client && role !== 'client') throw new CliUsageError(`--client contradicts --role ${role}`);
  return role as RolePreference;
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

function expandHome(p: string): string {
  const home = process.env['HOME'];
  return home !== undefined && (p === '~' || p.startsWith('~/')) ? home + p.slice(1) : p;
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

const DURATION_UNITS: Record<string, number> = { s: 1_000, m: 60_000, h: 3600_000, d: 24 * 3600_000 };

/** "90s", "30m", "24h", "7d", "1.5h" (a bare number is seconds). Throws CliUsageError naming `flag`. */
export function parseDuration(flag: string, raw: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$/i.exec(raw);
  if (m === null) throw new CliUsageError(`${flag}: "${raw}" is not a duration (examples: 30m, 24h, 7d)`);
  return Math.round(Number(m[1]) * DURATION_UNITS[(m[2] || 's').toLowerCase()]!);
}

function parsePort(flag: string, raw: string, min: number): number {
  if (!/^\d+$/.test(raw.trim())) throw new CliUsageError(`${flag}: "${raw}" is not a port number`);
  const n = Number(raw.trim());
  if (n < min || n > 65535) throw new CliUsageError(`${flag}: ${n} is out of range (${min}-65535)`);
  return n;
}

const UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  k: 1024,
  kib: 1024,
  kb: 1000,
  m: 1024 ** 2,
  mib: 1024 ** 2,
  mb: 1000 ** 2,
  g: 1024 ** 3,
  gib: 1024 ** 3,
  gb: 1000 ** 3,
  t: 1024 ** 4,
  tib: 1024 ** 4,
  tb: 1000 ** 4,
};

/**
 * A byte size as people write it: `8G`, `8GiB` (both 2^30), `8GB` (10^9, as disk makers count), `512MiB`,
 * `1.5g`, or plain bytes. Throws CliUsageError naming `flag`.
 */
export function parseByteSize(raw: string, flag = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)\s*$/i.exec(raw);
  const unit = m?.[2]?.toLowerCase() ?? '';
  if (m === null || !(unit in UNITS)) {
    throw new CliUsageError(`${flag}: "${raw}" is not a size (examples: 8G, 512MiB, 24GB)`);
  }
  return Math.floor(Number(m[1]) * UNITS[unit]!);
}

function parseMaxVram(raw: string): number {
  const bytes = parseByteSize(raw, '--max-vram');
  // A bare small number is almost surely a forgotten unit ("8" meaning 8 GiB), not 8 bytes.
  if (bytes < 1024 ** 2) {
    throw new CliUsageError(`--max-vram: "${raw}" is under 1 MiB; give a unit, e.g. ${raw.trim()}G`);
  }
  return bytes;
}

function parseName(raw: string | undefined): string {
  const name = (raw ?? hostname()).trim();
  if (name === '') throw new CliUsageError('--name: the name is empty');
  if (name.length > 64) throw new CliUsageError(`--name: at most 64 characters (got ${name.length})`);
  if (/[\p{Cc}]/u.test(name)) throw new CliUsageError('--name: control characters are not allowed');
  return name;
}

function parseInspect(raw: string | undefined): InspectTarget | null {
  if (raw === undefined) return null;
  if (raw === 'sky') return { kind: 'sky' };
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new CliUsageError(`--inspect: "${raw}" is not a URL (expected ws://host:port, or no value for the online inspector)`);
  }
  if (url.protocol !== 'ws:' && url.protocol !== 'wss:') {
    throw new CliUsageError(`--inspect: "${raw}" must be a ws:// or wss:// URL`);
  }
  return { kind: 'websocket', url: raw };
}

/** `--allowed-host NAME`: a DNS name or an IP address (IPv6 with or without brackets), no port, no scheme. */
function parseAllowedHosts(raw: readonly string[]): string[] {
  return raw.map((r) => {
    const name = r.trim().toLowerCase();
    const bare = name.startsWith('[') && name.endsWith(']') ? name.slice(1, -1) : name;
    if (!/^[a-z0-9]([a-z0-9_.-]*[a-z0-9])?\.?$/.test(bare) && !/^[0-9a-f:.]+$/.test(bare)) {
      throw new CliUsageError(`--allowed-host: "${r}" is not a host name or an IP address (no scheme, no port)`);
    }
    return bare;
  });
}

function parseRelay(raw: string | undefined): RelayMode {
  if (raw === undefined || raw === 'default') return { kind: 'default' };
  if (raw === 'none') return { kind: 'none' };
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new CliUsageError(`--relay: "${raw}" is not "default", "none" or a relay URL (https://...)`);
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    throw new CliUsageError(`--relay: "${raw}" must be an http(s):// URL`);
  }
  return { kind: 'custom', url: raw };
}

function parseStun(raw: readonly string[] | undefined): readonly string[] | null {
  if (raw === undefined) return null;
  if (raw.includes('none')) {
    if (raw.length > 1) throw new CliUsageError('--stun none cannot be combined with STUN servers');
    return [];
  }
  for (const s of raw) {
    const m = /^(\[[0-9a-fA-F:.]+\]|[^\s:[\]]+):(\d+)$/.exec(s);
    const port = m === null ? NaN : Number(m[2]);
    if (m === null || !(port >= 1 && port <= 65535)) {
      throw new CliUsageError(`--stun: "${s}" is not HOST:PORT (e.g. stun.l.google.com:19302)`);
    }
  }
  return raw;
}

function nonEmpty(flag: string, s: string): string {
  if (s.trim() === '') throw new CliUsageError(`${flag}: the value is empty`);
  return s;
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

function parseDataPath(raw: string | undefined): DataPathMode {
  if (raw === undefined || raw === 'auto') return 'auto';
  if (raw === 'quic') return 'quic';
  throw new CliUsageError(`--data-path: "${raw}" is not "auto" or "quic"`);
}
