// Patch 0003 (rpc-tls-psk) end to end: llama-server's own RPC client speaks TLS 1.3 with a pre-shared key to a
// worker's DirectPathServer (Node), which joins it to the worker's rpc-server: no Node on the host's side of the
// data path. Real processes on loopback, a generated tiny model, a counting proxy between the data port and the
// worker's rpc-server. The keys reach llama-server on an inherited file descriptor (GGML_RPC_TLS_FD).
import { mkdtemp, readdir, readFile, readlink, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { generateLlamaGguf } from '../src/io/gguf/gguf-writer.ts';
import { buildBinDir, ensureLlamaBinaries, type LlamaBinaries } from '../src/io/llama/llama-binaries.ts';
import { startRpcTrafficProxy, type RpcTrafficProxy } from '../src/io/llama/rpc-traffic.ts';
import { DirectPathServer, newTicket, type DirectTicket } from '../src/io/transport/direct-path.ts';
import type { EndpointId } from '../src/machines/mesh-types.ts';
import { freePort, greedyCompletion } from './helpers/llama.ts';
import { MESH_RPC_COMMANDS, startNativeLlamaServer, startNativeRpcServer, type NativeRpcServer } from './native-support.ts';


const SHAPE = { layers: 4, embd: 256, ff: 768, type: 'f16' } as const;
const PROMPT = 'Once upon a time, in a land far away,';
const N_PREDICT = 32;
const HOST_ID = 'h'.repeat(64) as EndpointId;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const hold: { dir: string; mesh?: LlamaBinaries; model: string } = { dir: '', model: '' };
const cleanups: (() => Promise<void> | void)[] = [];

/** A worker: its rpc-server, a counting proxy in front of it, and its data port (the policy joins "rpc" to the proxy). */
interface Worker {
  readonly rpc: NativeRpcServer;
  readonly proxy: RpcTrafficProxy;
  readonly data: DirectPathServer;
  /** What the host's node would get by asking the worker for a key over their admitted connection. */
  offer(): { ticket: DirectTicket; addr: string };
}

async function startWorker(): Promise<Worker> {
  const rpc = await startNativeRpcServer(hold.mesh!.rpcServer);
  cleanups.push(() => rpc.stop());
  const proxy = await startRpcTrafficProxy({ target: rpc.address, extraCommands: MESH_RPC_COMMANDS });
  cleanups.push(() => proxy.close());
  const data = new DirectPathServer(
    { host: '127.0.0.1', port: 0 },
    {
      allow: (peer, kind) => (peer === HOST_ID && kind === 'rpc' ? { host: '127.0.0.1', port: proxy.port } : { refuse: 'not the host' }),
      advertise: () => ['127.0.0.1'],
      log: pino({ level: 'silent' }),
    },
  );
  await data.start();
  cleanups.push(() => data.close());
  return {
    rpc,
    proxy,
    data,
    offer() {
      const ticket = newTicket();
      const answer = data.offer(HOST_ID, 'rpc', ticket);
      if (!('addrs' in answer)) throw new Error(`offer refused: ${answer.refuse}`);
      return { ticket, addr: answer.addrs[0]! };
    },
  };
}

interface Spawned {
  readonly pid: number;
  output(): string;
  /** Resolves with the exit code (or signal name) once it exits. */
  readonly exited: Promise<number | string>;
  stop(): Promise<void>;
}

/** Spawns a llama.cpp binary with `keys` written to its fd 3 (then closed) and GGML_RPC_TLS_FD=3. */
function spawnWithKeys(file: string, args: readonly string[], keys: string | null): Spawned {
  const sub = execa(file, args, {
    env: { GGML_RPC_NO_RDMA: '1', ...(keys === null ? {} : { GGML_RPC_TLS_FD: '3' }) },
    stdio: ['ignore', 'pipe', 'pipe', 'pipe'],
    buffer: false,
    reject: false,
  });
  let out = '';
  sub.stdout!.on('data', (b: Buffer) => (out += b.toString()));
  sub.stderr!.on('data', (b: Buffer) => (out += b.toString()));
  const keyPipe = sub.stdio[3] as unknown as NodeJS.WritableStream & { on(e: 'error', f: () => void): unknown };
  keyPipe.on('error', () => undefined);
  keyPipe.end(keys ?? '');
  const exited = sub.then((r) => (r.signal ? String(r.signal) : (r.exitCode ?? -1)));
  const handle: Spawned = {
    pid: sub.pid!,
    output: () => out,
    exited,
    stop: async () => {
      sub.kill('SIGTERM');
      const t = setTimeout(() => sub.kill('SIGKILL'), 3_000);
      await exited;
      clearTimeout(t);
    },
  };
  cleanups.push(() => handle.stop());
  return handle;
}

/** The same flags as native-support's startNativeLlamaServer (flash attention off, one thread, -c 512). */
function llamaArgs(port: number, rpc: readonly string[]): string[] {
  return [
    '-m', hold.model, '--host', '127.0.0.1', '--port', String(port),
    '-c', '512', '-t', '1', '-tb', '1', '-fa', 'off', '-np', '1', '--cache-ram', '0', '-ngl', '999', '-lm', 'none',
    // ggml's info lines (the RPC client's "connected with TLS") show from verbosity 4; before --rpc, which
    // connects while the arguments are parsed
    '-lv', '4',
    '--rpc', rpc.join(','), '--tensor-split', rpc.map(() => '1').join(','),
  ];
}

/** Waits for /health 200 (resolves with the url) or for the process to exit (resolves with null). */
async function healthy(p: Spawned, port: number, timeoutMs = 180_000): Promise<string | null> {
  let gone = false;
  void p.exited.then(() => (gone = true));
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + timeoutMs;
  while (!gone) {
    try {
      const res = await fetch(`${url}/health`, { signal: AbortSignal.timeout(2_000) });
      if (res.status === 200) return url;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error(`llama-server not healthy in time:\n${p.output().slice(-3000)}`);
    await sleep(50);
  }
  return null;
}

/** The fds past stderr of `pid` that are unix-domain sockets (a child's end of a stdio pipe from Node is one). */
async function unixSocketFds(pid: number): Promise<number[]> {
  const unixInodes = new Set((await readFile('/proc/net/unix', 'utf8')).split('\n').slice(1).map((l) => l.trim().split(/\s+/)[6]).filter(Boolean));
  const out: number[] = [];
  for (const fd of await readdir(`/proc/${pid}/fd`)) {
    if (Number(fd) <= 2) continue;
    const link = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
    const m = /^socket:\[(\d+)\]$/.exec(link);
    if (m && unixInodes.has(m[1]!)) out.push(Number(fd));
  }
  return out;
}

const keyLine = (addr: string, t: DirectTicket): string => `${addr} ${t.id} ${t.key.toString('hex')}\n`;

// Missing binaries or a build without OpenSSL are failures, not skips: a skipped suite would prove nothing.
describe('native: llama.cpp RPC client over TLS 1.3 PSK (patch 0003)', () => {
  let reference: readonly number[] = [];

  beforeAll(async () => {
    hold.mesh = await ensureLlamaBinaries({ variant: 'mesh', onLine: (l) => console.log(l) });
    if (!hold.mesh.rpcTlsPsk) {
      throw new Error('the llama.cpp build has no TLS client (patch 0003 needs OpenSSL at build time: apt-get install libssl-dev, then npm run build:native)');
    }
    hold.dir = await mkdtemp(join(tmpdir(), 'mesh-rpc-tls-'));
    hold.model = join(hold.dir, 'm.gguf');
    await generateLlamaGguf(hold.model, {
      ...SHAPE,
      seed: 1,
      vocabPath: join(buildBinDir('mesh'), '..', '..', 'src', 'models', 'ggml-vocab-llama-spm.gguf'),
    });
    const solo = await startNativeLlamaServer(hold.mesh.llamaServer, { model: hold.model });
    try {
      reference = (await greedyCompletion(solo, PROMPT, N_PREDICT)).tokens;
    } finally {
      await solo.stop();
    }
    expect(new Set(reference).size).toBeGreaterThanOrEqual(8);
  }, 40 * 60_000);

  afterAll(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
    if (hold.dir) await rm(hold.dir, { recursive: true, force: true });
  });

  it('the build announces the TLS client in its patch marker', () => {
    expect(hold.mesh!.patches).toContain('rpc-tls-psk/1');
  });

  it('generates the solo tokens with the worker reached over TLS straight from llama-server; the key is nowhere to read', async () => {
    const worker = await startWorker();
    const own = await startNativeRpcServer(hold.mesh!.rpcServer); // the host's own rpc-server: plain TCP
    cleanups.push(() => own.stop());
    const { ticket, addr } = worker.offer();
    const port = await freePort();
    const llama = spawnWithKeys(hold.mesh!.llamaServer, llamaArgs(port, [addr, own.address]), keyLine(addr, ticket));
    const url = await healthy(llama, port);
    expect(url, llama.output().slice(-3000)).not.toBeNull();

    // the key is not in the environment or the command line, and the fd was closed after reading
    const keyHex = ticket.key.toString('hex');
    for (const f of ['environ', 'cmdline']) {
      const b = await readFile(`/proc/${llama.pid}/${f}`);
      expect(b.includes(keyHex), f).toBe(false);
      expect(b.includes(keyHex.toUpperCase()), f).toBe(false);
      expect(b.includes(ticket.key), f).toBe(false);
    }
    expect((await readFile(`/proc/${llama.pid}/environ`)).toString()).toContain('GGML_RPC_TLS_FD=3');
    // fd 3 was closed after reading: no fd past stderr is a unix socket any more (a new TCP socket may reuse 3)
    expect(await unixSocketFds(llama.pid)).toEqual([]);

    const { tokens } = await greedyCompletion({ url: url! }, PROMPT, N_PREDICT);
    expect(tokens).toEqual(reference);

    expect(llama.output()).toContain(`RPC[${addr}]: connected with TLS 1.3 (pre-shared key)`);
    expect(llama.output()).not.toContain(`RPC[${own.address}]: connected with TLS`);
    expect(llama.output()).toContain(`RPC[${own.address}]: plain TCP (no key for this endpoint in GGML_RPC_TLS_FD)`);
    // one TLS connection reached the worker through the data port, and it carried the computation
    const conns = worker.data.connections();
    expect(conns.length).toBe(1);
    expect(conns[0]!.counters.bytesIn).toBeGreaterThan(0);
    const traffic = worker.proxy.snapshot();
    expect(traffic.connectionsOpened).toBe(1);
    expect(traffic.commands.HELLO?.count).toBe(1);
    expect((traffic.commands.GRAPH_COMPUTE?.count ?? 0) + (traffic.commands.GRAPH_RECOMPUTE?.count ?? 0)).toBeGreaterThan(N_PREDICT / 2);
    expect(traffic.notes).toEqual([]);
    await llama.stop();
  }, 240_000);

  it('a wrong key fails the handshake: llama-server exits with an error and nothing reaches the rpc-server', async () => {
    const worker = await startWorker();
    const { ticket, addr } = worker.offer();
    const wrong = { id: ticket.id, key: Buffer.alloc(32, 7) };
    const port = await freePort();
    const llama = spawnWithKeys(hold.mesh!.llamaServer, llamaArgs(port, [addr]), keyLine(addr, wrong));
    const url = await healthy(llama, port, 60_000);
    expect(url).toBeNull();
    const code = await llama.exited;
    expect(code).not.toBe(0);
    const out = llama.output();
    expect(out).toMatch(new RegExp(`RPC TLS: handshake with 127\\.0\\.0\\.1:${worker.data.port} failed`));
    expect(out).toContain(`Failed to connect to ${addr}`);
    expect(out).not.toContain(wrong.key.toString('hex'));
    expect(worker.proxy.snapshot().connectionsOpened).toBe(0);
    expect(worker.data.connections()).toEqual([]);
    // an unknown identity (a spent or never-offered ticket) fails the same way
    const port2 = await freePort();
    const stale = spawnWithKeys(hold.mesh!.llamaServer, llamaArgs(port2, [addr]), keyLine(addr, ticket)); // taken above
    expect(await healthy(stale, port2, 60_000)).toBeNull();
    expect(stale.output()).toMatch(/RPC TLS: handshake with .* failed/);
    expect(worker.proxy.snapshot().connectionsOpened).toBe(0);
  }, 180_000);

  it('refuses a malformed key line, naming the line but not its content', async () => {
    const port = await freePort();
    const own = await startNativeRpcServer(hold.mesh!.rpcServer);
    cleanups.push(() => own.stop());
    const secret = 'ab'.repeat(32); // a well-formed key on a line with one field too many
    const llama = spawnWithKeys(hold.mesh!.llamaServer, llamaArgs(port, [own.address]), `# keys\n\n127.0.0.1:1 someid ${secret} extra\n`);
    expect(await healthy(llama, port, 60_000)).toBeNull();
    expect(llama.output()).toContain('GGML_RPC_TLS_FD: line 3: expected 3 fields');
    expect(llama.output()).not.toContain(secret);
  }, 120_000);
});
