// `npm run bench:qemu`: the save targets that count, measured side by side behind a real QEMU: a paused guest's
// migrate time (what its users wait for) into snap-pipe and into the other durable consumers of an exec: stream, and
// QEMU's own multi-channel save to a file (mapped-ram + multifd + direct-io), against which snap-pipe's multifd save
// (save --listen --multifd-channels N) is judged at the same channel counts. Records the run in perf/history/ and
// rewrites perf/RESULTS.md (perf/results.ts).
//
//   npm run bench:qemu                              QEMU 10.0, 2 GiB guest, 1536 MiB random fill, 3 rounds (~6 min)
//   npm run bench:qemu -- --rounds 1 --no-results    a quick look, nothing recorded
//
// Options: --qemu PATH|10.0|5.2 (default 10.0: mapped-ram needs 9.0, direct-io 9.1)  --mem MiB (2048)  --fill MiB
//          (1536)  --rounds N (3)  --channels N,M (multifd channel counts, 2,4)  --dir DIR (/tmp)  --no-results
//
// One guest boots, fills its RAM, and is paused. Each round saves it once into each consumer, interleaved, from
// `migrate` to query-migrate's `completed` (polled every 10 ms), with the page cache dropped before each; cat's time
// includes the `sync` that makes its file durable. Between saves the guest is continued and paused again: QEMU
// refuses to migrate a VM paused by an earlier migration. Each round ends with fio writing the fill's size to the same
// file system: the disk's limit for the guest's data, with no QEMU and no pipe (the guest's zero pages cost nothing).
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { Guest, delayMs, guestFiles, shellQuote, snapPipeBin } from '../tools/qemu/guest.js';
import { chosenQemu, qemuAtLeast, type Qemu } from '../tools/qemu/versions.js';
import { checkout, recordRun } from './results.js';
import { fioCommand } from './fio.js';

const ROOT = join(import.meta.dirname, '..');
const GiB = 2 ** 30;
const POLL_MS = 10;

interface Args {
  qemu: string;
  memMiB: number;
  fillMiB: number;
  rounds: number;
  /** Multifd channel counts: QEMU's mapped-ram save and snap-pipe's multifd save run at each. */
  channels: number[];
  dir: string;
  results: boolean;
}

function parseArgs(argv: string[]): Args {
  const a: Args = { qemu: '10.0', memMiB: 2048, fillMiB: 1536, rounds: 3, channels: [2, 4], dir: '/tmp', results: true };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const v = () => {
      if (i + 1 >= argv.length) throw new Error(`${k} needs a value`);
      return argv[++i];
    };
    if (k === '--') continue;
    else if (k === '--qemu') a.qemu = v();
    else if (k === '--mem') a.memMiB = Number(v());
    else if (k === '--fill') a.fillMiB = Number(v());
    else if (k === '--rounds') a.rounds = Number(v());
    else if (k === '--channels') a.channels = v().split(',').map(Number);
    else if (k === '--dir') a.dir = v();
    else if (k === '--no-results') a.results = false;
    else throw new Error(`unknown option ${k}`);
  }
  for (const [name, n] of [['--mem', a.memMiB], ['--fill', a.fillMiB], ['--rounds', a.rounds], ...a.channels.map((c) => ['--channels', c] as const)] as const) {
    if (!Number.isInteger(n) || n < 1) throw new Error(`${name}: a positive integer`);
  }
  return a;
}

function log(msg: string): void {
  process.stderr.write(`bench:qemu: ${msg}\n`);
}

function sh(cmd: string): string {
  const r = spawnSync('bash', ['-o', 'pipefail', '-c', cmd], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`'${cmd}' failed (exit ${r.status ?? r.signal}): ${r.stderr.trim().slice(-1000)}`);
  return r.stdout;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

/** One way to save: how to start it, and what makes its output durable afterwards. */
interface Consumer {
  name: string;
  /** Set before the migration, undone after (capabilities and parameters of QEMU's own file save). */
  caps?: Record<string, boolean>;
  params?: Record<string, unknown>;
  uri(out: string): string;
  /** Before the migration, not counted: e.g. a listener started ahead. */
  before?: (out: string) => Promise<void>;
  /** After QEMU says completed: e.g. sync, counted in the time. */
  after?: (out: string) => void | Promise<void>;
  /** snap-pipe itself: the exec: save (the exec: target is judged on it), the listener over one socket, or multifd. */
  snapPipe?: 'exec' | 'listen' | 'multifd';
  /** Multifd channels (QEMU's mapped-ram save and snap-pipe's multifd save). */
  channels?: number;
}

function consumers(q: Qemu, args: Args): Consumer[] {
  const bin = shellQuote(snapPipeBin());
  const list: Consumer[] = [
    { name: 'exec:snap-pipe save', uri: (out) => `exec:${bin} save --force ${shellQuote(out)}`, snapPipe: 'exec' },
    { name: 'exec:cat > FILE, then sync', uri: (out) => `exec:cat > ${shellQuote(out)}`, after: () => void sh('sync') },
    { name: 'exec:dd oflag=direct bs=1M', uri: (out) => `exec:dd of=${shellQuote(out)} bs=1M iflag=fullblock oflag=direct status=none` },
    listenConsumer(0),
  ];
  for (const n of args.channels) {
    // QEMU's own multi-channel save to a file: mapped-ram came in 9.0, direct-io in 9.1.
    if (qemuAtLeast(q, 9, 1)) {
      list.push({
        name: `file: mapped-ram + multifd (${n} channels) + direct-io (QEMU's own)`,
        caps: { multifd: true, 'mapped-ram': true },
        params: { 'multifd-channels': n, 'direct-io': true },
        uri: (out) => `file:${out}`,
        channels: n,
      });
    }
    list.push(listenConsumer(n));
  }
  return list;
}

/**
 * `snap-pipe save --listen`, started before the migration (its stage threads and image ready, not counted), QEMU
 * migrating to its socket, over `channels` multifd channels (0: one connection); counted until save has exited (the
 * image complete and synced).
 */
function listenConsumer(channels: number): Consumer {
  let exited: Promise<number | null> = Promise.resolve(null);
  const sockOf = (out: string) => `${out}.sock`;
  const multifd = channels > 0 ? ['--multifd-channels', String(channels)] : [];
  return {
    name: channels > 0 ? `unix: snap-pipe save --listen, multifd (${channels} channels)` : 'unix: snap-pipe save --listen (started beforehand)',
    snapPipe: channels > 0 ? 'multifd' : 'listen',
    caps: channels > 0 ? { multifd: true } : undefined,
    params: channels > 0 ? { 'multifd-channels': channels } : undefined,
    channels: channels > 0 ? channels : undefined,
    uri: (out) => `unix:${sockOf(out)}`,
    before: async (out) => {
      const c = spawn(process.execPath, [snapPipeBin(), 'save', '--force', out, '--listen', `unix:${sockOf(out)}`, ...multifd], { stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      exited = new Promise((resolve) => c.on('exit', (code) => resolve(code)));
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`save --listen never listened: ${stderr}`)), 30_000);
        c.stderr!.on('data', (d) => {
          stderr += d;
          if (stderr.includes('listening on unix:')) {
            clearTimeout(timer);
            resolve();
          }
        });
      });
    },
    after: async () => {
      const code = await exited;
      if (code !== 0) throw new Error(`save --listen exited ${code}`);
    },
  };
}

/** Saves the paused guest once into `c`; the seconds from `migrate` to durable output. */
async function saveOnce(g: Guest, c: Consumer, out: string): Promise<number> {
  rmSync(out, { force: true });
  sh('sync; echo 3 > /proc/sys/vm/drop_caches');
  if (c.caps) await g.setCapabilities(c.caps);
  if (c.params) await g.setMigrationParams(c.params);
  try {
    await c.before?.(out);
    const t0 = performance.now();
    await g.migrate(c.uri(out));
    for (;;) {
      const m = await g.queryMigrate(120_000);
      if (m.status === 'completed') break;
      if (m.status === 'failed' || m.status === 'cancelled') throw g.failure(`${c.name}: ${m.status}: ${m['error-desc'] ?? '?'}`);
      await delayMs(POLL_MS);
    }
    await c.after?.(out);
    return (performance.now() - t0) / 1000;
  } finally {
    // One output on disk at a time: an 8 GiB guest's eight outputs would not all fit.
    rmSync(out, { force: true });
    if (c.caps) await g.setCapabilities(Object.fromEntries(Object.keys(c.caps).map((k) => [k, false])));
    // Paused by the migration: continue and pause again, or QEMU refuses the next one.
    await g.cont();
    await g.stop();
  }
}

/**
 * The disk's limit for the guest's data: seconds for fio to write --fill MiB (1 MiB direct writes, io_uring, depth 16,
 * as npm run bench's fio row), the page cache dropped first, the file removed after.
 */
function fioWrite(file: string, fillMiB: number): number {
  sh('sync; echo 3 > /proc/sys/vm/drop_caches');
  try {
    const out = sh(fioCommand('write', shellQuote(file), fillMiB));
    const bw = (JSON.parse(out) as { jobs: { write: { bw_bytes: number } }[] }).jobs[0].write.bw_bytes;
    return (fillMiB * 2 ** 20) / bw;
  } finally {
    rmSync(file, { force: true });
  }
}

function report(q: Qemu, args: Args, list: Consumer[], seconds: number[][], meta: string[], fioSeconds: number[]): string {
  const snapIdx = list.findIndex((c) => c.snapPipe === 'exec');
  const snap = median(seconds[snapIdx]);
  const execPeers = list.map((c, i) => ({ c, s: median(seconds[i]) })).filter(({ c }) => !c.snapPipe && c.uri('x').startsWith('exec:'));
  const bestPeer = execPeers.reduce((a, b) => (b.s < a.s ? b : a));
  const timed = list.map((c, i) => ({ c, s: median(seconds[i]) }));
  const multifdTargets = args.channels.map((n) => {
    const own = timed.find(({ c }) => c.caps?.['mapped-ram'] && c.channels === n);
    const ours = timed.find(({ c }) => c.snapPipe === 'multifd' && c.channels === n)!;
    return own
      ? `- a multifd save no slower than QEMU's own mapped-ram save, ${n} channels each (${own.s.toFixed(2)} s): snap-pipe ${ours.s.toFixed(2)} s, ` +
          `${(ours.s / own.s).toFixed(2)}× as long: ${ours.s <= own.s ? 'met' : '**MISSED**'}`
      : `- a multifd save no slower than QEMU's own mapped-ram save: ${q.label} has no mapped-ram with direct-io (9.1+): not measured`;
  });
  const lines = [
    `## ${meta[0]}`,
    '',
    ...meta.slice(1),
    '',
    `### A paused ${args.memMiB / 1024} GiB guest (${args.fillMiB} MiB of random data), ${q.label}: seconds from \`migrate\` to durable output, ${args.rounds} round(s), interleaved`,
    '',
    '| consumer | seconds (median) | range | vs exec:snap-pipe save |',
    '|---|---:|---:|---:|',
    ...list.map((c, i) => {
      const s = seconds[i];
      return `| ${c.name.replaceAll('|', '\\|')} | ${median(s).toFixed(2)} | ${Math.min(...s).toFixed(2)}–${Math.max(...s).toFixed(2)} | ${(median(s) / snap).toFixed(2)}× |`;
    }),
    `| the disk's limit: fio writing the ${args.fillMiB} MiB of data (1 MiB direct writes, io_uring, depth 16; no QEMU) | ${median(fioSeconds).toFixed(2)} | ${Math.min(...fioSeconds).toFixed(2)}–${Math.max(...fioSeconds).toFixed(2)} | ${(median(fioSeconds) / snap).toFixed(2)}× |`,
    '',
    'Targets:',
    '',
    `- exec: save no slower than the best other durable exec: consumer (${bestPeer.c.name}, ${bestPeer.s.toFixed(2)} s): snap-pipe ${snap.toFixed(2)} s: ${snap <= bestPeer.s ? 'met' : '**MISSED**'}`,
    ...multifdTargets,
    '',
  ];
  return lines.join('\n');
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const q = chosenQemu(args.qemu);
  guestFiles();
  const started = new Date();
  const { commit, dirtyFiles: dirty } = checkout(ROOT);
  const dir = mkdtempSync(join(args.dir, 'snap-pipe-qemu-bench-'));
  let g: Guest | null = null;
  const cleanup = async () => {
    await g?.quit().catch(() => undefined);
    rmSync(dir, { recursive: true, force: true });
  };
  process.once('SIGINT', () => void cleanup().finally(() => process.exit(130)));
  try {
    log(`${q.label}: booting a ${args.memMiB} MiB guest and filling ${args.fillMiB} MiB`);
    g = await Guest.start({ qemu: q, name: 'qemu-bench', memMiB: args.memMiB, fillMiB: args.fillMiB });
    await g.waitReady(600_000);
    await g.unthrottle();
    await g.stop();
    const list = consumers(q, args);
    const seconds = list.map(() => [] as number[]);
    const fioSeconds: number[] = [];
    for (let round = 0; round < args.rounds; round++) {
      for (const [i, c] of list.entries()) {
        const s = await saveOnce(g, c, join(dir, `out-${i}`));
        seconds[i].push(s);
        log(`round ${round + 1}: ${c.name}: ${s.toFixed(2)} s`);
      }
      fioSeconds.push(fioWrite(join(dir, 'fio'), args.fillMiB));
      log(`round ${round + 1}: fio write of ${args.fillMiB} MiB: ${fioSeconds[round].toFixed(2)} s`);
    }
    const meta = [
      `${started.toISOString().slice(0, 16).replace('T', ' ')} UTC — npm run bench:qemu`,
      `- CPU: ${cpus().length} × ${cpus()[0]?.model ?? '?'}; memory ${(totalmem() / GiB).toFixed(1)} GiB; kernel ${sh('uname -r').trim()}; Node ${process.version}; ${q.label} (${q.system}), -accel tcg`,
      `- ${args.dir}: ${sh(`findmnt -no SOURCE,FSTYPE --target ${args.dir}`).trim().replace(/\s+/g, ' ')}; snap-pipe at ${commit}${dirty ? ` (working tree: ${dirty} changed files)` : ''}`,
      `- load average at the end ${readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')}`,
    ];
    const text = report(q, args, list, seconds, meta, fioSeconds);
    process.stdout.write(text + '\n');
    if (args.results) {
      // Guests past the default 2 GiB are a kind of their own in RESULTS.md: the 2 GiB table stays beside them.
      const file = recordRun({ kind: args.memMiB > 2048 ? 'qemu-save-large' : 'qemu-save', started: started.toISOString(), commit, dirtyFiles: dirty, markdown: text, raw: { qemu: q.label, args, consumers: list.map((c) => c.name), seconds, fioSeconds } });
      log(`recorded ${file}; perf/RESULTS.md rewritten`);
    }
  } finally {
    await cleanup();
  }
}

main().catch((err) => {
  process.stderr.write(`bench:qemu: ${(err as Error).message.split('\n')[0]}\n`);
  process.exit(1);
});
