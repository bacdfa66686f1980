// snap-pipe save --listen unix:PATH, against a scripted source on a real unix socket: the socket appears only once
// save is ready, with mode 0600, and is gone after save exits, whatever the outcome; the image equals the one the
// same stream gives through stdin (compared by what load sends back, byte for byte); QEMU's return path runs back
// over the same connection (PONG, then SHUT(0) only once the image is complete); with --multifd-channels, pages
// re-sent across channels keep QEMU's sync-point order whatever order their bytes arrive in; a channel closed
// early, one past the count, a multifd channel without the option, or a silent extra connection fails the save
// with one line and an incomplete image; no connection within --accept-timeout fails it;
// a path that is a file or a live socket is refused, a stale socket replaced; SIGTERM while waiting removes it.
import { spawnSync } from 'node:child_process';
import { existsSync, lstatSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readInfo } from '../../src/image/info.js';
import { StreamBuilder } from '../../src/format/stream/encoder.js';
import { CMD_OPEN_RETURN_PATH, CMD_PING } from '../../src/format/stream/constants.js';
import { ReturnPathDecoder, type RpMessage } from '../../src/format/stream/returnpath.js';
import { BIN, ROOT, loadStream, runCli } from '../helpers/cli.js';
import { SMALL_PC_BLOCKS, buildStream, sequentialOps } from '../helpers/model.js';
import { startListeningSave, type ListeningSave } from '../helpers/listen.js';
import { encodeInit, encodeRamPacket, type RamPacketSpec } from '../helpers/multifd.js';
import { parseAll } from '../helpers/parse.js';
import { concat as concatBytes } from '../../src/save/ring/input.js';
import type { SaveReport } from '../../src/save/pipeline.js';

/** A multifd RAM packet, its fixed part and page data together. */
function packet(spec: RamPacketSpec): Uint8Array {
  const { fixed, data } = encodeRamPacket(spec);
  return concatBytes([fixed, data]);
}

let dir: string;
beforeAll(() => {
  if (!existsSync(join(ROOT, 'dist', 'main.js'))) throw new Error('dist/ is missing: run npm run build');
  dir = mkdtempSync(join(tmpdir(), 'snap-pipe-listen-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const BLOCKS = SMALL_PC_BLOCKS;
const RUN_MS_MAX = 30_000;
const SOCKET_WAIT_MS_MAX = 10_000;

function startSave(img: string, args: string[]): ListeningSave {
  return startListeningSave(BIN, [img, '--no-direct', ...args], RUN_MS_MAX);
}

/** Waits (bounded) until `path` is a socket: save listens only once its stages run and the image is open. */
async function socketAppears(path: string): Promise<void> {
  const t0 = Date.now();
  while (!(existsSync(path) && lstatSync(path).isSocket())) {
    if (Date.now() - t0 > SOCKET_WAIT_MS_MAX) throw new Error(`${path} did not appear in ${SOCKET_WAIT_MS_MAX} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function open(path: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ path });
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  });
}

describe('save --listen unix:PATH', () => {
  it('listens with mode 0600 once ready, stores what stdin stores, and removes the socket', async () => {
    const stream = buildStream(BLOCKS, sequentialOps(BLOCKS, 7), { ramEnd: true }).bytes;
    const sock = join(dir, 'a.sock');
    const img = join(dir, 'a.qcow2');
    const run = startSave(img, ['--listen', `unix:${sock}`]);
    await socketAppears(sock);
    expect(lstatSync(sock).mode & 0o777).toBe(0o600);
    const s = await open(sock);
    s.end(stream);
    const r = await run.done;
    expect(r.stderr).toContain(`listening on unix:${sock}`);
    expect(r.code).toBe(0);
    expect(existsSync(sock)).toBe(false);
    const viaStdin = join(dir, 'a-stdin.qcow2');
    expect((await runCli(['save', '--no-direct', viaStdin], stream)).code).toBe(0);
    expect(readInfo(img).complete).toBe(true);
    expect(loadStream(img).equals(loadStream(viaStdin))).toBe(true);
  });

  it('answers the return path on the same connection: PONG at once, SHUT(0) once the image is complete', async () => {
    const m = buildStream(BLOCKS, sequentialOps(BLOCKS, 5), { ramEnd: true });
    const head = new StreamBuilder().header().configuration('pc-i440fx-7.2').build();
    const stream = Buffer.concat([
      new StreamBuilder().bytes(head).command(CMD_OPEN_RETURN_PATH).command(CMD_PING, Uint8Array.of(0, 0, 0, 1)).build(),
      m.bytes.subarray(head.length),
    ]);
    const sock = join(dir, 'rp.sock');
    const img = join(dir, 'rp.qcow2');
    const run = startSave(img, ['--listen', `unix:${sock}`]);
    await socketAppears(sock);
    const s = await open(sock);
    const decoder = new ReturnPathDecoder();
    const seen: RpMessage[] = [];
    let completeAtShut: boolean | undefined;
    s.on('data', (d: Buffer) => {
      decoder.push(d);
      for (let msg = decoder.next(); msg; msg = decoder.next()) {
        seen.push(msg);
        if (msg.type === 'shut') completeAtShut = readInfo(img).complete;
      }
    });
    s.write(stream); // kept open, as QEMU keeps it open while it waits for SHUT
    const r = await run.done;
    s.destroy();
    expect(r.code).toBe(0);
    expect(seen.map((x) => x.type)).toEqual(['pong', 'shut']);
    expect(seen[1]).toMatchObject({ type: 'shut', status: 0 });
    expect(completeAtShut).toBe(true);
    expect(existsSync(sock)).toBe(false);
  });

  it('multifd: a page re-sent on another channel lands after its earlier copy, even when its bytes come first', async () => {
    // Main channel (QEMU 8.1+ layout): three sync points by MULTIFD_FLUSH: in ram START, at a round's end, in ram END.
    const FLUSH = 0x200;
    const main = new StreamBuilder().header().configuration('pc-i440fx-10.0');
    main.sectionStart(1, 2, 'ram', 0, 4).be64(BLOCKS.reduce((n, b) => n + b.lengthBytes, 0) + 4);
    for (const b of BLOCKS) main.str8(b.id).be64(b.lengthBytes);
    main.be64(FLUSH).ramEos(2).ramPart(2).be64(FLUSH).ramEos(2).ramEnd(2).be64(FLUSH).ramEos(2);
    main.device(3, 'timer', new Uint8Array(10)).eof();
    const P = 0;
    const Q = 4096;
    const Z = 8192;
    const sync = () => packet({ flags: 1 });
    // Round 1 (interval 2) on channel 0: P (each packet's page i is filled with byte i + 1: P = 1s) and zero page Z.
    // Round 2 (interval 3) on channel 1: Q = 1s, P = 2s. The last version of P is channel 1's.
    const ch0 = concatBytes([sync(), packet({ block: 'pc.ram', normal: [P], zero: [Z] }), sync(), sync()]);
    const ch1 = concatBytes([encodeInit({ id: 1 }), sync(), sync(), packet({ block: 'pc.ram', normal: [Q, P] }), sync()]);

    const sock = join(dir, 'mfd.sock');
    const img = join(dir, 'mfd.qcow2');
    const run = startSave(img, ['--listen', `unix:${sock}`, '--multifd-channels', '2', '--stats=' + join(dir, 'mfd.json')]);
    await socketAppears(sock);
    const [m, c0, c1] = [await open(sock), await open(sock), await open(sock)];
    // Channel 1's re-send arrives first; channel 0's first copy comes 300 ms later (its init at once: save starts
    // reading once every channel has said which it is).
    c0.write(encodeInit({ id: 0 }));
    c1.end(ch1);
    m.end(main.build());
    await new Promise((r) => setTimeout(r, 300));
    c0.end(ch0);
    const r = await run.done;
    expect(r.code, r.stderr).toBe(0);
    const info = readInfo(img);
    expect(info.complete).toBe(true);
    expect(info).toMatchObject({ dataPages: 2, zeroPages: 1, resentPages: 1 });
    const ram = parseAll(loadStream(img)).ram[0];
    expect(ram.subarray(P, P + 4096).every((x) => x === 2), 'P holds its second version').toBe(true);
    expect(ram.subarray(Q, Q + 4096).every((x) => x === 1)).toBe(true);
    expect(ram.subarray(Z, Z + 4096).every((x) => x === 0)).toBe(true);
    const report = JSON.parse(readFileSync(join(dir, 'mfd.json'), 'utf8')) as SaveReport;
    expect(report.multifd?.syncs).toBe(3);
    expect(existsSync(sock)).toBe(false);
  });

  it('multifd: a channel that closes before a sync point, one past --multifd-channels, one without it, a packet for an unknown block or past its end: one line each', async () => {
    const stream = buildStream(BLOCKS, sequentialOps(BLOCKS, 3), { ramEnd: true }).bytes;
    const cases: [string, string[], Uint8Array[], string][] = [
      ['early', ['--multifd-channels', '1'], [encodeInit({ id: 0 })], 'multifd channel 0 closed before sync point 1 of the main channel'],
      ['past', ['--multifd-channels', '1'], [encodeInit({ id: 1 })], 'QEMU opened multifd channel 1 to SOCK, but --multifd-channels is 1'],
      ['none', [], [encodeInit({ id: 0 })], 'QEMU opened a multifd channel to SOCK: give save --multifd-channels N'],
      ['unknown', ['--multifd-channels', '1'], [concatBytes([encodeInit({ id: 0 }), packet({ block: 'nope', normal: [0] })])], "multifd channel 0: a packet for RAM block 'nope', which the main channel's RAM setup never named"],
      ['beyond', ['--multifd-channels', '1'], [concatBytes([encodeInit({ id: 0 }), packet({ block: 'pc.ram', normal: [24 << 20] })])], "multifd channel 0: a page at offset 25165824 beyond RAM block 'pc.ram' (25165824 bytes)"],
    ];
    for (const [name, args, channels, line] of cases) {
      const sock = join(dir, `${name}.sock`);
      const img = join(dir, `${name}.qcow2`);
      const run = startSave(img, ['--listen', `unix:${sock}`, ...args]);
      await socketAppears(sock);
      const conns = [await open(sock), ...(await Promise.all(channels.map(() => open(sock))))];
      for (const c of conns) c.on('error', () => undefined);
      channels.forEach((bytes, i) => conns[i + 1].end(bytes));
      conns[0].end(stream);
      const r = await run.done;
      for (const c of conns) c.destroy();
      expect(r.code, name).toBe(1);
      const lines = r.stderr.trim().split('\n').filter((l) => !l.includes('listening on'));
      expect(lines, name).toHaveLength(1);
      expect(lines[0], name).toContain(`snap-pipe: save ${img} failed (the image stays incomplete): ${line.replace('SOCK', sock)}`);
      expect(readInfo(img).complete, name).toBe(false);
      expect(existsSync(sock), name).toBe(false);
    }
  });

  it('a TLS session (QEMU with tls-creds) is refused by name', async () => {
    const sock = join(dir, 'tls.sock');
    const img = join(dir, 'tls.qcow2');
    const run = startSave(img, ['--listen', `unix:${sock}`]);
    await socketAppears(sock);
    const c = await open(sock);
    c.on('error', () => undefined);
    c.write(new Uint8Array([0x16, 0x03, 0x01, 0x02, 0x00, 0x01])); // a TLS record header: handshake, version 3.1
    const r = await run.done;
    c.destroy();
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n').filter((l) => !l.includes('listening on'))).toEqual([
      `snap-pipe: save ${img} failed (the image stays incomplete): a TLS session on ${sock} (QEMU's tls-creds): snap-pipe save takes the stream in the clear; a unix socket is local`,
    ]);
    expect(readInfo(img).complete).toBe(false);
  });

  it('a second connection that says nothing fails the save with one line; the image stays incomplete', async () => {
    const stream = buildStream(BLOCKS, sequentialOps(BLOCKS, 3), { ramEnd: true }).bytes;
    const sock = join(dir, 'two.sock');
    const img = join(dir, 'two.qcow2');
    const run = startSave(img, ['--listen', `unix:${sock}`]);
    await socketAppears(sock);
    const first = await open(sock);
    first.on('error', () => undefined);
    first.write(stream.subarray(0, 100)); // the header and some of the configuration, then nothing
    const second = await open(sock);
    second.on('error', () => undefined);
    const r = await run.done;
    first.destroy();
    second.destroy();
    expect(r.code).not.toBe(0);
    const lines = r.stderr.trim().split('\n').filter((l) => !l.includes('listening on'));
    expect(lines).toEqual([
      `snap-pipe: save ${img} failed (the image stays incomplete): QEMU opened one more connection to ${sock} than the main channel and 0 multifd channels (--multifd-channels 0; QEMU's multifd-channels must be the same)`,
    ]);
    const info = readInfo(img);
    expect(info.complete).toBe(false);
    expect(existsSync(sock)).toBe(false);
  });

  it('fails after --accept-timeout when nobody connects, and removes the socket', async () => {
    const sock = join(dir, 'late.sock');
    const img = join(dir, 'late.qcow2');
    const run = startSave(img, ['--listen', `unix:${sock}`, '--accept-timeout', '1']);
    const r = await run.done;
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain(`failed (the image stays incomplete): no connection on ${sock} in 1 s`);
    expect(existsSync(sock)).toBe(false);
  });

  it('refuses a path that is a file or a live socket, and replaces a stale socket', async () => {
    const file = join(dir, 'file.sock');
    writeFileSync(file, 'x');
    const a = await runCli(['save', join(dir, 'f.qcow2'), '--listen', `unix:${file}`]);
    expect(a.code).toBe(2);
    expect(a.stderr.trim()).toBe(`snap-pipe: --listen: ${file} exists and is not a socket; choose another path`);

    const live = join(dir, 'live.sock');
    const server = createServer(() => undefined);
    await new Promise<void>((resolve) => server.listen(live, resolve));
    try {
      const run = startSave(join(dir, 'l.qcow2'), ['--listen', `unix:${live}`]);
      const r = await run.done;
      expect(r.code).toBe(2);
      expect(r.stderr).toContain(`--listen: something already listens on ${live}`);
    } finally {
      server.close();
    }

    const stale = join(dir, 'stale.sock');
    const py = spawnSync('python3', ['-c', 'import socket,sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])', stale]);
    expect(py.status).toBe(0);
    expect(lstatSync(stale).isSocket()).toBe(true);
    const stream = buildStream(BLOCKS, sequentialOps(BLOCKS, 2), { ramEnd: true }).bytes;
    const run = startSave(join(dir, 's.qcow2'), ['--listen', `unix:${stale}`]);
    await run.listening;
    const s = await open(stale);
    s.end(stream);
    expect((await run.done).code).toBe(0);
  });

  it('SIGTERM while waiting for QEMU removes the socket', async () => {
    const sock = join(dir, 'term.sock');
    const run = startSave(join(dir, 't.qcow2'), ['--listen', `unix:${sock}`]);
    await socketAppears(sock);
    run.child.kill('SIGTERM');
    const r = await run.done;
    expect(r.code).toBe(143);
    expect(existsSync(sock)).toBe(false);
  });
});
