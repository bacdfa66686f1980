// snap-pipe load --postcopy without QEMU: the real CLI against a scripted destination that speaks QEMU 7.2's side of
// the protocol. The peer parses the stream as it arrives, answers PINGs with PONGs, asks for pages on the return path
// (snap-pipe's stdin) once LISTEN has gone by — pages far ahead in the background order, zero pages, pages of other
// blocks, pages already sent, and a run of one-at-a-time "faults" the way a vCPU makes them — and sends SHUT after
// EOF. It checks the order QEMU's destination needs (ADVISE before any page; DISCARD covering exactly the pages not
// sent in the precopy share; PACKAGED = LISTEN + device sections without EOF/VMDESCRIPTION + PING + RUN), that every
// page arrives exactly once with the saved content, that requested pages jump the queue, and the refusals.
import { spawn } from 'node:child_process';
import net from 'node:net';
import type { Readable, Writable } from 'node:stream';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ImageReader } from '../../src/image/reader.js';
import type { PostcopyReport } from '../../src/load/postcopy/session.js';
import {
  RAM_CONTINUE,
  RAM_EOS,
  RAM_FLAGS_MASK,
  RAM_PAGE,
  RAM_ZERO,
  SEC_COMMAND,
  SEC_END,
  SEC_EOF,
  SEC_FOOTER,
  SEC_PART,
} from '../../src/format/stream/constants.js';
import { encodePong, encodeReqPages, encodeShut, encodeSwitchoverAck } from '../../src/format/stream/returnpath.js';
import { BIN, runCli, runOnTerminal } from '../helpers/cli.js';
import { buildStream, pulledForward, rng, sequentialOps, type BlockSpec, type ModelStream, type Op } from '../helpers/model.js';

const MiB = 1 << 20;
const PAGE = 4096;
let dir: string;
beforeAll(() => {
  if (!existsSync(join(import.meta.dirname, '..', '..', 'dist', 'main.js'))) throw new Error('dist/ is missing: run npm run build');
  dir = mkdtempSync(join(tmpdir(), 'snap-pipe-postcopy-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const BLOCKS: BlockSpec[] = [
  { id: 'pc.ram', lengthBytes: 96 << 20 },
  { id: '/rom@etc/acpi/tables', lengthBytes: 128 << 10 },
  { id: 'pc.bios', lengthBytes: 256 << 10 },
  { id: '/rom@etc/acpi/rsdp', lengthBytes: 4096 },
];

/** Background-snapshot-like order with zero pages, a range of pc.ram never saved, and a block never saved at all. */
function ops(): Op[] {
  return pulledForward(sequentialOps(BLOCKS, 5), 0.01, 3).filter((op) => !(op.block === 0 && op.page >= 3000 && op.page < 3300) && op.block !== 3);
}

// ---------------------------------------------------------------------------------------------------------------
// An incremental parser of what snap-pipe writes in postcopy mode

interface Cmd {
  cmd: number;
  payload: Buffer;
  at: number;
}

interface Events {
  cmd(c: Cmd): void;
  page(block: number, page: number, data: Buffer | undefined, at: number): void;
  section(type: number): void;
  eof(at: number): void;
}

class StreamReader {
  private buf = Buffer.alloc(0);
  private pos = 0;
  /** Absolute stream offset of buf[0]. */
  private base = 0;
  private state: 'prefix' | 'top' | 'records' | 'done' = 'prefix';
  private lastBlock = -1;
  readonly names: string[];

  constructor(
    private readonly prefix: Buffer,
    private readonly sectionId: number,
    names: string[],
    private readonly on: Events,
  ) {
    this.names = names;
  }

  get offset(): number {
    return this.base + this.pos;
  }

  feed(chunk: Buffer): void {
    this.buf = Buffer.concat([this.buf.subarray(this.pos), chunk]);
    this.base += this.pos;
    this.pos = 0;
    while (this.step());
  }

  private have(n: number): boolean {
    return this.buf.length - this.pos >= n;
  }

  private step(): boolean {
    const b = this.buf;
    const p = this.pos;
    switch (this.state) {
      case 'prefix':
        if (!this.have(this.prefix.length)) return false;
        if (!b.subarray(p, p + this.prefix.length).equals(this.prefix)) throw new Error('the stream does not start with the saved header, configuration and RAM setup');
        this.pos += this.prefix.length;
        this.state = 'top';
        return true;
      case 'top': {
        if (!this.have(1)) return false;
        const type = b[p];
        if (type === SEC_COMMAND) {
          if (!this.have(5)) return false;
          const cmd = b.readUInt16BE(p + 1);
          const len = b.readUInt16BE(p + 3);
          let total = 5 + len;
          if (cmd === 7) {
            if (!this.have(9)) return false;
            total += b.readUInt32BE(p + 5);
          }
          if (!this.have(total)) return false;
          this.pos += total;
          this.on.cmd({ cmd, payload: Buffer.from(b.subarray(p + 5, p + total)), at: this.base + p });
          return true;
        }
        if (type === SEC_PART || type === SEC_END) {
          if (!this.have(5)) return false;
          if (b.readUInt32BE(p + 1) !== this.sectionId) throw new Error(`section id ${b.readUInt32BE(p + 1)} at ${this.base + p}`);
          this.pos += 5;
          this.state = 'records';
          this.on.section(type);
          return true;
        }
        if (type === SEC_EOF) {
          this.pos += 1;
          this.state = 'done';
          this.on.eof(this.base + p);
          return true;
        }
        throw new Error(`unexpected section type 0x${type.toString(16)} at ${this.base + p}`);
      }
      case 'records': {
        if (!this.have(8)) return false;
        const hi = b.readUInt32BE(p);
        const lo = b.readUInt32BE(p + 4);
        const flags = lo & RAM_FLAGS_MASK;
        const offset = hi * 2 ** 32 + (lo - flags);
        if (flags === RAM_EOS) {
          if (!this.have(13)) return false;
          if (b[p + 8] !== SEC_FOOTER || b.readUInt32BE(p + 9) !== this.sectionId) throw new Error(`bad footer at ${this.base + p + 8}`);
          this.pos += 13;
          this.state = 'top';
          return true;
        }
        let at = p + 8;
        let block = this.lastBlock;
        if (!(flags & RAM_CONTINUE)) {
          if (!this.have(9)) return false;
          const n = b[at];
          if (!this.have(9 + n)) return false;
          const name = b.subarray(at + 1, at + 1 + n).toString('latin1');
          block = this.names.indexOf(name);
          if (block < 0) throw new Error(`unknown block ${name}`);
          at += 1 + n;
        }
        if (block < 0) throw new Error('CONTINUE without a block');
        const kind = flags & ~RAM_CONTINUE;
        if (kind === RAM_ZERO) {
          if (!this.have(at - p + 1)) return false;
          if (b[at] !== 0) throw new Error('ZERO record with a non-zero fill byte');
          this.pos = at + 1;
          this.lastBlock = block;
          this.on.page(block, offset / PAGE, undefined, this.base + p);
          return true;
        }
        if (kind === RAM_PAGE) {
          if (!this.have(at - p + PAGE)) return false;
          this.pos = at + PAGE;
          this.lastBlock = block;
          this.on.page(block, offset / PAGE, Buffer.from(b.subarray(at, at + PAGE)), this.base + p);
          return true;
        }
        throw new Error(`unexpected record flags 0x${flags.toString(16)} at ${this.base + p}`);
      }
      case 'done':
        if (this.have(1)) throw new Error(`${b.length - p} bytes after EOF`);
        return false;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The scripted destination

interface Request {
  block: number;
  page: number;
  /** Stream offset the peer had read when it sent the request. */
  sentAt: number;
  /** Stream offset of the page's record, when it came after the request. */
  gotAt?: number;
  kind: 'ahead' | 'zero' | 'unsaved' | 'other-block' | 'same-block' | 'already' | 'fault';
}

interface PeerScript {
  /** Requests to send right after the package, and later faults one at a time. */
  requests?: (m: ModelStream, received: (b: number, p: number) => boolean) => { block: number; page: number; kind: Request['kind'] }[];
  faults?: number;
  /** Raw return-path bytes to send after the package instead (error cases). */
  raw?: Buffer;
  /** Close stdin right after the package instead of anything else. */
  closeAfterPackage?: boolean;
  shut?: number;
  /** Answer OPEN_RETURN_PATH with SWITCHOVER_ACK, as a QEMU 8.1+ destination with switchover-ack does. */
  switchoverAck?: boolean;
}

interface PeerResult {
  code: number | null;
  stderr: string;
  ms: number;
  exitAfterShutMs?: number;
  cmds: Cmd[];
  /** Per block, per page: records received, and the order index of the first record. */
  records: Uint8Array[];
  ram: Uint8Array[];
  zeroRecord: Uint8Array[];
  /** Per block, per page: received before the package (the precopy share). */
  beforePackage: Uint8Array[];
  /** Stream offset of the last page record before the package (-1: none). */
  lastPageBeforePackageAt: number;
  requests: Request[];
  packageAt: number;
  firstPageAt: number;
  adviseAt: number;
  eofAt: number;
  endSections: number;
  sawEof: boolean;
  bytes: number;
}

/**
 * Runs `snap-pipe load IMG ARGS` against the scripted peer: over its stdout and stdin (QEMU's exec:), or with
 * `socket` over one unix socket the peer listens on, `load --connect unix:PATH`, the return path coming back on it.
 * `listenAfterMs`: the peer starts listening only then (load, started first, waits for it).
 */
function runPeer(img: string, m: ModelStream, args: string[], script: PeerScript, via?: { socket: string; listenAfterMs?: number }): Promise<PeerResult> {
  const reader = ImageReader.open(img);
  const meta = reader.meta!;
  reader.close();
  const prefix = Buffer.concat([meta.head, meta.ramSetup]);
  const names = meta.blocks.map((b) => b.id);
  const pages = m.blocks.map((b) => b.lengthBytes / PAGE);
  const res: PeerResult = {
    code: null,
    stderr: '',
    ms: 0,
    cmds: [],
    records: pages.map((n) => new Uint8Array(n)),
    ram: m.blocks.map((b) => new Uint8Array(b.lengthBytes)),
    zeroRecord: pages.map((n) => new Uint8Array(n)),
    beforePackage: pages.map((n) => new Uint8Array(n)),
    lastPageBeforePackageAt: -1,
    requests: [],
    packageAt: -1,
    firstPageAt: -1,
    adviseAt: -1,
    eofAt: -1,
    endSections: 0,
    sawEof: false,
    bytes: 0,
  };
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    let shutAt = 0;
    const loadArgs = via ? [...args, '--connect', `unix:${via.socket}`] : args;
    const child = spawn(process.execPath, [BIN, 'load', img, ...loadArgs], { stdio: [via ? 'ignore' : 'pipe', via ? 'ignore' : 'pipe', 'pipe'] });
    child.stderr!.on('data', (d) => (res.stderr += d));
    // What the peer reads the stream from and writes its return path to.
    let rpOut: Writable | undefined;
    const send = (b: Uint8Array) => {
      if (rpOut && !rpOut.destroyed && rpOut.writable) rpOut.write(b);
    };
    let lastNamed = -1;
    const request = (block: number, page: number, kind: Request['kind']) => {
      send(encodeReqPages(block === lastNamed ? undefined : names[block], page * PAGE, PAGE));
      lastNamed = block;
      res.requests.push({ block, page, sentAt: sr.offset, kind });
    };
    const received = (b: number, p: number) => res.records[b][p] > 0;
    let faultsLeft = script.faults ?? 0;
    let faultWaiting: { block: number; page: number } | undefined;
    const r = rng(42);
    const nextFault = () => {
      if (faultsLeft === 0) return;
      // A data page of pc.ram not received yet, as a vCPU would touch it.
      for (let tries = 0; tries < 1000; tries++) {
        const page = Math.floor(r() * pages[0]);
        if (!received(0, page) && m.data[0][page]) {
          faultsLeft--;
          faultWaiting = { block: 0, page };
          request(0, page, 'fault');
          return;
        }
      }
      faultsLeft = 0;
    };
    let listening = false;
    const sr: StreamReader = new StreamReader(prefix, meta.ramSectionId, names, {
      cmd(c) {
        res.cmds.push(c);
        if (c.cmd === 3 && res.adviseAt < 0) res.adviseAt = c.at;
        if (c.cmd === 1 && script.switchoverAck) send(encodeSwitchoverAck());
        if (c.cmd === 2) send(encodePong(c.payload.readUInt32BE(0)));
        if (c.cmd === 7) {
          res.packageAt = c.at;
          listening = true;
          const inner = c.payload.subarray(4);
          // The PING inside the package is answered once the devices are "loaded".
          if (inner.length >= 14 && inner[inner.length - 14] === SEC_COMMAND && inner.readUInt16BE(inner.length - 13) === 2) {
            send(encodePong(inner.readUInt32BE(inner.length - 9)));
          }
          if (script.closeAfterPackage) {
            rpOut!.end();
            return;
          }
          if (script.raw) {
            send(script.raw);
            return;
          }
          for (const q of script.requests?.(m, received) ?? []) request(q.block, q.page, q.kind);
          nextFault();
        }
      },
      section(type) {
        if (type === SEC_END) res.endSections++;
      },
      page(block, page, data, at) {
        if (res.firstPageAt < 0) res.firstPageAt = at;
        res.records[block][page]++;
        if (!listening) {
          res.beforePackage[block][page] = 1;
          res.lastPageBeforePackageAt = at;
        }
        if (data) res.ram[block].set(data, page * PAGE);
        else res.zeroRecord[block][page] = 1;
        for (const q of res.requests) if (q.block === block && q.page === page && q.gotAt === undefined && at >= q.sentAt) q.gotAt = at;
        if (faultWaiting && faultWaiting.block === block && faultWaiting.page === page) {
          faultWaiting = undefined;
          nextFault();
        }
      },
      eof(at) {
        res.eofAt = at;
        res.sawEof = true;
        // As QEMU: SHUT once the listen thread is done, then close both pipes.
        setTimeout(() => {
          shutAt = Date.now();
          send(encodeShut(script.shut ?? 0));
        }, 50);
      },
    });
    const wire = (streamIn: Readable, returnPath: Writable) => {
      rpOut = returnPath;
      returnPath.on('error', () => undefined);
      streamIn.on('data', (d: Buffer) => {
        res.bytes += d.length;
        try {
          sr.feed(d);
        } catch (err) {
          child.kill('SIGKILL');
          reject(err);
        }
      });
    };
    if (!via) wire(child.stdout!, child.stdin!);
    else {
      const server = net.createServer((conn) => {
        server.close(); // one connection: load --connect without multifd makes no other
        wire(conn, conn);
      });
      setTimeout(() => server.listen(via.socket), via.listenAfterMs ?? 0);
      child.on('close', () => server.close());
    }
    child.on('error', reject);
    child.on('close', (code) => {
      res.code = code;
      res.ms = Date.now() - t0;
      if (shutAt) res.exitAfterShutMs = Date.now() - shutAt;
      resolve(res);
    });
  });
}

async function save(name: string, m: ModelStream): Promise<string> {
  const img = join(dir, `${name}.qcow2`);
  const r = await runCli(['save', img], m.bytes);
  expect(r.code, r.stderr).toBe(0);
  return img;
}

/** The device sections of the saved stream: the device state without EOF and VMDESCRIPTION. */
function deviceSections(m: ModelStream): Buffer {
  const d = Buffer.from(m.deviceState);
  const k = d.lastIndexOf(Buffer.from([SEC_EOF, 0x06]));
  return d.subarray(0, k);
}

/** Byte ranges of POSTCOPY_RAM_DISCARD commands, decoded, per block name. */
function discards(cmds: Cmd[]): Map<string, [number, number][]> {
  const out = new Map<string, [number, number][]>();
  for (const c of cmds.filter((x) => x.cmd === 6)) {
    const p = c.payload;
    expect(p[0], 'discard version').toBe(0);
    const n = p[1];
    const name = p.subarray(2, 2 + n).toString('latin1');
    expect(p[2 + n], 'discard name terminator').toBe(0);
    const body = p.subarray(3 + n);
    expect(body.length % 16).toBe(0);
    expect(body.length / 16).toBeGreaterThanOrEqual(1);
    expect(body.length / 16).toBeLessThanOrEqual(12);
    const list = out.get(name) ?? [];
    for (let i = 0; i < body.length; i += 16) list.push([Number(body.readBigUInt64BE(i)), Number(body.readBigUInt64BE(i + 8))]);
    out.set(name, list);
  }
  return out;
}

function expectProtocol(res: PeerResult, m: ModelStream, percent: number): void {
  const cmds = res.cmds.map((c) => c.cmd);
  // ADVISE, OPEN_RETURN_PATH, PING 1 first, before any page.
  expect(cmds.slice(0, 3)).toEqual([3, 1, 2]);
  expect(res.cmds[0].payload.toString('hex')).toBe('0000000000001000' + '0000000000001000');
  expect(res.cmds[2].payload.readUInt32BE(0)).toBe(1);
  expect(res.firstPageAt < 0 || res.firstPageAt > res.adviseAt).toBe(true);
  // A save from QEMU 10 had SWITCHOVER_START: it goes next, after the precopy share and before the DISCARDs, where
  // QEMU's postcopy_start sends it.
  const switchover = m.switchoverCommands.length / 5;
  expect(cmds.slice(3, 3 + switchover)).toEqual(new Array(switchover).fill(11));
  for (const c of res.cmds.slice(3, 3 + switchover)) {
    expect(c.payload.length).toBe(0);
    expect(c.at).toBeGreaterThan(res.lastPageBeforePackageAt);
  }
  // Then DISCARDs (always: QEMU 7.2 mishandles LISTEN right after ADVISE), then one PACKAGED.
  const rest = cmds.slice(3 + switchover);
  expect(rest[rest.length - 1]).toBe(7);
  expect(rest.length).toBeGreaterThan(1);
  expect(rest.slice(0, -1).every((c) => c === 6)).toBe(true);
  const pkg = res.cmds[res.cmds.length - 1].payload;
  const inner = pkg.subarray(4);
  expect(pkg.readUInt32BE(0)).toBe(inner.length);
  const dev = deviceSections(m);
  const want = Buffer.concat([Buffer.from('0800040000', 'hex'), dev, Buffer.from('080002000400000003', 'hex'), Buffer.from('0800050000', 'hex')]);
  expect(inner.equals(want), 'PACKAGED = LISTEN, device sections (no EOF/VMDESCRIPTION), PING 3, RUN').toBe(true);

  // Every page exactly once, with the saved content (pages never saved: ZERO records).
  m.blocks.forEach((b, i) => {
    for (let p = 0; p < m.sent[i].length; p++) {
      if (res.records[i][p] !== 1) throw new Error(`${b.id} page ${p}: ${res.records[i][p]} records`);
      const isData = m.sent[i][p] && m.data[i][p];
      if (isData === (res.zeroRecord[i][p] === 1)) throw new Error(`${b.id} page ${p}: sent as ${res.zeroRecord[i][p] ? 'zero' : 'data'}`);
    }
    expect(Buffer.compare(res.ram[i], m.ram[i]), `${b.id} content`).toBe(0);
  });

  // Precopy share: ZERO for every non-data page and at least PERCENT% of the data pages; DISCARD = the rest exactly
  // (everything without a share).
  const count = (rows: ArrayLike<number>[]) => rows.reduce((a, r) => a + Array.from(r).filter(Boolean).length, 0);
  const dataPages = m.data.reduce((a, r, i) => a + r.filter((x, p) => x && m.sent[i][p]).length, 0);
  if (percent === 0) expect(count(res.beforePackage)).toBe(0);
  {
    if (percent > 0) {
      const dataBefore = m.blocks.reduce((a, _, i) => a + Array.from(res.beforePackage[i]).filter((x, p) => x && !res.zeroRecord[i][p]).length, 0);
      expect(dataBefore).toBeGreaterThanOrEqual(Math.ceil((dataPages * percent) / 100));
      expect(dataBefore).toBeLessThan(Math.ceil((dataPages * percent) / 100) + 256);
    }
    const d = discards(res.cmds);
    m.blocks.forEach((b, i) => {
      const covered = new Uint8Array(m.sent[i].length);
      for (const [start, len] of d.get(b.id) ?? []) {
        expect(start % PAGE).toBe(0);
        expect(len % PAGE).toBe(0);
        for (let p = start / PAGE; p < (start + len) / PAGE; p++) covered[p]++;
      }
      for (let p = 0; p < covered.length; p++) {
        const want = res.beforePackage[i][p] ? 0 : 1;
        if (covered[p] !== want) throw new Error(`${b.id} page ${p}: discarded ${covered[p]} times, sent before the package: ${res.beforePackage[i][p]}`);
        if (percent > 0 && (!m.data[i][p] || !m.sent[i][p])) expect(res.beforePackage[i][p], `${b.id} page ${p}: zero pages go in the share`).toBe(1);
      }
    });
  }
  expect(res.endSections).toBe(1);
  expect(res.sawEof).toBe(true);
}

// ---------------------------------------------------------------------------------------------------------------

describe('snap-pipe load --postcopy against a scripted destination', () => {
  let m: ModelStream;
  let img: string;
  let m10: ModelStream;
  let img10: string;
  beforeAll(async () => {
    m = buildStream(BLOCKS, ops());
    img = await save('pc', m);
    m10 = buildStream(BLOCKS, ops(), { switchoverStart: true });
    img10 = await save('pc-qemu10', m10);
  }, 120_000);

  /** Far-ahead pages: the last data pages of pc.ram (the background reaches them last), a zero page, others. */
  const burst: PeerScript['requests'] = (mm, received) => {
    const out: { block: number; page: number; kind: Request['kind'] }[] = [];
    const pages = mm.sent[0].length;
    for (let p = pages - 1; p >= 0 && out.length < 4; p -= 301) if (mm.data[0][p] && !received(0, p)) out.push({ block: 0, page: p, kind: 'ahead' });
    // Next page in the same block (REQ_PAGES without a name).
    const last = out[out.length - 1].page;
    if (mm.data[0][last - 1] && !received(0, last - 1)) out.push({ block: 0, page: last - 1, kind: 'same-block' });
    for (let p = pages - 2; p >= 0; p--) {
      if (mm.sent[0][p] && !mm.data[0][p] && !received(0, p)) {
        out.push({ block: 0, page: p, kind: 'zero' });
        break;
      }
    }
    if (!received(0, 3100)) out.push({ block: 0, page: 3100, kind: 'unsaved' });
    if (!received(2, 17)) out.push({ block: 2, page: 17, kind: 'other-block' });
    if (!received(3, 0)) out.push({ block: 3, page: 0, kind: 'unsaved' });
    // The same page again: already sent by then (QEMU asks again only for pages it has not received yet).
    out.push({ ...out[0], kind: 'already' });
    return out;
  };

  for (const c of [
    { name: 'postcopy from the start', percent: 0, args: ['--postcopy'] },
    { name: '30% precopy first', percent: 30, args: ['--postcopy=30'] },
    { name: 'sync reads, buffered, 10% first', percent: 10, args: ['--postcopy=10', '--io', 'sync', '--no-direct', '--queue-depth=2'] },
    { name: 'saved from QEMU 10 (SWITCHOVER_START), 20% first, a destination with switchover-ack', percent: 20, args: ['--postcopy=20'], qemu10: true },
    // load --connect: the stream and the return path on one socket, which stays blocking for the stream's writes.
    { name: 'over one socket (--connect), from the start; the peer listens 300 ms after load started', percent: 0, args: ['--postcopy'], listenAfterMs: 300 },
    { name: 'over one socket (--connect), saved from QEMU 10, 20% first, switchover-ack', percent: 20, args: ['--postcopy=20'], qemu10: true, listenAfterMs: 0 },
  ]) {
    it(c.name, async () => {
      const statsPath = join(dir, `${c.name.replace(/\W+/g, '-')}.json`);
      const [mm, image] = c.qemu10 ? [m10, img10] : [m, img];
      const via = c.listenAfterMs === undefined ? undefined : { socket: join(dir, `peer-${c.percent}.sock`), listenAfterMs: c.listenAfterMs };
      const res = await runPeer(image, mm, [...c.args, `--stats=${statsPath}`], { requests: burst, faults: 40, switchoverAck: c.qemu10 }, via);
      expect(res.code, res.stderr).toBe(0);
      // Over the socket, load says once that it waits for the peer to listen (when it had to), and nothing else.
      const waited = /^snap-pipe: load: waiting for QEMU to listen on unix:\S+ \(up to 10 s\)\n/;
      if (c.listenAfterMs) expect(res.stderr).toMatch(waited);
      expect(res.stderr.replace(waited, '')).toBe('');
      expectProtocol(res, mm, c.percent);
      // Requested pages jump the queue: each arrives soon after the request (the pipe, snap-pipe's small output
      // buffer and one cluster at most), long before the background would have reached it.
      const served = res.requests.filter((q) => q.gotAt !== undefined);
      expect(served.length).toBeGreaterThanOrEqual(res.requests.length - 1);
      for (const q of served) {
        if (q.gotAt! - q.sentAt > 3 * MiB) throw new Error(`${q.kind} request for page ${q.page} of block ${q.block}: answered ${q.gotAt! - q.sentAt} bytes later`);
      }
      // With a precopy share every zero page went before LISTEN: there is no zero page left to ask for.
      const zeroReqs = res.requests.filter((q) => q.kind === 'zero' || q.kind === 'unsaved');
      expect(zeroReqs.length > 0).toBe(c.percent === 0);
      for (const q of zeroReqs) expect(res.zeroRecord[q.block][q.page], 'zero request answered by a ZERO record').toBe(1);
      const stats = JSON.parse(readFileSync(statsPath, 'utf8')) as PostcopyReport;
      expect(stats.mode).toBe('postcopy');
      expect(stats.precopyPercent).toBe(c.percent);
      expect(stats.requests).toBe(res.requests.length);
      expect(stats.requestedAlreadySent).toBeGreaterThanOrEqual(1);
      expect(stats.requestedDataPages).toBeGreaterThanOrEqual(30);
      if (c.percent === 0) expect(stats.requestedZeroPages).toBeGreaterThanOrEqual(1);
      expect(stats.faultLatency.count).toBe(stats.requests - stats.requestedAlreadySent);
      expect(stats.shutStatus).toBe(0);
      expect(stats.pongs).toEqual([1, 3]);
      expect(stats.switchoverAcks).toBe(c.qemu10 ? 1 : 0);
      expect(stats.bytesOut).toBe(res.bytes);
      expect(res.exitAfterShutMs!).toBeLessThan(1000);
      const l = stats.faultLatency;
      console.log(
        `${c.name}: ${(res.bytes / 1e6).toFixed(0)} MB in ${res.ms} ms; ${stats.requests} requests (${stats.requestedDataPages} data, ${stats.requestedZeroPages} zero, ` +
          `${stats.requestedAlreadySent} already sent); fault latency p50 ${l.p50Ms.toFixed(2)} ms, p99 ${l.p99Ms.toFixed(2)} ms, max ${l.maxMs.toFixed(2)} ms; ` +
          `exit ${res.exitAfterShutMs} ms after SHUT`,
      );
    });
  }

  it('prints the summary with --stats', async () => {
    const res = await runPeer(img, m, ['--postcopy', '--stats'], { requests: burst });
    expect(res.code, res.stderr).toBe(0);
    expect(res.stderr).toMatch(/^snap-pipe load --postcopy=0: .*pc\.qcow2: [\d.]+ \w+ of stream/);
    expect(res.stderr).toMatch(/fault latency \(\d+ requests\): p50 [\d.]+ms, p90 [\d.]+ms, p99 [\d.]+ms/);
    expect(res.stderr).toMatch(/timeline: package sent [\d.]+s, devices loaded [\d.]+s, EOF sent [\d.]+s, SHUT [\d.]+s/);
  });

  function expectFailed(res: PeerResult, pattern: RegExp): void {
    expect(res.code, res.stderr).toBe(1);
    const lines = res.stderr.trim().split('\n');
    expect(lines, res.stderr).toHaveLength(1);
    expect(lines[0]).toMatch(/^snap-pipe: /);
    expect(lines[0]).toMatch(pattern);
    expect(res.ms).toBeLessThan(20_000);
  }

  it('a request outside its block ends the load with a clear error', async () => {
    const raw = Buffer.from(encodeReqPages('pc.ram', BLOCKS[0].lengthBytes, PAGE));
    expectFailed(await runPeer(img, m, ['--postcopy'], { raw }), /QEMU requested 4096 bytes at offset 0x6000000 of RAM block pc\.ram \(100663296 bytes\): outside the block/);
    const straddle = Buffer.from(encodeReqPages('pc.bios', (256 << 10) - PAGE, 2 * PAGE));
    expectFailed(await runPeer(img, m, ['--postcopy'], { raw: straddle }), /RAM block pc\.bios .*outside the block/);
  });

  it('a request for an unknown block, a REQ_PAGES naming no block, a malformed message', async () => {
    expectFailed(await runPeer(img, m, ['--postcopy'], { raw: Buffer.from(encodeReqPages('vga.vram', 0, PAGE)) }), /RAM block 'vga\.vram', which .* does not have/);
    expectFailed(await runPeer(img, m, ['--postcopy'], { raw: Buffer.from(encodeReqPages(undefined, 0, PAGE)) }), /REQ_PAGES before any request naming its block/);
    expectFailed(await runPeer(img, m, ['--postcopy'], { raw: Buffer.from('000900000000', 'hex') }), /return path from QEMU: unknown message type 0x0009/);
  });

  it('QEMU failing (SHUT 1) or closing the return path early ends the load at once, non-zero', async () => {
    expectFailed(await runPeer(img, m, ['--postcopy'], { raw: Buffer.from(encodeShut(1)) }), /QEMU reported the incoming migration failed \(SHUT 1\)/);
    expectFailed(await runPeer(img, m, ['--postcopy'], { closeAfterPackage: true }), /QEMU closed the return path \(stdin\) before the stream was complete/);
    const socket = join(dir, 'early-close.sock');
    expectFailed(await runPeer(img, m, ['--postcopy'], { closeAfterPackage: true }, { socket }), /QEMU closed the return path \(the --connect socket\) before the stream was complete/);
    expectFailed(await runPeer(img, m, ['--postcopy'], { raw: Buffer.from(encodeShut(1)) }, { socket }), /QEMU reported the incoming migration failed \(SHUT 1\)/);
  });

  it('a destination that never answers (no postcopy-ram): EPIPE names the capability', async () => {
    // The peer reads nothing and closes stdout: snap-pipe's writes fail with EPIPE.
    const child = spawn(process.execPath, [BIN, 'load', img, '--postcopy'], { stdio: ['pipe', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    child.stdout.destroy();
    const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
    expect(code).toBe(1);
    expect(stderr.trim().split('\n')).toHaveLength(1);
    expect(stderr).toMatch(/EPIPE.*does the destination have the postcopy-ram capability/);
  });

  it('refuses a terminal on stdin, and a bad PERCENT', async () => {
    // stdin must be QEMU's return path: on a terminal (a real pty; stdout to a file, so only stdin is one) it is a
    // usage error, one line, and nothing is written.
    const out = join(dir, 'tty.stream');
    const t = runOnTerminal(['load', '--postcopy', img], out);
    expect(t.lines).toEqual(["snap-pipe: load: --postcopy: stdin is a terminal; it must be QEMU's return path (run under migrate_incoming exec:, or use --connect)"]);
    expect(t.code).toBe(2);
    expect(readFileSync(out).length, 'bytes on stdout').toBe(0);
    for (const p of ['101', 'x', '-1', '']) {
      const r = await runCli(['load', img, `--postcopy=${p}`]);
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr).toMatch(/^snap-pipe: load: --postcopy /);
    }
  });
});
