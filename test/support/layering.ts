// The layers of src and the rooms of src/io as data, and a check over source text: every relative import
// must point at a place its own place may import. The table is the map in docs/TEAM.md.
import path from 'node:path';
import ts from 'typescript';

/** Where a file lives: a room of src/io, a layer of src, or `outside` (tests, benchmarks, packages). */
export type Place = string;

/** What each place may import (besides itself). Nothing else under src is allowed. */
export const ALLOWED_IMPORTS: Readonly<Record<Place, readonly Place[]>> = {
  'src/machines': [],
  'io/wire': ['src/machines'],
  'io/host': ['io/wire', 'src/machines'],
  'io/transport': ['io/wire', 'io/host', 'src/machines'],
  'io/mesh': ['io/transport', 'io/wire', 'io/host', 'src/machines'],
  'io/llama': ['io/host', 'src/machines'],
  'io/gguf': ['io/llama', 'io/host', 'src/machines'],
  'io/http': ['io/wire', 'io/host', 'src/machines'],
  'src/actors': ['io/*', 'src/machines'],
  'src/node': ['src/actors', 'io/*', 'src/machines'],
  'src/cli': ['src/node', 'src/actors', 'io/*', 'src/machines'],
};

/** The place of a repository-relative path under src, or null when it is not under src. */
export function placeOf(file: string): Place | null {
  const parts = file.split('/');
  if (parts[0] !== 'src') return null;
  if (parts[1] === 'io') return parts.length > 3 ? `io/${parts[2]}` : 'io/(loose)';
  if (parts[1] === 'machines' || parts[1] === 'actors') return `src/${parts[1]}`;
  if (file === 'src/node.ts' || parts[1] === 'node') return 'src/node';
  return 'src/cli';
}

export interface LayerViolation {
  readonly file: string;
  readonly line: number;
  readonly from: Place;
  readonly to: Place;
}

function allows(from: Place, to: Place): boolean {
  if (from === to) return true;
  const allowed = ALLOWED_IMPORTS[from] ?? [];
  return allowed.includes(to) || (to.startsWith('io/') && allowed.includes('io/*'));
}

/** Checks the relative imports of one file (`file` relative to `root`). A file loose in src/io always fails. */
export function checkImports(file: string, text: string): LayerViolation[] {
  const from = placeOf(file);
  if (from === null) return [];
  const source = ts.createSourceFile(file, text, ts.ScriptTarget.Latest, true, ts.ScriptKind.TS);
  const out: LayerViolation[] = [];
  const check = (node: ts.Node, spec: string) => {
    if (!spec.startsWith('.')) return;
    const target = path.posix.normalize(path.posix.join(path.posix.dirname(file), spec));
    const to = placeOf(target);
    if (to === null) return;
    if (from === 'io/(loose)' || !allows(from, to)) {
      out.push({ file, line: source.getLineAndCharacterOfPosition(node.getStart(source)).line + 1, from, to });
    }
  };
  const visit = (node: ts.Node): void => {
    if ((ts.isImportDeclaration(node) || ts.isExportDeclaration(node)) && node.moduleSpecifier && ts.isStringLiteral(node.moduleSpecifier)) {
      check(node, node.moduleSpecifier.text);
    } else if (ts.isCallExpression(node) && node.expression.kind === ts.SyntaxKind.ImportKeyword && node.arguments[0] && ts.isStringLiteralLike(node.arguments[0])) {
      check(node, node.arguments[0].text);
    } else if (ts.isImportTypeNode(node) && ts.isLiteralTypeNode(node.argument) && ts.isStringLiteral(node.argument.literal)) {
      check(node, node.argument.literal.text);
    }
    ts.forEachChild(node, visit);
  };
  visit(source);
  return out;
}
