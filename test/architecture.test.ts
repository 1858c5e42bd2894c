// src/machines stays pure: checked on the real folder, and on a fixture that breaks every rule so the
// check is shown to fire.
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { checkMachineSource, type Violation } from './support/machine-purity.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

function machineFiles(dir: string): string[] {
  return readdirSync(path.join(root, dir), { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? machineFiles(`${dir}/${e.name}`) : /\.(c|m)?tsx?$/.test(e.name) ? [`${dir}/${e.name}`] : [],
  );
}

describe('src/machines is pure', () => {
  it('no file imports src/io, src/actors or node built-ins, or uses Date, timers, Math.random or process', () => {
    const files = machineFiles('src/machines');
    expect(files.length).toBeGreaterThan(0);
    const violations = files.flatMap((f) => checkMachineSource(f, readFileSync(path.join(root, f), 'utf8'), root));
    const report = violations.map((v) => `${v.file}:${v.line} ${v.rule}: ${v.text}`).join('\n');
    expect(report).toBe('');
  });

  it('the check fires on every rule, and only on real uses (fixture)', () => {
    const fixture = readFileSync(path.join(root, 'test/fixtures/impure-machine.ts.txt'), 'utf8');
    const found = checkMachineSource('src/machines/impure-machine.ts', fixture, root).map((v: Violation) => [v.line, v.rule]);
    expect(found).toEqual([
      [3, 'imports-io'],
      [4, 'imports-actors'],
      [5, 'imports-node'],
      [6, 'imports-node'],
      [7, 'imports-io'],
      [9, 'uses-Date'],
      [10, 'uses-timer'],
      [11, 'uses-timer'],
      [12, 'uses-Math.random'],
      [13, 'uses-process'],
      [14, 'uses-timer'],
      [15, 'imports-node'],
    ]);
  });
});
