// A model's identity: what two nodes compare before serving one model together (name, size, fingerprint of
// the header and of a sample of every tensor's bytes).
import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { basename } from 'node:path';
import type { ModelIdentity } from '../../machines/mesh-types.ts';
import { GgufError } from './gguf-format.ts';
import { metaString, readGgufHeader, type GgufHeader } from './gguf-reader.ts';

/** Bytes read from the start and from the end of every tensor for the content fingerprint. */
const SAMPLE_BYTES = 4096;

/**
 * The identity two nodes compare before serving one model together. The header alone cannot tell two
 * models of one shape apart (a fine-tune, another seed), and a worker loads weights from its own file, so
 * the fingerprint also hashes a sample of every tensor's bytes: its first and last 4 KiB. That costs two
 * small reads per tensor, never a pass over the weights.
 */
export async function ggufModelIdentity(path: string, header: GgufHeader): Promise<ModelIdentity> {
  const hash = createHash('sha256').update(header.fingerprint);
  let fh;
  try {
    fh = await open(path, 'r');
    const sample = Buffer.alloc(SAMPLE_BYTES);
    for (const t of header.tensors) {
      const n = Math.min(SAMPLE_BYTES, t.bytes);
      for (const at of new Set([t.absoluteOffset, t.absoluteOffset + t.bytes - n])) {
        const { bytesRead } = await fh.read(sample, 0, n, at);
        if (bytesRead !== n) throw new GgufError('truncated', `file is truncated inside tensor ${t.name}`, path);
        hash.update(sample.subarray(0, n));
      }
    }
  } catch (e) {
    if (e instanceof GgufError) throw e;
    throw new GgufError('io', `cannot read tensor data: ${(e as Error).message}`, path);
  } finally {
    await fh?.close();
  }
  return {
    name: metaString(header, 'general.name') ?? basename(path).replace(/\.gguf$/i, ''),
    bytes: header.fileBytes,
    fingerprint: hash.digest('hex'),
  };
}

/** Reads the header and a sample of the weights, and returns the model's identity. */
export async function readModelIdentity(path: string): Promise<ModelIdentity> {
  return ggufModelIdentity(path, await readGgufHeader(path));
}
