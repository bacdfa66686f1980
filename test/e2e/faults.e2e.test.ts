// A save that fails under a real QEMU while QEMU is still writing: the migration fails (QEMU's next write to the
// exited snap-pipe fails with EPIPE; it never reads the exit status), the source VM keeps running, and the image
// does not look complete and says why.
import { afterEach, describe, expect, test } from 'vitest';
import { Guest } from '../../tools/qemu/guest.js';
import { testedQemus } from '../../tools/qemu/versions.js';
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
    // The line on QEMU's stderr names the image and the cause; the image records the cause.
    expect(guest.stderrText()).toMatch(/snap-pipe: save \S*vm\.qcow2 failed \(the image stays incomplete\): write of \d+ bytes at offset \d+: ENOSPC/);
    expect((await guest.queryStatus()).status).toBe('running');
    const from = guest.consoleBytes();
    await guest.waitTick(30_000, from); // still ticking after the failed save
    const inf = await info(img);
    expect(inf.complete).toBe(false);
    expect(inf.failure).toMatch(/^write of \d+ bytes at offset \d+: ENOSPC/);
  }, 180_000);
});
