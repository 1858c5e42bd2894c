// The node's OpenAI API: request checking and errors (app.inject), then real HTTP: an upstream that dies
// mid-stream ends the stream with an SSE error event (the official openai client throws), a client that
// goes away aborts the upstream request, and against a real llama-server through rpc-servers: answers,
// streaming chunk by chunk, and a killed upstream mid-stream.
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { FastifyInstance } from 'fastify';
import OpenAI from 'openai';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { allowedHostNames, hostHeaderName } from '../src/io/http/api-access.ts';
import type { Upstream } from '../src/io/http/api-proxy.ts';
import { buildApiServer, type ApiServerInit } from '../src/io/http/api-server.ts';
import { startLlamaServer, type LlamaServerProcess } from '../src/io/llama/llama-server-process.ts';
import { stopAll } from '../src/io/llama/processes.ts';
import { startRpcServer } from '../src/io/llama/rpc-server-process.ts';
import { llamaBinaries, makeTempModel, type TempModel } from './helpers/llama.ts';

const apps: FastifyInstance[] = [];
const upstreams: Server[] = [];
afterEach(async () => {
  for (const a of apps.splice(0)) await a.close();
  for (const s of upstreams.splice(0)) s.closeAllConnections(), s.close();
});

function app(init: Partial<ApiServerInit> & Pick<ApiServerInit, 'upstream'>): FastifyInstance {
  const a = buildApiServer({ status: () => ({ state: 'serving' }), ...init });
  apps.push(a);
  return a;
}
async function listen(a: FastifyInstance): Promise<string> {
  await a.listen({ host: '127.0.0.1', port: 0 });
  const addr = a.server.address() as { port: number };
  return `http://127.0.0.1:${addr.port}`;
}
async function upstreamServer(handler: (req: IncomingMessage, res: ServerResponse) => void): Promise<string> {
  const s = createServer(handler);
  upstreams.push(s);
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  return `http://127.0.0.1:${(s.address() as { port: number }).port}`;
}
const never: ApiServerInit['upstream'] = () => Promise.reject(new Error('the resolver must not be asked'));
const chat = { messages: [{ role: 'user', content: 'hi' }] };

describe('request checking (inject)', () => {
  it('bad JSON, a wrong content type, a missing field: 400 with an OpenAI error body', async () => {
    const a = app({ upstream: never });
    const bad = await a.inject({ method: 'POST', url: '/v1/chat/completions', headers: { 'content-type': 'application/json' }, payload: '{"messages": [' });
    expect(bad.statusCode).toBe(400);
    expect(bad.json()).toMatchObject({ error: { type: 'invalid_request_error', code: 'invalid_json' } });
    expect(bad.json().error.message).toMatch(/^the body is not valid JSON/);

    const text = await a.inject({ method: 'POST', url: '/v1/chat/completions', headers: { 'content-type': 'text/plain' }, payload: JSON.stringify(chat) });
    expect(text.statusCode).toBe(400);
    expect(text.json()).toMatchObject({ error: { code: 'unsupported_content_type', message: 'content-type must be application/json (got text/plain)' } });

    const noMessages = await a.inject({ method: 'POST', url: '/v1/chat/completions', payload: { model: 'x' } });
    expect(noMessages.statusCode).toBe(400);
    expect(noMessages.json()).toEqual({ error: { message: "missing required field 'messages'", type: 'invalid_request_error', code: 'missing_field', param: 'messages' } });

    const noPrompt = await a.inject({ method: 'POST', url: '/v1/completions', payload: { max_tokens: 3 } });
    expect(noPrompt.json().error).toMatchObject({ code: 'missing_field', param: 'prompt' });

    const empty = await a.inject({ method: 'POST', url: '/v1/chat/completions', payload: { messages: [] } });
    expect(empty.json().error).toMatchObject({ code: 'invalid_field', param: 'messages' });
    const badMsg = await a.inject({ method: 'POST', url: '/v1/chat/completions', payload: { messages: ['hi'] } });
    expect(badMsg.json().error).toMatchObject({ code: 'invalid_field', param: 'messages[0]' });
    const badStream = await a.inject({ method: 'POST', url: '/v1/completions', payload: { prompt: 'x', stream: 'yes' } });
    expect(badStream.json().error).toMatchObject({ param: 'stream' });
    const arr = await a.inject({ method: 'POST', url: '/v1/chat/completions', payload: '[1]', headers: { 'content-type': 'application/json' } });
    expect(arr.json().error).toMatchObject({ code: 'invalid_body' });
    const nothing = await a.inject({ method: 'POST', url: '/v1/chat/completions' });
    expect(nothing.statusCode).toBe(400);
    expect(nothing.json().error.type).toBe('invalid_request_error');
  });

  it('unknown routes: 404 in the same shape', async () => {
    const r = await app({ upstream: never }).inject({ method: 'GET', url: '/v1/nope' });
    expect(r.statusCode).toBe(404);
    expect(r.json()).toMatchObject({ error: { code: 'not_found', message: 'no route GET /v1/nope' } });
  });

  it('no route: 503 with Retry-After and the reason; a hung or failing resolver is bounded', async () => {
    const down = app({ upstream: async () => ({ kind: 'unavailable', reason: 'need 12.1 GB of VRAM, the mesh has 8.0 GB', retryAfterS: 30 }) });
    const r = await down.inject({ method: 'POST', url: '/v1/chat/completions', payload: chat });
    expect(r.statusCode).toBe(503);
    expect(r.headers['retry-after']).toBe('30');
    expect(r.json().error).toMatchObject({ code: 'mesh_unavailable', message: 'need 12.1 GB of VRAM, the mesh has 8.0 GB' });
    const h = await down.inject({ method: 'GET', url: '/health' });
    expect(h.statusCode).toBe(503);
    expect(h.json()).toEqual({ status: 'unavailable', reason: 'need 12.1 GB of VRAM, the mesh has 8.0 GB' });

    let sawAbort = false;
    const hung = app({
      resolveTimeoutMs: 300,
      upstream: ({ signal }) => new Promise<Upstream>(() => signal.addEventListener('abort', () => (sawAbort = true))),
    });
    const t = await hung.inject({ method: 'GET', url: '/v1/models' });
    expect(t.statusCode).toBe(503);
    expect(t.json().error.message).toMatch(/waited too long/);
    expect(sawAbort).toBe(true);

    const broken = app({ upstream: async () => { throw new Error('node is stopping'); } });
    const b = await broken.inject({ method: 'GET', url: '/v1/models' });
    expect(b.statusCode).toBe(503);
    expect(b.json().error.message).toBe('no route: node is stopping');
  });

  it('--api-key protects everything but /health', async () => {
    const a = app({ apiKey: 's3cret', upstream: async () => ({ kind: 'unavailable', reason: 'r', retryAfterS: 1 }) });
    const none = await a.inject({ method: 'GET', url: '/api/status' });
    expect(none.statusCode).toBe(401);
    expect(none.json().error).toMatchObject({ code: 'invalid_api_key' });
    expect((await a.inject({ method: 'GET', url: '/v1/models', headers: { authorization: 'Bearer nope' } })).statusCode).toBe(401);
    expect((await a.inject({ method: 'POST', url: '/v1/chat/completions', payload: chat })).statusCode).toBe(401);
    expect((await a.inject({ method: 'GET', url: '/health' })).statusCode).toBe(503);
    const ok = await a.inject({ method: 'GET', url: '/api/status', headers: { authorization: 'Bearer s3cret' } });
    expect(ok.statusCode).toBe(200);
    expect(ok.json()).toEqual({ state: 'serving' });
  });
});

describe('Host check (DNS rebinding)', () => {
  const ok = async () => ({ kind: 'unavailable' as const, reason: 'r', retryAfterS: 1 });

  it('answers loopback names with or without a port, refuses other names with 421 and a JSON error', async () => {
    const a = app({ upstream: ok });
    for (const host of ['localhost', 'localhost:9337', '127.0.0.1', '127.0.0.1:9337', '[::1]', '[::1]:9337', 'LOCALHOST:1']) {
      const r = await a.inject({ method: 'GET', url: '/api/status', headers: { host } });
      expect(r.statusCode, host).toBe(200);
    }
    for (const host of ['evil.example', 'evil.example:9337', 'localhost.evil.example', '127.0.0.1.nip.io:9337', '10.0.0.5:9337', 'localhost:9337@evil']) {
      const r = await a.inject({ method: 'GET', url: '/api/status', headers: { host } });
      expect(r.statusCode, host).toBe(421);
      expect(r.json().error).toMatchObject({ type: 'invalid_request_error', code: 'host_not_allowed' });
    }
    const r = await a.inject({ method: 'POST', url: '/v1/chat/completions', payload: chat, headers: { host: 'rebound.example:9337' } });
    expect(r.statusCode).toBe(421);
    expect(r.json().error.message).toMatch(/does not answer to Host "rebound.example:9337" \(DNS rebinding protection\).*--allowed-host rebound.example/);
    // /health too: no route answers a foreign name.
    expect((await a.inject({ method: 'GET', url: '/health', headers: { host: 'evil.example' } })).statusCode).toBe(421);
  });

  it('--allowed-host names and the addresses it listens on are answered; the Host check comes before the key check', async () => {
    const names = allowedHostNames('0.0.0.0', ['Mesh.LAN', '[fd00::7]'], () => ['192.168.1.5', 'fe80::1']);
    expect([...names].sort()).toEqual(['127.0.0.1', '192.168.1.5', '::1', 'fd00::7', 'fe80::1', 'localhost', 'mesh.lan'].sort());
    expect([...allowedHostNames('127.0.0.1')].sort()).toEqual(['127.0.0.1', '::1', 'localhost']);
    const a = app({ upstream: ok, apiKey: 'k', allowedHosts: names });
    for (const host of ['mesh.lan:9337', 'MESH.lan', '192.168.1.5:9337', '[fe80::1]:9337', '[fd00::7]']) {
      const r = await a.inject({ method: 'GET', url: '/api/status', headers: { host, authorization: 'Bearer k' } });
      expect(r.statusCode, host).toBe(200);
    }
    const foreign = await a.inject({ method: 'GET', url: '/api/status', headers: { host: 'evil.example', authorization: 'Bearer k' } });
    expect(foreign.statusCode).toBe(421);
    const noKey = await a.inject({ method: 'GET', url: '/api/status', headers: { host: 'evil.example' } });
    expect(noKey.statusCode).toBe(421);
  });

  it('parses Host headers', () => {
    expect(hostHeaderName('Example.COM:80')).toBe('example.com');
    expect(hostHeaderName('example.com.')).toBe('example.com');
    expect(hostHeaderName('[::1]:9337')).toBe('::1');
    expect(hostHeaderName('[::1')).toBeNull();
    expect(hostHeaderName('')).toBeNull();
    expect(hostHeaderName('a b')).toBeNull();
    expect(hostHeaderName('user@host')).toBeNull();
    expect(hostHeaderName('host:99999999')).toBeNull();
  });
});

describe('the mesh listener (where http tunnels end)', () => {
  it("serves llama-server's /completion, /tokenize and /apply-template; the client API does not", async () => {
    const seen: { path: string; auth: string | undefined; body: string }[] = [];
    const up = await upstreamServer((req, res) => {
      let body = '';
      req.on('data', (c) => (body += c));
      req.on('end', () => {
        seen.push({ path: req.url!, auth: req.headers.authorization, body });
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ path: req.url }));
      });
    });
    const upstream = async () => ({ kind: 'url' as const, baseUrl: up, headers: { authorization: 'Bearer llama-key' } });
    const mesh = app({ upstream, llamaRoutes: true });
    for (const [path, body] of [
      ['/completion', { prompt: 'hi', n_predict: 2 }],
      ['/tokenize', { content: 'hi' }],
      ['/apply-template', { messages: [{ role: 'user', content: 'hi' }] }],
    ] as const) {
      const r = await mesh.inject({ method: 'POST', url: path, payload: body });
      expect(r.statusCode, path).toBe(200);
      expect(r.json()).toEqual({ path });
    }
    expect(seen.map((x) => x.auth)).toEqual(['Bearer llama-key', 'Bearer llama-key', 'Bearer llama-key']);
    expect((await mesh.inject({ method: 'POST', url: '/tokenize', payload: { nope: 1 } })).json().error).toMatchObject({ param: 'content' });
    // The client API (:9337) has none of them.
    const client = app({ upstream });
    expect((await client.inject({ method: 'POST', url: '/completion', payload: { prompt: 'hi' } })).statusCode).toBe(404);
  });

  it("a client's Authorization header never reaches the upstream; the route's own key does", async () => {
    const auths: (string | undefined)[] = [];
    const up = await upstreamServer((req, res) => {
      auths.push(req.headers.authorization);
      res.writeHead(200, { 'content-type': 'application/json' }).end('{"data":[]}');
    });
    const a = app({ upstream: async () => ({ kind: 'url', baseUrl: up }) });
    await a.inject({ method: 'GET', url: '/v1/models', headers: { authorization: 'Bearer forged' } });
    expect(auths).toEqual([undefined]);
  });

  it("llama-server's /completion stream ends with a stop:true event, no [DONE]: passed on whole, no error event", async () => {
    const up = await upstreamServer((_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.write('data: {"content":"a","stop":false}\n\n');
      res.end('data: {"content":"","stop":true,"timings":{}}\n\n');
    });
    const base = await listen(app({ upstream: async () => ({ kind: 'url', baseUrl: up }), llamaRoutes: true }));
    const raw = await (await fetch(`${base}/completion`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'x', stream: true }) })).text();
    expect(raw).toContain('"stop":true');
    expect(raw).not.toContain('event: error');
    // Cut before the stop event: an error event.
    const cut = await upstreamServer((_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.end('data: {"content":"a","stop":false}\n\n');
    });
    const base2 = await listen(app({ upstream: async () => ({ kind: 'url', baseUrl: cut }), llamaRoutes: true }));
    const raw2 = await (await fetch(`${base2}/completion`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'x', stream: true }) })).text();
    expect(raw2).toContain('event: error');
  });
});

describe('proxying over real HTTP', () => {
  it('passes answers and upstream errors through; a dead upstream is 503', async () => {
    const up = await upstreamServer((req, res) => {
      let body = '';
      req.on('data', (c) => (body += c));
      req.on('end', () => {
        if (req.url === '/v1/models') return res.writeHead(200, { 'content-type': 'application/json' }).end('{"data":[{"id":"m"}]}');
        const j = JSON.parse(body);
        if (j.max_tokens === -5) return res.writeHead(400, { 'content-type': 'application/json' }).end('{"error":{"message":"bad max_tokens","code":400}}');
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ echo: j, path: req.url }));
      });
    });
    const base = await listen(app({ upstream: async () => ({ kind: 'url', baseUrl: up }) }));
    const r = await fetch(`${base}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...chat, n: 1 }) });
    expect(await r.json()).toEqual({ echo: { ...chat, n: 1 }, path: '/v1/chat/completions' });
    expect(await (await fetch(`${base}/v1/models`)).json()).toEqual({ data: [{ id: 'm' }] });
    const e = await fetch(`${base}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"prompt":"x","max_tokens":-5}' });
    expect(e.status).toBe(400);
    expect((await e.json()).error.message).toBe('bad max_tokens');

    const dead = await listen(app({ upstream: async () => ({ kind: 'url', baseUrl: 'http://127.0.0.1:1' }) }));
    const d = await fetch(`${dead}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(chat) });
    expect(d.status).toBe(503);
    expect(d.headers.get('retry-after')).toBe('5');
    expect((await d.json()).error.code).toBe('upstream_unavailable');
  });

  it('an upstream that dies mid-stream: an SSE error event, no [DONE]; the openai client throws', async () => {
    const up = await upstreamServer((req, res) => {
      req.resume();
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.write('data: {"id":"1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\n\n');
      setTimeout(() => res.socket?.destroy(), 50);
    });
    const base = await listen(app({ upstream: async () => ({ kind: 'url', baseUrl: up }) }));
    const raw = await (await fetch(`${base}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...chat, stream: true }) })).text();
    expect(raw).toContain('"content":"Hel"');
    expect(raw).toMatch(/event: error\ndata: \{"error":\{"message":"the stream was cut: [^"]+","type":"server_error","code":"stream_interrupted"/);
    expect(raw).not.toContain('[DONE]');

    const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0 });
    const got: string[] = [];
    await expect(
      (async () => {
        const stream = await client.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'hi' }], stream: true });
        for await (const c of stream) got.push(c.choices[0]?.delta?.content ?? '');
      })(),
    ).rejects.toThrow(/the stream was cut/);
    expect(got).toEqual(['Hel']);
  });

  it('an upstream that ends a stream cleanly but without [DONE] is also an error, not a silent truncation', async () => {
    const up = await upstreamServer((req, res) => {
      req.resume();
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.end('data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n');
    });
    const base = await listen(app({ upstream: async () => ({ kind: 'url', baseUrl: up }) }));
    const raw = await (await fetch(`${base}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"prompt":"a","stream":true}' })).text();
    expect(raw).toMatch(/event: error\ndata: .*without \[DONE\]/);
  });

  it('a client that goes away aborts the upstream request', async () => {
    let upstreamClosed!: () => void;
    const closed = new Promise<void>((r) => (upstreamClosed = r));
    const up = await upstreamServer((req, res) => {
      req.resume();
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      const t = setInterval(() => res.write('data: {"choices":[{"index":0,"delta":{"content":"."}}]}\n\n'), 20);
      res.on('close', () => {
        clearInterval(t);
        upstreamClosed();
      });
    });
    const base = await listen(app({ upstream: async () => ({ kind: 'url', baseUrl: up }) }));
    const ctrl = new AbortController();
    const res = await fetch(`${base}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...chat, stream: true }), signal: ctrl.signal });
    const reader = res.body!.getReader();
    await reader.read();
    ctrl.abort();
    await expect(Promise.race([closed.then(() => 'closed'), new Promise((r) => setTimeout(() => r('still open'), 10_000))])).resolves.toBe('closed');
  });

  it('a client that goes away from a non-streaming request aborts it upstream too', async () => {
    let upstreamClosed!: () => void;
    const closed = new Promise<void>((r) => (upstreamClosed = r));
    let arrived!: () => void;
    const got = new Promise<void>((r) => (arrived = r));
    const up = await upstreamServer((req, res) => {
      req.resume();
      arrived();
      res.on('close', () => upstreamClosed()); // never answers: a long generation
    });
    const base = await listen(app({ upstream: async () => ({ kind: 'url', baseUrl: up }) }));
    const ctrl = new AbortController();
    const pending = fetch(`${base}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"prompt":"x"}', signal: ctrl.signal }).catch(() => 'aborted');
    await got;
    ctrl.abort();
    expect(await pending).toBe('aborted');
    await expect(Promise.race([closed.then(() => 'closed'), new Promise((r) => setTimeout(() => r('still open'), 10_000))])).resolves.toBe('closed');
  });
});

describe('against a real llama-server', () => {
  let model: TempModel;
  let llama: LlamaServerProcess;
  beforeAll(async () => {
    model = await makeTempModel();
    const bins = llamaBinaries();
    const rpc = await startRpcServer({ binary: bins.rpcServer, threads: 1 });
    llama = await startLlamaServer({ binary: bins.llamaServer, model: model.path, rpc: [rpc.address], threads: 1, ctxSize: 4096 });
  });
  afterAll(async () => {
    await stopAll(3000);
    await model.remove();
  });

  it('answers chat and completions through the proxy, with the openai client', async () => {
    const base = await listen(app({ upstream: async () => ({ kind: 'url', baseUrl: llama.url, headers: llama.authHeaders }) }));
    const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0 });
    const models = await client.models.list();
    expect(models.data.length).toBeGreaterThan(0);
    const c = await client.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'hi' }], max_tokens: 8, temperature: 0 });
    expect(c.choices[0]?.message.content?.length).toBeGreaterThan(0);
    expect(c.usage?.completion_tokens).toBe(8);
    const p = await client.completions.create({ model: 'm', prompt: 'Once upon a time', max_tokens: 8, temperature: 0 });
    expect(p.choices[0]?.text.length).toBeGreaterThan(0);
    expect((await fetch(`${base}/health`)).status).toBe(200);
  });

  it('streams chunk by chunk: a client that leaves after the first chunk stops the generation', async () => {
    const base = await listen(app({ upstream: async () => ({ kind: 'url', baseUrl: llama.url, headers: llama.authHeaders }) }));
    const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0 });
    const stream = await client.completions.create({ model: 'm', prompt: 'Once upon a time', max_tokens: 3000, temperature: 0, stream: true });
    let chunks = 0;
    for await (const c of stream) {
      chunks++;
      expect(c.choices[0]).toBeDefined();
      if (chunks === 2) break; // leaves: the SDK aborts its request
    }
    // llama-server cancels the task only if the first chunks reached us before it finished all 3000 tokens.
    const deadline = Date.now() + 20_000;
    let log = '';
    while (Date.now() < deadline) {
      log = llama.process.tail().slice(-60).join('\n');
      if (/cancel task/.test(log) && /eval time = .* \/\s+\d+ tokens/.test(log)) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(log).toMatch(/cancel task/);
    const evals = [...log.matchAll(/ {7}eval time = .*? \/\s+(\d+) tokens/g)].map((m) => Number(m[1]));
    expect(evals.at(-1)).toBeLessThan(3000);
  });

  it('a full stream ends with [DONE] and the chunks add up', async () => {
    const base = await listen(app({ upstream: async () => ({ kind: 'url', baseUrl: llama.url, headers: llama.authHeaders }) }));
    const raw = await (await fetch(`${base}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...chat, stream: true, max_tokens: 16, temperature: 0 }) })).text();
    expect(raw.trimEnd().endsWith('data: [DONE]')).toBe(true);
    expect(raw).not.toContain('event: error');
    expect(raw.split('\n').filter((l) => l.startsWith('data: {')).length).toBeGreaterThanOrEqual(16);
  });
});

describe('a real llama-server killed mid-stream', () => {
  it('the client gets the SSE error event, never a hang or a silent end', async () => {
    const model = await makeTempModel();
    try {
      const bins = llamaBinaries();
      const rpc = await startRpcServer({ binary: bins.rpcServer, threads: 1 });
      const llama = await startLlamaServer({ binary: bins.llamaServer, model: model.path, rpc: [rpc.address], threads: 1, ctxSize: 4096 });
      const base = await listen(app({ upstream: async () => ({ kind: 'url', baseUrl: llama.url, headers: llama.authHeaders }) }));
      const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0 });
      const stream = await client.completions.create({ model: 'm', prompt: 'Once upon a time', max_tokens: 3000, temperature: 0, stream: true });
      let chunks = 0;
      const outcome = await (async () => {
        try {
          for await (const _ of stream) {
            if (++chunks === 2) process.kill(llama.process.pid, 'SIGKILL');
          }
          return 'ended silently';
        } catch (err) {
          return (err as Error).message;
        }
      })();
      expect(outcome).toMatch(/the stream was cut/);
      expect(chunks).toBeGreaterThanOrEqual(2);
    } finally {
      await stopAll(3000);
      await model.remove();
    }
  });
});

describe('meshUpstreamResolver: one proxy machine per request', () => {
  type Snap = Parameters<typeof import('../src/machines/proxy.machine.ts').routeFacts>[0];
  /** The node actor as routing sees it: a snapshot and its updates. */
  function fakeNode(initial: { running: unknown; llamaPort: number | null; links: string[]; serving: boolean }) {
    let state = initial;
    const subs = new Set<(s: Snap) => void>();
    const snap = (): Snap => ({
      context: { self: { id: 'aa' as never }, running: state.running as never, llamaPort: state.llamaPort, links: state.links as never },
      matches: () => state.serving,
    });
    return {
      getSnapshot: snap,
      subscribe(cb: (s: Snap) => void) {
        subs.add(cb);
        return { unsubscribe: () => subs.delete(cb) };
      },
      set(next: Partial<typeof initial>) {
        state = { ...state, ...next };
        for (const cb of subs) cb(snap());
      },
      subscribers: () => subs.size,
    };
  }
  const ready = (host: string) => ({ kind: 'ready', id: 'p', host, stages: [{ id: host, share: 1 }], model: { name: 'm', bytes: 1, fingerprint: 'f' } });

  it('waits for the mesh, then routes to the local llama-server or through the tunnel to the host', async () => {
    const { meshUpstreamResolver } = await import('../src/actors/api-server.actor.ts');
    const node = fakeNode({ running: null, llamaPort: null, links: [], serving: false });
    const resolve = meshUpstreamResolver({ node, remoteBaseUrl: async (host) => `http://127.0.0.1:7/${host}` });
    const pending = resolve({ path: '/v1/models', signal: new AbortController().signal });
    await new Promise((r) => setTimeout(r, 50));
    expect(node.subscribers()).toBe(1);
    node.set({ running: ready('aa'), serving: true, llamaPort: 4242 });
    expect(await pending).toEqual({ kind: 'url', baseUrl: 'http://127.0.0.1:4242' }); // no llama-server of ours on 4242: no key
    expect(node.subscribers()).toBe(0);

    node.set({ running: ready('bb'), links: ['bb'], llamaPort: null });
    expect(await resolve({ path: '/v1/models', signal: new AbortController().signal })).toEqual({ kind: 'url', baseUrl: 'http://127.0.0.1:7/bb' });
    node.set({ running: { kind: 'waiting', id: 'w', reason: 'need 12.1 GB of VRAM, the mesh has 8.0 GB' } });
    expect(await resolve({ path: '/v1/models', signal: new AbortController().signal })).toEqual({ kind: 'unavailable', reason: 'need 12.1 GB of VRAM, the mesh has 8.0 GB', retryAfterS: 30 });
  });

  it("a local route carries the local llama-server's key; a mesh request is served locally or refused, never forwarded", async () => {
    const { meshUpstreamResolver } = await import('../src/actors/api-server.actor.ts');
    const { NOT_HOST_REASON } = await import('../src/machines/proxy.machine.ts');
    const keys = (port: number) => (port === 4242 ? 'k4242' : null);
    const node = fakeNode({ running: ready('aa'), llamaPort: 4242, links: [], serving: true });
    const forwarded: string[] = [];
    const remoteBaseUrl = async (host: string) => (forwarded.push(host), `http://127.0.0.1:7/${host}`);
    const client = meshUpstreamResolver({ node, remoteBaseUrl, llamaKeyFor: keys });
    const mesh = meshUpstreamResolver({ node, remoteBaseUrl, llamaKeyFor: keys, origin: 'mesh' });
    const sig = () => new AbortController().signal;
    const local = { kind: 'url', baseUrl: 'http://127.0.0.1:4242', headers: { authorization: 'Bearer k4242' } };
    expect(await client({ path: '/v1/models', signal: sig() })).toEqual(local);
    expect(await mesh({ path: '/v1/models', signal: sig() })).toEqual(local);
    // Another node hosts now (two nodes whose plans disagree): the client's request goes there, the mesh's is
    // refused at once, never sent back over the mesh.
    node.set({ running: ready('bb'), links: ['bb'], llamaPort: null });
    expect(await client({ path: '/v1/models', signal: sig() })).toEqual({ kind: 'url', baseUrl: 'http://127.0.0.1:7/bb' });
    expect(forwarded).toEqual(['bb']);
    expect(await mesh({ path: '/v1/models', signal: sig() })).toEqual({ kind: 'unavailable', reason: NOT_HOST_REASON, retryAfterS: 2 });
    // Through the mesh listener's API: 503 with Retry-After, nothing forwarded.
    const a = app({ upstream: mesh, llamaRoutes: true });
    for (const [url, payload] of [['/v1/chat/completions', chat], ['/completion', { prompt: 'x' }]] as const) {
      const r = await a.inject({ method: 'POST', url, payload });
      expect(r.statusCode, url).toBe(503);
      expect(r.json().error.message).toBe(NOT_HOST_REASON);
    }
    expect((await a.inject({ method: 'GET', url: '/health' })).statusCode).toBe(503);
    expect(forwarded).toEqual(['bb']);
    // Still restarting as the host: the mesh request waits (bounded) like any other.
    node.set({ running: ready('aa'), links: [], llamaPort: null, serving: false });
    const pending = mesh({ path: '/v1/models', signal: sig() });
    await new Promise((r) => setTimeout(r, 30));
    node.set({ llamaPort: 4242, serving: true });
    expect(await pending).toEqual(local);
  });

  it('gives up after the wait bound, and at once when the client leaves', async () => {
    const { meshUpstreamResolver } = await import('../src/actors/api-server.actor.ts');
    const node = fakeNode({ running: null, llamaPort: null, links: [], serving: false });
    const resolve = meshUpstreamResolver({ node, remoteBaseUrl: async () => 'x', maxWaitMs: 200 });
    expect(await resolve({ path: '/v1/models', signal: new AbortController().signal })).toMatchObject({ kind: 'unavailable', reason: 'the mesh is restarting; try again shortly' });
    const ctrl = new AbortController();
    const slow = meshUpstreamResolver({ node, remoteBaseUrl: async () => 'x' })({ path: '/v1/models', signal: ctrl.signal });
    ctrl.abort();
    expect(await slow).toMatchObject({ kind: 'unavailable' });
    expect(node.subscribers()).toBe(0);
    // Through the API: the wait ends in 503 with Retry-After.
    const a = app({ upstream: resolve });
    const r = await a.inject({ method: 'POST', url: '/v1/chat/completions', payload: chat });
    expect(r.statusCode).toBe(503);
    expect(r.headers['retry-after']).toBe('5');
  });
});
