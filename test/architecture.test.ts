// src/machines stays pure and the layers and rooms of src import only what docs/TEAM.md's map allows:
// checked on the real folders, and on fixtures that break the rules so each check is shown to fire.
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { checkImports, placeOf } from './support/layering.ts';
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

describe('the layers of src and the rooms of src/io', () => {
  it('every import points where its place may import; no file lies loose in src/io', () => {
    const files = machineFiles('src');
    const violations = files.flatMap((f) => checkImports(f, readFileSync(path.join(root, f), 'utf8')));
    const report = violations.map((v) => `${v.file}:${v.line} ${v.from} -> ${v.to}`).join('\n');
    expect(report).toBe('');
    const rooms = new Set(files.map(placeOf).filter((p) => p?.startsWith('io/')));
    expect([...rooms].sort()).toEqual(['io/gguf', 'io/host', 'io/http', 'io/llama', 'io/mesh', 'io/transport', 'io/wire']);
  });

  it('the check fires on imports against the map (fixtures)', () => {
    const imports = (file: string, ...specs: string[]) => checkImports(file, specs.map((s, i) => `import { x${i} } from '${s}';`).join('\n'));
    expect(imports('src/io/wire/codec.ts', '../host/logger.ts', '../../machines/protocol.ts').map((v) => v.to)).toEqual(['io/host']);
    expect(imports('src/io/llama/a.ts', '../transport/tunnel.ts', '../../actors/x.ts', '../../node.ts').map((v) => v.to)).toEqual(['io/transport', 'src/actors', 'src/node']);
    expect(imports('src/machines/m.ts', '../io/wire/messages.ts').map((v) => v.to)).toEqual(['io/wire']);
    expect(imports('src/actors/a.ts', '../node.ts', '../io/mesh/mesh-network.ts').map((v) => v.to)).toEqual(['src/node']);
    expect(imports('src/io/stray.ts', './host/logger.ts')).toHaveLength(1);
    expect(imports('src/node.ts', './cli.ts').map((v) => v.to)).toEqual(['src/cli']);
  });
});
