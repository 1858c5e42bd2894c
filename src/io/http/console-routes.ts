// The console and its feed on the node's API port: `GET /api/events` (server-sent events: a snapshot of the
// mesh first, then one event per change; src/machines/mesh-events.ts has the types, docs/console.md the
// catalogue) and the console's page at `/` and `/console/` (static files of ./console/, and the browser
// builds of cytoscape and uPlot from node_modules; no build step).
//
// Access: the page and its scripts hold nothing of the mesh and are served without the key (a browser that
// opens the URL sends no Authorization header); everything they show comes from `/api/events` and
// `/api/status`, which need the key like the rest of the API (the page asks for it and sends it with fetch,
// keeping it in the tab's sessionStorage). The Host check applies to every route, the page's included.
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import fastifyStatic from '@fastify/static';
import type { FastifyInstance } from 'fastify';

export interface ConsoleEvent {
  readonly seq: number;
  readonly type: string;
}

export interface ConsoleRoutesInit {
  /** The event every client gets first (type `snapshot`). */
  readonly snapshot: () => ConsoleEvent;
  /** Every later event, in order; returns the unsubscribe. */
  readonly subscribe: (listener: (event: ConsoleEvent) => void) => () => void;
  /** A comment line this often keeps proxies from closing a quiet stream (default 15 s). */
  readonly keepAliveMs?: number;
  /** A client that falls this far behind (bytes not yet sent) is dropped; it reconnects for a new snapshot (default 4 MiB). */
  readonly maxBufferedBytes?: number;
}

const CONSOLE_DIR = join(dirname(fileURLToPath(import.meta.url)), 'console');
const require = createRequire(import.meta.url);
/** The browser builds the page loads, by the name it asks for. */
const VENDOR: Readonly<Record<string, string>> = {
  'cytoscape.min.js': require.resolve('cytoscape/dist/cytoscape.min.js'),
  'uPlot.iife.min.js': require.resolve('uplot/dist/uPlot.iife.min.js'),
  'uPlot.min.css': require.resolve('uplot/dist/uPlot.min.css'),
};

/** Paths served without the API key: the page and its static files (never data). */
export function isConsoleAssetPath(url: string): boolean {
  const path = url.split('?')[0]!;
  return path === '/' || path === '/console' || path.startsWith('/console/');
}

export function installConsoleRoutes(app: FastifyInstance, init: ConsoleRoutesInit): void {
  app.get('/api/events', (request, reply) => {
    const raw = reply.raw;
    reply.hijack();
    raw.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache, no-transform',
      connection: 'keep-alive',
      'x-accel-buffering': 'no',
    });
    const limit = init.maxBufferedBytes ?? 4 * 1024 * 1024;
    let closed = false;
    const send = (event: ConsoleEvent) => {
      if (closed || raw.destroyed) return;
      if (raw.writableLength > limit) {
        request.log.warn({ buffered: raw.writableLength }, 'an /api/events client fell behind; dropped (it reconnects for a new snapshot)');
        raw.destroy();
        return;
      }
      raw.write(`id: ${event.seq}\ndata: ${JSON.stringify(event)}\n\n`);
    };
    // The snapshot and the subscription in one turn: no event falls between them.
    send(init.snapshot());
    const unsubscribe = init.subscribe(send);
    const keepAlive = setInterval(() => {
      if (!raw.destroyed) raw.write(': keep-alive\n\n');
    }, init.keepAliveMs ?? 15_000);
    keepAlive.unref();
    raw.once('close', () => {
      closed = true;
      clearInterval(keepAlive);
      unsubscribe();
    });
  });

  void app.register(fastifyStatic, { root: CONSOLE_DIR, prefix: '/console/', index: ['index.html'], redirect: true, cacheControl: false });
  app.get('/', (_request, reply) => reply.sendFile('index.html', CONSOLE_DIR));
  app.get('/console/vendor/:file', (request, reply) => {
    const file = VENDOR[(request.params as { file: string }).file];
    if (file === undefined) return reply.code(404).send({ error: 'no such file' });
    return reply.sendFile(file.split('/').pop()!, dirname(file));
  });
}
