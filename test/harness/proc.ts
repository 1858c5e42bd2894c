// Test-side handle on a harness process (test/harness/*.ts): JSON lines out of stdout become events,
// pino lines out of stderr become logs, commands go in as JSON lines on stdin.
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';

export interface LogLine {
  readonly level: number;
  readonly msg: string;
  readonly [k: string]: unknown;
}

export class HarnessProc {
  readonly lines: Record<string, unknown>[] = [];
  readonly logs: LogLine[] = [];
  readonly stderrText: string[] = [];
  readonly child: ChildProcess;
  exit: { code: number | null; signal: NodeJS.Signals | null } | null = null;

  /** `prefix`: a command that runs the harness, e.g. `ip netns exec NS` (the WAN lab). */
  constructor(script: string, config: unknown, prefix: readonly string[] = []) {
    const path = fileURLToPath(new URL(script, import.meta.url));
    const args = ['--import', 'tsx', path, JSON.stringify(config)];
    const [file, ...before] = prefix.length > 0 ? [...prefix, process.execPath] : [process.execPath];
    this.child = spawn(file!, [...before, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
    splitLines(this.child.stdout!, (l) => {
      try {
        this.lines.push(JSON.parse(l) as Record<string, unknown>);
      } catch {
        this.stderrText.push(`stdout: ${l}`);
      }
    });
    splitLines(this.child.stderr!, (l) => {
      try {
        this.logs.push(JSON.parse(l) as LogLine);
      } catch {
        this.stderrText.push(l);
      }
    });
    this.child.on('exit', (code, signal) => (this.exit = { code, signal }));
    this.child.stdin!.on('error', () => {});
  }

  get alive(): boolean {
    return this.exit === null;
  }

  send(value: unknown): void {
    if (this.alive) this.child.stdin!.write(JSON.stringify(value) + '\n');
  }

  /** The first stdout line matching `pred` (including ones already seen). */
  waitLine<T = Record<string, unknown>>(pred: (l: Record<string, unknown>) => boolean, ms = 10_000, what = 'a line'): Promise<T> {
    return until(() => this.lines.find(pred) as T | undefined, ms, `${what} (exit: ${JSON.stringify(this.exit)}, stderr: ${this.stderrText.slice(-5).join(' | ')})`);
  }

  waitLog(pred: (l: LogLine) => boolean, ms = 10_000, what = 'a log line'): Promise<LogLine> {
    return until(() => this.logs.find(pred), ms, what);
  }

  async stop(): Promise<void> {
    if (!this.alive) return;
    this.send({ cmd: 'exit' });
    const exited = new Promise<void>((r) => this.child.once('exit', () => r()));
    const t = setTimeout(() => this.child.kill('SIGKILL'), 3_000);
    await exited;
    clearTimeout(t);
  }

  kill(signal: NodeJS.Signals): void {
    this.child.kill(signal);
  }
}

export async function until<T>(f: () => T | undefined, ms: number, what: string): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function splitLines(stream: NodeJS.ReadableStream, onLine: (line: string) => void): void {
  let buf = '';
  stream.setEncoding('utf8');
  stream.on('data', (chunk: string) => {
    buf += chunk;
    let i: number;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      if (line.trim()) onLine(line);
    }
  });
}
