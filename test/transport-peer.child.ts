// A mesh endpoint in its own process, for tests that SIGKILL a peer: it echoes control streams and
// prints {"id","addrs"} as one JSON line once bound.
import { randomBytes } from 'node:crypto';
import { createIrohEndpoint } from '../src/io/iroh-transport.ts';

const ep = await createIrohEndpoint({ secretKey: new Uint8Array(randomBytes(32)), bindHost: '127.0.0.1' });
ep.handle('control', (s) => {
  void (async () => {
    for (;;) {
      const chunk = await s.read();
      if (chunk === null) break;
      await s.write(chunk);
    }
    await s.finish();
  })().catch(() => {});
});
// Accepted connections are kept by the endpoint; draining accept() keeps its queue empty.
void (async () => {
  while ((await ep.accept()) !== null);
})();
process.stdout.write(JSON.stringify({ id: ep.id, addrs: ep.addrs() }) + '\n');
setInterval(() => {}, 1 << 30);
