// The accept and dial loop: incoming and outgoing connections become sessions (one per peer, a newer connection replacing a stale one), each with its hello deadline.
import type { EndpointId } from '../../machines/mesh-types.ts';
import { firstLine, type MeshConnection, type MeshEndpoint, type MeshStream } from '../transport/transport.ts';
import { ControlWriter, doneSignal, type Session } from './session.ts';
import type { ControlStreams } from './control-stream.ts';
import { withDeadline, type PeerTable } from './peer-table.ts';

export interface ConnectionTimeouts {
  /** A dial that has not connected by then fails. */
  readonly dialTimeoutMs: number;
  /** A connection whose peer has not sent a valid hello by then is closed. */
  readonly helloTimeoutMs: number;
}

export class Connections {
  private readonly dialing = new Set<EndpointId>();

  constructor(
    private readonly id: EndpointId,
    private readonly endpoint: MeshEndpoint,
    private readonly table: PeerTable,
    private readonly control: ControlStreams,
    private readonly timeouts: ConnectionTimeouts,
  ) {}

  /** Connects and handshakes; the outcome arrives as net.peer.connected or net.peer.disconnected. */
  async dial(id: EndpointId, addrs: readonly string[]): Promise<void> {
    const table = this.table;
    if (!table.running) return;
    if (id === this.id) return;
    const existing = table.sessions.get(id);
    if (existing && (existing.state === 'handshaking' || existing.state === 'admitted')) {
      // Already connected or handshaking (perhaps inbound): the node hears how that one ends.
      existing.reported = true;
      if (existing.state === 'admitted') table.emit({ type: 'net.peer.connected', id, direct: existing.conn.isDirect() });
      return;
    }
    if (this.dialing.has(id)) return;
    this.dialing.add(id);
    // A session on its way out still holds the transport's connection: let it finish, then dial afresh.
    if (existing && existing.state === 'closing') await existing.done;
    const log = table.peerLog(id);
    log.debug({ addrs }, 'dialing');
    let conn: MeshConnection;
    try {
      conn = await this.endpoint.dial(id, addrs, { timeoutMs: this.timeouts.dialTimeoutMs });
      if (table.retired.has(conn)) {
        // The transport forgets a connection only once its close completes: wait for that and dial afresh.
        await withDeadline(conn.closed, 2_000);
        conn = await this.endpoint.dial(id, addrs, { timeoutMs: this.timeouts.dialTimeoutMs });
        if (table.retired.has(conn)) throw new Error('the previous connection is still closing');
      }
    } catch (err) {
      this.dialing.delete(id);
      const reason = `dial failed: ${firstLine(err)}`;
      log.info({ addrs }, reason);
      // An inbound connection may have arrived meanwhile: then that one speaks for the peer.
      const s = table.sessions.get(id);
      if (s && s.state !== 'closed') s.reported = true;
      else if (table.running) table.emit({ type: 'net.peer.disconnected', id, reason });
      return;
    }
    this.dialing.delete(id);
    if (!table.running) return; // stop() closed the endpoint's connections or the owner will
    this.sessionFor(conn).reported = true;
  }

  async acceptLoop(): Promise<void> {
    const table = this.table;
    while (table.running) {
      let conn: MeshConnection | null;
      try {
        conn = await this.endpoint.accept();
      } catch (err) {
        if (!table.running) return;
        table.log.warn({ err: firstLine(err) }, 'accept failed');
        continue;
      }
      if (conn === null) {
        if (table.running) table.log.info('endpoint closed; no more incoming connections');
        return;
      }
      if (!table.running) {
        conn.close('node stopping');
        return;
      }
      this.sessionFor(conn);
    }
  }

  /** The endpoint's handler for `control` streams. */
  onControlStream(stream: MeshStream, conn: MeshConnection): void {
    if (!this.table.running || this.table.retired.has(conn)) {
      stream.reset();
      return;
    }
    this.control.accept(this.sessionFor(conn), stream);
  }

  /**
   * The session of a connection, created on first sight. The transport keeps one connection per pair, so a
   * new connection from a known id means the old one is stale (say, the peer restarted): it ends.
   */
  private sessionFor(conn: MeshConnection): Session {
    const table = this.table;
    const id = conn.remoteId;
    const previous = table.sessions.get(id);
    if (previous && previous.conn === conn) return previous;
    const session: Session = {
      id,
      conn,
      log: table.peerLog(id).child({ dir: conn.dialer === 'local' ? 'out' : 'in' }),
      state: 'handshaking',
      reported: previous !== undefined && (previous.reported || previous.state === 'admitted'),
      stream: null,
      out: new ControlWriter(table.limits.maxQueuedBytes, (err) => {
        if (session.state === 'handshaking' || session.state === 'admitted') table.teardown(session, `write failed: ${firstLine(err)}`);
      }),
      helloTimer: null,
      ...doneSignal(),
    };
    if (previous) {
      const wasAdmitted = previous.state === 'admitted';
      previous.log.info('replaced by a newer connection');
      previous.reported = false; // the successor speaks for this peer now
      table.teardown(previous, 'replaced by a newer connection');
      // The node saw this peer connected; it sees it go before the new connection's hello brings it back.
      if (wasAdmitted && table.running) table.emit({ type: 'net.peer.disconnected', id, reason: 'replaced by a newer connection' });
    }
    table.sessions.set(id, session);
    session.helloTimer = setTimeout(() => {
      if (session.state === 'handshaking') void table.fail(session, `no valid hello within ${this.timeouts.helloTimeoutMs} ms`);
    }, this.timeouts.helloTimeoutMs);
    void conn.closed.then((info) => {
      if (session.state === 'closed') return;
      const reason = info.byPeer ? `connection closed by peer: ${info.reason}` : `connection closed: ${info.reason}`;
      if (session.state === 'admitted') session.log.info({ reason }, 'peer disconnected');
      table.teardown(session, reason);
    });
    // The connection's dialer opens the control stream; the other side receives it in onControlStream.
    if (conn.dialer === 'local') void this.control.open(session);
    return session;
  }
}
