// `mesh-inference inspector [--port 8080]`: a local Stately inspector relay for nodes started with
// `--inspect ws://127.0.0.1:PORT`. Nodes send their actors' events to its WebSocket; a browser that opens
// http://127.0.0.1:PORT gets a page that loads stately.ai/inspect and feeds it those events. The nodes need
// no internet; the browser needs stately.ai (any WebSocket server that reads the JSON events works too).
import { createInspectorServer } from '@statelyai/inspect/server';

export function runInspectorRelay(port: number, out: (line: string) => void): { stop(): void } {
  const server = createInspectorServer({ port, autoOpen: false });
  out(`mesh-inference inspector: relaying on ws://127.0.0.1:${port}`);
  out(`  start nodes with: mesh-inference --inspect ws://127.0.0.1:${port} ...`);
  out(`  open http://127.0.0.1:${port} in a browser (it loads stately.ai/inspect, so the browser needs the internet; the nodes do not)`);
  return server;
}
