// `npm run flame` (after `npm run build`): profiles of a save and a load of a generated 2 GiB-of-RAM stream.
//   - clinic flame and clinic doctor (HTML under perf/out/): the main thread (supervision, comlink, for load: all of it)
//   - node --cpu-prof (applies to worker threads too in Node 20: one .cpuprofile per thread, under perf/out/cpuprof-*)
//     then the top self-time frames of each thread, printed and written to perf/out/top.txt
//
//   npm run flame                               everything
//   npm run flame -- --ram 1G --no-clinic       only the --cpu-prof profiles
//   npm run flame -- top FILE.cpuprofile... [--n 20]   the top frames of existing profiles
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';

const ROOT = join(import.meta.dirname, '..');
const BIN = join(ROOT, 'bin', 'snap-pipe');
const OUT = join(ROOT, 'perf', 'out');
const CLINIC = join(ROOT, 'node_modules', 'clinic', 'bin.js');
const VITE_NODE = join(ROOT, 'node_modules', '.bin', 'vite-node');

// ---------------------------------------------------------------------------------------------------------------
// .cpuprofile reading

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
  columnNumber: number;
}
interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}
interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface Frame {
  key: string;
  selfMs: number;
  totalMs: number;
}

export interface ProfileSummary {
  file: string;
  thread: string;
  wallMs: number;
  idleMs: number;
  frames: Frame[];
}

function frameKey(cf: CallFrame): string {
  const fn = cf.functionName || '(anonymous)';
  if (!cf.url) return fn;
  const url = cf.url.replace(/^file:\/\//, '').replace(ROOT + '/', '');
  return `${fn} ${url}:${cf.lineNumber + 1}`;
}

/** Which thread a profile is: the snap-pipe worker whose module it ran, else main. */
function threadOf(p: CpuProfile): string {
  const urls = new Set(p.nodes.map((n) => n.callFrame.url));
  for (const w of ['reader', 'coalescer', 'writer']) if ([...urls].some((u) => u.endsWith(`/workers/${w}.js`))) return `${w} worker`;
  return 'main thread';
}

export function summarize(file: string): ProfileSummary {
  const p = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile;
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const self = new Map<string, number>();
  const total = new Map<string, number>();
  let idleUs = 0;
  let wallUs = 0;
  for (let i = 0; i < p.samples.length; i++) {
    // A sample lasts until the next one (the last until the profile's end).
    const dt = i + 1 < p.timeDeltas.length ? p.timeDeltas[i + 1] : Math.max(0, p.endTime - (p.startTime + p.timeDeltas.reduce((a, b) => a + b, 0)));
    wallUs += dt;
    const node = byId.get(p.samples[i])!;
    const k = frameKey(node.callFrame);
    if (k === '(idle)') idleUs += dt;
    self.set(k, (self.get(k) ?? 0) + dt);
    const seen = new Set<string>();
    for (let id: number | undefined = node.id; id !== undefined; id = parent.get(id)) {
      const kk = frameKey(byId.get(id)!.callFrame);
      if (kk === '(root)' || seen.has(kk)) continue;
      seen.add(kk);
      total.set(kk, (total.get(kk) ?? 0) + dt);
    }
  }
  const frames = [...self.entries()]
    .map(([key, us]) => ({ key, selfMs: us / 1000, totalMs: (total.get(key) ?? us) / 1000 }))
    .sort((a, b) => b.selfMs - a.selfMs);
  return { file, thread: threadOf(p), wallMs: wallUs / 1000, idleMs: idleUs / 1000, frames };
}

export function formatTop(s: ProfileSummary, n: number): string {
  const busy = s.wallMs - s.idleMs;
  const lines = [
    `${s.thread} — ${basename(s.file)}: ${(s.wallMs / 1000).toFixed(2)} s profiled, ${(busy / 1000).toFixed(2)} s not idle`,
    `   self ms  self%   total ms  frame (self% of non-idle time)`,
  ];
  for (const f of s.frames.filter((f) => f.key !== '(idle)').slice(0, n)) {
    lines.push(`${f.selfMs.toFixed(0).padStart(10)} ${((100 * f.selfMs) / Math.max(1, busy)).toFixed(1).padStart(5)}% ${f.totalMs.toFixed(0).padStart(10)}  ${f.key}`);
  }
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------------------------------
// Running the profiles

function log(msg: string): void {
  process.stderr.write(`flame: ${msg}\n`);
}

function sh(cmd: string, env: NodeJS.ProcessEnv = {}): { code: number; err: string } {
  const r = spawnSync('bash', ['-o', 'pipefail', '-c', cmd], { encoding: 'utf8', env: { ...process.env, ...env }, maxBuffer: 64 << 20 });
  return { code: r.status ?? 128, err: (r.stderr ?? '') + (r.error ? String(r.error) : '') };
}

/** Runs a save under `wrap` (a profiler prefix); io_uring first, then --io sync if that fails (see README: EINTR). */
function profiledSave(wrap: string, stream: string, img: string, notes: string[], what: string, env: NodeJS.ProcessEnv = {}): void {
  for (const io of ['uring', 'sync']) {
    rmSync(img, { force: true });
    sh(`cat ${stream} > /dev/null`);
    const r = sh(`${wrap} node ${BIN} save ${img} --force --io ${io} --stats < ${stream}`, env);
    const tail = r.err.trim().split('\n').filter((l) => l.startsWith('snap-pipe')).join(' | ');
    // clinic exits 0 even when the program it ran failed: success is the --stats summary line.
    if (r.code === 0 && /snap-pipe save: .* of stream in/.test(r.err)) {
      notes.push(`${what}: save --io ${io}: ${tail.replace(/\s+/g, ' ').slice(0, 200)}`);
      return;
    }
    notes.push(`${what}: save --io ${io} FAILED (exit ${r.code}): ${tail.slice(0, 300)}`);
    log(`${what}: save --io ${io} failed: ${tail}`);
  }
}

function profiledLoad(wrap: string, img: string, notes: string[], what: string, env: NodeJS.ProcessEnv = {}): void {
  sh('sync && echo 3 > /proc/sys/vm/drop_caches');
  const r = sh(`${wrap} node ${BIN} load ${img} --stats > /dev/null`, env);
  const tail = r.err.trim().split('\n').filter((l) => l.startsWith('snap-pipe')).join(' | ');
  notes.push(`${what}: load ${r.code === 0 ? '' : `FAILED (exit ${r.code}) `}${tail.replace(/\s+/g, ' ').slice(0, 200)}`);
}

/** Moves clinic's newest `<pid>.clinic-<tool>.html` to perf/out/<name>.html (its data directory beside it). */
function keepClinic(dest: string, tool: string, name: string): string | undefined {
  const html = readdirSync(dest).filter((f) => f.endsWith(`.clinic-${tool}.html`));
  if (html.length === 0) return undefined;
  const src = join(dest, html[0]);
  const to = join(OUT, `${name}.html`);
  rmSync(to, { force: true });
  renameSync(src, to);
  const data = join(dest, html[0].replace(/\.html$/, ''));
  if (existsSync(data)) {
    rmSync(join(OUT, `${name}.data`), { recursive: true, force: true });
    renameSync(data, join(OUT, `${name}.data`));
  }
  return to;
}

function cpuProfiles(dir: string, n: number): string {
  const files = readdirSync(dir).filter((f) => f.endsWith('.cpuprofile')).map((f) => join(dir, f));
  return files
    .map((f) => summarize(f))
    .sort((a, b) => a.thread.localeCompare(b.thread))
    .map((s) => formatTop(s, n))
    .join('\n\n');
}

function main(argv: string[]): void {
  const args = argv.filter((a) => a !== '--');
  const nAt = args.indexOf('--n');
  const n = nAt >= 0 ? Number(args[nAt + 1]) : 15;
  if (args[0] === 'top') {
    const files = args.slice(1).filter((a, i, all) => a !== '--n' && all[i - 1] !== '--n');
    if (files.length === 0) throw new Error('usage: flame top FILE.cpuprofile... [--n 20]');
    process.stdout.write(files.map((f) => formatTop(summarize(f), n)).join('\n\n') + '\n');
    return;
  }
  if (!existsSync(join(ROOT, 'dist', 'main.js'))) throw new Error('dist/ is missing: run npm run build first');
  const ramAt = args.indexOf('--ram');
  const ram = ramAt >= 0 ? args[ramAt + 1] : '2G';
  const clinic = !args.includes('--no-clinic');
  mkdirSync(OUT, { recursive: true });
  const tmp = mkdtempSync('/tmp/snap-pipe-flame-');
  const notes: string[] = [];
  try {
    const stream = join(tmp, 'stream.bin');
    const img = join(tmp, 'image.qcow2');
    log(`generating a --ram ${ram} background stream`);
    const g = sh(`${VITE_NODE} ${join(ROOT, 'perf', 'generate.ts')} -- --ram ${ram} --zero 0.3 --order background --seed 1 --out ${stream} --summary ${join(tmp, 's.json')}`);
    if (g.code !== 0) throw new Error(`generate failed: ${g.err}`);

    // Worker threads: --cpu-prof writes one profile per thread (main + reader + coalescer + writer).
    for (const what of ['save', 'load'] as const) {
      const dir = join(OUT, `cpuprof-${what}`);
      rmSync(dir, { recursive: true, force: true });
      log(`--cpu-prof ${what}`);
      if (what === 'save') {
        // Retry on failure: a failed run leaves partial profiles, so clear them before the second backend.
        for (const io of ['uring', 'sync']) {
          rmSync(dir, { recursive: true, force: true });
          rmSync(img, { force: true });
          sh(`cat ${stream} > /dev/null`);
          const r = sh(`node --cpu-prof --cpu-prof-dir=${dir} ${BIN} save ${img} --force --io ${io} --stats < ${stream}`);
          const tail = r.err.trim().split('\n').filter((l) => l.startsWith('snap-pipe') || l.startsWith('  ')).join(' | ').replace(/\s+/g, ' ');
          notes.push(`--cpu-prof save --io ${io}: ${r.code === 0 ? 'ok' : `FAILED (exit ${r.code})`}: ${tail.slice(0, 400)}`);
          if (r.code === 0) break;
        }
      } else {
        sh('sync && echo 3 > /proc/sys/vm/drop_caches');
        const r = sh(`node --cpu-prof --cpu-prof-dir=${dir} ${BIN} load ${img} --stats > /dev/null`);
        notes.push(`--cpu-prof load: ${r.code === 0 ? 'ok' : `FAILED (exit ${r.code})`}: ${r.err.trim().replace(/\s+/g, ' ').slice(0, 400)}`);
      }
    }

    if (clinic) {
      const dest = join(tmp, 'clinic');
      mkdirSync(dest, { recursive: true });
      const env = { NO_INSIGHT: '1' };
      for (const tool of ['flame', 'doctor'] as const) {
        log(`clinic ${tool} save`);
        profiledSave(`cd ${tmp} && node ${CLINIC} ${tool} --open=false --dest ${dest} --`, stream, img, notes, `clinic ${tool}`, env);
        const s = keepClinic(dest, tool, `save.clinic-${tool}`);
        notes.push(s ? `clinic ${tool} save report: ${s.replace(ROOT + '/', '')}` : `clinic ${tool} save: no report`);
      }
      if (!existsSync(img)) profiledSave('', stream, img, notes, 'plain');
      for (const tool of ['flame', 'doctor'] as const) {
        log(`clinic ${tool} load`);
        profiledLoad(`cd ${tmp} && node ${CLINIC} ${tool} --open=false --dest ${dest} --`, img, notes, `clinic ${tool}`, env);
        const s = keepClinic(dest, tool, `load.clinic-${tool}`);
        notes.push(s ? `clinic ${tool} load report: ${s.replace(ROOT + '/', '')}` : `clinic ${tool} load: no report`);
      }
    }

    const text = [
      `# npm run flame, ${new Date().toISOString().slice(0, 16).replace('T', ' ')} UTC, --ram ${ram} background stream`,
      '',
      ...notes.map((x) => `- ${x}`),
      '',
      '## save (--cpu-prof, one profile per thread)',
      '',
      cpuProfiles(join(OUT, 'cpuprof-save'), n),
      '',
      '## load (--cpu-prof)',
      '',
      cpuProfiles(join(OUT, 'cpuprof-load'), n),
      '',
    ].join('\n');
    writeFileSync(join(OUT, 'top.txt'), text);
    process.stdout.write(text);
    log(`written ${join(OUT, 'top.txt')}`);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

try {
  main(process.argv.slice(2));
} catch (err) {
  process.stderr.write(`flame: ${(err as Error).message}\n`);
  process.exit(1);
}
