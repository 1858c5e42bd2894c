// The machine a benchmark ran on, for its header: figures mean little without it (cores, CPU, load, memory,
// GPUs). One line, printed at the start of every bench/*.bench.ts.
import { execFileSync } from 'node:child_process';
import { cpus, loadavg, totalmem } from 'node:os';

export interface MachineInfo {
  readonly cores: number;
  readonly cpuModel: string;
  /** 1, 5 and 15 minutes. */
  readonly loadAverage: readonly number[];
  readonly memoryGiB: number;
  /** One entry per GPU `nvidia-smi -L` lists; empty without NVIDIA GPUs (or without nvidia-smi). */
  readonly gpus: readonly string[];
}

export function machineInfo(): MachineInfo {
  const cpu = cpus();
  return {
    cores: cpu.length,
    cpuModel: cpu[0]?.model.trim().replace(/\s+/g, ' ') ?? 'unknown CPU',
    loadAverage: loadavg(),
    memoryGiB: totalmem() / 2 ** 30,
    gpus: nvidiaGpus(),
  };
}

function nvidiaGpus(): string[] {
  try {
    const out = execFileSync('nvidia-smi', ['-L'], { encoding: 'utf8', timeout: 10_000, stdio: ['ignore', 'pipe', 'ignore'] });
    // "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)" -> "NVIDIA H100 80GB HBM3"
    return out.split('\n').flatMap((l) => {
      const m = /^GPU \d+: (.*?)(?: \(UUID:.*)?$/.exec(l.trim());
      return m ? [m[1]!] : [];
    });
  } catch {
    return [];
  }
}

/** "Machine: 2 cores (Intel Xeon ...), 7.8 GiB, load 1.20 0.80 0.50, no NVIDIA GPU". */
export function describeMachine(m: MachineInfo = machineInfo()): string {
  const gpus = m.gpus.length === 0 ? 'no NVIDIA GPU' : `${m.gpus.length} GPU(s): ${m.gpus.join(', ')}`;
  return `Machine: ${m.cores} cores (${m.cpuModel}), ${m.memoryGiB.toFixed(1)} GiB, load ${m.loadAverage.map((l) => l.toFixed(2)).join(' ')}, ${gpus}`;
}
