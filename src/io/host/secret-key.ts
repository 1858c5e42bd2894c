// The node's persistent identity: a 32-byte secret key in the user's config directory (mode 0600), so the
// endpoint id survives restarts; `--key-file` points elsewhere; tests use an ephemeral key.
import { randomBytes } from 'node:crypto';
import { chmod, mkdir, open, readFile, stat } from 'node:fs/promises';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';

export class SecretKeyError extends Error {
  override name = 'SecretKeyError';
}

export interface SecretKeyInit {
  /** `--key-file`: an explicit path, created if missing. */
  readonly keyFile?: string;
  /** Overrides the environment (tests). Default `process.env`. */
  readonly env?: NodeJS.ProcessEnv;
}

export interface LoadedSecretKey {
  readonly key: Uint8Array;
  readonly path: string;
  /** True when this call created the file (a new identity). */
  readonly created: boolean;
}

/** `$XDG_CONFIG_HOME/mesh-inference/secret.key`, else `~/.config/mesh-inference/secret.key`. */
export function defaultKeyPath(env: NodeJS.ProcessEnv = process.env): string {
  const xdg = env['XDG_CONFIG_HOME'];
  const base = xdg && xdg.startsWith('/') ? xdg : join(env['HOME'] ?? homedir(), '.config');
  return join(base, 'mesh-inference', 'secret.key');
}

/** A fresh key that lives only in memory: each run is a new endpoint id. */
export function ephemeralSecretKey(): Uint8Array {
  return new Uint8Array(randomBytes(32));
}

/**
 * Reads the key file, or creates it (64 hex characters and a newline, mode 0600) when it does not exist.
 * A file that exists but is not a key is an error, never silently replaced: that would change the node's
 * identity behind the user's back.
 */
export async function loadOrCreateSecretKey(init: SecretKeyInit = {}): Promise<LoadedSecretKey> {
  const path = init.keyFile ?? defaultKeyPath(init.env);
  let text: string | undefined;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
      throw new SecretKeyError(`cannot read the key file ${path}: ${(err as Error).message}`);
    }
  }
  if (text !== undefined) {
    const key = parseKey(text, path);
    await tightenMode(path);
    return { key, path, created: false };
  }
  const key = ephemeralSecretKey();
  try {
    await mkdir(dirname(path), { recursive: true, mode: 0o700 });
    // 'wx': if another process created it meanwhile, we fail instead of overwriting its identity.
    const fh = await open(path, 'wx', 0o600);
    try {
      await fh.writeFile(Buffer.from(key).toString('hex') + '\n');
    } finally {
      await fh.close();
    }
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return loadOrCreateSecretKey(init);
    throw new SecretKeyError(`cannot create the key file ${path}: ${(err as Error).message}`);
  }
  return { key, path, created: true };
}

/** Reads the key file without creating it: null when there is none (`mesh-inference invite` needs an identity that exists). */
export async function readSecretKey(init: SecretKeyInit = {}): Promise<{ readonly key: Uint8Array; readonly path: string } | null> {
  const path = init.keyFile ?? defaultKeyPath(init.env);
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new SecretKeyError(`cannot read the key file ${path}: ${(err as Error).message}`);
  }
  return { key: parseKey(text, path), path };
}

function parseKey(text: string, path: string): Uint8Array {
  const t = text.trim();
  if (/^[0-9a-fA-F]{64}$/.test(t)) return new Uint8Array(Buffer.from(t, 'hex'));
  throw new SecretKeyError(
    `the key file ${path} does not hold a key (expected 64 hex characters, found ${t.length} characters); ` +
      'move it away to create a new identity',
  );
}

/** A key readable by others is fixed rather than refused: the node keeps working, the hole is closed. */
async function tightenMode(path: string): Promise<void> {
  try {
    const st = await stat(path);
    if ((st.mode & 0o077) !== 0) await chmod(path, 0o600);
  } catch {
    // Not ours to fix (a read-only mount, say): reading worked, and that is what the node needs.
  }
}
