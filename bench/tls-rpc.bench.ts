// What the host's side of the direct data path costs per token: llama-bench through two rpc-servers (a worker
// first, the host's own rpc-server last and direct, as the mesh runs them), with the worker reached
//   direct   straight over TCP (no encryption: the floor);
//   relay    through Node on both ends: llama-bench -> TCP -> host relay (dialDirect + relay) -> TLS -> the
//            worker's DirectPathServer -> TCP -> rpc-server (what the mesh did before patch 0003);
//   native   llama-bench's own TLS 1.3 PSK client (patch 0003, key on GGML_RPC_TLS_FD) -> DirectPathServer
//            -> TCP -> rpc-server: Node only on the worker's end.
// The worker's data port and the host relay each run in their own Node process, as on two machines. Modes
// alternate within every round; medians over rounds. CPU figures on a shared 2-core machine are noisy.
//
//   npx tsx bench/tls-rpc.bench.ts [--embd 2048 --layers 2 --ff 2048 --type q8_0] [--model FILE]
//                                  [--rounds 5] [--p 64] [--n 32] [--reps 2] [--threads 1] [--md FILE]
import { fork, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { execa } from 'execa';
import { pino } from 'pino';
import { generateLlamaGguf, type WeightType } from '../src/io/gguf/gguf-writer.ts';
import { buildBinDir, ensureLlamaBinaries } from '../src/io/llama/llama-binaries.ts';
import { stopAll } from '../src/io/llama/processes.ts';
import { DirectPathServer, dialDirect, newTicket, relay, type DirectTicket } from '../src/io/transport/direct-path.ts';
import type { EndpointId } from '../src/machines/mesh-types.ts';
import { startNativeRpcServer } from '../test/native-support.ts';
import { describeMachine } from './machine.ts';

const SELF = fileURLToPath(import.meta.url);
const HOST_ID = 'h'.repeat(64) as EndpointId;

type Msg =
  | { type: 'ready'; port: number }
  | { type: 'offer'; id: string; key: string }
  | { type: 'offered'; addrs: string[] }
  | { type: 'ticket'; addrs: string[]; id: string; key: string }
  | { type: 'queued' };

/** Child roles: the worker's data port, or the host's relay. Each talks to the parent over IPC. */
async function child(role: string, targetPort: number): Promise<void> {
  const send = (m: Msg) => process.send!(m);
  if (role === 'worker') {
    const data = new DirectPathServer(
      { host: '127.0.0.1', port: 0, ticketTtlMs: 600_000 },
      { allow: () => ({ host: '127.0.0.1', port: targetPort }), advertise: () => ['127.0.0.1'], log: pino({ level: 'silent' }) },
    );
    await data.start();
    process.on('message', (m: Msg) => {
      if (m.type !== 'offer') return;
      const a = data.offer(HOST_ID, 'rpc', { id: m.id, key: Buffer.from(m.key, 'hex') });
      send({ type: 'offered', addrs: 'addrs' in a ? [...a.addrs] : [] });
    });
    send({ type: 'ready', port: data.port });
    return;
  }
  // relay: every local connection takes the next ticket and is joined to a fresh TLS connection
  const queue: { addrs: string[]; ticket: DirectTicket }[] = [];
  const server = createServer({ noDelay: true, pauseOnConnect: true }, (local: Socket) => {
    local.on('error', () => {});
    const next = queue.shift();
    if (!next) {
      local.destroy();
      return;
    }
    dialDirect(next.addrs, next.ticket, 5_000).then(
      (tls) => void relay(local, tls, { bytesIn: 0, bytesOut: 0 }, () => {}),
      () => local.destroy(),
    );
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  process.on('message', (m: Msg) => {
    if (m.type !== 'ticket') return;
    queue.push({ addrs: m.addrs, ticket: { id: m.id, key: Buffer.from(m.key, 'hex') } });
    send({ type: 'queued' });
  });
  const addr = server.address();
  send({ type: 'ready', port: typeof addr === 'object' && addr ? addr.port : 0 });
}

/** A child role with a request/answer channel. */
class Child {
  private constructor(
    readonly proc: ChildProcess,
    readonly port: number,
  ) {}
  static async start(role: string, targetPort = 0): Promise<Child> {
    const proc = fork(SELF, ['--role', role, '--target', String(targetPort)], { execArgv: ['--import', 'tsx'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    const port = await new Promise<number>((resolve, reject) => {
      proc.once('message', (m: Msg) => (m.type === 'ready' ? resolve(m.port) : reject(new Error(`unexpected ${m.type}`))));
      proc.once('exit', (c) => reject(new Error(`${role} exited (${c})`)));
    });
    return new Child(proc, port);
  }
  ask<T extends Msg>(m: Msg): Promise<T> {
    return new Promise((resolve) => {
      this.proc.once('message', (r: T) => resolve(r));
      this.proc.send(m);
    });
  }
  stop(): void {
    this.proc.kill();
  }
}

interface BenchRow {
  readonly test: string;
  readonly tps: number;
}

async function llamaBench(bin: string, model: string, rpc: string[], keys: string | null, o: { p: number; n: number; reps: number; threads: number }): Promise<BenchRow[]> {
  const argv = ['-m', model, '-rpc', rpc.join(','), '-ts', rpc.map(() => '1').join('/'), '-ngl', '99', '-fa', '0',
    '-p', String(o.p), '-n', String(o.n), '-r', String(o.reps), '-t', String(o.threads), '-o', 'json'];
  const sub = execa(bin, argv, {
    env: { GGML_RPC_NO_RDMA: '1', ...(keys === null ? {} : { GGML_RPC_TLS_FD: '3' }) },
    stdio: ['ignore', 'pipe', 'pipe', 'pipe'],
    reject: false,
    timeout: 20 * 60_000,
  });
  const keyPipe = sub.stdio[3] as unknown as NodeJS.WritableStream & { on(e: 'error', f: () => void): unknown };
  keyPipe.on('error', () => undefined);
  keyPipe.end(keys ?? '');
  const r = await sub;
  if (r.exitCode !== 0) throw new Error(`llama-bench failed (${r.exitCode ?? r.signal}):\n${String(r.stderr).split('\n').slice(-20).join('\n')}`);
  const json = JSON.parse(String(r.stdout)) as { n_prompt: number; n_gen: number; avg_ts: number }[];
  return json.map((x) => ({ test: x.n_prompt > 0 ? `pp${x.n_prompt}` : `tg${x.n_gen}`, tps: x.avg_ts }));
}

const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

async function main(): Promise<void> {
  const { values: a } = parseArgs({
    options: {
      role: { type: 'string' }, target: { type: 'string' },
      model: { type: 'string' }, embd: { type: 'string', default: '2048' }, layers: { type: 'string', default: '2' },
      ff: { type: 'string', default: '2048' }, type: { type: 'string', default: 'q8_0' },
      rounds: { type: 'string', default: '5' }, p: { type: 'string', default: '64' }, n: { type: 'string', default: '32' },
      reps: { type: 'string', default: '2' }, threads: { type: 'string', default: '1' }, md: { type: 'string' },
    },
  });
  if (a.role) return child(a.role, Number(a.target));

  const lines: string[] = [];
  const print = (s = ''): void => {
    lines.push(s);
    console.log(s);
  };
  const bins = await ensureLlamaBinaries({ variant: 'mesh', onLine: (l) => console.error(l) });
  if (!bins.llamaBench) throw new Error(`no llama-bench in ${bins.dir}`);
  if (!bins.patches.includes('rpc-tls-psk/1')) throw new Error(`the binaries in ${bins.dir} have no TLS client (patches: ${bins.patches.join(' ') || 'none'}); install libssl-dev and rebuild`);
  const embd = Number(a.embd), layers = Number(a.layers), ff = Number(a.ff);
  let model = a.model;
  if (!model) {
    const dir = join(process.cwd(), '.cache', 'bench');
    mkdirSync(dir, { recursive: true });
    model = join(dir, `tls-${layers}x${embd}-ff${ff}-${a.type}.gguf`);
    if (!existsSync(model)) {
      await generateLlamaGguf(model, {
        layers, embd, ff, type: a.type as WeightType, seed: 1,
        vocabPath: join(buildBinDir('mesh'), '..', '..', 'src', 'models', 'ggml-vocab-llama-spm.gguf'),
      });
    }
  }
  const o = { p: Number(a.p), n: Number(a.n), reps: Number(a.reps), threads: Number(a.threads) };
  const rounds = Number(a.rounds);

  const workerRpc = await startNativeRpcServer(bins.rpcServer, ['--gguf', model], { threads: o.threads });
  const ownRpc = await startNativeRpcServer(bins.rpcServer, ['--gguf', model], { threads: o.threads });
  const worker = await Child.start('worker', Number(workerRpc.address.split(':')[1]));
  const hostRelay = await Child.start('relay');
  const dataAddr = `127.0.0.1:${worker.port}`;
  const relayAddr = `127.0.0.1:${hostRelay.port}`;
  const offer = async (): Promise<{ ticket: DirectTicket; addrs: string[] }> => {
    const ticket = newTicket();
    const r = await worker.ask<{ type: 'offered'; addrs: string[] }>({ type: 'offer', id: ticket.id, key: ticket.key.toString('hex') });
    if (r.addrs.length === 0) throw new Error('the worker refused the offer');
    return { ticket, addrs: r.addrs };
  };

  const modes = {
    direct: async () => llamaBench(bins.llamaBench!, model, [workerRpc.address, ownRpc.address], null, o),
    relay: async () => {
      const { ticket, addrs } = await offer();
      await hostRelay.ask({ type: 'ticket', addrs, id: ticket.id, key: ticket.key.toString('hex') });
      return llamaBench(bins.llamaBench!, model, [relayAddr, ownRpc.address], null, o);
    },
    native: async () => {
      const { ticket } = await offer();
      return llamaBench(bins.llamaBench!, model, [dataAddr, ownRpc.address], `${dataAddr} ${ticket.id} ${ticket.key.toString('hex')}\n`, o);
    },
  } as const;
  type Mode = keyof typeof modes;
  const results: Record<Mode, Record<string, number[]>> = { direct: {}, relay: {}, native: {} };
  const loads: number[] = [];
  try {
    for (let r = 0; r < rounds; r++) {
      // rotate the order so that no mode always runs first in a round
      const order = (['direct', 'relay', 'native'] as Mode[]).map((_, i, all) => all[(i + r) % all.length]!);
      for (const m of order) {
        for (const row of await modes[m]()) (results[m][row.test] ??= []).push(row.tps);
      }
      loads.push(loadavg()[0]!);
      console.error(`round ${r + 1}/${rounds}: ${order.map((m) => `${m} ${Object.entries(results[m]).map(([t, v]) => `${t} ${v.at(-1)!.toFixed(1)}`).join(' ')}`).join(' | ')}`);
    }
  } finally {
    worker.stop();
    hostRelay.stop();
    await workerRpc.stop();
    await ownRpc.stop();
    await stopAll(2_000);
  }

  const tests = Object.keys(results.direct);
  print(`### llama.cpp RPC to a worker: direct TCP vs Node relay on both ends vs native TLS client (patch 0003)`);
  print();
  print(`${describeMachine()}; load average during the run ${Math.min(...loads).toFixed(1)}-${Math.max(...loads).toFixed(1)} (1 min); ` +
    `model ${layers}x${embd} ff ${ff} ${a.type}; llama-bench -p ${o.p} -n ${o.n} -r ${o.reps} -fa 0 -t ${o.threads}, two rpc-servers -ts 1/1 ` +
    `(worker first through the mode's path, the host's own last and direct); median of ${rounds} alternating rounds`);
  print();
  print(`| mode | ${tests.map((t) => `${t} tok/s`).join(' | ')} | ${tests.filter((t) => t.startsWith('tg')).map((t) => `${t} ms/token | vs direct`).join(' | ')} |`);
  print(`|---|${tests.map(() => '---:').join('|')}|${tests.filter((t) => t.startsWith('tg')).map(() => '---:|---:').join('|')}|`);
  const label: Record<Mode, string> = {
    direct: 'direct TCP to the rpc-server',
    relay: 'Node relay on both ends (TCP -> Node -> TLS -> Node -> TCP)',
    native: 'native TLS-PSK client -> Node DirectPathServer -> TCP',
  };
  for (const m of ['direct', 'relay', 'native'] as Mode[]) {
    const cells = tests.map((t) => `${median(results[m][t]!).toFixed(1)} (${Math.min(...results[m][t]!).toFixed(1)}-${Math.max(...results[m][t]!).toFixed(1)})`);
    const tg = tests.filter((t) => t.startsWith('tg')).map((t) => {
      const ms = 1000 / median(results[m][t]!);
      const base = 1000 / median(results.direct[t]!);
      return `${ms.toFixed(2)} | ${m === 'direct' ? '-' : `${ms - base >= 0 ? '+' : ''}${(ms - base).toFixed(2)} ms`}`;
    });
    print(`| ${label[m]} | ${cells.join(' | ')} | ${tg.join(' | ')} |`);
  }
  print();
  print('(medians, min-max in brackets)');
  // Paired by round: each round ran the three modes back to back, so their ratio shares the machine's state.
  print();
  print(`| paired per round (median of ${rounds}) | ${tests.map((t) => `${t} vs direct`).join(' | ')} |`);
  print(`|---|${tests.map(() => '---:').join('|')}|`);
  for (const m of ['relay', 'native'] as Mode[]) {
    const cells = tests.map((t) => {
      const ratios = results[m][t]!.map((v, i) => v / results.direct[t]![i]!);
      const extraMs = t.startsWith('tg') ? results[m][t]!.map((v, i) => 1000 / v - 1000 / results.direct[t]![i]!) : null;
      return `${median(ratios).toFixed(2)}x${extraMs ? ` (+${median(extraMs).toFixed(2)} ms/token)` : ''}`;
    });
    print(`| ${label[m]} | ${cells.join(' | ')} |`);
  }
  if (a.md) writeFileSync(a.md, `${lines.join('\n')}\n`);
}

main().catch((err: unknown) => {
  console.error(err instanceof Error ? err.stack : err);
  process.exit(1);
});
