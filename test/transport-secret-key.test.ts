// The persistent endpoint key: created once with mode 0600, read back the same, never silently replaced.
import { mkdtemp, readFile, stat, writeFile, chmod, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { SecretKeyError, defaultKeyPath, ephemeralSecretKey, loadOrCreateSecretKey } from '../src/io/host/secret-key.ts';

const dirs: string[] = [];
afterEach(async () => {
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});
async function tmp(): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), 'mesh-key-'));
  dirs.push(d);
  return d;
}

describe('secret key', () => {
  it('creates the key under XDG_CONFIG_HOME with mode 0600 and reads the same key back', async () => {
    const d = await tmp();
    const env = { XDG_CONFIG_HOME: d, HOME: '/nonexistent' };
    const first = await loadOrCreateSecretKey({ env });
    expect(first.created).toBe(true);
    expect(first.path).toBe(join(d, 'mesh-inference', 'secret.key'));
    expect(first.key).toHaveLength(32);
    expect((await stat(first.path)).mode & 0o777).toBe(0o600);
    expect((await readFile(first.path, 'utf8')).trim()).toMatch(/^[0-9a-f]{64}$/);
    const second = await loadOrCreateSecretKey({ env });
    expect(second.created).toBe(false);
    expect(Buffer.from(second.key).equals(Buffer.from(first.key))).toBe(true);
  });

  it('falls back to ~/.config without XDG_CONFIG_HOME', () => {
    expect(defaultKeyPath({ HOME: '/home/x' })).toBe('/home/x/.config/mesh-inference/secret.key');
    // A relative XDG path is invalid by the spec and ignored.
    expect(defaultKeyPath({ HOME: '/home/x', XDG_CONFIG_HOME: 'rel' })).toBe('/home/x/.config/mesh-inference/secret.key');
  });

  it('honours --key-file and tightens a too-open mode', async () => {
    const d = await tmp();
    const path = join(d, 'my.key');
    await writeFile(path, 'ab'.repeat(32) + '\n');
    await chmod(path, 0o644);
    const k = await loadOrCreateSecretKey({ keyFile: path });
    expect(k.created).toBe(false);
    expect(k.key[0]).toBe(0xab);
    expect((await stat(path)).mode & 0o777).toBe(0o600);
  });

  it('refuses a file that is not a key, naming the file, instead of replacing the identity', async () => {
    const d = await tmp();
    const path = join(d, 'bad.key');
    await writeFile(path, 'hello');
    await expect(loadOrCreateSecretKey({ keyFile: path })).rejects.toThrow(SecretKeyError);
    await expect(loadOrCreateSecretKey({ keyFile: path })).rejects.toThrow(/bad\.key.*64 hex/);
    expect(await readFile(path, 'utf8')).toBe('hello');
  });

  it('gives a different ephemeral key each time', () => {
    expect(Buffer.from(ephemeralSecretKey()).equals(Buffer.from(ephemeralSecretKey()))).toBe(false);
  });
});
