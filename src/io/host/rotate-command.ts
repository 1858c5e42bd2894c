// `mesh-inference rotate [--remove ID|NAME]...`: asks the node running on this machine (its API on --port) to
// rotate the mesh secret across the live members and remove the named ones. The request is signed with the
// node's key file (src/io/wire/admin-proof.ts): only who can read that 0600 file changes the mesh.
import { ed25519PrivateKey } from '../wire/announcement-signature.ts';
import { ADMIN_PROOF_HEADER, adminProof, ROTATE_PATH, type RotationAnswer } from '../wire/admin-proof.ts';
import { readSecretKey } from './secret-key.ts';

export class RotateCommandError extends Error {
  override name = 'RotateCommandError';
}

export async function rotateThroughApi(init: {
  readonly keyFile: string | null;
  readonly port: number;
  readonly apiKey: string | null;
  readonly remove: readonly string[];
  readonly env?: NodeJS.ProcessEnv;
  readonly timeoutMs?: number;
}): Promise<RotationAnswer> {
  const key = await readSecretKey({ keyFile: init.keyFile ?? undefined, env: init.env });
  if (key === null) throw new RotateCommandError(`no key file at ${init.keyFile ?? 'the default place'}: name the running node's key with --key-file`);
  const body = Buffer.from(JSON.stringify({ remove: init.remove }), 'utf8');
  const headers: Record<string, string> = {
    'content-type': 'application/json',
    [ADMIN_PROOF_HEADER]: adminProof(ed25519PrivateKey(key.key), 'POST', ROTATE_PATH, body),
  };
  if (init.apiKey !== null) headers.authorization = `Bearer ${init.apiKey}`;
  let res: Response;
  try {
    res = await fetch(`http://127.0.0.1:${init.port}${ROTATE_PATH}`, { method: 'POST', headers, body, signal: AbortSignal.timeout(init.timeoutMs ?? 30_000) });
  } catch (err) {
    throw new RotateCommandError(`no node answers on 127.0.0.1:${init.port} (${(err as Error).message}): is the node of ${key.path} running? (its API port: --port)`);
  }
  const text = await res.text();
  let json: unknown = null;
  try {
    json = JSON.parse(text);
  } catch {
    // not JSON: reported below
  }
  if (res.status === 404) throw new RotateCommandError(`the node on port ${init.port} has no rotate route (it runs with an ephemeral key, or an older version)`);
  if (!res.ok) {
    const message = (json as { error?: { message?: unknown } } | null)?.error?.message;
    throw new RotateCommandError(`the node refused (HTTP ${res.status}): ${typeof message === 'string' ? message : text.slice(0, 200)}`);
  }
  const out = json as RotationAnswer;
  if (typeof out?.keyEpoch !== 'number') throw new RotateCommandError(`unexpected answer from the node: ${text.slice(0, 200)}`);
  return out;
}
