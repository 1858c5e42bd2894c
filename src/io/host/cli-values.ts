// The command line's value parsers (role, ports, sizes, durations, name, hosts, inspect, relay, STUN, data path, serving settings).
import { hostname } from 'node:os';
import type { RolePreference } from '../../machines/mesh-types.ts';
import { DEFAULT_SERVE, isKvCacheType, KV_CACHE_TYPES, needsFlashAttention, type ServeSettings } from '../../machines/kv-cache.ts';

export type InspectTarget = { readonly kind: 'sky' } | { readonly kind: 'websocket'; readonly url: string };
export type DataPathMode = 'auto' | 'quic';
export type RelayMode = { readonly kind: 'default' } | { readonly kind: 'none' } | { readonly kind: 'custom'; readonly url: string };

/** A bad command line; `message` is the one line shown to the user. */
export class CliUsageError extends Error {
  override readonly name = 'CliUsageError';
}

const ROLES: readonly RolePreference[] = ['auto', 'host', 'worker', 'client'];

export function parseRole(role: string | undefined, client: boolean): RolePreference {
  if (role === undefined) return client ? 'client' : 'auto';
  if (!(ROLES as readonly string[]).includes(role)) {
    throw new CliUsageError(`--role: "${role}" is not one of ${ROLES.join(', ')}`);
  }
  if (client && role !== 'client') throw new CliUsageError(`--client contradicts --role ${role}`);
  return role as RolePreference;
}

const DURATION_UNITS: Record<string, number> = { s: 1_000, m: 60_000, h: 3600_000, d: 24 * 3600_000 };

/** "90s", "30m", "24h", "7d", "1.5h" (a bare number is seconds). Throws CliUsageError naming `flag`. */
export function parseDuration(flag: string, raw: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$/i.exec(raw);
  if (m === null) throw new CliUsageError(`${flag}: "${raw}" is not a duration (examples: 30m, 24h, 7d)`);
  return Math.round(Number(m[1]) * DURATION_UNITS[(m[2] || 's').toLowerCase()]!);
}

export function parsePort(flag: string, raw: string, min: number): number {
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

export function parseMaxVram(raw: string): number {
  const bytes = parseByteSize(raw, '--max-vram');
  // A bare small number is almost surely a forgotten unit ("8" meaning 8 GiB), not 8 bytes.
  if (bytes < 1024 ** 2) {
    throw new CliUsageError(`--max-vram: "${raw}" is under 1 MiB; give a unit, e.g. ${raw.trim()}G`);
  }
  return bytes;
}

export function parseName(raw: string | undefined): string {
  const name = (raw ?? hostname()).trim();
  if (name === '') throw new CliUsageError('--name: the name is empty');
  if (name.length > 64) throw new CliUsageError(`--name: at most 64 characters (got ${name.length})`);
  if (/[\p{Cc}]/u.test(name)) throw new CliUsageError('--name: control characters are not allowed');
  return name;
}

export function parseInspect(raw: string | undefined): InspectTarget | null {
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
export function parseAllowedHosts(raw: readonly string[]): string[] {
  return raw.map((r) => {
    const name = r.trim().toLowerCase();
    const bare = name.startsWith('[') && name.endsWith(']') ? name.slice(1, -1) : name;
    if (!/^[a-z0-9]([a-z0-9_.-]*[a-z0-9])?\.?$/.test(bare) && !/^[0-9a-f:.]+$/.test(bare)) {
      throw new CliUsageError(`--allowed-host: "${r}" is not a host name or an IP address (no scheme, no port)`);
    }
    return bare;
  });
}

export function parseRelay(raw: string | undefined): RelayMode {
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

export function parseStun(raw: readonly string[] | undefined): readonly string[] | null {
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

export function nonEmpty(flag: string, s: string): string {
  if (s.trim() === '') throw new CliUsageError(`${flag}: the value is empty`);
  return s;
}

export function parseDataPath(raw: string | undefined): DataPathMode {
  if (raw === undefined || raw === 'auto') return 'auto';
  if (raw === 'quic') return 'quic';
  throw new CliUsageError(`--data-path: "${raw}" is not "auto" or "quic"`);
}

export function expandHome(p: string): string {
  const home = process.env['HOME'];
  return home !== undefined && (p === '~' || p.startsWith('~/')) ? home + p.slice(1) : p;
}

/**
 * `--ctx-size N` (tokens of context per request; `k` suffix allowed: 32k), `--parallel N` (slots),
 * `--flash-attn on|off|auto`, `--cache-type TYPE` (K and V): the serving settings of the plans this node
 * would host. `defaultCtx` is $MESH_INFERENCE_CTX's value where set. A quantized cache needs flash attention.
 */
export function parseServe(
  raw: { ctx?: string; parallel?: string; flashAttn?: string; cacheType?: string },
  defaultCtx: string | undefined,
): ServeSettings {
  const ctxRaw = raw.ctx ?? (defaultCtx !== undefined && defaultCtx !== '' ? defaultCtx : undefined);
  const ctxFlag = raw.ctx !== undefined ? '--ctx-size' : '$MESH_INFERENCE_CTX';
  const ctxSize = ctxRaw === undefined ? DEFAULT_SERVE.ctxSize : positiveCount(ctxFlag, ctxRaw, 1 << 24, true);
  const parallel = raw.parallel === undefined ? DEFAULT_SERVE.parallel : positiveCount('--parallel', raw.parallel, 256, false);
  const flashAttn = raw.flashAttn ?? DEFAULT_SERVE.flashAttn;
  if (flashAttn !== 'on' && flashAttn !== 'off' && flashAttn !== 'auto') throw new CliUsageError(`--flash-attn: "${flashAttn}" is not one of on, off, auto`);
  const cacheType = raw.cacheType ?? DEFAULT_SERVE.cacheType;
  if (!isKvCacheType(cacheType)) throw new CliUsageError(`--cache-type: "${cacheType}" is not one of ${Object.keys(KV_CACHE_TYPES).join(', ')}`);
  if (needsFlashAttention(cacheType) && flashAttn !== 'on') {
    throw new CliUsageError(`--cache-type ${cacheType}: a quantized KV cache needs --flash-attn on (llama.cpp quantizes the V cache only with flash attention)`);
  }
  return { ctxSize, parallel, flashAttn, cacheType };
}

function positiveCount(flag: string, raw: string, max: number, kSuffix: boolean): number {
  const m = (kSuffix ? /^\s*(\d+)\s*(k?)\s*$/i : /^\s*(\d+)()\s*$/).exec(raw);
  const n = m === null ? NaN : Number(m[1]) * (m[2] === '' ? 1 : 1024);
  if (!Number.isSafeInteger(n) || n < 1 || n > max) throw new CliUsageError(`${flag}: "${raw}" is not a whole number from 1 to ${max}${kSuffix ? ' (e.g. 4096, 32k)' : ''}`);
  return n;
}
