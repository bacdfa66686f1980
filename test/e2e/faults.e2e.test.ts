// A save that fails under a real QEMU: the migration must fail (QEMU sees snap-pipe exit non-zero), the source
// VM must keep running, and the image must not look complete.
import { afterEach, describe, expect, test } from 'vitest';
import { Guest } from '../../src/qemu/guest.js';
import { testedQemus } from '../../src/qemu/versions.js';
import { info } from '../helpers/cli.js';
import { saveUri } from '../helpers/e2e.js';
import { mountSmallFs, type SmallFs } from '../helpers/smallfs.js';

let guest: Guest | undefined;
let small: SmallFs | undefined;
afterEach(async () => {
  await guest?.quit();
  guest = undefined;
  small?.unmount();
  small = undefined;
});

describe.each(testedQemus())('snap-pipe save failing under QEMU: $label', (qemu) => {
  test('disk full: the migration fails, the running source goes on, the image is incomplete', async () => {
    small = mountSmallFs(48);
    guest = await Guest.start({ qemu, name: 'fault-full', memMiB: 256, fillMiB: 100 });
    await guest.waitReady();
    await guest.unthrottle();
    const img = `${small.dir}/vm.qcow2`;
    await guest.migrate(saveUri(img));
    const status = await guest.waitMigration(120_000);
    expect(status.status).toBe('failed');
    expect(guest.stderrText()).toMatch(/snap-pipe: .*vm\.qcow2: write of \d+ bytes at offset \d+: ENOSPC/);
    expect((await guest.queryStatus()).status).toBe('running');
    const from = guest.consoleBytes();
    await guest.waitTick(30_000, from); // still ticking after the failed save
    expect((await info(img)).complete).toBe(false);
  }, 180_000);
});
