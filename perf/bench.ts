// `npm run bench` (after `npm run build`): snap-pipe save/load against dd, cat and fio on the same file system, with a
// stream generated once into a file and fed from memory through a pipe as QEMU does (perf/feed.mjs: one copy per
// byte, 128 KiB writes, the consumer's start-up timed). Next to fio, which reads no pipe, perf/pipe-ceiling.c shows
// what the simplest fast consumer of such a pipe reaches here. Records the run in perf/history/ and rewrites perf/RESULTS.md (perf/results.ts).
//
//   npm run bench                    4 GiB of RAM, 5 runs of each write command (about 9 minutes here)
//   npm run bench -- --long          8 and 16 GiB of RAM, 3 runs each; memory check 1 GiB vs 16 GiB
//   npm run bench -- --ram 2G --runs 1 --no-results     a quick look, nothing appended
//
// Options: --ram SIZE[,SIZE...]  --runs N  --zero SHARE  --order ORDER  --dir DIR (default /tmp)  --no-results
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { checkout, recordRun } from './results.js';
import { fioCommand } from './fio.js';
import { cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { DEFAULT_QUEUE_DEPTH as QD } from '../src/save/pipeline.js';

const ROOT = join(import.meta.dirname, '..');
const BIN = join(ROOT, 'bin', 'snap-pipe');
const GENERATE = `${join(ROOT, 'node_modules', '.bin', 'vite-node')} ${join(ROOT, 'perf', 'generate.ts')} --`;
/**
 * save from a stream in memory, as a share of fio's write rate: a regression guard, not the goal. On two cores the
 * pipe and the feeder limit it; what users feel is QEMU's migrate time, measured side by side with real QEMU.
 */
const SAVE_GUARD_PCT = 80;
/** load reading the image, as a share of fio's read rate. */
const LOAD_TARGET_PCT = 90;
const FEED = join(ROOT, 'perf', 'feed.mjs');
const CEILING_SOURCE = join(ROOT, 'perf', 'pipe-ceiling.c');
const GiB = 2 ** 30;
const MiB = 2 ** 20;
const TIME = '/usr/bin/time';

interface Args {
  long: boolean;
  ramSizes: number[];
  runs: number;
  zero: number;
  order: string;
  dir: string;
  results: boolean;
  ringSize: string;
}

function parseSize(s: string): number {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)$/i.exec(s.trim());
  if (!m) throw new Error(`bad size '${s}'`);
  return Math.round(Number(m[1]) * { '': 1, K: 1024, M: MiB, G: GiB, T: 1024 * GiB }[m[2].toUpperCase() as '' | 'K' | 'M' | 'G' | 'T']);
}

function parseArgs(argv: string[]): Args {
  const a: Args = { long: false, ramSizes: [], runs: 0, zero: 0.3, order: 'background', dir: '/tmp', results: true, ringSize: '64M' };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const v = () => {
      if (i + 1 >= argv.length) throw new Error(`${k} needs a value`);
      return argv[++i];
    };
    if (k === '--') continue;
    else if (k === '--long') a.long = true;
    else if (k === '--ram') a.ramSizes = v().split(',').map(parseSize);
    else if (k === '--runs') a.runs = Number(v());
    else if (k === '--zero') a.zero = Number(v());
    else if (k === '--order') a.order = v();
    else if (k === '--dir') a.dir = v();
    else if (k === '--ring-size') a.ringSize = v();
    else if (k === '--no-results') a.results = false;
    else throw new Error(`unknown option ${k}`);
  }
  if (a.ramSizes.length === 0) a.ramSizes = a.long ? [8 * GiB, 16 * GiB] : [4 * GiB];
  // Five rounds at 4 GiB: with three, one slow or fast minute of this disk moved a median by 10%. The long streams
  // take minutes per round.
  if (a.runs === 0) a.runs = a.long ? 3 : 5;
  if (!(a.runs >= 1)) throw new Error('--runs must be at least 1');
  return a;
}

function log(msg: string): void {
  process.stderr.write(`bench: ${msg}\n`);
}

/** Runs a shell command; throws with its stderr when it fails. */
function sh(cmd: string, opts: { allowFail?: boolean } = {}): { code: number; out: string; err: string } {
  const r = spawnSync('bash', ['-o', 'pipefail', '-c', cmd], { encoding: 'utf8', maxBuffer: 64 * MiB });
  const code = r.status ?? 128;
  if (code !== 0 && !opts.allowFail) throw new Error(`'${cmd}' failed (exit ${r.status ?? r.signal}): ${r.stderr.trim().slice(-2000)}`);
  return { code, out: r.stdout, err: r.stderr };
}

interface Run {
  seconds: number;
  cpuSeconds: number;
  /** Largest max-RSS among the pipeline's processes (KiB), from /usr/bin/time. */
  maxRssKiB: number;
  /** snap-pipe's own max RSS (KiB), when it ran under its own /usr/bin/time. */
  snapRssKiB?: number;
  /** fio's own bandwidth (bytes/s). */
  fioBps?: number;
  /** fio's own I/O time (s): the window its bandwidth is measured over. */
  fioSeconds?: number;
  /** Time the bench's block device had at least one request in flight during the run (io_ticks, ms). */
  diskBusyMs?: number;
  stats?: Record<string, unknown>;
}

/** The block device under `dir`, as named in /sys/block (a partition's disk). */
function blockDevice(dir: string): string {
  const dev = sh(`findmnt -no SOURCE --target ${dir}`).out.trim().replace(/^\/dev\//, '');
  if (existsSync(`/sys/block/${dev}`)) return dev;
  const disk = dev.replace(/p?\d+$/, '');
  return existsSync(`/sys/block/${disk}`) ? disk : dev;
}

/** io_ticks of the device (ms with at least one request in flight), or undefined where /sys does not say. */
function diskTicksMs(dev: string): number | undefined {
  const f = `/sys/block/${dev}/stat`;
  if (!existsSync(f)) return undefined;
  const v = readFileSync(f, 'utf8').trim().split(/\s+/).map(Number);
  return v[9];
}

/** Runs fn, noting how long the device was busy meanwhile. */
function withDiskBusy(dev: string, fn: () => Run): Run {
  const t0 = diskTicksMs(dev);
  const run = fn();
  const t1 = diskTicksMs(dev);
  if (t0 !== undefined && t1 !== undefined) run.diskBusyMs = t1 - t0;
  return run;
}

/** The device's busy share of the run's window (fio: its I/O time; others: start of the consumer to its exit). */
function diskBusyShare(run: Run): number | undefined {
  if (run.diskBusyMs === undefined) return undefined;
  return Math.min(1, run.diskBusyMs / 1000 / (run.fioSeconds ?? run.seconds));
}

/** Times `cmd` (a pipeline) under /usr/bin/time: wall clock here, user+sys and max RSS of all its processes. */
function timed(cmd: string, dir: string): Run {
  const tf = join(dir, 'time.txt');
  const t0 = performance.now();
  sh(`${TIME} -f '%e %U %S %M' -o ${tf} bash -o pipefail -c ${quote(cmd)}`);
  const seconds = (performance.now() - t0) / 1000;
  const last = readFileSync(tf, 'utf8').trim().split('\n').pop()!.split(' ').map(Number);
  return { seconds, cpuSeconds: last[1] + last[2], maxRssKiB: last[3] };
}

/**
 * Times `consumer` fed STREAM from memory by perf/feed.mjs: the seconds are the feeder's (consumer started to consumer
 * exited, the feeder's loading of STREAM excluded), the CPU is every process's minus what loading STREAM cost.
 */
function timedFed(streamPath: string, consumer: string, dir: string): Run {
  const res = join(dir, 'feed.json');
  const run = timed(fedCommand(streamPath, consumer, res), dir);
  const f = JSON.parse(readFileSync(res, 'utf8')) as { seconds: number; loadCpuSeconds: number };
  rmSync(res);
  return { ...run, seconds: f.seconds, cpuSeconds: run.cpuSeconds - f.loadCpuSeconds };
}

function fedCommand(streamPath: string, consumer: string, resultPath: string): string {
  return `node ${FEED} ${streamPath} ${resultPath} ${quote(consumer)}`;
}

function quote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

interface Row {
  direction: 'write' | 'read';
  name: string;
  command: string;
  /** Bytes each run moves, for MB/s (stream bytes for the stream side, file bytes for dd/cat/fio). */
  bytes: number;
  runs: Run[];
  /** MB/s per run. */
  rates: number[];
  note?: string;
  /** load: the image's size, to state its read rate (image bytes per wall-clock second) next to fio's. */
  imageBytes?: number;
}

function fmtRow(r: Row, fioRate: number | undefined): string {
  const rate = median(r.rates);
  const cpu = median(r.runs.map((x) => x.cpuSeconds)) / (r.bytes / GiB);
  const snapRss = r.runs.some((x) => x.snapRssKiB !== undefined) ? Math.max(...r.runs.map((x) => x.snapRssKiB ?? 0)) / 1024 : undefined;
  const rss = snapRss ?? Math.max(...r.runs.map((x) => x.maxRssKiB)) / 1024;
  const ratio = fioRate ? `${((100 * rate) / fioRate).toFixed(0)}%` : '';
  const spread = r.rates.length > 1 ? `${Math.min(...r.rates).toFixed(0)}–${Math.max(...r.rates).toFixed(0)}` : '';
  const shares = r.runs.map(diskBusyShare).filter((x): x is number => x !== undefined);
  const busy = shares.length === r.runs.length ? `${(100 * median(shares)).toFixed(0)}%` : '?';
  return `| ${r.name.replaceAll('|', '\\|')}${r.note ? ` ${r.note}` : ''} | ${rate.toFixed(0)} | ${spread} | ${ratio} | ${busy} | ${cpu.toFixed(2)} | ${rss.toFixed(0)}${snapRss === undefined ? '*' : ''} |`;
}

function machine(dir: string, at: { commit: string; dirtyFiles: number }): string[] {
  const mount = sh(`findmnt -no SOURCE,FSTYPE,OPTIONS --target ${dir}`).out.trim();
  const base = blockDevice(dir);
  const q = (f: string) => (existsSync(`/sys/block/${base}/queue/${f}`) ? readFileSync(`/sys/block/${base}/queue/${f}`, 'utf8').trim() : '?');
  const df = sh(`df -h --output=source,fstype,size,used,avail ${dir} | tail -1`).out.trim().replace(/\s+/g, ' ');
  const lsblk = sh(`lsblk -dno NAME,SIZE,ROTA,MODEL /dev/${base} 2>/dev/null || true`).out.trim().replace(/\s+/g, ' ');
  return [
    `- CPU: ${cpus().length} × ${cpus()[0]?.model ?? '?'} (nproc ${sh('nproc').out.trim()}); memory ${(totalmem() / GiB).toFixed(1)} GiB; kernel ${sh('uname -r').out.trim()}; Node ${process.version}`,
    `- ${dir}: ${mount}; df: ${df}; device ${lsblk || base} (scheduler ${q('scheduler')}, logical block ${q('logical_block_size')} B, max_sectors_kb ${q('max_sectors_kb')})`,
    `- snap-pipe at ${at.commit}${at.dirtyFiles ? ` (working tree: ${at.dirtyFiles} changed files)` : ''}, as the run started; fio ${sh('fio --version').out.trim()}`,
  ];
}

function loadAvg(): string {
  return readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
}

function memAvailableBytes(): number {
  const m = /MemAvailable:\s+(\d+) kB/.exec(readFileSync('/proc/meminfo', 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

function freeBytes(dir: string): number {
  return Number(sh(`df -B1 --output=avail ${dir} | tail -1`).out.trim());
}

function dropCaches(): boolean {
  return sh('sync && echo 3 > /proc/sys/vm/drop_caches', { allowFail: true }).code === 0;
}

function generate(dir: string, ramBytes: number, zero: number, order: string, name: string): { path: string; bytes: number; summary: Record<string, number> } {
  const path = join(dir, `${name}.bin`);
  const sum = join(dir, `${name}.json`);
  log(`generating ${name}: --ram ${ramBytes / GiB}G --zero ${zero} --order ${order}`);
  sh(`${GENERATE} --ram ${ramBytes} --zero ${zero} --order ${order} --seed 1 --out ${path} --summary ${sum}`);
  const summary = JSON.parse(readFileSync(sum, 'utf8')) as Record<string, number>;
  rmSync(sum);
  return { path, bytes: statSync(path).size, summary };
}

/** The whole matrix for one RAM size. */
function benchSize(args: Args, dir: string, ceiling: string, ramBytes: number, notes: string[]): { rows: Row[]; commands: string[]; gen: string; rssByStream: [number, number][] } {
  const rows: Row[] = [];
  const commands: string[] = [];
  const rssByStream: [number, number][] = [];
  const dev = blockDevice(dir);
  const stream = generate(dir, ramBytes, args.zero, args.order, `stream-${ramBytes / GiB}G-${args.order}`);
  const gen = `generated ${(stream.bytes / 1e9).toFixed(2)} GB (${args.order}, --zero ${args.zero}: ${stream.summary.dataPages} data pages, ${stream.summary.zeroPages} zero) at ${stream.summary.MBps.toFixed(0)} MB/s into the page cache`;
  log(gen);
  const img = join(dir, 'image.qcow2');
  const out = join(dir, 'out.bin');
  const st = join(dir, 'stats.json');
  const rss = join(dir, 'rss.txt');
  const fioMiB = Math.floor(stream.bytes / MiB);
  const warm = (p: string) => sh(`cat ${p} > /dev/null`);
  const clean = () => {
    for (const f of [img, out, st, rss]) rmSync(f, { force: true });
    sh('sync');
  };

  // Every consumer runs under its own /usr/bin/time for its peak RSS (the feeder holds the whole stream).
  const saver = (extra: string) => `${TIME} -f %M -o ${rss} ${BIN} save ${img} --force --ring-size ${args.ringSize} ${extra} --stats=${st}`;
  const writes: { name: string; consumer?: string; cmd?: string; fio?: boolean }[] = [
    { name: 'snap-pipe save --io uring --queue-depth 4', consumer: saver('--io uring --queue-depth 4') },
    { name: 'snap-pipe save --io uring --queue-depth 16', consumer: saver('--io uring --queue-depth 16') },
    { name: 'snap-pipe save --io uring --queue-depth 64', consumer: saver('--io uring --queue-depth 64') },
    { name: 'snap-pipe save --io uring --queue-depth 128', consumer: saver('--io uring --queue-depth 128') },
    { name: 'snap-pipe save --io sync', consumer: saver('--io sync') },
    { name: `cat STREAM | snap-pipe save --queue-depth ${QD} (fed by cat, not from memory)`, cmd: `cat ${stream.path} | ${saver(`--io uring --queue-depth ${QD}`)}` },
    { name: 'dd oflag=direct', consumer: `${TIME} -f %M -o ${rss} dd of=${out} bs=1M iflag=fullblock oflag=direct status=none` },
    { name: 'cat > FILE; sync', consumer: `${TIME} -f %M -o ${rss} cat > ${out} && sync` },
    { name: 'pipe ceiling (perf/pipe-ceiling.c)', consumer: `${TIME} -f %M -o ${rss} ${ceiling} ${out}` },
    {
      name: 'fio write (disk limit)',
      cmd: fioCommand('write', out, fioMiB),
      fio: true,
    },
  ];
  const writeRows = writes.map((w): Row => {
    const shown = w.consumer ? fedCommand(stream.path, w.consumer, 'feed.json') : w.cmd!;
    commands.push(shown);
    return { direction: 'write', name: w.name, command: shown, bytes: w.fio ? fioMiB * MiB : stream.bytes, runs: [], rates: [] };
  });
  interleaved(args.runs, writes.length, (j) => {
    const w = writes[j];
    clean();
    warm(stream.path);
    const run = withDiskBusy(dev, () => (w.fio ? fioRun(w.cmd!, dir, 'write') : w.consumer ? timedFed(stream.path, w.consumer, dir) : timed(w.cmd!, dir)));
    if (existsSync(rss)) run.snapRssKiB = Number(readFileSync(rss, 'utf8').trim().split('\n').pop());
    if (existsSync(st)) run.stats = JSON.parse(readFileSync(st, 'utf8')) as Record<string, unknown>;
    record(writeRows[j], run);
  });
  for (const row of writeRows) {
    if (row.name === `snap-pipe save --io uring --queue-depth ${QD}`) rssByStream.push([stream.bytes, Math.max(...row.runs.map((r) => r.snapRssKiB ?? 0))]);
    rows.push(row);
  }
  clean();

  // The other orders: one save each at the default queue depth (pages out of order, pages re-sent).
  for (const order of ['ascending', 'background', 'precopy'].filter((o) => o !== args.order)) {
    const s = generate(dir, ramBytes, args.zero, order, `stream-${ramBytes / GiB}G-${order}`);
    const consumer = saver(`--io uring --queue-depth ${QD}`);
    const row: Row = { direction: 'write', name: `snap-pipe save, --order ${order} stream`, command: fedCommand(s.path, consumer, 'feed.json'), bytes: s.bytes, runs: [], rates: [], note: `(${(s.bytes / 1e9).toFixed(2)} GB stream, 1 run)` };
    clean();
    warm(s.path);
    const run = withDiskBusy(dev, () => timedFed(s.path, consumer, dir));
    run.snapRssKiB = Number(readFileSync(rss, 'utf8').trim());
    run.stats = JSON.parse(readFileSync(st, 'utf8')) as Record<string, unknown>;
    row.runs.push(run);
    row.rates.push(s.bytes / 1e6 / run.seconds);
    log(`${row.name}: ${row.rates[0].toFixed(0)} MB/s`);
    rows.push(row);
    rmSync(s.path);
    clean();
  }

  // Read side: one image, page cache dropped before every run.
  const hasLoad = sh(`${BIN} load --help`, { allowFail: true }).code === 0;
  if (!hasLoad) {
    notes.push('`snap-pipe load` is not available in this build: read side not measured.');
  } else {
    warm(stream.path);
    sh(`cat ${stream.path} | ${BIN} save ${img} --force --ring-size ${args.ringSize}`);
    const imgBytes = statSync(img).size;
    const loadBytes = Number(sh(`${BIN} load ${img} --no-verify | wc -c`).out.trim());
    const fioReadMiB = Math.floor(imgBytes / MiB);
    const reads: { name: string; cmd: string; bytes: number; fio?: boolean; snap?: boolean }[] = [
      { name: 'snap-pipe load > /dev/null', cmd: `${TIME} -f %M -o ${rss} ${BIN} load ${img} --stats=${st} > /dev/null`, bytes: loadBytes, snap: true },
      { name: 'snap-pipe load | cat > /dev/null', cmd: `${TIME} -f %M -o ${rss} ${BIN} load ${img} --stats=${st} | cat > /dev/null`, bytes: loadBytes, snap: true },
      { name: 'snap-pipe load --no-verify > /dev/null', cmd: `${TIME} -f %M -o ${rss} ${BIN} load ${img} --no-verify --stats=${st} > /dev/null`, bytes: loadBytes, snap: true },
      { name: 'dd iflag=direct', cmd: `dd if=${img} iflag=direct bs=1M of=/dev/null status=none`, bytes: imgBytes },
      {
        name: 'fio read (disk limit)',
        cmd: fioCommand('read', img, fioReadMiB),
        bytes: fioReadMiB * MiB,
        fio: true,
      },
    ];
    const readRows = reads.map((r): Row => {
      commands.push(r.cmd);
      return { direction: 'read', name: r.name, command: r.cmd, bytes: r.bytes, runs: [], rates: [], imageBytes: r.snap ? imgBytes : undefined };
    });
    // Reads take seconds each and this disk's read rate drifts more than its write rate: at least 5 rounds.
    interleaved(Math.max(args.runs, 5), reads.length, (j) => {
      const r = reads[j];
      rmSync(rss, { force: true });
      rmSync(st, { force: true });
      if (!dropCaches()) notes.push('could not drop the page cache (not root?): read figures may come from memory');
      const run = withDiskBusy(dev, () => (r.fio ? fioRun(r.cmd, dir, 'read') : timed(r.cmd, dir)));
      if (r.snap) {
        run.snapRssKiB = Number(readFileSync(rss, 'utf8').trim().split('\n').pop());
        run.stats = JSON.parse(readFileSync(st, 'utf8')) as Record<string, unknown>;
      }
      record(readRows[j], run);
    });
    rows.push(...readRows);
    notes.push(
      `Read side: image ${(imgBytes / 1e9).toFixed(2)} GB; snap-pipe load writes a ${(loadBytes / 1e9).toFixed(2)} GB stream (its MB/s are stream bytes; dd's and fio's are file bytes).`,
    );
  }
  clean();
  rmSync(stream.path);
  return { rows, commands, gen, rssByStream };
}

/**
 * Runs measure(j) for each of `commands` commands, `rounds` times. Round i starts one command further along: the
 * disk of this VM slows down and speeds up over minutes (the host's own caching), and running each command's runs
 * back to back would hand that drift to whole rows.
 */
function interleaved(rounds: number, commands: number, measure: (j: number) => void): void {
  for (let i = 0; i < rounds; i++) for (let k = 0; k < commands; k++) measure((k + i) % commands);
}

/** Adds a run to its row (MB/s: fio's own figure, else the row's bytes over the wall-clock seconds) and logs it. */
function record(row: Row, run: Run): void {
  row.runs.push(run);
  row.rates.push(run.fioBps !== undefined ? run.fioBps / 1e6 : row.bytes / 1e6 / run.seconds);
  log(`${row.name}: ${row.rates[row.rates.length - 1].toFixed(0)} MB/s, ${run.cpuSeconds.toFixed(2)} CPU s${run.snapRssKiB ? `, RSS ${(run.snapRssKiB / 1024).toFixed(0)} MiB` : ''}`);
}

function fioRun(cmd: string, dir: string, dir2: 'read' | 'write'): Run {
  const run = timed(`${cmd} > ${join(dir, 'fio.json')}`, dir);
  const text = readFileSync(join(dir, 'fio.json'), 'utf8');
  const j = JSON.parse(text.slice(text.indexOf('{'))) as { jobs: Record<'read' | 'write', { bw_bytes: number; runtime: number }>[] };
  run.fioBps = j.jobs[0][dir2].bw_bytes;
  run.fioSeconds = j.jobs[0][dir2].runtime / 1000;
  rmSync(join(dir, 'fio.json'));
  if (dir2 === 'write') rmSync(join(dir, 'out.bin'), { force: true });
  return run;
}

/** Peak RSS of snap-pipe save for a small stream, with the same ring size, to compare with the big one. */
function memoryCheck(args: Args, dir: string, ramBytes: number): [number, number] {
  const s = generate(dir, ramBytes, args.zero, args.order, `stream-mem-${ramBytes / GiB}G`);
  const img = join(dir, 'image-mem.qcow2');
  const rss = join(dir, 'rss-mem.txt');
  let best = 0;
  for (let i = 0; i < Math.min(args.runs, 2); i++) {
    sh(`cat ${s.path} > /dev/null`);
    sh(`cat ${s.path} | ${TIME} -f %M -o ${rss} ${BIN} save ${img} --force --ring-size ${args.ringSize}`);
    best = Math.max(best, Number(readFileSync(rss, 'utf8').trim()));
    rmSync(img, { force: true });
  }
  rmSync(rss, { force: true });
  rmSync(s.path);
  return [s.bytes, best];
}

function statsLine(rows: Row[]): string[] {
  const lines: string[] = [];
  for (const r of rows) {
    const withStats = r.runs.filter((x) => x.stats);
    if (withStats.length === 0) continue;
    // The run with the median rate.
    const mid = r.runs[r.rates.indexOf(median(r.rates))] ?? withStats[0];
    const s = (mid.stats ?? withStats[0].stats) as Record<string, unknown>;
    if (r.direction === 'write') {
      const st = s.stages as Record<string, { busyMs: number; upstreamWaitMs: number; downstreamWaitMs: number }>;
      const f = (x: number) => (x / 1000).toFixed(2);
      lines.push(
        `- ${r.name}: ${Number(s.seconds).toFixed(2)} s inside (${Number(s.streamMBps).toFixed(0)} MB/s); wrote ${(Number(s.bytesWritten) / 1e9).toFixed(2)} GB in ${s.writeCalls} writes; ` +
          `reader busy ${f(st.reader.busyMs)} s / waits on stdin ${f(st.reader.upstreamWaitMs)} s / on coalescer ${f(st.reader.downstreamWaitMs)} s; ` +
          `coalescer busy ${f(st.coalescer.busyMs)} s / waits on reader ${f(st.coalescer.upstreamWaitMs)} s / on writer ${f(st.coalescer.downstreamWaitMs)} s; ` +
          `writer busy ${f(st.writer.busyMs)} s / waits on coalescer ${f(st.writer.upstreamWaitMs)} s / in disk writes ${f(st.writer.downstreamWaitMs)} s; ` +
          `${s.rewrittenClusters} rewritten clusters, ${(Number(s.oldContentBytes) / 1e9).toFixed(2)} GB of old content read first; finish ${f(Number(s.finishMs))} s`,
      );
    } else {
      const ms = (k: string) => (Number(s[k]) / 1000).toFixed(2);
      lines.push(
        `- ${r.name}: ${Number(s.seconds).toFixed(2)} s inside (${Number(s.outMBps).toFixed(0)} MB/s); reading ${ms('readMs')} s, verifying ${ms('verifyMs')} s, writing to stdout ${ms('writeMs')} s; ${s.readBackend} reads at queue depth ${s.queueDepth}`,
      );
    }
  }
  return lines;
}

function main(): void {
  const args = parseArgs(process.argv.slice(2));
  if (!existsSync(join(ROOT, 'dist', 'main.js'))) throw new Error('dist/ is missing: run npm run build first');
  for (const tool of ['fio', 'dd', TIME]) if (sh(`command -v ${tool}`, { allowFail: true }).code !== 0) throw new Error(`${tool} is missing (apt-get install fio time)`);
  const maxRam = Math.max(...args.ramSizes);
  const streamMax = maxRam * (1 - args.zero) * 1.01 + 64 * MiB;
  const needDisk = 3 * streamMax + maxRam * 0.2;
  const free = freeBytes(args.dir);
  if (free < needDisk) throw new Error(`${args.dir} has ${(free / GiB).toFixed(1)} GiB free; this run needs about ${(needDisk / GiB).toFixed(1)} GiB`);
  const notes: string[] = [];
  const mem = memAvailableBytes();
  if (mem < streamMax + 2 * GiB) notes.push(`only ${(mem / GiB).toFixed(1)} GiB of memory available for a ${(streamMax / GiB).toFixed(1)} GiB stream: the stream file may not stay cached, so cat re-reads it from the same disk`);

  const dir = mkdtempSync(join(args.dir, 'snap-pipe-bench-'));
  const cleanup = () => rmSync(dir, { recursive: true, force: true });
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      cleanup();
      process.exit(130);
    });
  }
  const started = new Date();
  const at = checkout(ROOT);
  const loadStart = loadAvg();
  const sections: string[] = [];
  const raw: { ramBytes: number; generated: string; rows: Row[] }[] = [];
  try {
    const mach = machine(args.dir, at);
    const ceiling = join(dir, 'pipe-ceiling');
    sh(`cc -O2 -o ${ceiling} ${CEILING_SOURCE} -luring`);
    log(`work directory ${dir}; load average ${loadStart}`);
    const rssPoints: [number, number][] = [];
    for (const ram of args.ramSizes) {
      const { rows, commands, gen, rssByStream } = benchSize(args, dir, ceiling, ram, notes);
      raw.push({ ramBytes: ram, generated: gen, rows });
      rssPoints.push(...rssByStream);
      const fioW = rows.find((r) => r.name.startsWith('fio write'));
      const fioR = rows.find((r) => r.name.startsWith('fio read'));
      const fw = fioW ? median(fioW.rates) : undefined;
      const fr = fioR ? median(fioR.rates) : undefined;
      const table = [
        `### ${ram / GiB} GiB of RAM, ${args.runs} run(s) of each write command, ${Math.max(args.runs, 5)} of each read command, interleaved`,
        '',
        gen + '.',
        '',
        '| command | MB/s (median) | range | vs fio | disk busy | CPU s/GiB | peak RSS MiB |',
        '|---|---:|---:|---:|---:|---:|---:|',
        ...rows.filter((r) => r.direction === 'write').map((r) => fmtRow(r, fw)),
        ...rows.filter((r) => r.direction === 'read').map((r) => fmtRow(r, fr)),
        '',
        'The stream comes from memory (perf/feed.mjs holds it and writes it into the consumer\'s stdin pipe in 128 KiB writes, one copy per byte, like QEMU\'s migration thread); MB/s count from starting the consumer to its exit. Peak RSS is the consumer\'s own (snap-pipe, dd, cat, pipe-ceiling); `*` = fio\'s. CPU s/GiB = user+sys of every process per GiB moved, the feeder\'s writing included (its loading of the stream not). Disk busy = the share of the run in which the device had at least one request in flight (io_ticks in /sys/block/DEV/stat; for fio, of its own I/O time; median of the runs).',
        '',
        'Where snap-pipe\'s time went (median run, from --stats):',
        '',
        ...statsLine(rows),
        '',
        'Targets:',
        '',
      ];
      const ceil = rows.find((r) => r.name.startsWith('pipe ceiling'));
      const cr = ceil ? median(ceil.rates) : undefined;
      if (cr && fw) table.push(`- the pipe ceiling itself: ${cr.toFixed(0)} MB/s = ${((100 * cr) / fw).toFixed(0)}% of fio write`);
      for (const r of rows) {
        if (!r.name.startsWith('snap-pipe save --io') && !r.name.startsWith('snap-pipe load >')) continue;
        const ref = r.direction === 'write' ? fw : fr;
        if (!ref) continue;
        const pct = (100 * median(r.rates)) / ref;
        const vsCeiling = r.direction === 'write' && cr ? `; ${((100 * median(r.rates)) / cr).toFixed(0)}% of the pipe ceiling` : '';
        if (r.imageBytes) {
          // fio reads the image; load reads the same image and sends fewer bytes (zero pages go out as 9-byte records).
          const imgRate = r.imageBytes / 1e6 / median(r.runs.map((x) => x.seconds));
          const imgPct = (100 * imgRate) / ref;
          table.push(
            `- ${r.name}: reads the ${(r.imageBytes / 1e9).toFixed(2)} GB image at ${imgRate.toFixed(0)} MB/s (wall clock, start-up included) = ${imgPct.toFixed(0)}% of fio read (${ref.toFixed(0)} MB/s); its stream, ${median(r.rates).toFixed(0)} MB/s, is ${pct.toFixed(0)}%: ${imgPct >= LOAD_TARGET_PCT ? 'met' : `**MISSED** (target ≥ ${LOAD_TARGET_PCT}% of fio)`}`,
          );
          continue;
        }
        // What the disk did: save writes more than the stream (zero pages among data pages are written as zeros, to
        // keep clusters whole); shown for context, the verdict stays on stream bytes.
        const written = r.runs.map((x) => Number(x.stats?.bytesWritten)).filter((b) => b > 0);
        const diskRate = written.length === r.runs.length ? median(written) / 1e6 / median(r.runs.map((x) => x.seconds)) : undefined;
        const disk = diskRate ? `; it writes ${(median(written) / 1e9).toFixed(2)} GB to the image at ${diskRate.toFixed(0)} MB/s = ${((100 * diskRate) / ref).toFixed(0)}% of fio` : '';
        // Each round runs every command once, so run i of this row and run i of fio's came minutes apart at most: the
        // ratio within a round is less exposed to the disk's drift than the ratio of the medians. Both must pass.
        const paired = fioW && fioW.rates.length === r.rates.length && r.rates.length > 1 ? r.rates.map((x, i) => (100 * x) / fioW.rates[i]) : undefined;
        const pairedText = paired ? `; round by round ${median(paired).toFixed(0)}% (${Math.min(...paired).toFixed(0)}–${Math.max(...paired).toFixed(0)}%)` : '';
        const met = pct >= SAVE_GUARD_PCT && (!paired || median(paired) >= SAVE_GUARD_PCT);
        // How much of the gap is start-up (node and the three stage threads, before the first write): the same runs,
        // timed from the first write. Context only: QEMU waits through the start-up, so the verdict includes it.
        const firstWrite = r.runs.map((x) => Number((x.stats?.startup as { firstWriteMs?: number } | undefined)?.firstWriteMs) / 1000);
        const afterStart = firstWrite.every((f) => f > 0) ? median(r.runs.map((x, i) => r.bytes / 1e6 / (x.seconds - firstWrite[i]))) : undefined;
        const startText = afterStart ? `; from its first write (${median(firstWrite).toFixed(2)} s after it started) ${afterStart.toFixed(0)} MB/s = ${((100 * afterStart) / ref).toFixed(0)}% of fio` : '';
        table.push(`- ${r.name}: ${median(r.rates).toFixed(0)} MB/s = ${pct.toFixed(0)}% of fio ${r.direction} (${ref.toFixed(0)} MB/s)${pairedText}${vsCeiling}${disk}${startText}: ${met ? 'met' : `**MISSED** (regression guard: ≥ ${SAVE_GUARD_PCT}% of fio in stream bytes, as the ratio of medians and round by round)`}`);
      }
      table.push('', 'Commands (STREAM, IMG, OUT in a temporary directory under ' + args.dir + '; each save/dd/cat run starts with `cat STREAM > /dev/null`, each read run with `sync; echo 3 > /proc/sys/vm/drop_caches`):', '', '```');
      table.push(...commands.map((c) => c.replaceAll(dir + '/', '').replace(/stream-[^ ]+\.bin/g, 'STREAM').replace(/image\.qcow2/g, 'IMG').replace(/out\.bin/g, 'OUT')));
      table.push('```', '');
      sections.push(table.join('\n'));
    }

    // Memory is bounded: peak RSS for a 1 GiB stream vs the biggest one, same ring size.
    const small = memoryCheck(args, dir, GiB);
    const big = rssPoints.sort((a, b) => b[0] - a[0])[0];
    const ringBytes = parseSize(args.ringSize);
    const growthMiB = (big[1] - small[1]) / 1024;
    // The park pool and the writer's old-content units (together half the ring, src/save/pipeline.ts ringSizes) are
    // allocated up front but only touched as pages are parked or overwritten: a bigger stream of the same order
    // touches more of them, up to their size, and no further.
    const parkMiB = ringBytes / 2 / MiB;
    const slackMiB = parkMiB + 16;
    const memLines = [
      `### Memory bound (--ring-size ${args.ringSize}, uring, queue depth ${QD})`,
      '',
      '| stream | peak RSS MiB | RSS − ring MiB |',
      '|---|---:|---:|',
      `| ${(small[0] / 1e9).toFixed(2)} GB (1 GiB RAM) | ${(small[1] / 1024).toFixed(0)} | ${((small[1] * 1024 - ringBytes) / MiB).toFixed(0)} |`,
      `| ${(big[0] / 1e9).toFixed(2)} GB (${Math.max(...args.ramSizes) / GiB} GiB RAM) | ${(big[1] / 1024).toFixed(0)} | ${((big[1] * 1024 - ringBytes) / MiB).toFixed(0)} |`,
      '',
      `RSS grows by ${growthMiB.toFixed(0)} MiB for a ${(big[0] / small[0]).toFixed(1)}× bigger stream: ${growthMiB <= slackMiB ? 'bounded (target met)' : '**MISSED**: memory grows with the stream'} ` +
        `(allowed: the ${parkMiB} MiB of park pool and old-content units, which a small stream touches less of, plus 16 MiB). ` +
        'Besides the pool, what grows is the per-page bitmaps (3 bits per 4 KiB page in the coalescer: sent, data, on disk; 96 KiB per GiB of RAM) and the cluster table.',
      '',
    ];
    sections.push(memLines.join('\n'));

    const loadEnd = loadAvg();
    const minutes = ((Date.now() - started.getTime()) / 60000).toFixed(1);
    const header = [
      `## ${started.toISOString().slice(0, 16).replace('T', ' ')} UTC — npm run bench${args.long ? ' -- --long' : ''} (${minutes} min)`,
      '',
      ...mach,
      `- load average ${loadStart} at the start, ${loadEnd} at the end (other work on the machine disturbs the figures)`,
      ...notes.map((n) => `- ${n}`),
      '',
    ].join('\n');
    const text = header + '\n' + sections.join('\n') + '\n';
    process.stdout.write(text);
    if (args.results) {
      const file = recordRun({
        kind: args.long ? 'bench-long' : 'bench',
        started: started.toISOString(),
        ...at,
        markdown: text,
        raw: { machine: mach, notes, loadStart, loadEnd, sizes: raw, memory: { small, big, ringBytes } },
      });
      log(`recorded ${file}; perf/RESULTS.md rewritten`);
    }
  } finally {
    cleanup();
  }
}

try {
  main();
} catch (err) {
  process.stderr.write(`bench: ${(err as Error).message}\n`);
  process.exit(1);
}
