// The command line: every flag of issue 5 §1, the environment and file sources of invite tokens, and
// one clear line (exit status 2 from the real CLI entry) for every kind of bad input.
import { mkdtempSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { beforeAll, describe, expect, it } from 'vitest';
import { DEFAULT_API_PORT, HELP_TEXT, parseByteSize, parseCliArgs, type CliOptions } from '../src/io/host/cli-args.ts';
import { createMeshId, createMeshSecret, encodeInviteToken } from '../src/io/wire/invite-token.ts';
import { asEndpointId } from '../src/machines/mesh-types.ts';

let dir: string;
let model: string;
const inviter = asEndpointId('ab'.repeat(32));
const meshA = { meshId: createMeshId(), secret: createMeshSecret() };
const tokenA1 = encodeInviteToken({ ...meshA, inviter, addrs: ['192.168.1.5:7842'] });
const tokenA2 = encodeInviteToken({ ...meshA, inviter, addrs: ['10.0.0.2:7842'] });
const tokenB = encodeInviteToken({ meshId: createMeshId(), secret: createMeshSecret(), inviter, addrs: [] });

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'cli-args-'));
  model = join(dir, 'm.gguf');
  writeFileSync(model, 'GGUF');
  mkdirSync(join(dir, 'adir'));
});

function run(argv: string[], env: NodeJS.ProcessEnv = {}): CliOptions {
  const r = parseCliArgs(argv, env);
  if (r.kind !== 'run') throw new Error(`expected run, got ${JSON.stringify(r)}`);
  return r.options;
}
function error(argv: string[], env: NodeJS.ProcessEnv = {}): string {
  const r = parseCliArgs(argv, env);
  if (r.kind !== 'error') throw new Error(`expected an error, got ${JSON.stringify(r)}`);
  expect(r.message).not.toContain('\n');
  expect(r.message).not.toMatch(/at .*\.ts:\d+/);
  return r.message;
}

describe('parseCliArgs', () => {
  it('no arguments at all means the demo', () => {
    expect(parseCliArgs([], {})).toEqual({ kind: 'demo' });
  });

  it('--help and -h give the help text with examples', () => {
    for (const flag of ['--help', '-h']) {
      const r = parseCliArgs([flag], {});
      expect(r.kind).toBe('help');
      if (r.kind === 'help') expect(r.text).toContain('Examples:');
    }
    for (const flag of ['--model', '--join', '--role', '--client', '--port', '--bind-port', '--max-vram', '--name', '--listen-all', '--api-key', '--log-level', '--inspect', '--relay', '--key-file', '--stun', '--join-file', '--data-port', '--data-path', '--allowed-host']) {
      expect(HELP_TEXT).toContain(flag);
    }
  });

  it('defaults for a plain node with a model', () => {
    const o = run(['--model', model]);
    expect(o).toMatchObject({
      model,
      joins: [],
      role: 'auto',
      port: DEFAULT_API_PORT,
      apiHost: '127.0.0.1',
      bindPort: null,
      dataPort: null,
      dataPath: 'auto',
      maxVramBytes: null,
      apiKey: null,
      allowedHosts: [],
      logLevel: 'info',
      inspect: null,
      relay: { kind: 'default' },
      keyFile: null,
      stun: null,
    });
    expect(o.name.length).toBeGreaterThan(0);
  });

  it('--allowed-host: repeatable names (DNS names or IP addresses) the API answers to in Host', () => {
    expect(run(['--model', model, '--allowed-host', 'Mesh.LAN', '--allowed-host', '192.168.1.5', '--allowed-host', '[fd00::1]']).allowedHosts).toEqual([
      'mesh.lan',
      '192.168.1.5',
      'fd00::1',
    ]);
    expect(error(['--model', model, '--allowed-host', 'http://x.example'])).toMatch(/--allowed-host: "http:\/\/x.example" is not a host name or an IP address/);
    expect(error(['--model', model, '--allowed-host', 'x.example:9337'])).toMatch(/--allowed-host/);
    expect(error(['--model', model, '--allowed-host', ''])).toMatch(/--allowed-host/);
    expect(HELP_TEXT).toMatch(/--allowed-host NAME[^]*refuses\s+others with 421/);
  });

  it('the direct data path: --data-port and --data-path', () => {
    expect(run(['--model', model, '--data-port', '7900', '--data-path', 'quic'])).toMatchObject({ dataPort: 7900, dataPath: 'quic' });
    expect(error(['--model', model, '--data-path', 'tcp'])).toBe('--data-path: "tcp" is not "auto" or "quic"');
    expect(error(['--model', model, '--data-port', '70000'])).toMatch(/^--data-port/);
    expect(HELP_TEXT).toMatch(/forward UDP \(QUIC\) and TCP/);
  });

  it('reads every flag', () => {
    const o = run([
      '--model', model, '--join', tokenA1, '--role', 'worker', '--port', '0', '--bind-port', '7842',
      '--max-vram', '6G', '--name', 'box-1', '--listen-all', '--api-key', 's3cret', '--log-level', 'debug',
      '--inspect', 'ws://127.0.0.1:4242', '--relay', 'none', '--key-file', join(dir, 'k'),
      '--stun', '127.0.0.1:3478', '--stun', '[::1]:3478',
    ]);
    expect(o.role).toBe('worker');
    expect(o.joins.map((j) => j.meshId)).toEqual([meshA.meshId]);
    expect(o.joins[0]!.addrs).toEqual(['192.168.1.5:7842']);
    expect(o.port).toBe(0);
    expect(o.bindPort).toBe(7842);
    expect(o.maxVramBytes).toBe(6 * 2 ** 30);
    expect(o.name).toBe('box-1');
    expect(o.apiHost).toBe('0.0.0.0');
    expect(o.apiKey).toBe('s3cret');
    expect(o.logLevel).toBe('debug');
    expect(o.inspect).toEqual({ kind: 'websocket', url: 'ws://127.0.0.1:4242' });
    expect(o.relay).toEqual({ kind: 'none' });
    expect(o.keyFile).toBe(join(dir, 'k'));
    expect(o.stun).toEqual(['127.0.0.1:3478', '[::1]:3478']);
  });

  it('--inspect takes an optional URL', () => {
    expect(run(['--model', model, '--inspect']).inspect).toEqual({ kind: 'sky' });
    expect(run(['--inspect', '--model', model]).inspect).toEqual({ kind: 'sky' });
    expect(run(['--model', model, '--inspect=ws://h:1']).inspect).toEqual({ kind: 'websocket', url: 'ws://h:1' });
    expect(error(['--model', model, '--inspect', 'http://h:1'])).toMatch(/--inspect: .*ws:\/\//);
    expect(error(['--model', model, '--inspect', 'nonsense'])).toMatch(/--inspect: "nonsense" is not a URL/);
  });

  it('--client is a lite client that needs a token and takes no model', () => {
    const o = run(['--client', '--join', tokenA1]);
    expect(o.role).toBe('client');
    expect(o.model).toBeNull();
    expect(error(['--client'])).toMatch(/lite client needs a mesh to join/);
    expect(error(['--client', '--join', tokenA1, '--model', model])).toMatch(/holds no model/);
    expect(error(['--client', '--role', 'host', '--join', tokenA1])).toMatch(/--client contradicts --role host/);
    expect(run(['--role', 'client', '--client', '--join', tokenA1]).role).toBe('client');
  });

  it('tokens come from flags, a file and the environment, deduplicated, one mesh only', () => {
    const file = join(dir, 'tokens');
    writeFileSync(file, `# the office mesh\n${tokenA2}\n\n${tokenA1}  # again\n`);
    const o = run(['--model', model, '--join', tokenA1, '--join-file', file], { MESH_INFERENCE_JOIN: `${tokenA2}, ${tokenA1}` });
    expect(o.joins.map((j) => j.addrs[0])).toEqual(['192.168.1.5:7842', '10.0.0.2:7842']);
    expect(run(['--client'], { MESH_INFERENCE_JOIN: tokenA1 }).joins).toHaveLength(1);
    expect(error(['--model', model, '--join', tokenA1, '--join', tokenB])).toMatch(/another mesh/);
    expect(error(['--model', model, '--join-file', join(dir, 'missing')])).toMatch(/--join-file: cannot read .*ENOENT/);
    const empty = join(dir, 'empty');
    writeFileSync(empty, '# nothing\n');
    expect(error(['--model', model, '--join-file', empty])).toMatch(/--join-file: no token/);
  });

  it('a damaged token is one clear line naming where it came from', () => {
    const altered = tokenA1.slice(0, 20) + (tokenA1[20] === 'A' ? 'B' : 'A') + tokenA1.slice(21);
    expect(error(['--model', model, '--join', altered])).toMatch(/^--join: /);
    expect(error(['--model', model, '--join', tokenA1.slice(0, 30)])).toMatch(/^--join: /);
    expect(error(['--model', model], { MESH_INFERENCE_JOIN: 'hello' })).toMatch(/^\$MESH_INFERENCE_JOIN: /);
  });

  it('the model must be a file that exists', () => {
    expect(error(['--role', 'host'])).toMatch(/--model PATH is required/);
    expect(error(['--model', join(dir, 'nope.gguf')])).toMatch(/--model: no such file: .*nope\.gguf/);
    expect(error(['--model', join(dir, 'adir')])).toMatch(/--model: not a file/);
    expect(error(['--model', ''])).toMatch(/--model: the value is empty/);
  });

  it('ports, roles, levels, names, relays and STUN servers are checked', () => {
    expect(error(['--model', model, '--port', 'abc'])).toMatch(/--port: "abc" is not a port number/);
    expect(error(['--model', model, '--port', '70000'])).toMatch(/--port: 70000 is out of range/);
    expect(error(['--model', model, '--bind-port', '0'])).toMatch(/--bind-port: 0 is out of range \(1-65535\)/);
    expect(error(['--model', model, '--role', 'boss'])).toMatch(/--role: "boss" is not one of auto, host, worker, client/);
    expect(error(['--model', model, '--log-level', 'loud'])).toMatch(/--log-level: "loud"/);
    expect(error(['--model', model, '--name', ' '])).toMatch(/--name: the name is empty/);
    expect(error(['--model', model, '--name', 'x'.repeat(65)])).toMatch(/at most 64/);
    expect(error(['--model', model, '--relay', 'sometimes'])).toMatch(/--relay: "sometimes"/);
    expect(run(['--model', model, '--relay', 'https://relay.example.com']).relay).toEqual({ kind: 'custom', url: 'https://relay.example.com' });
    expect(error(['--model', model, '--stun', 'stunhost'])).toMatch(/--stun: "stunhost" is not HOST:PORT/);
    expect(run(['--model', model, '--stun', 'none']).stun).toEqual([]);
    expect(error(['--model', model, '--api-key', ''])).toMatch(/--api-key: the key is empty/);
    expect(run(['--model', model], { MESH_INFERENCE_API_KEY: 'k' }).apiKey).toBe('k');
  });

  it('unknown flags, missing values and stray arguments', () => {
    expect(error(['--model', model, '--gpu'])).toBe('unknown option --gpu (see --help)');
    expect(error(['--model'])).toBe('--model needs a value (see --help)');
    expect(error(['--model', model, 'extra'])).toMatch(/unexpected argument "extra"/);
    expect(error(['--model', model, '--listen-all=yes'])).toMatch(/--listen-all takes no value/);
  });

  it('--max-vram sizes', () => {
    expect(run(['--model', model, '--max-vram', '512MiB']).maxVramBytes).toBe(512 * 2 ** 20);
    expect(run(['--model', model, '--max-vram', '24GB']).maxVramBytes).toBe(24e9);
    expect(run(['--model', model, '--max-vram', '1.5g']).maxVramBytes).toBe(1.5 * 2 ** 30);
    expect(error(['--model', model, '--max-vram', '8'])).toMatch(/under 1 MiB; give a unit, e.g. 8G/);
    expect(error(['--model', model, '--max-vram', 'lots'])).toMatch(/--max-vram: "lots" is not a size/);
    expect(error(['--model', model, '--max-vram', '-3G'])).toMatch(/--max-vram/);
  });
});

describe('parseByteSize', () => {
  it('binary and decimal units', () => {
    expect(parseByteSize('1K')).toBe(1024);
    expect(parseByteSize('1kb')).toBe(1000);
    expect(parseByteSize('2 TiB')).toBe(2 * 2 ** 40);
    expect(parseByteSize('4096')).toBe(4096);
    expect(parseByteSize('.5M')).toBe(2 ** 19);
    expect(() => parseByteSize('5 parsecs', '--x')).toThrow(/--x: "5 parsecs" is not a size/);
  });
});

describe('the CLI entry', () => {
  // The real process (with -e, node puts the arguments from argv[1]): a usage error is one line on stderr and exit status 2, help goes to stdout.
  const entry = `import { parseCliArgsOrExit } from ${JSON.stringify(new URL('../src/io/host/cli-args.ts', import.meta.url).pathname)};
const r = parseCliArgsOrExit(process.argv.slice(1)); console.log(JSON.stringify(r.kind));`;
  const runEntry = (args: string[]) =>
    execa('node', ['--import', 'tsx', '--input-type=module', '-e', entry, '--', ...args], { reject: false, env: { MESH_INFERENCE_JOIN: '' } });

  it('exits 2 with one line for bad input, 0 with help', async () => {
    const bad = await runEntry(['--port', 'x', '--model', model]);
    expect(bad.exitCode).toBe(2);
    expect(bad.stderr).toBe('mesh-inference: --port: "x" is not a port number');
    expect(bad.stdout).toBe('');
    const help = await runEntry(['--help']);
    expect(help.exitCode).toBe(0);
    expect(help.stdout).toContain('Usage: mesh-inference');
    const ok = await runEntry(['--model', model]);
    expect(ok.exitCode).toBe(0);
    expect(ok.stdout).toBe('"run"');
  });
});
