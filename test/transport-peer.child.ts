// A mesh endpoint in its own process, for tests that SIGKILL a peer: it echoes control streams and prints
// {"id","addrs","dialed"} as one JSON line once bound. Args: [secret key hex | -] [{"id","addrs"} to dial first].
import { randomBytes } from 'node:crypto';
import { asEndpointId } from '../src/machines/mesh-types.ts';
import { createIrohEndpoint } from '../src/io/transport/iroh-transport.ts';

const [keyHex, dialTo] = process.argv.slice(2);
const key = keyHex && keyHex !== '-' ? new Uint8Array(Buffer.from(keyHex, 'hex')) : new Uint8Array(randomBytes(32));
const ep = await createIrohEndpoint({ secretKey: key, bindHost: '127.0.0.1', admission: 'open' });
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
let dialed: string | undefined;
if (dialTo) {
  const t = JSON.parse(dialTo) as { id: string; addrs: string[] };
  dialed = await ep.dial(asEndpointId(t.id), t.addrs).then(
    () => 'ok',
    (e: unknown) => String(e),
  );
}
process.stdout.write(JSON.stringify({ id: ep.id, addrs: ep.addrs(), dialed }) + '\n');
setInterval(() => {}, 1 << 30);
