// An ext4 file system on a loop device made by the test, which the test can shut down mid-operation with
// EXT4_IOC_SHUTDOWN (what xfstests' godown does): from then on ext4 fails every operation on it (open, read, write,
// fsync) with EIO, as a dying disk would, until it is unmounted and mounted again (journal replayed, as after a
// reboot). Device-mapper's error target would be closer to a bad disk, but this kernel has no device-mapper.
// Needs root, as CI has; without it the test fails with the reason (it does not skip).
import { spawnSync } from 'node:child_process';
import { closeSync, mkdirSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/**
 * EXT4_IOC_SHUTDOWN = _IOR('X', 125, __u32) (linux/fs/ext4/ext4.h): direction read (2) << 30, size 4 << 16,
 * type 'X' << 8, number 125 = 0x8004587d.
 */
export const EXT4_IOC_SHUTDOWN = ((2 << 30) | (4 << 16) | ('X'.charCodeAt(0) << 8) | 125) >>> 0;

/** EXT4_GOING_FLAGS_*: how the file system goes down. */
export const SHUTDOWN_FLAGS = {
  /** DEFAULT (0): freeze (everything written so far reaches the disk), then shut down. */
  sync: 0,
  /** LOGFLUSH (1): commit the journal, then shut down; data not yet written back is lost. */
  logflush: 1,
  /** NOLOGFLUSH (2): shut down at once, as if the disk died; the journal's open transaction is lost. */
  nologflush: 2,
} as const;

export interface LoopFs {
  /** Where the file system is mounted. */
  dir: string;
  /** /dev/loopN. */
  device: string;
  /** From now on every operation on the file system fails (EIO). */
  shutdown(how?: keyof typeof SHUTDOWN_FLAGS): void;
  /** Unmount and mount again: the file system works again, holding what reached its disk (after a shutdown too). */
  remount(): void;
  /** Unmount, detach the loop device, remove the files; safe to call twice and after a failure part way. */
  cleanup(): void;
}

function run(cmd: string, args: string[]): { ok: boolean; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 30_000 });
  return { ok: r.status === 0, out: `${cmd} ${args.join(' ')}: ${(r.stderr || r.stdout || r.error?.message || `exit ${r.status}`).trim()}` };
}

function must(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 30_000 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${(r.stderr || r.error?.message || `exit ${r.status}`).trim()}`);
  return r.stdout.trim();
}

/** Makes a sparse file of `sizeMiB`, ext4 on it through a loop device, and mounts it. */
export function mountLoopFs(sizeMiB: number): LoopFs {
  if (process.getuid?.() !== 0) throw new Error('this test mounts an ext4 file system on a loop device and needs root');
  const base = mkdtempSync(join(tmpdir(), 'snap-pipe-loopfs-'));
  const backing = join(base, 'disk.img');
  const dir = join(base, 'mnt');
  let device = '';
  let mounted = false;
  let cleaned = false;

  const fs: LoopFs = {
    dir,
    get device() {
      return device;
    },
    shutdown(how = 'sync') {
      const flags = SHUTDOWN_FLAGS[how];
      // Node has no ioctl(2); python3 does (fcntl.ioctl with a 4-byte argument: the flags as a native u32).
      const py = 'import fcntl, os, struct, sys\n' +
        'fd = os.open(sys.argv[1], os.O_RDONLY)\n' +
        'fcntl.ioctl(fd, int(sys.argv[2]), bytearray(struct.pack("=I", int(sys.argv[3]))))\n';
      must('python3', ['-c', py, dir, String(EXT4_IOC_SHUTDOWN), String(flags)]);
    },
    remount() {
      must('umount', [dir]);
      mounted = false;
      must('mount', ['-t', 'ext4', device, dir]);
      mounted = true;
    },
    cleanup() {
      if (cleaned) return;
      cleaned = true;
      const problems: string[] = [];
      if (mounted) {
        // A process still holding a file there (a save that hung) makes umount fail: detach lazily then.
        const u = run('umount', [dir]);
        if (!u.ok) {
          problems.push(u.out);
          const lazy = run('umount', ['-l', dir]);
          if (!lazy.ok) problems.push(lazy.out);
        }
      }
      if (device) {
        const d = run('losetup', ['-d', device]);
        if (!d.ok) problems.push(d.out);
      }
      rmSync(base, { recursive: true, force: true });
      if (problems.length > 0) throw new Error(`cleaning up the loop file system: ${problems.join('; ')}`);
    },
  };

  try {
    closeSync(openSync(backing, 'w'));
    must('truncate', ['-s', `${sizeMiB}M`, backing]);
    // 4 KiB blocks as on a real disk (mkfs picks 1 KiB for small file systems); no lazy init writing behind the test.
    must('mkfs.ext4', ['-q', '-F', '-b', '4096', '-E', 'lazy_itable_init=0,lazy_journal_init=0', backing]);
    device = must('losetup', ['--find', '--show', backing]);
    mkdirSync(dir);
    must('mount', ['-t', 'ext4', device, dir]);
    mounted = true;
  } catch (err) {
    try {
      fs.cleanup();
    } catch {
      // the first failure is the one to report
    }
    throw err;
  }
  return fs;
}
