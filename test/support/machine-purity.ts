// The purity rule of src/machines as a function over source text: no imports of src/io, src/actors or
// Node built-ins, and no clock, timers, randomness or process. Parsed with TypeScript, so comments,
// strings, property names and types never count.
import { builtinModules } from 'node:module';
import path from 'node:path';
import ts from 'typescript';

export type PurityRule = 'imports-io' | 'imports-actors' | 'imports-node' | 'uses-Date' | 'uses-timer' | 'uses-Math.random' | 'uses-process';

export interface Violation {
  readonly file: string;
  readonly line: number;
  readonly rule: PurityRule;
  readonly text: string;
}

// setImmediate is a timer like the others; the list is the rule of docs/TEAM.md.
const BANNED_GLOBALS: Readonly<Record<string, PurityRule>> = {
  Date: 'uses-Date',
  setTimeout: 'uses-timer',
  setInterval: 'uses-timer',
  setImmediate: 'uses-timer',
  process: 'uses-process',
};
const GLOBAL_OBJECTS = new Set(['globalThis', 'global', 'window', 'self']);
const BUILTINS = new Set(builtinModules);

/**
 * Checks one machine source. `file` is where it lives (or would live), relative to `root`: relative imports
 * are resolved from there to tell src/io and src/actors apart.
 */
export function checkMachineSource(file: string, text: string, root: string): Violation[] {
  const source = ts.createSourceFile(file, text, ts.ScriptTarget.Latest, true, ts.ScriptKind.TS);
  const out: Violation[] = [];
  const report = (node: ts.Node, rule: PurityRule) =>
    out.push({ file, line: source.getLineAndCharacterOfPosition(node.getStart(source)).line + 1, rule, text: node.getText(source).slice(0, 80) });

  const checkSpecifier = (node: ts.Node, spec: string) => {
    if (spec.startsWith('node:') || BUILTINS.has(spec.split('/')[0] as string)) return report(node, 'imports-node');
    if (!spec.startsWith('.')) return;
    const target = path.relative(root, path.resolve(root, path.dirname(file), spec)).split(path.sep).join('/');
    if (target === 'src/io' || target.startsWith('src/io/')) report(node, 'imports-io');
    if (target === 'src/actors' || target.startsWith('src/actors/')) report(node, 'imports-actors');
  };

  const visit = (node: ts.Node): void => {
    if ((ts.isImportDeclaration(node) || ts.isExportDeclaration(node)) && node.moduleSpecifier && ts.isStringLiteral(node.moduleSpecifier)) {
      checkSpecifier(node, node.moduleSpecifier.text);
    } else if (ts.isImportEqualsDeclaration(node) && ts.isExternalModuleReference(node.moduleReference)) {
      const ref = node.moduleReference.expression;
      if (ts.isStringLiteral(ref)) checkSpecifier(node, ref.text);
    } else if (ts.isCallExpression(node) && node.arguments.length > 0 && ts.isStringLiteralLike(node.arguments[0] as ts.Node)) {
      const isImport = node.expression.kind === ts.SyntaxKind.ImportKeyword;
      const isRequire = ts.isIdentifier(node.expression) && node.expression.text === 'require';
      if (isImport || isRequire) checkSpecifier(node, (node.arguments[0] as ts.StringLiteral).text);
    } else if (ts.isImportTypeNode(node) && ts.isLiteralTypeNode(node.argument) && ts.isStringLiteral(node.argument.literal)) {
      checkSpecifier(node, node.argument.literal.text);
    }

    // Math.random / Math['random'], and globals reached through globalThis.X / globalThis['X'].
    const member = memberAccess(node);
    if (member !== null && ts.isIdentifier(member.object)) {
      if (member.object.text === 'Math' && member.name === 'random') report(node, 'uses-Math.random');
      if (GLOBAL_OBJECTS.has(member.object.text) && member.name in BANNED_GLOBALS) report(node, BANNED_GLOBALS[member.name] as PurityRule);
    }

    if (ts.isIdentifier(node) && Object.hasOwn(BANNED_GLOBALS, node.text) && isValueReference(node)) {
      report(node, BANNED_GLOBALS[node.text] as PurityRule);
    }
    ts.forEachChild(node, visit);
  };
  visit(source);
  return out;
}

function memberAccess(node: ts.Node): { object: ts.Expression; name: string } | null {
  if (ts.isPropertyAccessExpression(node)) return { object: node.expression, name: node.name.text };
  if (ts.isElementAccessExpression(node) && ts.isStringLiteralLike(node.argumentExpression)) {
    return { object: node.expression, name: node.argumentExpression.text };
  }
  return null;
}

// A free use of the name as a value: not `x.name`, not `{ name: ... }`, not a declaration, not a type.
function isValueReference(id: ts.Identifier): boolean {
  const parent = id.parent;
  if (ts.isPropertyAccessExpression(parent) && parent.name === id) return false;
  if ((ts.isPropertyAssignment(parent) || ts.isPropertyDeclaration(parent) || ts.isPropertySignature(parent) || ts.isMethodDeclaration(parent) || ts.isMethodSignature(parent)) && parent.name === id) return false;
  if ((ts.isVariableDeclaration(parent) || ts.isParameter(parent) || ts.isFunctionDeclaration(parent) || ts.isBindingElement(parent)) && parent.name === id) return false;
  if (ts.isImportSpecifier(parent) || ts.isExportSpecifier(parent) || ts.isLabeledStatement(parent)) return false;
  for (let n: ts.Node = parent; !ts.isSourceFile(n); n = n.parent) {
    if (ts.isTypeNode(n) && !ts.isExpressionWithTypeArguments(n)) return false;
  }
  return true;
}
