// VRAM detection: the --max-vram override, nvidia-smi (parsed from output captured on a real H100, and
// run for real as a program on PATH), unified memory on macOS, and a share of RAM on CPU-only machines.
import { chmodSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { detectVram, parseNvidiaSmi } from '../src/io/host/vram.ts';

const MIB = 2 ** 20;
const GIB = 2 ** 30;
// `nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader,nounits` on an H100 (device machine).
const H100 = '0, NVIDIA H100 80GB HBM3, 81559, 81079\n';

describe('parseNvidiaSmi', () => {
  it('reads real output', () => {
    expect(parseNvidiaSmi(H100)).toEqual([{ index: 0, name: 'NVIDIA H100 80GB HBM3', totalBytes: 81559 * MIB, freeBytes: 81079 * MIB }]);
  });
  it('several GPUs, and names with commas', () => {
    const gpus = parseNvidiaSmi('0, NVIDIA H100 80GB HBM3, 81559, 81079\n1, Odd, GPU, 1024, 512\n\n');
    expect(gpus.map((g) => [g.index, g.name, g.freeBytes / MIB])).toEqual([[0, 'NVIDIA H100 80GB HBM3', 81079], [1, 'Odd, GPU', 512]]);
  });
  it('refuses lines it cannot read instead of guessing', () => {
    expect(() => parseNvidiaSmi('0, GRID vGPU, [N/A], [N/A]')).toThrow(/unexpected nvidia-smi line/);
    expect(() => parseNvidiaSmi('No devices were found')).toThrow(/unexpected nvidia-smi line/);
  });
});

describe('detectVram', () => {
  it('--max-vram wins and measures nothing', async () => {
    const v = await detectVram({ maxVramBytes: 6 * GIB, runNvidiaSmi: () => Promise.reject(new Error('must not run')) });
    expect(v).toMatchObject({ bytes: 6 * GIB, source: 'override' });
    await expect(detectVram({ maxVramBytes: -1 })).rejects.toThrow(/positive/);
  });

  it('sums the free memory of every NVIDIA GPU', async () => {
    const v = await detectVram({ platform: 'linux', runNvidiaSmi: async () => H100 + H100.replace(/^0/, '1') });
    expect(v.source).toBe('nvidia-smi');
    expect(v.bytes).toBe(2 * 81079 * MIB);
    expect(v.gpus).toHaveLength(2);
    expect(v.detail).toMatch(/^2 GPUs \(NVIDIA H100 80GB HBM3\): 158\.4 GiB free$/);
  });

  it('macOS: a share of unified memory', async () => {
    expect((await detectVram({ platform: 'darwin', totalMemBytes: 16 * GIB, freeMemBytes: GIB })).bytes).toBe(Math.floor((16 * GIB * 2) / 3));
    const big = await detectVram({ platform: 'darwin', totalMemBytes: 64 * GIB, freeMemBytes: GIB });
    expect(big).toMatchObject({ bytes: 48 * GIB, source: 'unified-memory' });
  });

  it('CPU-only: half the RAM, bounded by what is free', async () => {
    const noGpu = () => Promise.reject(Object.assign(new Error('spawn nvidia-smi ENOENT'), { code: 'ENOENT' }));
    const roomy = await detectVram({ platform: 'linux', runNvidiaSmi: noGpu, totalMemBytes: 32 * GIB, freeMemBytes: 30 * GIB });
    expect(roomy).toMatchObject({ bytes: 16 * GIB, source: 'ram-share' });
    expect(roomy.detail).toMatch(/^no GPU found; offering 16\.0 GiB of RAM/);
    const busy = await detectVram({ platform: 'linux', runNvidiaSmi: noGpu, totalMemBytes: 32 * GIB, freeMemBytes: 10 * GIB });
    expect(busy.bytes).toBe(Math.floor(10 * GIB * 0.8));
    expect((await detectVram({ platform: 'linux', runNvidiaSmi: noGpu, totalMemBytes: 32 * GIB, freeMemBytes: 30 * GIB, ramShare: 0.25 })).bytes).toBe(8 * GIB);
  });

  describe('running the real program', () => {
    const savedPath = process.env['PATH'];
    afterEach(() => {
      process.env['PATH'] = savedPath;
    });
    function fakeSmi(script: string): void {
      const dir = mkdtempSync(join(tmpdir(), 'smi-'));
      const f = join(dir, 'nvidia-smi');
      writeFileSync(f, `#!/bin/sh\n${script}\n`);
      chmodSync(f, 0o755);
      process.env['PATH'] = `${dir}${delimiter}${savedPath}`;
    }

    it('this machine as it is', async () => {
      const v = await detectVram({});
      expect(v.bytes).toBeGreaterThan(0);
      expect(['nvidia-smi', 'unified-memory', 'ram-share']).toContain(v.source);
    });

    it('an nvidia-smi on PATH is run with the query and parsed', async () => {
      fakeSmi(`[ "$1" = "--query-gpu=index,name,memory.total,memory.free" ] && [ "$2" = "--format=csv,noheader,nounits" ] || exit 7\nprintf '${H100}'`);
      const v = await detectVram({ platform: 'linux' });
      expect(v).toMatchObject({ source: 'nvidia-smi', bytes: 81079 * MIB });
    });

    it('a failing nvidia-smi (no driver) falls back to RAM and says why', async () => {
      fakeSmi(`echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."; exit 9`);
      const v = await detectVram({ platform: 'linux' });
      expect(v.source).toBe('ram-share');
      expect(v.detail).toMatch(/^nvidia-smi failed: NVIDIA-SMI has failed because it couldn't communicate/);
    });
  });
});
