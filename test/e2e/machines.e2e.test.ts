// Machines as users run them, not only the minimal one: a q35 machine with 2 vCPUs, two NUMA nodes each backed by a
// memory-backend-ram object (two RAM blocks for guest memory), virtio-net, virtio-rng, virtio-balloon, an xHCI
// tablet and VGA, under each tested QEMU; and a 4 GiB guest, whose RAM the PCI hole splits in two. Each is saved
// paused, and every guest-physical range of RAM and ROM (QEMU's own flat view) is compared byte for byte with its
// RAM block in the image, then with the same range of a fresh QEMU the image was loaded into (precopy, and postcopy
// for q35), which then runs on.
// Fails (never skips) when a QEMU, the guest files or the build are missing.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import { Guest, guestFiles, snapPipeBin, type GuestOptions } from '../../tools/qemu/guest.js';
import { cachedQemu, testedQemus, type Qemu } from '../../tools/qemu/versions.js';
import { info, qemuImg } from '../helpers/cli.js';
import { loadUri, saveUri } from '../helpers/e2e.js';
import { dumpRanges, expectRangesMatchImage, expectSameRanges, type RangeDumps } from '../helpers/memory.js';

const MiB = 1024 * 1024;

/** q35, 2 vCPUs, a NUMA node per vCPU with its own memory backend, and the devices a desktop-ish VM has. */
const Q35_ARGS = [
  '-smp', '2',
  '-object', 'memory-backend-ram,id=mem0,size=256M',
  '-object', 'memory-backend-ram,id=mem1,size=256M',
  '-numa', 'node,nodeid=0,memdev=mem0,cpus=0',
  '-numa', 'node,nodeid=1,memdev=mem1,cpus=1',
  '-netdev', 'user,id=n0', '-device', 'virtio-net-pci,netdev=n0',
  '-device', 'virtio-rng-pci',
  '-device', 'virtio-balloon-pci',
  '-device', 'qemu-xhci', '-device', 'usb-tablet',
  '-vga', 'std',
];

/**
 * Boots `opts`, saves it paused through snap-pipe, and checks the image against the guest range by range; then
 * restores it into a fresh QEMU of the same options per `modes` and checks that guest the same way, and that it runs.
 */
class MachineRun {
  dir = mkdtempSync(join(tmpdir(), 'snap-pipe-machines-'));
  guests: Guest[] = [];
  img = join(this.dir, 'vm.qcow2');
  raw = join(this.dir, 'vm.raw');
  source!: RangeDumps;
  imageInfo!: Awaited<ReturnType<typeof info>>;

  constructor(readonly opts: GuestOptions) {}

  async start(extra: Partial<GuestOptions>): Promise<Guest> {
    const g = await Guest.start({ ...this.opts, ...extra });
    this.guests.push(g);
    return g;
  }

  async save(blocks: string[]): Promise<void> {
    const src = await this.start({ name: `${this.opts.name}-src` });
    await src.waitReady(300_000);
    await src.stop();
    this.source = await dumpRanges(src, this.dir, 'src');
    await src.unthrottle();
    const t0 = Date.now();
    await src.migrate(saveUri(this.img));
    const m = await src.waitMigration(300_000);
    if (m.status !== 'completed') throw src.failure(`save ${m.status}: ${m['error-desc'] ?? '?'}`);
    const ms = Date.now() - t0;
    await src.quit();
    expect(qemuImg(['check', this.img]).code).toBe(0);
    this.imageInfo = await info(this.img);
    expect(this.imageInfo.complete).toBe(true);
    const conv = qemuImg(['convert', '-O', 'raw', this.img, this.raw]);
    expect(conv.code, conv.out).toBe(0);
    const compared = await expectRangesMatchImage(this.source, { blocks: this.imageInfo.blocks! }, this.raw, blocks);
    const mapped = [...compared].map(([id, bytes]) => `${id} ${Math.round(bytes / MiB)} MiB`).join(', ');
    console.log(`${this.opts.qemu!.label} ${this.opts.name}: saved in ${ms} ms; ${this.imageInfo.blocks!.length} RAM blocks; compared with pmemsave: ${mapped}`);
  }

  async restore(mode: 'precopy' | 'postcopy'): Promise<void> {
    const dst = await this.start({ name: `${this.opts.name}-${mode}`, incoming: true });
    if (mode === 'postcopy') await dst.setCapabilities({ 'postcopy-ram': true });
    await dst.migrateIncoming(loadUri(this.img, mode === 'postcopy' ? ['--postcopy'] : []));
    const m = await dst.waitMigration(300_000);
    if (m.status !== 'completed') throw dst.failure(`${mode} load ${m.status}: ${m['error-desc'] ?? '?'}`);
    expect(dst.stderrText()).not.toMatch(/snap-pipe:/);
    const restored = await dumpRanges(dst, this.dir, mode);
    await expectSameRanges(this.source, restored);
    for (const f of restored.files) rmSync(f);
    const from = dst.consoleBytes();
    await dst.cont();
    await dst.waitTick(60_000, from);
    await dst.quit();
  }

  async close(): Promise<void> {
    for (const g of this.guests.splice(0)) await g.quit();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

describe.each(testedQemus())('a q35 machine: 2 vCPUs, two NUMA nodes on two memory backends, virtio-net/rng/balloon, xHCI tablet, VGA: $label', (qemu: Qemu) => {
  let run: MachineRun;

  beforeAll(async () => {
    guestFiles();
    snapPipeBin();
    run = new MachineRun({ qemu, name: 'q35', memMiB: 512, fillMiB: 200, machine: 'q35', extraArgs: Q35_ARGS });
    await run.save(['mem0', 'mem1']);
  }, 600_000);

  afterEach(async () => {
    for (const g of run.guests.splice(0)) await g.quit();
  });

  afterAll(async () => {
    await run?.close();
  });

  test('the image holds each NUMA node\'s backend as a RAM block of its own, and every mapped range of every block byte for byte', () => {
    const ids = run.imageInfo.blocks!.map((b) => b.id);
    expect(ids).toEqual(expect.arrayContaining(['mem0', 'mem1', 'pc.bios']));
    expect(ids.some((id) => id.endsWith('/vga.vram')), ids.join(', ')).toBe(true);
    expect(ids.some((id) => id.endsWith('/virtio-net-pci.rom')), ids.join(', ')).toBe(true);
    for (const id of ['mem0', 'mem1']) expect(run.imageInfo.blocks!.find((b) => b.id === id)!.lengthBytes).toBe(256 * MiB);
    expect(run.imageInfo.machineType).toMatch(/^pc-q35-/);
  });

  test('restored by precopy into the same machine: every range byte for byte, and it runs', async () => {
    await run.restore('precopy');
  }, 600_000);

  test('restored by postcopy into the same machine: every range byte for byte, and it runs', async () => {
    await run.restore('postcopy');
  }, 600_000);
});

describe('a 4 GiB guest, its RAM split by the PCI hole: QEMU 10.0', () => {
  let run: MachineRun;

  beforeAll(() => {
    guestFiles();
    snapPipeBin();
  });

  afterAll(async () => {
    await run?.close();
  });

  test('saved and restored by precopy: both parts of pc.ram (below 4 GiB and above it) byte for byte, and it runs', async () => {
    run = new MachineRun({ qemu: cachedQemu('10.0'), name: 'big', memMiB: 4096, fillMiB: 512 });
    await run.save(['pc.ram']);
    // pc.ram really is split: one range below the PCI hole, one from 4 GiB on.
    const pcRam = run.source.ranges.filter((r) => r.region === 'pc.ram');
    expect(pcRam.some((r) => r.gpa >= 4 * 1024 * MiB), JSON.stringify(pcRam)).toBe(true);
    expect(pcRam.reduce((n, r) => n + r.bytes, 0)).toBeGreaterThan(4000 * MiB);
    await run.restore('precopy');
  }, 900_000);
});
