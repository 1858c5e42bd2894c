// How much memory this node offers the mesh for model layers: `--max-vram` when given, else the free
// memory of its NVIDIA GPUs (nvidia-smi), else its unified memory on macOS, else a share of its RAM.
import { execFile } from 'node:child_process';
import { freemem, totalmem } from 'node:os';
import { formatSize } from '../../machines/units.ts';

export type VramSource = 'override' | 'nvidia-smi' | 'unified-memory' | 'ram-share';

export interface GpuInfo {
  readonly index: number;
  readonly name: string;
  readonly totalBytes: number;
  readonly freeBytes: number;
}

export interface VramInfo {
  readonly bytes: number;
  readonly source: VramSource;
  /** For people: what was measured and why this figure, e.g. "2 GPUs (NVIDIA H100 ...): 158.3 GiB free". */
  readonly detail: string;
  /** The GPUs nvidia-smi listed (empty elsewhere). */
  readonly gpus: readonly GpuInfo[];
}

export interface DetectVramInit {
  /** `--max-vram`: used as is, nothing is measured. */
  readonly maxVramBytes?: number | null;
  /** Share of RAM a CPU-only node offers (default 0.5: the OS, the node and the KV cache need the rest). */
  readonly ramShare?: number;
  /** Runs nvidia-smi; injectable for tests. Resolves with stdout, rejects when it cannot run or fails. */
  readonly runNvidiaSmi?: () => Promise<string>;
  readonly platform?: NodeJS.Platform;
  readonly totalMemBytes?: number;
  readonly freeMemBytes?: number;
}

const MIB = 1024 ** 2;
const GIB = 1024 ** 3;
export const NVIDIA_SMI_QUERY = ['--query-gpu=index,name,memory.total,memory.free', '--format=csv,noheader,nounits'];

export async function detectVram(init: DetectVramInit = {}): Promise<VramInfo> {
  if (init.maxVramBytes !== undefined && init.maxVramBytes !== null) {
    if (!(Number.isFinite(init.maxVramBytes) && init.maxVramBytes > 0)) {
      throw new RangeError(`max VRAM must be a positive number of bytes, got ${init.maxVramBytes}`);
    }
    return { bytes: Math.floor(init.maxVramBytes), source: 'override', detail: `--max-vram ${formatBytes(init.maxVramBytes)}`, gpus: [] };
  }
  const platform = init.platform ?? process.platform;
  const total = init.totalMemBytes ?? totalmem();
  const free = init.freeMemBytes ?? freemem();

  let smiProblem: string | null = null;
  if (platform !== 'darwin') {
    try {
      const gpus = parseNvidiaSmi(await (init.runNvidiaSmi ?? runNvidiaSmi)());
      if (gpus.length > 0) {
        // Free, not total: memory that other programs hold on the GPU cannot take our layers.
        const bytes = gpus.reduce((n, g) => n + g.freeBytes, 0);
        const names = [...new Set(gpus.map((g) => g.name))].join(', ');
        return {
          bytes,
          source: 'nvidia-smi',
          detail: `${gpus.length} GPU${gpus.length > 1 ? 's' : ''} (${names}): ${formatBytes(bytes)} free`,
          gpus,
        };
      }
      smiProblem = 'nvidia-smi lists no GPU';
    } catch (err) {
      smiProblem = (err as NodeJS.ErrnoException).code === 'ENOENT' ? null : `nvidia-smi failed: ${firstLine(err)}`;
    }
  }

  if (platform === 'darwin') {
    // Metal can wire about 2/3 of unified memory on small Macs and 3/4 on larger ones (the default
    // recommendedMaxWorkingSetSize); the rest stays with macOS and other programs.
    const share = total > 36 * GIB ? 0.75 : 2 / 3;
    const bytes = Math.floor(total * share);
    return { bytes, source: 'unified-memory', detail: `unified memory: ${Math.round(share * 100)}% of ${formatBytes(total)}`, gpus: [] };
  }

  const share = init.ramShare ?? 0.5;
  // Also bounded by what is free now, less a margin, so a busy machine does not offer memory it lacks.
  const bytes = Math.floor(Math.min(total * share, free * 0.8));
  const why = smiProblem === null ? 'no GPU found' : smiProblem;
  return {
    bytes,
    source: 'ram-share',
    detail: `${why}; offering ${formatBytes(bytes)} of RAM (${Math.round(share * 100)}% of ${formatBytes(total)}, at most 80% of the ${formatBytes(free)} free)`,
    gpus: [],
  };
}

/** Parses `nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader,nounits` (MiB). */
export function parseNvidiaSmi(stdout: string): GpuInfo[] {
  const gpus: GpuInfo[] = [];
  for (const raw of stdout.split('\n')) {
    const line = raw.trim();
    if (line === '') continue;
    // The name may itself contain commas; index first, the two numbers last.
    const parts = line.split(',').map((s) => s.trim());
    if (parts.length < 4) throw new Error(`unexpected nvidia-smi line: ${line}`);
    const index = Number(parts[0]);
    const free = Number(parts[parts.length - 1]);
    const total = Number(parts[parts.length - 2]);
    const name = parts.slice(1, -2).join(', ');
    // "[N/A]" (some virtual GPUs, MIG) gives NaN: such a line tells us nothing usable.
    if (!Number.isInteger(index) || !Number.isFinite(total) || !Number.isFinite(free)) {
      throw new Error(`unexpected nvidia-smi line: ${line}`);
    }
    gpus.push({ index, name, totalBytes: total * MIB, freeBytes: free * MIB });
  }
  return gpus;
}

function runNvidiaSmi(): Promise<string> {
  return new Promise((resolve, reject) => {
    // A wedged driver can make nvidia-smi hang: bound it.
    execFile('nvidia-smi', NVIDIA_SMI_QUERY, { timeout: 10_000 }, (err, stdout, stderr) => {
      if (err) {
        const detail = `${stderr}`.trim() || `${stdout}`.trim();
        reject(Object.assign(new Error(detail || err.message), { code: (err as NodeJS.ErrnoException).code }));
      } else {
        resolve(stdout);
      }
    });
  });
}

/** Sizes in the unit that shows the number (src/machines/units.ts). */
export function formatBytes(n: number): string {
  return formatSize(n);
}

function firstLine(err: unknown): string {
  return String((err as Error).message ?? err).split('\n')[0]!;
}
