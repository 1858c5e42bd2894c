// A worker node's transport side in its own process: an iroh endpoint whose rpc tunnels from one host go
// to a local TCP target. Args: <host endpoint id> <target port>. Prints {"id","addrs"} once bound.
import { createIrohEndpoint } from '../src/io/transport/iroh-transport.ts';
import { ephemeralSecretKey } from '../src/io/host/secret-key.ts';
import { TunnelService } from '../src/io/transport/tunnel.ts';

const [hostId, targetPort] = process.argv.slice(2);
if (!hostId || !targetPort) {
  process.stderr.write('usage: tunnel-worker.child.ts <host id> <target port>\n');
  process.exit(2);
}
const ep = await createIrohEndpoint({ secretKey: ephemeralSecretKey(), bindHost: '127.0.0.1', admission: 'open' });
const tunnels = new TunnelService(
  {
    allow: (id, kind) =>
      id === hostId && kind === 'rpc' ? { host: '127.0.0.1', port: Number(targetPort) } : { refuse: 'not the host of our plan' },
  },
  { endpoint: ep },
);
tunnels.start();
void (async () => {
  while ((await ep.accept()) !== null);
})();
process.stdout.write(JSON.stringify({ id: ep.id, addrs: ep.addrs() }) + '\n');
process.on('SIGTERM', () => {
  void tunnels.close().then(() => ep.close()).finally(() => process.exit(0));
});
setInterval(() => {}, 1 << 30);
