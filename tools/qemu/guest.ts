// A QEMU guest for the end-to-end tests and the demo: qemu-system-x86_64 under TCG booting the test kernel and
// initramfs built by scripts/guest.sh (.cache/guest/), with its serial console in a file, a second serial port on a
// unix socket for commands to the guest (contentHash), and QMP on a unix socket.
// Every wait is bounded; quit() always leaves no QEMU process behind.
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, readSync, rmSync, statSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { findExecutable, repoRoot } from './paths.js';
import { QmpClient } from './qmp.js';
import { systemQemu, type Qemu } from './versions.js';

export { findExecutable, repoRoot } from './paths.js';

// ---------------------------------------------------------------------------------------------------------------
// Paths

/** `<repo>/bin/snap-pipe`, the executable QEMU names in exec:. Throws if it or its build (dist/main.js) is missing. */
export function snapPipeBin(): string {
  const bin = join(repoRoot(), 'bin', 'snap-pipe');
  if (!existsSync(bin)) throw new Error(`${bin} is missing`);
  if (!existsSync(join(repoRoot(), 'dist', 'main.js'))) {
    throw new Error(`${join(repoRoot(), 'dist', 'main.js')} is missing: run 'npm run build'`);
  }
  return bin;
}

export interface GuestFiles {
  kernel: string;
  initrd: string;
}

/** The guest kernel and initramfs built by scripts/guest.sh; throws (never skips) when they are missing. */
export function guestFiles(): GuestFiles {
  const dir = join(repoRoot(), '.cache', 'guest');
  const files = { kernel: join(dir, 'vmlinuz'), initrd: join(dir, 'initramfs.cpio.gz') };
  for (const f of [files.kernel, files.initrd]) {
    if (!existsSync(f)) throw new Error(`guest file ${f} is missing: run 'bash scripts/guest.sh' (npm test does)`);
  }
  return files;
}

export function qemuSystemBinary(): string {
  return findExecutable('qemu-system-x86_64', 'qemu-system-x86');
}

export function qemuImgBinary(): string {
  return findExecutable('qemu-img', 'qemu-utils');
}

/** Quotes a word for /bin/sh (exec: URIs are run with `sh -c`). */
export function shellQuote(word: string): string {
  if (/^[A-Za-z0-9_@%+=:,./-]+$/.test(word)) return word;
  return `'${word.replace(/'/g, `'\\''`)}'`;
}

// ---------------------------------------------------------------------------------------------------------------
// Guest

export interface GuestOptions {
  /** Names the QEMU process (-name) and its temporary directory. */
  name: string;
  memMiB: number;
  /** MiB of random data the guest keeps in RAM before printing READY (default 200; 0 for none). */
  fillMiB?: number;
  /** Start paused, waiting for `migrate-incoming` (-S -incoming defer). */
  incoming?: boolean;
  /** The QEMU to run (default: the machine's own, see tools/qemu/versions.ts). */
  qemu?: Qemu;
  /** -machine (default 'pc': the QEMU's newest i440fx). */
  machine?: string;
  /** Extra qemu-system-x86_64 arguments. */
  extraArgs?: string[];
  /** Keep the temporary directory after quit() (console log, QEMU's stderr). */
  keepDir?: boolean;
  /** Bound on QEMU creating its QMP socket and answering (default 30 s). */
  qmpTimeoutMs?: number;
}

/** query-migrate's answer; `error-desc` is set when status is 'failed'. */
export interface MigrationStatus {
  status: string;
  'error-desc'?: string;
  'total-time'?: number;
  'setup-time'?: number;
  downtime?: number;
  ram?: {
    transferred: number;
    remaining: number;
    total: number;
    duplicate: number;
    normal: number;
    'normal-bytes': number;
    mbps: number;
    'dirty-sync-count': number;
    [key: string]: unknown;
  };
  [key: string]: unknown;
}

export interface RunStatus {
  status: string;
  running: boolean;
  singlestep?: boolean;
}

const migrationEndStates = new Set(['completed', 'failed', 'cancelled']);
const pollIntervalMs = 100;

export class Guest {
  readonly name: string;
  readonly qemu: Qemu;
  readonly memMiB: number;
  readonly fillMiB: number;
  /** Temporary directory holding the console log, QEMU's stderr log and the QMP socket. */
  readonly dir: string;
  readonly consolePath: string;
  /** QEMU's stdout and stderr (the stderr of exec: migration children lands here too). */
  readonly stderrPath: string;
  readonly qmpPath: string;
  /** The guest's second serial port (ttyS1): scripts/guest.sh reads commands from it. */
  readonly controlPath: string;
  readonly qmp: QmpClient;
  private readonly child: ChildProcess;
  private readonly keepDir: boolean;
  private exit: { code: number | null; signal: NodeJS.Signals | null } | null = null;
  private readonly exited: Promise<void>;
  private quitDone = false;
  private commandCount = 0;

  private constructor(opts: GuestOptions & { fillMiB: number }, dir: string, child: ChildProcess, qmp: QmpClient, exited: Promise<void>) {
    this.name = opts.name;
    this.qemu = opts.qemu ?? systemQemu();
    this.memMiB = opts.memMiB;
    this.fillMiB = opts.fillMiB;
    this.dir = dir;
    this.consolePath = join(dir, 'console.log');
    this.stderrPath = join(dir, 'qemu.log');
    this.qmpPath = join(dir, 'qmp.sock');
    this.controlPath = join(dir, 'control.sock');
    this.child = child;
    this.qmp = qmp;
    this.keepDir = opts.keepDir ?? false;
    this.exited = exited;
    if (child.exitCode !== null || child.signalCode !== null) {
      this.exit = { code: child.exitCode, signal: child.signalCode };
    }
    child.once('exit', (code, signal) => {
      this.exit = { code, signal };
    });
  }

  /** Spawns QEMU and connects to QMP. Does not wait for the guest to boot: see waitReady(). */
  static async start(opts: GuestOptions): Promise<Guest> {
    if (!/^[A-Za-z0-9_.-]+$/.test(opts.name)) throw new Error(`Guest name '${opts.name}': use [A-Za-z0-9_.-] only`);
    if (!Number.isInteger(opts.memMiB) || opts.memMiB < 64) throw new Error(`memMiB ${opts.memMiB}: an integer >= 64`);
    const fillMiB = opts.fillMiB ?? 200;
    if (!Number.isInteger(fillMiB) || fillMiB < 0 || fillMiB > opts.memMiB - 96) {
      throw new Error(`fillMiB ${fillMiB}: an integer between 0 and memMiB - 96 (${opts.memMiB - 96})`);
    }
    const qemu = opts.qemu ?? systemQemu();
    const files = guestFiles();
    const dir = mkdtempSync(join(tmpdir(), `snap-pipe-guest-${opts.name}-`));
    const consolePath = join(dir, 'console.log');
    const stderrPath = join(dir, 'qemu.log');
    const qmpPath = join(dir, 'qmp.sock');
    const args = [
      '-name', opts.name,
      '-accel', 'tcg',
      ...qemu.firmwareArgs,
      '-machine', opts.machine ?? 'pc',
      '-m', String(opts.memMiB),
      '-kernel', files.kernel,
      '-initrd', files.initrd,
      '-append', `console=ttyS0 quiet panic=-1 fill=${fillMiB}`,
      '-display', 'none',
      '-serial', `file:${consolePath}`,
      // ttyS1: the guest's command channel. Every guest has it, so source and destination of a migration match.
      '-chardev', `socket,id=snapctl,path=${join(dir, 'control.sock')},server=on,wait=off`,
      '-device', 'isa-serial,chardev=snapctl',
      '-qmp', `unix:${qmpPath},server=on,wait=off`,
      '-no-reboot',
      ...(opts.incoming ? ['-S', '-incoming', 'defer'] : []),
      ...(opts.extraArgs ?? []),
    ];
    const logFd = openSync(stderrPath, 'a');
    let child: ChildProcess;
    try {
      child = spawn(qemu.system, args, { stdio: ['ignore', logFd, logFd], cwd: dir, env: { ...process.env, ...qemu.env } });
    } finally {
      closeSync(logFd);
    }
    let earlyExit: { code: number | null; signal: NodeJS.Signals | null } | null = null;
    let spawnError: Error | null = null;
    const exited = new Promise<void>((resolve) => {
      child.once('exit', (code, signal) => {
        earlyExit = { code, signal };
        resolve();
      });
      child.once('error', (err) => {
        spawnError = err;
        earlyExit ??= { code: null, signal: null };
        resolve();
      });
    });
    let qmp: QmpClient;
    try {
      qmp = await Promise.race([
        QmpClient.connect(qmpPath, opts.qmpTimeoutMs ?? 30_000),
        exited.then(() => {
          throw new Error('exited');
        }),
      ]);
    } catch (err) {
      child.kill('SIGKILL');
      await Promise.race([exited, delayMs(5_000)]);
      const why = spawnError
        ? `cannot run ${qemu.system}: ${(spawnError as Error).message}`
        : earlyExit
          ? `QEMU exited at start (${describeExit(earlyExit)}): ${tail(readText(stderrPath), 2000)}`
          : (err as Error).message;
      if (!opts.keepDir) rmSync(dir, { recursive: true, force: true });
      throw new Error(`Guest ${opts.name} (${qemu.label}): ${why}`);
    }
    return new Guest({ ...opts, qemu, fillMiB }, dir, child, qmp, exited);
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  /** True while the QEMU process has not exited. */
  get alive(): boolean {
    return this.exit === null && this.child.exitCode === null && this.child.signalCode === null;
  }

  consoleText(): string {
    return readText(this.consolePath);
  }

  /** Bytes written to the console so far: pass to waitConsole() to wait for output that comes later. */
  consoleBytes(): number {
    try {
      return statSync(this.consolePath).size;
    } catch {
      return 0;
    }
  }

  stderrText(): string {
    return readText(this.stderrPath);
  }

  /**
   * Polls the console log until a line matching `re` appears at or after byte `fromByte`; returns that line.
   * Throws on timeout or when QEMU exits, with the end of the console and of QEMU's stderr.
   */
  async waitConsole(re: RegExp, timeoutMs: number, fromByte = 0): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const text = readText(this.consolePath, fromByte);
      for (const line of text.split(/\r?\n/)) {
        if (re.test(line)) return line;
      }
      if (!this.alive) throw this.failure(`QEMU exited while waiting for ${re} on the console`);
      if (Date.now() >= deadline) throw this.failure(`no console line matching ${re} within ${timeoutMs} ms`);
      await delayMs(pollIntervalMs);
    }
  }

  /** Waits for the guest's SNAPPIPE-READY line (its RAM is filled). */
  waitReady(timeoutMs = 180_000): Promise<string> {
    return this.waitConsole(/SNAPPIPE-READY/, timeoutMs);
  }

  /** Waits for a SNAPPIPE-TICK printed after byte `fromByte` of the console (the guest runs). */
  waitTick(timeoutMs = 30_000, fromByte = this.consoleBytes()): Promise<string> {
    return this.waitConsole(/SNAPPIPE-TICK \d+/, timeoutMs, fromByte);
  }

  /**
   * Asks the running guest to hash what it wrote and never changes after READY: its random fill, and /init with
   * busybox (scripts/guest.sh). The guest reads the whole fill back, so a wrong byte anywhere in it shows here.
   */
  async contentHash(timeoutMs = 120_000): Promise<{ fill: string; init: string }> {
    const nonce = ++this.commandCount;
    const from = this.consoleBytes();
    await this.command(`hash ${nonce}`, timeoutMs);
    const line = await this.waitConsole(new RegExp(`SNAPPIPE-HASH ${nonce} `), timeoutMs, from);
    const m = /fill=([0-9a-f]{32}|none) init=([0-9a-f]{32})/.exec(line);
    if (!m) throw this.failure(`the guest's hash line is malformed: ${line}`);
    return { fill: m[1], init: m[2] };
  }

  /** Writes one line to the guest's command channel (ttyS1). */
  private command(line: string, timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const sock = connect(this.controlPath);
      const timer = setTimeout(() => {
        sock.destroy();
        reject(this.failure(`the command channel took over ${timeoutMs} ms to take '${line}'`));
      }, timeoutMs);
      sock.once('error', (err) => {
        clearTimeout(timer);
        reject(this.failure(`command channel ${this.controlPath}: ${err.message}`));
      });
      sock.once('connect', () => {
        sock.end(`${line}\n`, () => {
          clearTimeout(timer);
          resolve();
        });
      });
    });
  }

  /** Runs a QMP command; failures name the guest. */
  async execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = 30_000): Promise<T> {
    if (!this.alive) throw this.failure(`QEMU is not running (QMP ${command})`);
    return this.qmp.execute<T>(command, args, timeoutMs);
  }

  queryStatus(): Promise<RunStatus> {
    return this.execute<RunStatus>('query-status');
  }

  async stop(): Promise<void> {
    await this.execute('stop');
  }

  async cont(): Promise<void> {
    await this.execute('cont');
  }

  /** Writes guest-physical memory [addr, addr + sizeBytes) to `file` (QEMU opens it). */
  async pmemsave(addr: number, sizeBytes: number, file: string, timeoutMs = 120_000): Promise<void> {
    await this.execute('pmemsave', { val: addr, size: sizeBytes, filename: file }, timeoutMs);
  }

  /** migrate-set-parameters, e.g. { 'max-bandwidth': 1e11 }. */
  async setMigrationParams(params: Record<string, unknown>): Promise<void> {
    await this.execute('migrate-set-parameters', params);
  }

  /** migrate-set-capabilities from a { name: state } map, e.g. { 'background-snapshot': true }. */
  async setCapabilities(caps: Record<string, boolean>): Promise<void> {
    const capabilities = Object.entries(caps).map(([capability, state]) => ({ capability, state }));
    await this.execute('migrate-set-capabilities', { capabilities });
  }

  /** Raises QEMU's migration bandwidth limit so the stream is not throttled (QEMU's default is 32 MiB/s). */
  async unthrottle(): Promise<void> {
    await this.setMigrationParams({ 'max-bandwidth': 100 * 1024 * 1024 * 1024 });
  }

  /** Starts an outgoing migration (returns at once; see waitMigration()). */
  async migrate(uri: string): Promise<void> {
    await this.execute('migrate', { uri });
  }

  /** Starts an incoming migration on a guest started with `incoming: true`. */
  async migrateIncoming(uri: string): Promise<void> {
    await this.execute('migrate-incoming', { uri });
  }

  queryMigrate(timeoutMs = 30_000): Promise<MigrationStatus> {
    return this.execute<MigrationStatus>('query-migrate', undefined, timeoutMs);
  }

  /**
   * Polls query-migrate until the migration is completed, failed or cancelled and returns that status object
   * (with `error-desc` on failure). Throws on timeout or when QEMU exits. QEMU's monitor stalls while it waits
   * for an exec: child to exit, so each poll may take long: it is bounded by the overall deadline.
   */
  async waitMigration(timeoutMs: number): Promise<MigrationStatus> {
    const deadline = Date.now() + timeoutMs;
    let last: MigrationStatus | null = null;
    for (;;) {
      const remainingMs = deadline - Date.now();
      if (remainingMs <= 0) {
        throw this.failure(`migration not finished within ${timeoutMs} ms (last status: ${last?.status ?? 'none'})`);
      }
      try {
        last = await this.queryMigrate(remainingMs);
      } catch (err) {
        if (!this.alive) throw this.failure('QEMU exited during the migration');
        throw this.failure(`query-migrate: ${(err as Error).message}`);
      }
      if (migrationEndStates.has(last.status)) return last;
      await delayMs(pollIntervalMs);
    }
  }

  /**
   * Ends QEMU: `quit` over QMP, then SIGKILL if it has not exited within timeoutMs. Always returns with the
   * process gone (or unkillable, which throws). Removes the temporary directory unless keepDir. Idempotent.
   */
  async quit(timeoutMs = 10_000): Promise<void> {
    if (this.quitDone) return;
    if (this.alive && !this.qmp.closed) {
      try {
        await Promise.race([this.qmp.execute('quit', undefined, Math.min(timeoutMs, 3_000)), this.exited]);
      } catch {
        // QEMU may close the socket before answering, or be stuck: SIGKILL below
      }
    }
    if (this.alive) await Promise.race([this.exited, delayMs(timeoutMs)]);
    if (this.alive) {
      this.child.kill('SIGKILL');
      await Promise.race([this.exited, delayMs(10_000)]);
    }
    this.qmp.close();
    if (this.alive) throw new Error(`Guest ${this.name}: QEMU (pid ${this.pid}) survived SIGKILL`);
    this.quitDone = true;
    if (!this.keepDir) rmSync(this.dir, { recursive: true, force: true });
  }

  /** SIGKILL without ceremony (also removes the directory unless keepDir). */
  async kill(): Promise<void> {
    if (this.alive) this.child.kill('SIGKILL');
    await this.quit(1_000);
  }

  /** How QEMU exited, or null while it runs. */
  get exitStatus(): string | null {
    return this.exit ? describeExit(this.exit) : null;
  }

  /** An Error naming the guest, with the end of its console and of QEMU's stderr. */
  failure(what: string): Error {
    const exit = this.exit ? ` [QEMU exited: ${describeExit(this.exit)}]` : '';
    const stderr = tail(this.stderrText(), 1500).trim();
    const console = tail(this.consoleText(), 800).trim();
    return new Error(
      `Guest ${this.name} (${this.qemu.label}): ${what}${exit}` +
        (stderr ? `\n--- QEMU stderr (end) ---\n${stderr}` : '') +
        (console ? `\n--- console (end) ---\n${console}` : ''),
    );
  }
}

// ---------------------------------------------------------------------------------------------------------------
// helpers

function readText(path: string, fromByte = 0): string {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch {
    return '';
  }
  try {
    const size = statSync(path).size;
    if (size <= fromByte) return '';
    const buf = Buffer.alloc(size - fromByte);
    let got = 0;
    while (got < buf.length) {
      const n = readSync(fd, buf, got, buf.length - got, fromByte + got);
      if (n === 0) break;
      got += n;
    }
    return buf.subarray(0, got).toString('utf8');
  } finally {
    closeSync(fd);
  }
}

function tail(text: string, chars: number): string {
  return text.length <= chars ? text : '…' + text.slice(text.length - chars);
}

function describeExit(e: { code: number | null; signal: NodeJS.Signals | null }): string {
  return e.signal ? `signal ${e.signal}` : `exit code ${e.code}`;
}

export function delayMs(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
