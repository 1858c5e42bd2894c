// CLI: writes a random-weight llama GGUF (real tokenizer, deterministic by seed) for tests and benchmarks.
//   npx tsx bench/tools/make-model.ts --out m.gguf --layers 8 --embd 64 --ff 192 --type f16 --seed 1
import { parseArgs } from 'node:util';
import { GgufError } from '../../src/io/gguf/gguf-format.ts';
import { DEFAULT_VOCAB_PATH, generateLlamaGguf, planLlamaModel, type LlamaModelSpec, type WeightType } from '../../src/io/gguf/gguf-writer.ts';

const USAGE = `usage: make-model --out FILE [options]
  --layers N      transformer blocks (default 8)
  --embd N        embedding width (default 64)
  --ff N          feed-forward width (default 192)
  --heads N       attention heads (default: heads of 64 dims from embd 128, of 16 below)
  --kv-heads N    key/value heads (default = heads)
  --ctx N         context length in the metadata (default 2048)
  --type T        f32 | f16 | q8_0 for the weight matrices (default f16)
  --seed N        PRNG seed (default 1)
  --std X         one std for every weight matrix (default: gain / sqrt(fan_in))
  --gain X        gain of the default std (default 1.6)
  --name S        general.name
  --vocab FILE    GGUF to copy tokenizer.* from (default ${DEFAULT_VOCAB_PATH})
  --dry-run       print the size and exit
  --quiet         no progress`;

function fail(msg: string): never {
  process.stderr.write(`make-model: ${msg}\n${USAGE}\n`);
  process.exit(2);
}

function int(v: string | undefined, name: string, dflt?: number): number | undefined {
  if (v === undefined) return dflt;
  if (!/^\d+$/.test(v)) fail(`--${name} must be a non-negative integer, got "${v}"`);
  return Number(v);
}

async function main(): Promise<void> {
  let args;
  try {
    args = parseArgs({
      options: {
        out: { type: 'string' },
        layers: { type: 'string' },
        embd: { type: 'string' },
        ff: { type: 'string' },
        heads: { type: 'string' },
        'kv-heads': { type: 'string' },
        ctx: { type: 'string' },
        type: { type: 'string' },
        seed: { type: 'string' },
        std: { type: 'string' },
        gain: { type: 'string' },
        name: { type: 'string' },
        vocab: { type: 'string' },
        'dry-run': { type: 'boolean' },
        quiet: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
    }).values;
  } catch (e) {
    fail((e as Error).message);
  }
  if (args.help) {
    process.stdout.write(`${USAGE}\n`);
    return;
  }
  const type = (args.type ?? 'f16').toLowerCase();
  if (type !== 'f32' && type !== 'f16' && type !== 'q8_0') fail(`--type must be f32, f16 or q8_0, got "${args.type}"`);
  const std = args.std === undefined ? undefined : Number(args.std);
  if (std !== undefined && !Number.isFinite(std)) fail(`--std must be a number, got "${args.std}"`);
  const gain = args.gain === undefined ? undefined : Number(args.gain);
  if (gain !== undefined && !Number.isFinite(gain)) fail(`--gain must be a number, got "${args.gain}"`);
  const spec: LlamaModelSpec = {
    layers: int(args.layers, 'layers', 8)!,
    embd: int(args.embd, 'embd', 64)!,
    ff: int(args.ff, 'ff', 192)!,
    heads: int(args.heads, 'heads'),
    kvHeads: int(args['kv-heads'], 'kv-heads'),
    contextLength: int(args.ctx, 'ctx'),
    type: type as WeightType,
    seed: int(args.seed, 'seed', 1)!,
    std,
    gain,
    name: args.name,
    vocabPath: args.vocab,
  };

  if (args['dry-run']) {
    const plan = await planLlamaModel(spec);
    process.stdout.write(`${plan.fileBytes} bytes (${mib(plan.fileBytes)} MiB), ${plan.tensors.length} tensors\n`);
    return;
  }
  if (!args.out) fail('--out is required');

  const started = Date.now();
  let lastShown = 0;
  const tty = process.stderr.isTTY;
  const header = await generateLlamaGguf(args.out, spec, (p) => {
    // Small models finish before progress would help; big ones get a line every ~5%.
    if (args.quiet || p.totalBytes < 32 * 1024 * 1024) return;
    const pct = Math.floor((100 * p.bytesWritten) / p.totalBytes);
    if (pct < lastShown + 5 && p.bytesWritten < p.totalBytes) return;
    lastShown = pct;
    const line = `${pct}% ${mib(p.bytesWritten)}/${mib(p.totalBytes)} MiB (${p.tensor})`;
    process.stderr.write(tty ? `\r${line.padEnd(70)}` : `${line}\n`);
  });
  if (tty && !args.quiet && header.fileBytes >= 32 * 1024 * 1024) process.stderr.write('\n');
  const secs = ((Date.now() - started) / 1000).toFixed(1);
  process.stdout.write(
    `wrote ${args.out}: ${mib(header.fileBytes)} MiB, ${header.layerCount} layers, ${header.tensors.length} tensors, ` +
      `fingerprint ${header.fingerprint.slice(0, 16)}, ${secs} s\n`,
  );
}

function mib(n: number): string {
  return (n / 1048576).toFixed(1);
}

main().catch((e: unknown) => {
  if (e instanceof GgufError) {
    process.stderr.write(`make-model: ${e.message}\n`);
    process.exit(1);
  }
  throw e;
});
