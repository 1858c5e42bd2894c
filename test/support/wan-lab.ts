// The WAN lab: every node in a network namespace of its own, reachable from the others ONLY through the link
// emulator's relays (link-emulator.ts) in the root namespace. Why namespaces: iroh tells its peer every
// address it is bound to, inside QUIC, and switches to whichever path answers first; on loopback that is
// the real address, and the relay is bypassed within a second. Here no real address can be reached:
//
//   site i (namespace)                        root namespace
//   veth 10.<net>.i.2/24  <--- veth --->  10.<net>.i.1/24 (this site's side)
//   public 10.<net>.0.i/32 (also here)      public 10.<net>.0.i/32 on the root's end: the relays listen on it
//
// A node in site i binds 0.0.0.0:port_i. It announces its public address (and its veth one); a peer in site
// j dials the public address, which its default route sends to the root, where it is local: the UDP relay
// (QUIC) or the TCP relay (the data port, the same number) there forwards to 10.<net>.i.2:port_i with the
// link's shape. The veth addresses of other sites cannot be reached: the root forwards nothing (forwarding
// is off on every veth of the lab), so a dial to one is dropped. Each pair crosses exactly one relay (the
// front of whoever was dialed), so the shape's delays give the pair's round trip.
//
// Needs root and `ip` (iproute2); creating namespaces is refused otherwise, with what is missing.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { startE2eNode, type E2eNode, type NodeOptions } from '../e2e-support.ts';
import { TcpRelay, UdpRelay, type LinkRelay, type LinkShape, type RelayCounters } from './link-emulator.ts';

const run = promisify(execFile);
const IP = '/usr/sbin/ip';

export interface WanSite {
  readonly index: number;
  /** Network namespace name. */
  readonly ns: string;
  /** What the node binds and announces, and what peers dial: lands on this site's relays in the root. */
  readonly publicIp: string;
  /** The node's own veth address: where the relays deliver to (reachable from the root only). */
  readonly vethIp: string;
  /** The node's QUIC port (UDP) and data port (TCP): the same number. */
  readonly port: number;
  readonly quicRelay: UdpRelay;
  readonly dataRelay: TcpRelay;
  /** Command prefix that runs a program inside this site's namespace. */
  readonly exec: readonly string[];
}

export interface WanLab {
  readonly sites: readonly WanSite[];
  /** The same shape on every relay, both ways: `rttMs` of round trip between any two sites. */
  setShape(shape: LinkShape): void;
  /** Every relay's counters, by site index. */
  counters(): { site: number; quic: RelayCounters; data: RelayCounters }[];
  /** Tears down relays and namespaces. */
  close(): Promise<void>;
}

async function ip(...args: string[]): Promise<void> {
  try {
    await run(IP, args);
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`ip ${args.join(' ')}: ${(e.stderr || e.message).trim()}`);
  }
}

async function sysctl(ns: string | null, key: string, value: string): Promise<void> {
  const path = `/proc/sys/${key.replace(/\./g, '/')}`;
  if (ns === null) await run('sh', ['-c', `echo ${value} > ${path}`]);
  else await run(IP, ['netns', 'exec', ns, 'sh', '-c', `echo ${value} > ${path}`]);
}

/** Fails with what is missing when this machine cannot make namespaces (not root, no iproute2). */
export async function checkWanLabPossible(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('the WAN lab makes network namespaces: it must run as root');
  try {
    await run(IP, ['netns', 'list']);
  } catch (err) {
    throw new Error(`the WAN lab needs iproute2's ip (${IP}): ${(err as Error).message.split('\n')[0]}`);
  }
}

/**
 * `count` sites, numbered from 1, with relays shaped `shape`. `net` (1..250) is the second octet of the
 * lab's addresses; the default comes from the process id so that two labs on one machine do not collide.
 */
export async function createWanLab(count: number, shape: LinkShape = { delayMs: 0 }, net = 100 + (process.pid % 150)): Promise<WanLab> {
  await checkWanLabPossible();
  const tag = `wl${process.pid.toString(36)}${Date.now().toString(36).slice(-3)}`;
  const sites: WanSite[] = [];
  const relays: LinkRelay[] = [];
  const made: string[] = [];
  const close = async () => {
    await Promise.all(relays.map((r) => r.close().catch(() => {})));
    for (const ns of made) await ip('netns', 'del', ns).catch(() => {});
    for (const s of sites) await ip('addr', 'del', `${s.publicIp}/32`, 'dev', `${tag}r${s.index}`).catch(() => {});
  };
  try {
    for (let i = 1; i <= count; i++) {
      const ns = `${tag}-${i}`;
      const rootIf = `${tag}r${i}`;
      const nsIf = `${tag}n${i}`;
      const rootIp = `10.${net}.${i}.1`;
      const vethIp = `10.${net}.${i}.2`;
      const publicIp = `10.${net}.0.${i}`;
      await ip('netns', 'add', ns);
      made.push(ns);
      await ip('link', 'add', rootIf, 'type', 'veth', 'peer', 'name', nsIf);
      await ip('link', 'set', nsIf, 'netns', ns);
      await ip('addr', 'add', `${rootIp}/24`, 'dev', rootIf);
      // The root owns the public address too (on this site's veth end): traffic to it ends at the relays.
      await ip('addr', 'add', `${publicIp}/32`, 'dev', rootIf);
      await sysctl(null, `net.ipv4.conf.${rootIf}.forwarding`, '0');
      await sysctl(null, `net.ipv6.conf.${rootIf}.disable_ipv6`, '1');
      await ip('link', 'set', rootIf, 'up');
      await ip('-n', ns, 'link', 'set', 'lo', 'up');
      await ip('-n', ns, 'addr', 'add', `${vethIp}/24`, 'dev', nsIf);
      await ip('-n', ns, 'addr', 'add', `${publicIp}/32`, 'dev', nsIf);
      await sysctl(ns, `net.ipv6.conf.${nsIf}.disable_ipv6`, '1');
      await ip('-n', ns, 'link', 'set', nsIf, 'up');
      await ip('-n', ns, 'route', 'add', 'default', 'via', rootIp);
      const port = 7840 + i;
      const target = { host: vethIp, port };
      const quicRelay = await UdpRelay.start({ listenHost: publicIp, listenPort: port, target, forward: shape });
      relays.push(quicRelay);
      const dataRelay = await TcpRelay.start({ listenHost: publicIp, listenPort: port, target, forward: shape });
      relays.push(dataRelay);
      sites.push({ index: i, ns, publicIp, vethIp, port, quicRelay, dataRelay, exec: [IP, 'netns', 'exec', ns] });
    }
  } catch (err) {
    await close();
    throw err;
  }
  return {
    sites,
    setShape: (s) => relays.forEach((r) => r.setShape(s)),
    counters: () => sites.map((s) => ({ site: s.index, quic: s.quicRelay.counters(), data: s.dataRelay.counters() })),
    close,
  };
}

/**
 * A whole node (bin/mesh-inference.js, test/e2e-support.ts) in `site`: bound to 0.0.0.0 on the site's port
 * (QUIC on UDP, the data port on TCP), its API on every interface and reached at the site's veth address.
 */
export function startWanNode(site: WanSite, o: Omit<NodeOptions, 'exec' | 'apiHost'>): Promise<E2eNode> {
  return startE2eNode({
    ...o,
    exec: site.exec,
    apiHost: site.vethIp,
    extraArgs: ['--bind-port', String(site.port), '--listen-all', '--allowed-host', site.vethIp, ...(o.extraArgs ?? [])],
    env: { ...o.env, MESH_INFERENCE_BIND_HOST: '0.0.0.0' },
  });
}
