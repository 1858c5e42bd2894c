// End to end, the local trust boundary of a host and a worker (real processes on loopback):
// - the worker's API still reaches the host through the http tunnel, which now ends at the host's own API
//   (its mesh listener), not at llama-server: the same greedy tokens as a solo llama-server;
// - llama-server's own port refuses a request without the per-start key the host's node holds (401), and a
//   key planted in the node's environment does not work there either; CORS lets no foreign origin read it;
// - its command line names a key file (never the key), the file is gone once it runs, and the node's
//   LLAMA_ARG_* variables (LLAMA_ARG_TOOLS enables shell tools) never reach its environment;
// - `:9337` refuses a DNS-rebinding request (a foreign Host) with 421; `--listen-all` without `--api-key`
//   warns at start, naming the risk;
// - no TCP port of the host's node process but its API serves the model: the mesh listener, where incoming
//   http tunnels end, is a Unix socket in a 0700 folder (a loopback port let a local user past --api-key).
import { existsSync, readFileSync, readdirSync, readlinkSync, statSync } from 'node:fs';
import { request } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { greedyTokens, hostServesPlan, llamaChildren, makeE2eMesh, servesPlan, soloReferenceTokens, type E2eMesh, type E2eNode } from './e2e-support.ts';

const PROMPT = 'The mesh of machines shares one model, and every token';
const N_TOKENS = 32;
const PLANTED = {
  LLAMA_ARG_TOOLS: 'all',
  LLAMA_ARG_AGENT: '1',
  LLAMA_ARG_UI_MCP_PROXY: '1',
  LLAMA_ARG_CORS_ORIGINS: '*',
  LLAMA_API_KEY: 'planted-key',
};

/** One request with a Host header of our choosing (fetch does not let us set it). */
function get(url: string, headers: Record<string, string>): Promise<{ status: number; body: string; headers: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = request(url, { method: 'GET', headers }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body, headers: res.headers }));
    });
    req.on('error', reject);
    req.end();
  });
}

describe('e2e: the local trust boundary of a host and a worker', { timeout: 240_000 }, () => {
  let mesh: E2eMesh;
  let host: E2eNode;
  let worker: E2eNode;
  let reference: number[];
  let llamaPort: number;
  let llamaPid: number;

  beforeAll(async () => {
    mesh = await makeE2eMesh();
    reference = await soloReferenceTokens(mesh.model, PROMPT, N_TOKENS);
    host = await mesh.start({ name: 'host', vram: 0.7, extraArgs: ['--listen-all'], env: PLANTED });
    worker = await mesh.start({ name: 'worker', vram: 0.6, join: host.token, extraArgs: ['--allowed-host', 'mesh.example'] });
    await host.waitStatus(hostServesPlan([worker.id, host.id]), 120_000, 'the 2-stage plan served');
    await worker.waitStatus(servesPlan([worker.id, host.id]), 30_000, 'the worker serving');
    llamaPort = (await host.status()).processes.llamaServer.port!;
    llamaPid = llamaChildren(host).find((p) => p.name === 'llama-server')!.pid;
  }, 240_000);

  afterAll(async () => {
    await mesh?.cleanup();
  });

  it("a request through the worker's API (the tunnel ends at the host's API) gives the solo tokens", async () => {
    expect(reference.length).toBeGreaterThanOrEqual(16);
    expect((await greedyTokens(worker, PROMPT, N_TOKENS)).tokens).toEqual(reference);
    expect((await greedyTokens(host, PROMPT, N_TOKENS)).tokens).toEqual(reference);
  });

  it("llama-server's own port refuses a request without its key, and with the key planted in the node's environment", async () => {
    const body = JSON.stringify({ prompt: 'x', n_predict: 1 });
    const none = await fetch(`http://127.0.0.1:${llamaPort}/completion`, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
    expect(none.status).toBe(401);
    const planted = await fetch(`http://127.0.0.1:${llamaPort}/completion`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${PLANTED.LLAMA_API_KEY}` },
      body,
    });
    expect(planted.status).toBe(401);
    expect((await fetch(`http://127.0.0.1:${llamaPort}/v1/models`)).status).toBe(401);
    // /health is llama.cpp's one public route (readiness); the web UI is off.
    expect((await fetch(`http://127.0.0.1:${llamaPort}/health`)).status).toBe(200);
    const ui = await fetch(`http://127.0.0.1:${llamaPort}/`);
    expect(ui.status).not.toBe(200);
    // CORS: no foreign origin is granted, even with planted LLAMA_ARG_CORS_ORIGINS=*.
    const cors = await get(`http://127.0.0.1:${llamaPort}/health`, { origin: 'http://evil.example' });
    expect(cors.headers['access-control-allow-origin']).not.toBe('http://evil.example');
    expect(cors.headers['access-control-allow-origin']).not.toBe('*');
  });

  it('its command line names a key file, never the key; the file is gone; no LLAMA_ARG_* reached its environment', () => {
    const argv = readFileSync(`/proc/${llamaPid}/cmdline`, 'utf8').split('\0');
    expect(argv).not.toContain('--api-key');
    const file = argv[argv.indexOf('--api-key-file') + 1]!;
    expect(file).toMatch(/mesh-llama-key-/);
    expect(existsSync(file)).toBe(false);
    for (const f of ['--no-webui', '--no-agent', '--no-ui-mcp-proxy', '--no-cors-credentials']) expect(argv).toContain(f);
    expect(argv[argv.indexOf('--cors-origins') + 1]).toBe('https://mesh-inference.invalid');
    const env = readFileSync(`/proc/${llamaPid}/environ`, 'utf8').split('\0');
    expect(env.filter((e) => /^LLAMA_ARG_|^LLAMA_API_KEY=/.test(e))).toEqual([]);
    expect(env).toContain('LLAMA_SERVER_ROUTER_PORT=0');
    // The node itself had them (the test planted them there).
    const nodeEnv = readFileSync(`/proc/${host.proc.pid}/environ`, 'utf8');
    expect(nodeEnv).toContain('LLAMA_ARG_TOOLS=all');
  });

  it(':9337 refuses a DNS-rebinding request with 421; loopback and --allowed-host names are answered', async () => {
    for (const node of [host, worker]) {
      const port = new URL(node.api).port;
      const rebound = await get(`${node.api}/api/status`, { host: `evil.example:${port}` });
      expect(rebound.status).toBe(421);
      expect(JSON.parse(rebound.body).error).toMatchObject({ code: 'host_not_allowed' });
      expect((await get(`${node.api}/api/status`, { host: `localhost:${port}` })).status).toBe(200);
      expect((await get(`${node.api}/v1/models`, { host: `evil.example:${port}` })).status).toBe(421);
    }
    const port = new URL(worker.api).port;
    expect((await get(`${worker.api}/api/status`, { host: `mesh.example:${port}` })).status).toBe(200);
  });

  it('--listen-all without --api-key warned at start, naming the risk', () => {
    expect(host.lines().some((l) => /--listen-all without --api-key: anyone on the network .* mesh's GPUs/.test(l))).toBe(true);
    expect(worker.lines().some((l) => /--listen-all without --api-key/.test(l))).toBe(false);
  });

  it("no TCP port of the host's node but its API answers HTTP; its mesh listener is a private Unix socket", async () => {
    const apiPort = Number(new URL(host.api).port);
    const ports = listeningTcpPorts(host.proc.pid!).filter((p) => p !== apiPort);
    expect(ports.length).toBeGreaterThan(0); // the data port at least
    for (const port of ports) {
      const answer = await fetch(`http://127.0.0.1:${port}/v1/models`, { signal: AbortSignal.timeout(3_000) }).then(
        (r) => r.status,
        () => 'no http',
      );
      expect(answer, `port ${port}`).not.toBe(200);
    }
    const unix = readFileSync('/proc/net/unix', 'utf8').split('\n').map((l) => l.trim().split(/\s+/).at(-1) ?? '').filter((p) => /mesh-inference-.*\/mesh-api\.sock$/.test(p));
    expect(unix.length).toBeGreaterThan(0);
    for (const path of unix) {
      if (!existsSync(path)) continue;
      expect(statSync(path.replace(/\/mesh-api\.sock$/, '')).mode & 0o777).toBe(0o700);
    }
  });
});

/** TCP ports in LISTEN that the process holds (its own sockets, not its children's). */
function listeningTcpPorts(pid: number): number[] {
  const inodes = new Set(
    readdirSync(`/proc/${pid}/fd`)
      .map((fd) => {
        try {
          return /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`))?.[1];
        } catch {
          return undefined;
        }
      })
      .filter((i): i is string => i !== undefined),
  );
  const ports: number[] = [];
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    for (const line of readFileSync(table, 'utf8').split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 10 || f[3] !== '0A' || !inodes.has(f[9]!)) continue;
      ports.push(parseInt(f[1]!.split(':')[1]!, 16));
    }
  }
  return [...new Set(ports)];
}
