// `npm run bench:postcopy`: how soon a restored guest runs, precopy vs postcopy, behind a real QEMU (TCG), and the
// fault latency snap-pipe's --stats reports under its sequential background stream. Records the run in perf/history/
// and rewrites perf/RESULTS.md (perf/results.ts).
//
//   npm run bench:postcopy                        2 GiB guest, 1200 MiB of random fill, 3 warm + 1 cold run per mode (~4 min)
//   npm run bench:postcopy -- --runs 1 --cold-runs 0 --no-results     a quick look, nothing appended
//
// Options: --mem MiB (default 2048)  --fill MiB (default 1200)  --runs N (warm runs per mode, default 3)
//          --cold-runs N (default 1; 0 for none)  --settle SECONDS (idle before each cold run, default 30)
//          --modes precopy,postcopy,postcopy25,multifd,mapped-ram (default all; mapped-ram needs QEMU 9.1+)
//          --dir DIR (default /tmp)  --no-results
//          --qemu PATH|10.0 (the qemu-system-x86_64 to run; default $SNAP_PIPE_QEMU, else the machine's own)
// Needs python3 (the warm-up below; Node cannot madvise).
//
// 1. A guest of --mem MiB boots (scripts/guest.sh's /init fills --fill MiB of tmpfs with random data, prints
//    SNAPPIPE-READY, then SNAPPIPE-TICK n about twice a second), is stopped after a tick and saved with
//    `migrate exec:snap-pipe save IMG` (unthrottled), then quits.
// 2. For each run, modes interleaved (precopy, postcopy, postcopy=25, precopy, ...): the page cache is dropped, the
//    memory is warmed (or left to go cold, below), a fresh destination of the same size is started with
//    -S -incoming defer (postcopy modes: postcopy-ram and postcopy-blocktime on), and
//    `migrate_incoming exec:snap-pipe load [--postcopy[=25]] IMG --stats=FILE` is sent (the --connect modes: load
//    --connect unix:S is started first, and `migrate_incoming unix:S` sent once it says it waits). Then
//    query-migrate and the console are polled every 5 ms:
//      precopy:  completed -> cont (returned = "running": the vCPUs started) -> the first SNAPPIPE-TICK after
//                migrate_incoming ("first tick");
//      postcopy: postcopy-active -> cont at once (with -S QEMU leaves the guest paused at POSTCOPY_RUN, so cont is
//                what starts it; without -S it would start by itself at the same point; returned = "running")
//                -> first tick;
//                completed when query-migrate says so.
//    After completion the guest must tick twice more and query-status must say running. The fault latency
//    (from snap-pipe reading a page request off the return path to the write holding that page returning) and the
//    request count come from snap-pipe's --stats JSON; QEMU's postcopy-blocktime (total time vCPUs spent blocked
//    on missing pages) from query-migrate at the end.
//
// Warm and cold memory. This VM (Firecracker; virtio-balloon with free page reporting) hands free memory back to its
// host in 2 MiB blocks, a few seconds after it was freed, and the host must fault it in again on next use. QEMU's RAM
// is transparent-huge-page memory (except under postcopy, where QEMU places 4 KiB pages), so a precopy load's speed
// depends on what ran just before: 1.9–2.5 s into memory freed a second earlier, 4.6 s after 10 s idle, 5.3–5.5 s
// after 30 s (2 GiB guest, 1.4 GB stream); touching 1.5 GiB of huge-page memory took 0.2 s right after a free and 3.5 s
// cold. So each warm run first touches and frees --mem + 256 MiB of huge-page memory (python3, PRETOUCH_PY) and
// starts the destination right after: its RAM is memory the host already backs, as on bare metal. The cold pass
// waits --settle seconds instead: what a restore on this VM sees after a pause.
//
// "Time to running" is when the restore tool has handed QEMU a guest it runs (cont returned). The first tick shows
// the guest going; it includes the guest's own ~0.5 s tick loop (the saved guest was somewhere in `sleep 0.5`), the
// same image is restored in every run, so that part is the same for every mode. Until 2026-12-05 the table's "time
// to running" was the first tick; perf/history/ keeps both figures of every run (contMs, runningMs). Times are from
// just before the migrate-incoming QMP command is sent. Temporary files live in a directory under --dir, removed at the end (also
// on Ctrl-C), and every QEMU started here is quit.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import type { LatencySummary } from '../src/load/postcopy/latency.js';
import type { PostcopyReport } from '../src/load/postcopy/session.js';
import type { LoadReport } from '../src/load/precopy.js';
import { Guest, delayMs, guestFiles, shellQuote, snapPipeBin } from '../tools/qemu/guest.js';
import { checkout, recordRun } from './results.js';
import { chosenQemu, qemuAtLeast, type Qemu } from '../tools/qemu/versions.js';

const ROOT = join(import.meta.dirname, '..');
const MiB = 2 ** 20;
const GiB = 2 ** 30;
const POLL_MS = 5;

interface Args {
  memMiB: number;
  fillMiB: number;
  runs: number;
  dir: string;
  results: boolean;
  modes: string[];
  /** --modes was given (else every mode this QEMU can run). */
  modesGiven: boolean;
  /** Cold pass: runs per mode (0: none) and the idle pause before each. */
  coldRuns: number;
  settleS: number;
  qemu: string | undefined;
}

function parseArgs(argv: string[]): Args {
  const a: Args = { memMiB: 2048, fillMiB: 1200, runs: 3, dir: '/tmp', results: true, modes: MODES.map((m) => m.key), modesGiven: false, coldRuns: 1, settleS: 30, qemu: undefined };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const v = () => {
      if (i + 1 >= argv.length) throw new Error(`${k} needs a value`);
      return argv[++i];
    };
    if (k === '--') continue;
    else if (k === '--mem') a.memMiB = Number(v());
    else if (k === '--fill') a.fillMiB = Number(v());
    else if (k === '--runs') a.runs = Number(v());
    else if (k === '--dir') a.dir = v();
    else if (k === '--no-results') a.results = false;
    else if (k === '--modes') {
      a.modes = v().split(',');
      a.modesGiven = true;
    }
    else if (k === '--cold-runs') a.coldRuns = Number(v());
    else if (k === '--settle') a.settleS = Number(v());
    else if (k === '--qemu') a.qemu = v();
    else throw new Error(`unknown option ${k}`);
  }
  if (!(a.runs >= 0 && a.coldRuns >= 0 && a.runs + a.coldRuns >= 1)) throw new Error('--runs and --cold-runs: at least one run in all');
  for (const m of a.modes) if (!MODES.some((x) => x.key === m)) throw new Error(`--modes: unknown mode '${m}' (${MODES.map((x) => x.key).join(', ')})`);
  return a;
}

function log(msg: string): void {
  process.stderr.write(`bench:postcopy: ${msg}\n`);
}

function sh(cmd: string, allowFail = false): string {
  const r = spawnSync('bash', ['-o', 'pipefail', '-c', cmd], { encoding: 'utf8' });
  if (r.status !== 0 && !allowFail) throw new Error(`'${cmd}' failed (exit ${r.status ?? r.signal}): ${r.stderr.trim().slice(-2000)}`);
  return r.stdout ?? '';
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

const sec = (ms: number) => (ms / 1000).toFixed(2);
const msf = (ms: number) => (ms < 10 ? ms.toFixed(2) : ms.toFixed(1));

function loadAvg(): string {
  return readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
}

/** Live guests, quit on the way out (also on Ctrl-C). */
const guests = new Set<Guest>();

/** The QEMU every guest of this run uses (--qemu), set once at the start. */
let qemu: Qemu;

async function startGuest(opts: Parameters<typeof Guest.start>[0]): Promise<Guest> {
  const g = await Guest.start({ qemu, ...opts });
  guests.add(g);
  return g;
}

async function quitGuest(g: Guest): Promise<void> {
  try {
    await g.quit();
  } finally {
    guests.delete(g);
  }
}

function lastTick(text: string): number {
  const all = [...text.matchAll(/SNAPPIPE-TICK (\d+)/g)];
  return all.length ? Number(all[all.length - 1][1]) : -1;
}

function firstTick(text: string): number {
  const m = /SNAPPIPE-TICK (\d+)/.exec(text);
  return m ? Number(m[1]) : -1;
}

// ---------------------------------------------------------------------------------------------------------------
// One restore

interface Mode {
  key: string;
  label: string;
  loadArgs: string[];
  postcopy: boolean;
  /**
   * load --connect (migrate_incoming unix:) instead of exec:, over this many multifd channels (0: one socket),
   * started before migrate_incoming: it checks the image and waits for QEMU to listen.
   */
  connect?: { channels: number };
  /** QEMU's own restore of its own mapped-ram file (no snap-pipe): migrate_incoming file: (QEMU 9.1+). */
  mappedRam?: boolean;
}

/** Channels of the multifd restores, snap-pipe's and QEMU's mapped-ram alike. */
const MULTIFD_CHANNELS = 2;

const MODES: Mode[] = [
  { key: 'precopy', label: 'precopy (`load IMG`)', loadArgs: [], postcopy: false },
  { key: 'postcopy', label: 'postcopy (`load --postcopy IMG`)', loadArgs: ['--postcopy'], postcopy: true },
  { key: 'postcopy25', label: 'postcopy=25 (`load --postcopy=25 IMG`)', loadArgs: ['--postcopy=25'], postcopy: true },
  {
    key: 'postcopy-connect',
    label: 'postcopy over a socket (`load --postcopy --connect unix:S IMG`, started beforehand)',
    loadArgs: ['--postcopy'],
    postcopy: true,
    connect: { channels: 0 },
  },
  {
    key: 'multifd',
    label: `multifd (\`load --connect unix:S --multifd-channels ${MULTIFD_CHANNELS} IMG\`, started beforehand)`,
    loadArgs: [],
    postcopy: false,
    connect: { channels: MULTIFD_CHANNELS },
  },
  { key: 'mapped-ram', label: `QEMU's own mapped-ram restore (\`migrate_incoming file:\`, multifd ${MULTIFD_CHANNELS} channels + direct-io)`, loadArgs: [], postcopy: false, mappedRam: true },
];

interface RunResult {
  mode: string;
  pass: Pass;
  run: number;
  /** ms from migrate_incoming: postcopy-active seen (postcopy), completed seen, cont returned, first tick seen. */
  activeMs?: number;
  completedMs: number;
  contMs: number;
  runningMs: number;
  /** The first tick came while query-migrate still said postcopy-active. */
  tickWhileActive: boolean;
  firstTickNo: number;
  statuses: string[];
  /** Ticks seen after completion (the guest goes on). */
  ticksAfter: number;
  /** snap-pipe's --stats (none for QEMU's own mapped-ram restore). */
  stats?: PostcopyReport | LoadReport;
  blocktimeMs?: number;
  /** 1-minute load average before the run. */
  load: string;
  /** /proc/vmstat thp_fault_alloc from migrate_incoming to completion (machine-wide; QEMU's RAM, mostly). */
  thpFaults: number;
}

type Pass = 'warm' | 'cold';

/**
 * Maps, touches and frees MiB of transparent-huge-page memory (what QEMU's RAM is, outside postcopy): the host then
 * backs it, and the destination started right after reuses it before this VM reports it free to its host.
 */
const PRETOUCH_PY = `
import mmap, sys
n = int(sys.argv[1]) << 20
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_HUGEPAGE)
for off in range(0, n, 4096):
    m[off] = 1
m.close()
`;

function thpFaultAlloc(): number {
  const m = /^thp_fault_alloc (\d+)$/m.exec(readFileSync('/proc/vmstat', 'utf8'));
  return m ? Number(m[1]) : 0;
}

function loadUri(bin: string, img: string, args: string[]): string {
  return `exec:${[bin, 'load', img, ...args].map(shellQuote).join(' ')}`;
}

/** QEMU's own mapped-ram save of the source guest (step 1), for the mapped-ram mode. */
function mappedRamFile(dir: string): string {
  return join(dir, 'guest.mapped-ram');
}

/**
 * `load --connect` started before the destination listens: resolves `waiting` once load has checked the image and
 * says it waits for QEMU, `exited` with its exit code.
 */
function connectLoad(bin: string, img: string, sock: string, mode: Mode, statsPath: string): { waiting: Promise<void>; exited: Promise<number | null> } {
  const { channels } = mode.connect!;
  const multifd = channels > 0 ? ['--multifd-channels', String(channels)] : [];
  const c = spawn(process.execPath, [bin, 'load', img, ...mode.loadArgs, '--connect', `unix:${sock}`, '--connect-timeout', '120', ...multifd, `--stats=${statsPath}`], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let said = '';
  const exited = new Promise<number | null>((resolve) => c.on('exit', (code) => resolve(code)));
  const waiting = new Promise<void>((resolve, reject) => {
    c.stderr.on('data', (d: Buffer) => {
      said += d.toString();
      if (said.includes('waiting for QEMU to listen')) resolve();
      else process.stderr.write(d);
    });
    void exited.then((code) => reject(new Error(`load --connect exited ${code} before waiting for QEMU: ${said.trim()}`)));
  });
  return { waiting, exited };
}

async function readJson<T>(g: Guest, path: string): Promise<T> {
  for (const deadline = Date.now() + 15_000; Date.now() < deadline; ) {
    try {
      return JSON.parse(readFileSync(path, 'utf8')) as T;
    } catch {
      await delayMs(50);
    }
  }
  throw g.failure(`snap-pipe wrote no stats to ${path}`);
}

async function restore(args: Args, dir: string, bin: string, img: string, mode: Mode, pass: Pass, run: number, savedTick: number): Promise<RunResult> {
  const statsPath = join(dir, `stats-${mode.key}-${run}.json`);
  rmSync(statsPath, { force: true });
  sh('sync && echo 3 > /proc/sys/vm/drop_caches', true);
  if (pass === 'warm') sh(`python3 ${join(dir, 'pretouch.py')} ${args.memMiB + 256}`);
  else await delayMs(args.settleS * 1000);
  const g = await startGuest({ name: `pcbench-${mode.key}-${pass}-${run}`, memMiB: args.memMiB, fillMiB: args.fillMiB, incoming: true });
  try {
    // QEMU 7.2 checks postcopy-ram on the destination at POSTCOPY_ADVISE: set before migrate_incoming.
    if (mode.postcopy) await g.setCapabilities({ 'postcopy-ram': true, 'postcopy-blocktime': true });
    if (mode.connect?.channels || mode.mappedRam) {
      await g.setCapabilities({ multifd: true, ...(mode.mappedRam ? { 'mapped-ram': true } : {}) });
      await g.setMigrationParams({ 'multifd-channels': MULTIFD_CHANNELS, ...(mode.mappedRam ? { 'direct-io': true } : {}) });
    }
    await g.unthrottle();
    const from = g.consoleBytes();
    const thp0 = thpFaultAlloc();
    const sock = join(dir, `in-${mode.key}.sock`);
    const uri = mode.mappedRam ? `file:${mappedRamFile(dir)}` : mode.connect ? `unix:${sock}` : loadUri(bin, img, [...mode.loadArgs, `--stats=${statsPath}`]);
    const connected = mode.connect ? connectLoad(bin, img, sock, mode, statsPath) : undefined;
    await connected?.waiting;
    const load = loadAvg().split(' ')[0];
    const t0 = performance.now();
    const now = () => performance.now() - t0;
    await g.migrateIncoming(uri);

    const seen: string[] = [];
    let activeMs: number | undefined;
    let completedMs: number | undefined;
    let contMs: number | undefined;
    let runningMs: number | undefined;
    let tickWhileActive = false;
    let status = '';
    const tickSeen = () => /SNAPPIPE-TICK \d+/.test(readFileSync(g.consolePath).subarray(from).toString('latin1'));
    for (const deadline = Date.now() + 300_000; ; ) {
      if (Date.now() > deadline) throw g.failure(`${mode.key}: not running and completed within 300 s (statuses ${seen.join(', ')})`);
      // Console first: a tick seen here came before (or while) the status below.
      const ticked = runningMs === undefined && contMs !== undefined && tickSeen();
      const tTick = now();
      const m = await g.queryMigrate(300_000);
      if (seen[seen.length - 1] !== m.status) seen.push(m.status);
      if (m.status === 'failed' || m.status === 'cancelled') throw g.failure(`${mode.key}: migration ${m.status}: ${m['error-desc'] ?? '?'}`);
      if (ticked) {
        runningMs = tTick;
        if (status === 'postcopy-active' && m.status === 'postcopy-active') tickWhileActive = true;
      }
      status = m.status;
      if (status === 'postcopy-active' && activeMs === undefined) {
        activeMs = now();
        if (mode.postcopy && contMs === undefined) {
          await g.cont();
          contMs = now();
        }
      }
      if (status === 'completed' && completedMs === undefined) {
        completedMs = now();
        if (contMs === undefined) {
          await g.cont();
          contMs = now();
        }
      }
      if (completedMs !== undefined && runningMs !== undefined) break;
      await delayMs(POLL_MS);
    }

    const thpFaults = thpFaultAlloc() - thp0;
    const done = await g.queryMigrate();
    const blocktime = (done as Record<string, unknown>)['postcopy-blocktime'];
    if (connected && (await connected.exited) !== 0) throw g.failure(`${mode.key}: load --connect exited ${await connected.exited}`);
    const stats = mode.mappedRam ? undefined : await readJson<PostcopyReport | LoadReport>(g, statsPath);
    const text = g.consoleText().slice(from);
    const firstTickNo = firstTick(text);
    // The guest goes on: two more ticks after completion, and QEMU says it runs.
    let ticksAfter = 0;
    for (let i = 0; i < 2; i++) {
      await g.waitTick(30_000);
      ticksAfter++;
    }
    const st = await g.queryStatus();
    if (!st.running) throw g.failure(`${mode.key}: query-status ${st.status} after completion`);
    const errs = g.stderrText().split('\n').filter((l) => /snap-pipe:|error/i.test(l));
    if (errs.length) throw g.failure(`${mode.key}: errors in QEMU's log: ${errs.join(' | ')}`);
    if (stats && 'shutStatus' in stats && stats.shutStatus !== 0) throw g.failure(`${mode.key}: snap-pipe got SHUT status ${stats.shutStatus}`);
    if (firstTickNo !== savedTick + 1) log(`${mode.key} ${pass} run ${run}: first tick after restore is ${firstTickNo}, the saved guest's last was ${savedTick}`);
    const r: RunResult = {
      mode: mode.key,
      pass,
      run,
      activeMs,
      completedMs: completedMs!,
      contMs: contMs!,
      runningMs: runningMs!,
      tickWhileActive,
      firstTickNo,
      statuses: seen,
      ticksAfter,
      stats,
      blocktimeMs: typeof blocktime === 'number' ? blocktime : undefined,
      load,
      thpFaults,
    };
    const pc = stats && 'faultLatency' in stats ? (stats as PostcopyReport) : null;
    log(
      `${mode.key} ${pass} run ${run} (load ${load}): running ${sec(r.runningMs)} s, completed ${sec(r.completedMs)} s` +
        (r.activeMs !== undefined ? `, postcopy-active ${sec(r.activeMs)} s` : '') +
        `, cont ${sec(r.contMs)} s; statuses ${seen.join(' > ')}; ${thpFaults} THP faults` +
        (stats ? `; snap-pipe out in ${sec(stats.seconds * 1000)} s (reading ${sec(stats.readMs)}, verifying ${sec(stats.verifyMs)}, writing ${sec(stats.writeMs)})` : '') +
        (pc ? `; ${pc.requests} requests, fault p50 ${msf(pc.faultLatency.p50Ms)} ms p99 ${msf(pc.faultLatency.p99Ms)} ms max ${msf(pc.faultLatency.maxMs)} ms; blocktime ${r.blocktimeMs ?? '?'} ms` : ''),
    );
    return r;
  } finally {
    await quitGuest(g);
    rmSync(statsPath, { force: true });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Report

/** Pools the histograms of several runs (same bucket bounds) and takes snap-pipe's quantile: the bucket's upper bound. */
function pooled(lat: LatencySummary[]): { count: number; p50: number; p99: number; max: number } {
  const counts = new Map<number, number>();
  let n = 0;
  for (const l of lat) for (const b of l.buckets) {
    counts.set(b.leMs, (counts.get(b.leMs) ?? 0) + b.count);
    n += b.count;
  }
  const max = Math.max(0, ...lat.map((l) => l.maxMs));
  const sorted = [...counts.entries()].sort((a, b) => a[0] - b[0]);
  const q = (p: number) => {
    const rank = Math.max(1, Math.ceil(p * n));
    let seen = 0;
    for (const [le, c] of sorted) {
      seen += c;
      if (seen >= rank) return Math.min(le, max);
    }
    return max;
  };
  return { count: n, p50: n ? q(0.5) : 0, p99: n ? q(0.99) : 0, max };
}

/** Bytes snap-pipe sent: the main channel's, and the multifd channels' with load --connect. */
function streamBytes(st: PostcopyReport | LoadReport): number {
  return st.bytesOut + ('multifd' in st ? (st.multifd?.bytesOut ?? 0) : 0);
}

function range(xs: number[]): string {
  return xs.length > 1 ? `${sec(Math.min(...xs))}–${sec(Math.max(...xs))}` : '';
}

/** The summary table of one pass. */
function summaryTable(results: RunResult[]): string[] {
  const lines = [
    '| mode | time to running (vCPUs started), s (median) | range | to the first tick, s (median) | range | time to completed, s (median) | range | cont → first tick, s | stream | requests (median) | fault p50 / p99 / max, ms (pooled) | p50 / p99 per run, ms | fault latency summed / QEMU blocktime, ms per run |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|',
  ];
  for (const mode of MODES) {
    const rs = results.filter((r) => r.mode === mode.key);
    if (rs.length === 0) continue;
    const running = rs.map((r) => r.contMs);
    const ticked = rs.map((r) => r.runningMs);
    const completed = rs.map((r) => r.completedMs);
    const pcs = rs.map((r) => r.stats).filter((s): s is PostcopyReport => s !== undefined && 'faultLatency' in s);
    const p = pcs.length ? pooled(pcs.map((s) => s.faultLatency)) : null;
    lines.push(
      `| ${mode.label} | ${sec(median(running))} | ${range(running)} | ${sec(median(ticked))} | ${range(ticked)} | ${sec(median(completed))} | ${range(completed)} | ` +
        `${sec(median(rs.map((r) => r.runningMs - r.contMs)))} | ` +
        `${rs[0].stats ? `${(median(rs.map((r) => streamBytes(r.stats!))) / 1e9).toFixed(2)} GB` : '—'} | ` +
        (p
          ? `${median(pcs.map((s) => s.requests))} | ${msf(p.p50)} / ${msf(p.p99)} / ${msf(p.max)} (${p.count} faults) | ${pcs.map((s) => `${msf(s.faultLatency.p50Ms)} / ${msf(s.faultLatency.p99Ms)}`).join('; ')} | ` +
            `${rs.map((r) => { const l = (r.stats as PostcopyReport).faultLatency; return `${(l.meanMs * l.count).toFixed(0)} / ${r.blocktimeMs ?? '?'}`; }).join('; ')} |`
          : '— | — | — | — |'),
    );
  }
  lines.push('');
  return lines;
}

/** What the figures of one pass show, computed. */
function findings(results: RunResult[]): string[] {
  const said: string[] = [];
  const of = (key: string) => results.filter((r) => r.mode === key);
  const pre = of('precopy');
  const runningOf = (rs: RunResult[]) => median(rs.map((r) => r.contMs));
  const tickOf = (rs: RunResult[]) => median(rs.map((r) => r.runningMs));
  if (pre.length) {
    const preComp = median(pre.map((r) => r.completedMs));
    for (const mode of MODES.filter((m) => m.postcopy)) {
      const rs = of(mode.key);
      if (!rs.length) continue;
      const [run, preRun] = [runningOf(rs), runningOf(pre)];
      const comp = median(rs.map((r) => r.completedMs));
      said.push(
        `- ${mode.key}: the guest ran ${sec(preRun - run)} s sooner than with precopy (median ${sec(run)} s vs ${sec(preRun)} s; first tick ${sec(tickOf(rs))} s vs ${sec(tickOf(pre))} s); ` +
          `the migration completed ${sec(comp)} s after migrate_incoming vs ${sec(preComp)} s for precopy; ` +
          `the first tick came while still postcopy-active in ${rs.filter((r) => r.tickWhileActive).length} of ${rs.length} runs.`,
      );
    }
  }
  const mapped = of('mapped-ram');
  if (!mapped.length) return said;
  const [mappedRun, mappedTick] = [runningOf(mapped), tickOf(mapped)];
  for (const mode of MODES.filter((m) => !m.mappedRam)) {
    const rs = of(mode.key);
    if (!rs.length) continue;
    const [run, tick] = [runningOf(rs), tickOf(rs)];
    said.push(
      `- ${mode.key} vs QEMU's own mapped-ram restore: running after ${sec(run)} s vs ${sec(mappedRun)} s, ${((100 * run) / mappedRun).toFixed(0)}% of it ` +
        `(target: at most a third): ${run * 3 <= mappedRun ? 'met' : '**MISSED**'}; first tick after ${sec(tick)} s vs ${sec(mappedTick)} s (${((100 * tick) / mappedTick).toFixed(0)}%; both include the guest's own sleep).`,
    );
  }
  return said;
}

function report(args: Args, results: RunResult[], meta: { savedTick: number }): string[] {
  const lines: string[] = [];
  const warm = results.filter((r) => r.pass === 'warm');
  const cold = results.filter((r) => r.pass === 'cold');
  if (warm.length) {
    lines.push(`Warm memory (the main figures; ${args.runs} run(s) per mode): each destination starts right after ${args.memMiB + 256} MiB of huge-page memory was touched and freed, so its RAM is memory this VM's host already backs (as on bare metal).`, '');
    lines.push(...summaryTable(warm), ...findings(warm), '');
  }
  if (cold.length) {
    lines.push(`Cold memory (${args.coldRuns} run(s) per mode): each destination starts after ${args.settleS} s idle, by when this VM has handed much of the memory freed before back to its host, which must fault it in again.`, '');
    lines.push(...summaryTable(cold), ...findings(cold), '');
  }
  lines.push('Every run (ms from migrate_incoming; "active" = query-migrate first said postcopy-active; THP = thp_fault_alloc of /proc/vmstat during the run):', '');
  lines.push(
    '| mode | memory | run | load avg | THP faults | active | cont | first tick (running) | completed | tick while postcopy-active | snap-pipe: stream out in; reading / verifying / writing to QEMU\'s pipe | snap-pipe: devices loaded / EOF sent / SHUT (from its start) | requests (pages: data, zero, already sent) | fault p50 / p90 / p99 / max, ms | for requests: waiting for clusters / writing, ms |',
    '|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---|---|',
  );
  for (const r of results) {
    const s = r.stats && 'faultLatency' in r.stats ? r.stats : null;
    const f = (x: number | null | undefined) => (x === null || x === undefined ? '—' : x.toFixed(0));
    lines.push(
      `| ${r.mode} | ${r.pass} | ${r.run} | ${r.load} | ${r.thpFaults} | ${f(r.activeMs)} | ${f(r.contMs)} | ${f(r.runningMs)} | ${f(r.completedMs)} | ${MODES.find((m) => m.key === r.mode)?.postcopy ? (r.tickWhileActive ? 'yes' : 'no') : '—'} | ` +
        (r.stats ? `${f(r.stats.seconds * 1000)}; ${f(r.stats.readMs)} / ${f(r.stats.verifyMs)} / ${f(r.stats.writeMs)} | ` : '— | ') +
        (s
          ? `${f(s.devicesLoadedMs)} / ${f(s.eofSentMs)} / ${f(s.shutMs)} | ${s.requests} (${s.requestedDataPages}, ${s.requestedZeroPages}, ${s.requestedAlreadySent}) | ` +
            `${msf(s.faultLatency.p50Ms)} / ${msf(s.faultLatency.p90Ms)} / ${msf(s.faultLatency.p99Ms)} / ${msf(s.faultLatency.maxMs)} | ${msf(s.requestReadWaitMs)} / ${msf(s.requestWriteMs)} |`
          : '— | — | — | — |'),
    );
  }
  lines.push('');
  const nAfter = results.filter((r) => r.ticksAfter >= 2).length;
  lines.push(`- After completion the guest ticked on in ${nAfter} of ${results.length} runs (two more ticks, query-status running).`);
  const tickNos = [...new Set(results.map((r) => r.firstTickNo))];
  lines.push(`- First tick after every restore: SNAPPIPE-TICK ${tickNos.join(', ')} (the saved guest's last was ${meta.savedTick}).`, '');
  return lines;
}

// ---------------------------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  qemu = chosenQemu(args.qemu);
  // mapped-ram came in QEMU 9.0, direct-io in 9.1: by default the mode runs where the QEMU has them.
  if (!qemuAtLeast(qemu, 9, 1)) {
    if (args.modesGiven && args.modes.includes('mapped-ram')) throw new Error(`--modes mapped-ram: ${qemu.label} has no mapped-ram with direct-io (9.1+)`);
    args.modes = args.modes.filter((m) => m !== 'mapped-ram');
  }
  log(`${qemu.label}: ${qemu.system}`);
  guestFiles();
  const bin = snapPipeBin();
  if (args.runs > 0 && sh('command -v python3', true).trim() === '') throw new Error('python3 is missing (apt-get install python3): the warm runs need it');
  const free = Number(sh(`df -B1 --output=avail ${args.dir} | tail -1`).trim());
  if (free < args.memMiB * MiB * 1.5) throw new Error(`${args.dir} has ${(free / GiB).toFixed(1)} GiB free; the image needs up to ${((args.memMiB * MiB) / GiB).toFixed(1)} GiB`);
  const dir = mkdtempSync(join(args.dir, 'snap-pipe-postcopy-bench-'));
  const cleanup = async () => {
    for (const g of [...guests]) await g.kill().catch(() => undefined);
    rmSync(dir, { recursive: true, force: true });
  };
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      void cleanup().finally(() => process.exit(130));
    });
  }
  const started = new Date();
  const at = checkout(ROOT);
  const loadStart = loadAvg();
  log(`work directory ${dir}; load average ${loadStart}`);
  try {
    const img = join(dir, 'guest.qcow2');
    // 1. Boot, fill, stop, save.
    const src = await startGuest({ name: 'pcbench-src', memMiB: args.memMiB, fillMiB: args.fillMiB });
    const tb = performance.now();
    await src.waitReady(600_000);
    const bootMs = performance.now() - tb;
    log(`source booted and filled ${args.fillMiB} MiB in ${sec(bootMs)} s`);
    await src.waitTick(30_000);
    await src.stop();
    const savedTick = lastTick(src.consoleText());
    await src.unthrottle();
    const ts = performance.now();
    await src.migrate(`exec:${shellQuote(bin)} save ${shellQuote(img)}`);
    const m = await src.waitMigration(600_000);
    if (m.status !== 'completed') throw src.failure(`save ${m.status}: ${m['error-desc'] ?? '?'}`);
    const saveMs = performance.now() - ts;
    if (args.modes.includes('mapped-ram')) {
      // QEMU refuses to migrate a guest an earlier migration paused: continue it and pause it again.
      await src.cont();
      await src.stop();
      await src.setCapabilities({ multifd: true, 'mapped-ram': true });
      await src.setMigrationParams({ 'multifd-channels': MULTIFD_CHANNELS, 'direct-io': true });
      await src.migrate(`file:${mappedRamFile(dir)}`);
      const mr = await src.waitMigration(600_000);
      if (mr.status !== 'completed') throw src.failure(`mapped-ram save ${mr.status}: ${mr['error-desc'] ?? '?'}`);
      log(`QEMU's own mapped-ram file for the mapped-ram mode: ${(statSync(mappedRamFile(dir)).size / 1e9).toFixed(2)} GB`);
    }
    await quitGuest(src);
    const imgBytes = statSync(img).size;
    log(`saved in ${sec(saveMs)} s: image ${(imgBytes / 1e9).toFixed(2)} GB; last tick before the save ${savedTick}`);

    // 2. Restores, modes interleaved: the warm pass, then the cold one.
    writeFileSync(join(dir, 'pretouch.py'), PRETOUCH_PY);
    const results: RunResult[] = [];
    const modes = MODES.filter((m) => args.modes.includes(m.key));
    for (const [pass, runs] of [['warm', args.runs], ['cold', args.coldRuns]] as const) {
      for (let run = 1; run <= runs; run++) {
        for (const mode of modes) results.push(await restore(args, dir, bin, img, mode, pass, run, savedTick));
      }
    }

    // 3. Report.
    const loadEnd = loadAvg();
    const minutes = ((Date.now() - started.getTime()) / 60000).toFixed(1);
    const qemuVer = sh(`${shellQuote(qemu.system)} --version | head -1`).trim();
    const mount = sh(`findmnt -no SOURCE,FSTYPE --target ${args.dir}`).trim().replace(/\s+/g, ' ');
    const pc = results.find((r) => r.stats && 'faultLatency' in r.stats)?.stats as PostcopyReport | undefined;
    const text = [
      `## ${started.toISOString().slice(0, 16).replace('T', ' ')} UTC — npm run bench:postcopy (${minutes} min)`,
      '',
      `- CPU: ${cpus().length} × ${cpus()[0]?.model ?? '?'}; memory ${(totalmem() / GiB).toFixed(1)} GiB; kernel ${sh('uname -r').trim()}; Node ${process.version}; ${qemuVer}, -accel tcg`,
      `- ${args.dir}: ${mount}; snap-pipe at ${at.commit}${at.dirtyFiles ? ` (working tree: ${at.dirtyFiles} changed files)` : ''}, as the run started (dist/ built from it by npm run bench:postcopy)`,
      `- load average ${loadStart} at the start, ${loadAvg()} at the end (other work on the machine disturbs the figures)`,
      `- Guest: -machine pc -m ${args.memMiB} (${args.memMiB / 1024} GiB), scripts/guest.sh with fill=${args.fillMiB} (MiB of random data in tmpfs): booted and filled in ${sec(bootMs)} s; stopped after a tick, saved unthrottled in ${sec(saveMs)} s`,
      `- Image ${(imgBytes / 1e9).toFixed(2)} GB; stream ${((results.find((r) => r.stats)?.stats?.bytesOut ?? 0) / 1e9).toFixed(2)} GB (${results.find((r) => r.stats)?.stats?.dataPages} data pages, ${results.find((r) => r.stats)?.stats?.zeroPages} zero)` +
        (pc ? `; postcopy=25 sends ${(results.find((r) => r.mode === 'postcopy25')?.stats as PostcopyReport | undefined)?.precopyDataPages ?? '?'} data pages before the device state` : ''),
      `- Modes interleaved (${args.modes.join(', ')}); a fresh destination each run; the page cache dropped before each restore`,
      '',
      `### Time from migrate_incoming to the guest running, precopy vs postcopy (${args.memMiB / 1024} GiB guest, ${args.fillMiB} MiB random fill)`,
      '',
      ...report(args, results, { savedTick }),
      'Definitions: "running" = the guest\'s vCPUs started: the destination runs with -S, and `cont` is sent (and its return ' +
        'timed) once query-migrate says completed (precopy, multifd, mapped-ram) or postcopy-active (postcopy: QEMU leaves the ' +
        'guest paused at POSTCOPY_RUN until then; without -S it would start it by itself at that point). "first tick" = the first ' +
        `SNAPPIPE-TICK printed after migrate_incoming (the console file polled every ${POLL_MS} ms together with query-migrate): ` +
        'the guest visibly running; it includes the rest of the saved guest\'s `sleep 0.5` (about 0.5 s, the same in every run), ' +
        'and "cont → first tick" beyond the modes that restored all of RAM first shows how much missing pages slowed the guest. ' +
        '"completed" = query-migrate first said completed. "started beforehand": load --connect was started before ' +
        'migrate_incoming and had checked the image and said it waits for QEMU; its own start-up is out of the time, as for ' +
        'QEMU\'s own process. ' +
        'Fault latency = snap-pipe\'s own (--stats): from reading a page request off the return path to the return of the write ' +
        'holding that page; it leaves out the time the page then spends in the pipe and in QEMU. Percentiles are upper bounds of ' +
        'snap-pipe\'s log-linear histogram buckets (8 per power of two), pooled over the runs of a mode. QEMU blocktime = ' +
        'query-migrate postcopy-blocktime (total time vCPUs were blocked on missing pages, from QEMU\'s side), next to the ' +
        'sum of snap-pipe\'s fault latencies in the same run. "cont → first tick" = the guest\'s own time to its first tick once started. ' +
        'Warm/cold: see perf/postcopy.ts (this VM hands freed memory back to its host; QEMU\'s huge-page RAM then has to be faulted in again by the host).',
      '',
      'Commands (IMG, FILE in a temporary directory under ' + args.dir + '):',
      '',
      '```',
      `qemu-system-x86_64 -name pcbench-src -accel tcg -machine pc -m ${args.memMiB} -kernel vmlinuz -initrd initramfs.cpio.gz -append 'console=ttyS0 quiet panic=-1 fill=${args.fillMiB}' -display none -serial file:console.log -qmp unix:qmp.sock,server=on,wait=off -no-reboot`,
      `  stop; migrate-set-parameters max-bandwidth=107374182400; migrate uri="exec:${bin} save IMG"`,
      `sync; echo 3 > /proc/sys/vm/drop_caches; python3 pretouch.py ${args.memMiB + 256}   # warm runs (cold: sleep ${args.settleS} instead of python3)`,
      `qemu-system-x86_64 … (same) … -S -incoming defer`,
      `  [postcopy modes] migrate-set-capabilities postcopy-ram=on postcopy-blocktime=on`,
      `  migrate-set-parameters max-bandwidth=107374182400`,
      ...MODES.filter((m) => !m.connect && !m.mappedRam).map((m) => `  migrate-incoming uri="${loadUri(bin, 'IMG', [...m.loadArgs, '--stats=FILE'])}"   # ${m.key}`),
      `  [postcopy-connect] ${bin} load IMG --postcopy --connect unix:S --connect-timeout 120 --stats=FILE, started first (it waits for QEMU: timed from the line saying so); migrate-incoming uri="unix:S"`,
      `  [multifd] migrate-set-capabilities multifd=on; migrate-set-parameters multifd-channels=${MULTIFD_CHANNELS}; ${bin} load IMG --connect unix:S --multifd-channels ${MULTIFD_CHANNELS} --connect-timeout 120 --stats=FILE, started first; migrate-incoming uri="unix:S"`,
      `  [mapped-ram] saved by the source after snap-pipe's save (cont; stop; multifd=on mapped-ram=on multifd-channels=${MULTIFD_CHANNELS} direct-io=on; migrate uri="file:F"); migrate-incoming uri="file:F" with the same settings`,
      `  poll query-migrate + console every ${POLL_MS} ms; cont at completed (precopy) / postcopy-active (postcopy)`,
      '```',
      '',
    ].join('\n');
    process.stdout.write(text);
    if (args.results) {
      const file = recordRun({
        kind: args.memMiB > 2048 ? 'postcopy-large' : 'postcopy',
        started: started.toISOString(),
        ...at,
        markdown: text,
        raw: { qemu: qemuVer, args, results },
      });
      log(`recorded ${file}; perf/RESULTS.md rewritten`);
    }
    log(`done in ${minutes} min; load average ${loadEnd}`);
  } finally {
    await cleanup();
  }
}

main().catch(async (err) => {
  process.stderr.write(`bench:postcopy: ${(err as Error).stack ?? (err as Error).message}\n`);
  for (const g of [...guests]) await g.kill().catch(() => undefined);
  process.exit(1);
});
