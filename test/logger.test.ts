// Logging: JSON lines (for services and log collectors) with the component of each child logger, and
// readable lines for a terminal; levels filter.
import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { componentLogger, createLogger, isLogLevel, silentLogger } from '../src/io/host/logger.ts';

function sink(): { stream: Writable & { write: Writable['write'] }; text: () => string } {
  let out = '';
  const stream = new Writable({
    write(chunk, _enc, cb) {
      out += chunk.toString();
      cb();
    },
  });
  return { stream, text: () => out };
}

describe('logger', () => {
  it('JSON lines carry the component and the fields', () => {
    const s = sink();
    const root = createLogger({ pretty: false, level: 'info', destination: s.stream });
    componentLogger(root, 'rpc-server').info({ port: 4242 }, 'rpc-server ready');
    componentLogger(root, 'api').debug('dropped below the level');
    const lines = s.text().trim().split('\n').map((l) => JSON.parse(l));
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatchObject({ level: 30, component: 'rpc-server', port: 4242, msg: 'rpc-server ready' });
  });

  it('pretty lines are for people: level name, component, message, no JSON', () => {
    const s = sink();
    const root = createLogger({ pretty: true, level: 'debug', destination: s.stream });
    componentLogger(root, 'llama-server').warn({ code: 134 }, 'llama-server crashed');
    const text = s.text().replace(/\x1b\[[0-9;]*m/g, '');
    expect(text).toMatch(/WARN.*\[llama-server\] llama-server crashed/);
    expect(text).toMatch(/code: 134/);
    expect(() => JSON.parse(text)).toThrow();
  });

  it('levels', () => {
    expect(isLogLevel('debug')).toBe(true);
    expect(isLogLevel('loud')).toBe(false);
    expect(silentLogger().isLevelEnabled('fatal')).toBe(false);
  });
});
