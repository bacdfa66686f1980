// The floor plan, as a reader checks it: which folder of src/ imports which (and whether any import runs up the
// layering the README draws, or around in a circle), and the longest functions.
//
//   npx vite-node tools/house.ts [--root DIR] [--top N]
//
// --root reads another checkout (e.g. a worktree of an older commit). Folders are src/'s subfolders (a file at
// src/'s top is its own room). The layering checked is the README's: main → commands → {save, load, verify} →
// image → native; format/, errors, output, text and version may be imported by anything.
import fs from 'node:fs';
import path from 'node:path';
import ts from 'typescript';

/** The README's layers, top first; a room may import rooms below it (same rank: not each other). */
const LAYERS: string[][] = [['main'], ['commands'], ['save', 'load', 'verify'], ['image'], ['native']];
const ANYONE = /^(format|errors|output|version|types)(\/|$)/;

function parseArgs(argv: string[]): { root: string; top: number } {
  let root = process.cwd();
  let top = 15;
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--root') root = path.resolve(argv[++i] ?? '');
    else if (argv[i] === '--top') top = Number(argv[++i]);
    else throw new Error(`usage: tools/house.ts [--root DIR] [--top N] (got ${argv[i]})`);
  }
  if (!Number.isInteger(top) || top < 1) throw new Error('--top takes a positive integer');
  return { root, top };
}

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...sourceFiles(p));
    else if (e.name.endsWith('.ts') && !e.name.endsWith('.d.ts')) out.push(p);
  }
  return out;
}

/** src/load/postcopy/session.ts → load/postcopy; src/main.ts → main. */
function roomOf(src: string, file: string): string {
  const rel = path.relative(src, file);
  const dir = path.dirname(rel);
  return dir === '.' ? rel.replace(/\.ts$/, '') : dir;
}

function topRoom(room: string): string {
  return room.split('/')[0];
}

function rankOf(room: string): number {
  return LAYERS.findIndex((l) => l.includes(topRoom(room)));
}

interface Fn {
  file: string;
  name: string;
  lines: number;
}

function scan(src: string): { edges: Map<string, number>; fns: Fn[] } {
  const edges = new Map<string, number>();
  const fns: Fn[] = [];
  for (const file of sourceFiles(src)) {
    const text = fs.readFileSync(file, 'utf8');
    const sf = ts.createSourceFile(file, text, ts.ScriptTarget.ES2022, true);
    const from = roomOf(src, file);
    const visit = (node: ts.Node, owner: string): void => {
      if ((ts.isImportDeclaration(node) || ts.isExportDeclaration(node)) && node.moduleSpecifier && ts.isStringLiteral(node.moduleSpecifier)) {
        const spec = node.moduleSpecifier.text;
        if (spec.startsWith('.')) {
          const to = roomOf(src, path.resolve(path.dirname(file), spec.replace(/\.js$/, '.ts')));
          if (to !== from) edges.set(`${from} -> ${to}`, (edges.get(`${from} -> ${to}`) ?? 0) + 1);
        }
      }
      const name = functionName(node, owner);
      if (name !== undefined) {
        const start = sf.getLineAndCharacterOfPosition(node.getStart(sf)).line;
        const end = sf.getLineAndCharacterOfPosition(node.getEnd()).line;
        fns.push({ file: path.relative(path.dirname(src), file), name, lines: end - start + 1 });
      }
      const inner = ts.isClassDeclaration(node) && node.name ? node.name.text : owner;
      ts.forEachChild(node, (c) => visit(c, inner));
    };
    visit(sf, '');
  }
  return { edges, fns };
}

function functionName(node: ts.Node, owner: string): string | undefined {
  const prefix = owner ? `${owner}.` : '';
  if (ts.isFunctionDeclaration(node) && node.body) return node.name?.text ?? '(default)';
  if ((ts.isMethodDeclaration(node) || ts.isGetAccessor(node)) && node.body) return prefix + node.name.getText();
  if (ts.isConstructorDeclaration(node) && node.body) return `${prefix}constructor`;
  if ((ts.isArrowFunction(node) || ts.isFunctionExpression(node)) && ts.isVariableDeclaration(node.parent)) {
    return node.parent.name.getText();
  }
  if ((ts.isArrowFunction(node) || ts.isFunctionExpression(node)) && ts.isPropertyDeclaration(node.parent)) {
    return prefix + node.parent.name.getText();
  }
  return undefined;
}

/** Rooms on a cycle of imports (Tarjan's strongly connected components of more than one room). */
function cycles(edges: Map<string, number>): string[][] {
  const next = new Map<string, string[]>();
  for (const e of edges.keys()) {
    const [a, b] = e.split(' -> ');
    next.set(a, [...(next.get(a) ?? []), b]);
    if (!next.has(b)) next.set(b, []);
  }
  let index = 0;
  const idx = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const on = new Set<string>();
  const out: string[][] = [];
  const strong = (v: string): void => {
    idx.set(v, index);
    low.set(v, index++);
    stack.push(v);
    on.add(v);
    for (const w of next.get(v) ?? []) {
      if (!idx.has(w)) {
        strong(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (on.has(w)) low.set(v, Math.min(low.get(v)!, idx.get(w)!));
    }
    if (low.get(v) !== idx.get(v)) return;
    const comp: string[] = [];
    for (let w = stack.pop()!; ; w = stack.pop()!) {
      on.delete(w);
      comp.push(w);
      if (w === v) break;
    }
    if (comp.length > 1) out.push(comp.sort());
  };
  for (const v of next.keys()) if (!idx.has(v)) strong(v);
  return out;
}

function upward(edges: Map<string, number>): string[] {
  const out: string[] = [];
  for (const e of edges.keys()) {
    const [a, b] = e.split(' -> ');
    if (ANYONE.test(b) || topRoom(a) === topRoom(b)) continue;
    const ra = rankOf(a);
    const rb = rankOf(b);
    if (ra < 0 || rb < 0 || rb <= ra) out.push(e);
  }
  return out;
}

function main(): void {
  const { root, top } = parseArgs(process.argv.slice(2));
  const src = path.join(root, 'src');
  const { edges, fns } = scan(src);
  console.log(`imports between folders of ${src} (count of import statements):`);
  for (const [e, n] of [...edges].sort()) console.log(`  ${e}  ${n}`);
  const up = upward(edges);
  console.log(`\nagainst the layering (${LAYERS.map((l) => l.join('|')).join(' → ')}; format, errors, output free): ${up.length}`);
  for (const e of up) console.log(`  ${e}`);
  const cyc = cycles(edges);
  console.log(`\nfolders on an import cycle: ${cyc.length === 0 ? 'none' : ''}`);
  for (const c of cyc) console.log(`  ${c.join(' ⇄ ')}`);
  console.log(`\nlongest functions (lines, of ${fns.length}):`);
  for (const f of fns.sort((x, y) => y.lines - x.lines).slice(0, top)) console.log(`  ${String(f.lines).padStart(4)}  ${f.name}  (${f.file})`);
}

main();
