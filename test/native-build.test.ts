// native/build.sh and src/io/llama/llama-binaries.ts: the cache key, the refusals (missing tools, a tampered
// source tarball), and finding the binaries with their patches. The real build runs once (ensureLlamaBinaries,
// seconds when it is up to date); every other case runs the script where it stops before compiling.
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  BUILD_SCRIPT,
  LlamaBinariesError,
  ensureLlamaBinaries,
  findLlamaBinaries,
  type LlamaBinaries,
} from '../src/io/llama/llama-binaries.ts';

const tmp = mkdtempSync(join(tmpdir(), 'mesh-native-build-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** Runs native/build.sh with `env` added to (or, for keys set to undefined, removed from) ours. */
function script(args: string[], env: Record<string, string | undefined> = {}): { code: number | null; out: string } {
  const full: NodeJS.ProcessEnv = { ...process.env };
  delete full.MESH_LLAMA_BIN_DIR;
  delete full.MESH_LLAMA_SKIP_BUILD;
  for (const [k, v] of Object.entries(env)) {
    if (v === undefined) delete full[k];
    else full[k] = v;
  }
  const r = spawnSync('bash', [BUILD_SCRIPT, ...args], { env: full, encoding: 'utf8', timeout: 120_000 });
  return { code: r.status, out: `${r.stdout}${r.stderr}` };
}

describe('native/build.sh refusals and switches (no compiling)', () => {
  it('MESH_LLAMA_SKIP_BUILD=1 builds nothing', () => {
    const r = script([], { MESH_LLAMA_SKIP_BUILD: '1', MESH_LLAMA_BUILD_ROOT: join(tmp, 'skip') });
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/MESH_LLAMA_SKIP_BUILD=1: not building/);
    expect(existsSync(join(tmp, 'skip'))).toBe(false);
  });

  it('MESH_LLAMA_BIN_DIR means the user brings binaries: nothing is built', () => {
    const r = script([], { MESH_LLAMA_BIN_DIR: '/opt/llama/bin', MESH_LLAMA_BUILD_ROOT: join(tmp, 'own') });
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/MESH_LLAMA_BIN_DIR=\/opt\/llama\/bin: using those binaries/);
  });

  it('names a missing cmake and how to install it', () => {
    // a PATH with the basic tools the script needs before its checks, and no cmake
    const bin = join(tmp, 'no-cmake-bin');
    rmSync(bin, { recursive: true, force: true });
    spawnSync('mkdir', ['-p', bin]);
    for (const tool of ['bash', 'dirname', 'uname', 'date', 'sed', 'cat', 'grep', 'apt-get']) {
      const found = spawnSync('bash', ['-c', `command -v ${tool}`], { encoding: 'utf8' }).stdout.trim();
      if (found) symlinkSync(found, join(bin, tool));
    }
    const r = script([], { PATH: bin, MESH_LLAMA_BUILD_ROOT: join(tmp, 'no-cmake') });
    expect(r.code).toBe(1);
    expect(r.out).toMatch(/FAILED: cmake is missing/);
    expect(r.out).toMatch(/apt-get install -y cmake|brew install cmake|dnf install|apk add/);
    expect(r.out).not.toMatch(/line \d+:/); // no shell error leaks through
  });

  it('refuses a source tarball whose sha512 is not the pinned integrity', () => {
    const cache = join(tmp, 'cache');
    spawnSync('mkdir', ['-p', cache]);
    writeFileSync(join(cache, 'node-llama-cpp-3.21.1.tgz'), 'not the package');
    const r = script([], { MESH_LLAMA_CACHE_DIR: cache, MESH_LLAMA_BUILD_ROOT: join(tmp, 'tampered') });
    expect(r.code).toBe(1);
    expect(r.out).toMatch(/does not match the pinned integrity/);
    expect(r.out).toMatch(/expected sha512-E3N0Ev2Va0wzydvXYFwM9Hvyo07Po/);
  });

  it('rejects an unknown variant with a one-line error', () => {
    const r = script(['--variant', 'nightly']);
    expect(r.code).toBe(2);
    expect(r.out).toMatch(/--variant must be 'mesh' or 'stock'/);
  });
});

// No build output (and none allowed to be made) is a failure, not a skip: ensureLlamaBinaries says what is missing.
describe('native build output', () => {
  let mesh: LlamaBinaries;

  beforeAll(async () => {
    mesh = await ensureLlamaBinaries({ variant: 'mesh', onLine: (l) => console.log(l) });
  }, 40 * 60_000);

  it('a second run reuses the build', () => {
    const check = script(['--check']);
    expect(check.out).toMatch(/^up-to-date /m);
    const again = script([]);
    expect(again.code).toBe(0);
    expect(again.out).toMatch(/up to date: .*native\/build\/mesh\/build\/bin/);
    expect(again.out).not.toMatch(/5\/5 building/);
  });

  it('a build for another CPU is not reused', () => {
    // a compiler wrapper that reports one more target feature for -march=native
    const cc = join(tmp, 'other-cpu-cc');
    writeFileSync(
      cc,
      '#!/bin/sh\nif [ "$*" = "-march=native -Q --help=target" ]; then cc "$@"; echo "  -mimaginary-feature [enabled]"; exit 0; fi\nexec cc "$@"\n',
    );
    chmodSync(cc, 0o755);
    const check = script(['--check'], { CC: cc });
    expect(check.code).toBe(3);
    expect(check.out).toMatch(/^stale: .*\bcpu\b/m);
    // and the real build is still the one in place
    expect(script(['--check']).out).toMatch(/^up-to-date /m);
  });

  it('finds the binaries and the patch they carry; the build record names the patch', async () => {
    expect(mesh.source).toBe('native-build');
    expect(mesh.setTensorGguf).toBe(true);
    // Patch 0003 (llama.cpp's RPC client speaking TLS) is compiled in only where OpenSSL was found.
    const tls = mesh.build?.['rpc_tls'] === 'on';
    expect(mesh.patches).toEqual(
      tls
        ? ['rpc-keepalive/1', 'rpc-recompute-uaf/1', 'rpc-tls-psk/1', 'set-tensor-gguf/1']
        : ['rpc-keepalive/1', 'rpc-recompute-uaf/1', 'set-tensor-gguf/1'],
    );
    expect(mesh.rpcTlsPsk).toBe(tls);
    expect(mesh.build?.variant).toBe('mesh');
    // every patch, in the order applied (0004: the upstream fix for GHSA-2phh-px2f-2qmx, carried by us)
    expect(mesh.build?.patch).toMatch(
      /^0001-rpc-set-tensor-gguf\.patch [0-9a-f]{16}, 0002-rpc-keepalive\.patch [0-9a-f]{16}, 0003-rpc-tls-psk-client\.patch [0-9a-f]{16}, 0004-rpc-recompute-uaf\.patch [0-9a-f]{16}$/,
    );
    expect(mesh.llamaBench).toBeDefined();
    const help = spawnSync(mesh.rpcServer, ['--help'], { encoding: 'utf8' });
    expect(`${help.stdout}${help.stderr}`).toMatch(/--gguf PATH/);
  });

  it('MESH_LLAMA_BIN_DIR wins, and is checked: what is missing and how to fix it', async () => {
    const own = await findLlamaBinaries({ env: { MESH_LLAMA_BIN_DIR: mesh.dir } });
    expect(own.source).toBe('MESH_LLAMA_BIN_DIR');
    expect(own.setTensorGguf).toBe(true);
    const empty = join(tmp, 'empty-bin');
    spawnSync('mkdir', ['-p', empty]);
    await expect(findLlamaBinaries({ env: { MESH_LLAMA_BIN_DIR: empty } })).rejects.toThrow(LlamaBinariesError);
    await expect(findLlamaBinaries({ env: { MESH_LLAMA_BIN_DIR: empty } })).rejects.toThrow(
      /no llama-server or ggml-rpc-server in .*empty-bin; MESH_LLAMA_BIN_DIR=.* must hold/,
    );
    await expect(findLlamaBinaries({ env: { MESH_LLAMA_BIN_DIR: join(tmp, 'nowhere') } })).rejects.toThrow(/does not exist/);
  });

  it('says how to build when there is no build at all', async () => {
    await expect(findLlamaBinaries({ env: { MESH_LLAMA_BUILD_ROOT: join(tmp, 'never-built') } })).rejects.toThrow(
      /npm run build:native/,
    );
  });
});
