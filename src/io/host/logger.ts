// The node's logging: pino, readable (pino-pretty) on a terminal and JSON lines otherwise, with one
// child logger per component so every line says where it came from.
import { createRequire } from 'node:module';
import { pino, type Logger, type LevelWithSilent, type DestinationStream } from 'pino';

export type { Logger } from 'pino';

export const LOG_LEVELS: readonly LevelWithSilent[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

export interface LoggerInit {
  /** Default `info`. */
  readonly level?: LevelWithSilent;
  /**
   * Pretty output for people. Default: whether stderr is a terminal, so that services and pipes get
   * JSON lines that log collectors can parse, while someone at a terminal gets readable lines.
   */
  readonly pretty?: boolean;
  /** Where lines go (tests); default stderr, keeping stdout free for what the CLI prints on purpose. */
  readonly destination?: DestinationStream;
}

export function isLogLevel(s: string): s is LevelWithSilent {
  return (LOG_LEVELS as readonly string[]).includes(s);
}

/** The root logger of a node. Components take `componentLogger(root, 'rpc-server')`. */
export function createLogger(init: LoggerInit = {}): Logger {
  const level = init.level ?? 'info';
  const pretty = init.pretty ?? Boolean(process.stderr.isTTY);
  // Synchronous streams, not pino's worker-thread transports: the last lines of a node that is
  // crashing must still reach the terminal, and a transport thread can be cut off at exit.
  if (pretty) return pino({ level }, prettyStream(init.destination ?? 2));
  return pino({ level }, init.destination ?? pino.destination({ fd: 2, sync: true }));
}

/** A child logger whose lines carry `component: name`. */
export function componentLogger(parent: Logger, component: string): Logger {
  return parent.child({ component });
}

/** A logger that drops everything: for tests and for io used without a node around it. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}

function prettyStream(destination: DestinationStream | number): DestinationStream {
  // Loaded only in pretty mode, so JSON-mode nodes (services) never load pino-pretty.
  const require = createRequire(import.meta.url);
  const pinoPretty = require('pino-pretty') as (opts: object) => DestinationStream;
  return pinoPretty({
    colorize: true,
    sync: true,
    destination,
    translateTime: 'HH:MM:ss.l',
    ignore: 'pid,hostname,component',
    messageFormat: '{if component}[{component}] {end}{msg}',
  });
}
