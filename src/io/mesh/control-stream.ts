// A session's control stream: the dialer opens it, the acceptor takes one; its frames are read and routed (handshake messages to the handshake, the rest to the node).
import type { MeshMessage } from '../../machines/protocol.ts';
import { FrameDecoder } from '../wire/frame-codec.ts';
import { firstLine, type MeshStream } from '../transport/transport.ts';
import type { Session } from './session.ts';
import type { Handshake } from './handshake.ts';
import type { Rekeying } from './rekeying.ts';
import type { Keyring } from './keyring.ts';
import { logLeaving, type PeerTable } from './peer-table.ts';

export class ControlStreams {
  constructor(
    private readonly table: PeerTable,
    private readonly handshake: Handshake,
    private readonly rekeying: Rekeying,
    private readonly keys: Keyring,
  ) {}

  /** The dialer's side: opens the session's control stream. */
  async open(s: Session): Promise<void> {
    let stream: MeshStream;
    try {
      stream = await s.conn.openStream('control');
    } catch (err) {
      this.table.teardown(s, `could not open the control stream: ${firstLine(err)}`);
      return;
    }
    if (s.state === 'closed') {
      stream.reset();
      return;
    }
    this.attach(s, stream);
  }

  /** The acceptor's side: the control stream the peer opened (one per session). */
  accept(s: Session, stream: MeshStream): void {
    if (s.stream !== null || s.conn.dialer === 'local' || s.state !== 'handshaking') {
      s.log.warn('peer opened a second control stream; reset it');
      stream.reset();
      return;
    }
    this.attach(s, stream);
  }

  private attach(s: Session, stream: MeshStream): void {
    s.stream = stream;
    s.out.attach(stream);
    // The dialer speaks first; the acceptor answers with its hello only once the dialer's is verified, so a
    // stranger learns nothing about this node (role, VRAM, model), only why it was refused.
    void this.readLoop(s, stream);
    if (s.conn.dialer === 'local') this.handshake.greet(s);
  }

  private async readLoop(s: Session, stream: MeshStream): Promise<void> {
    const decoder = new FrameDecoder({ maxFrameBytes: this.table.limits.maxFrameBytes });
    try {
      for (;;) {
        const chunk = await stream.read();
        if (s.state === 'closed') return;
        if (chunk === null) {
          const cut = decoder.end();
          if (s.state !== 'closing') this.table.teardown(s, cut ? `peer ended its control stream: ${cut.message}` : 'peer ended its control stream');
          return;
        }
        const { messages, error } = decoder.push(chunk);
        for (const message of messages) {
          if (s.state === 'closing' && message.type === 'leaving') {
            // Both sides may refuse (or close) at once: the peer's reason still belongs in our log.
            logLeaving(s.log, message.reason);
            continue;
          }
          if (s.state !== 'handshaking' && s.state !== 'admitted') continue;
          this.onMessage(s, message);
        }
        if (error !== null) {
          // The messages before the bad frame were fine and are delivered; the stream cannot be trusted after it.
          void this.table.fail(s, `${error.name}: ${error.message}`);
          return;
        }
      }
    } catch (err) {
      if (s.state === 'handshaking' || s.state === 'admitted') this.table.teardown(s, `control stream failed: ${firstLine(err)}`);
    }
  }

  /** Synchronous, so the read loop keeps reading while a session closes (the peer's `leaving` still gets logged). */
  private onMessage(s: Session, message: MeshMessage): void {
    if (s.state === 'handshaking') {
      this.handshake.onMessage(s, message);
      return;
    }
    if (s.state !== 'admitted') return;
    switch (message.type) {
      case 'hello':
        void this.table.fail(s, 'a second hello on an admitted connection');
        return;
      case 'welcome':
        void this.table.fail(s, 'a welcome on an admitted connection');
        return;
      case 'leaving':
        s.log.info({ reason: message.reason }, `peer is leaving: ${message.reason}`);
        this.table.emit({ type: 'net.message', from: s.id, message });
        this.table.teardown(s, `left: ${message.reason}`);
        return;
      case 'rekey':
        this.rekeying.onRekey(s, message);
        return;
      case 'gossip': {
        // Facts about removed members are dropped here: the node never learns (or dials) them again.
        const announcements = message.announcements.filter((a) => !this.keys.isRemoved(a.id));
        if (announcements.length > 0) this.table.emit({ type: 'net.message', from: s.id, message: { type: 'gossip', announcements } });
        return;
      }
      default:
        this.table.emit({ type: 'net.message', from: s.id, message });
    }
  }
}
