// Where benchmark runs go: each run's raw figures as one JSON file in perf/history/, and perf/RESULTS.md rewritten as
// the current state: the newest run of each kind of benchmark, nothing older (older runs stay in history/).
import { execFileSync } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const PERF = import.meta.dirname;
const HISTORY = join(PERF, 'history');
const RESULTS = join(PERF, 'RESULTS.md');

/** The kinds of run RESULTS.md shows, in its order, with what each is. */
const KINDS: Record<string, string> = {
  'qemu-save': '`npm run bench:qemu`: a paused guest\'s save behind a real QEMU, snap-pipe against the other durable consumers and QEMU\'s own multi-channel save (the targets that count)',
  'qemu-save-large': '`npm run bench:qemu -- --mem 8192 --fill 6144`: the same with an 8 GiB guest',
  bench: '`npm run bench`: save and load against the disk\'s limit (fio) and the usual consumers, 4 GiB of RAM',
  'bench-long': '`npm run bench -- --long`: the same at 8 and 16 GiB, and the memory bound',
  postcopy: '`npm run bench:postcopy`: time to a running guest, precopy vs postcopy, behind a real QEMU',
  'postcopy-large': '`npm run bench:postcopy -- --mem 8192 --fill 6144`: the same with an 8 GiB guest',
};

export interface RunRecord {
  kind: keyof typeof KINDS | string;
  /** ISO 8601, when the run started. */
  started: string;
  commit: string;
  /** Files the working tree had changed against the commit (0: the figures are the commit's). */
  dirtyFiles: number;
  /** The run's report, as printed: tables of figures against their targets and against the peers of the same run. */
  markdown: string;
  /** Everything measured, per run and per command, for later comparison. */
  raw: unknown;
}

/**
 * The commit being measured and how many files the working tree changes against it, taken when a run starts (the
 * built dist/ is what runs; a commit made while a run goes on is not what it measured).
 */
export function checkout(root: string): { commit: string; dirtyFiles: number } {
  const git = (...args: string[]) => {
    try {
      return execFileSync('git', ['-C', root, ...args], { encoding: 'utf8' });
    } catch {
      return '';
    }
  };
  const commit = git('rev-parse', '--short', 'HEAD').trim() || '?';
  const dirtyFiles = git('status', '--porcelain').split('\n').filter((l) => l.trim() !== '').length;
  return { commit, dirtyFiles };
}

/** Saves `run` to perf/history/ and rewrites RESULTS.md from the newest run of each kind. Returns the JSON's path. */
export function recordRun(run: RunRecord): string {
  mkdirSync(HISTORY, { recursive: true });
  const file = join(HISTORY, `${run.started.slice(0, 16).replace(/:/g, '')}Z-${run.kind}.json`);
  writeFileSync(file, JSON.stringify(run, null, 1) + '\n');
  rewriteResults();
  return file;
}

/** RESULTS.md from the newest run of each kind in history/ (also after a record there was mended by hand). */
export function rewriteResults(): void {
  writeFileSync(RESULTS, currentResults());
}

function currentResults(): string {
  const newest = new Map<string, RunRecord>();
  for (const name of readdirSync(HISTORY).filter((f) => f.endsWith('.json')).sort()) {
    const run = JSON.parse(readFileSync(join(HISTORY, name), 'utf8')) as RunRecord;
    newest.set(run.kind, run); // sorted by start time: the last one read is the newest
  }
  const parts = [
    '# snap-pipe: current benchmark results',
    '',
    'The newest run of each benchmark, rewritten by the run itself (perf/results.ts). Every run\'s raw figures are in',
    'perf/history/ as JSON, older runs included; perf/README.md says what limits save and load and what was tried.',
    'Compare figures only within one run: the disk\'s rate here swings from run to run.',
    '',
  ];
  for (const [kind, what] of Object.entries(KINDS)) {
    const run = newest.get(kind);
    parts.push(`## ${what}`, '');
    if (!run) {
      parts.push('No run recorded yet.', '');
      continue;
    }
    parts.push(`Run of ${run.started.slice(0, 16).replace('T', ' ')} UTC at ${run.commit}${run.dirtyFiles ? ` (working tree: ${run.dirtyFiles} changed files)` : ''}.`, '');
    parts.push(run.markdown.replace(/^## .*\n/, '').trim(), '');
  }
  return parts.join('\n');
}
