#!/usr/bin/env node
// Installs what `npm test` and `npm run demo` need on a fresh Debian 12 machine with Node 20:
// npm packages, the Debian packages (when running as root; otherwise names them and fails),
// the TypeScript build, the guest (kernel + initramfs) used by the end-to-end tests and the demo, and the other
// QEMUs the end-to-end tests run against (10.0 from bookworm-backports, 5.2 from bullseye, unpacked under
// .cache/qemu/: scripts/qemu.sh).
// Idempotent: each step is skipped when its result is already present.
import { spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const forWhat = process.argv.includes('--for') ? process.argv[process.argv.indexOf('--for') + 1] : 'build';

// Debian package -> a file it installs, to test presence without dpkg's locks.
const debianPackages = [
  ['qemu-system-x86', '/usr/bin/qemu-system-x86_64'],
  ['qemu-utils', '/usr/bin/qemu-img'],
  ['liburing-dev', '/usr/include/liburing.h'],
  ['busybox-static', '/bin/busybox'],
  ['cpio', '/usr/bin/cpio'],
  ['fio', '/usr/bin/fio'],
];

function log(msg) {
  process.stderr.write(`setup: ${msg}\n`);
}

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { stdio: 'inherit', cwd: root, ...opts });
  if (r.status !== 0) {
    log(`'${cmd} ${args.join(' ')}' failed (exit ${r.status ?? r.signal})`);
    process.exit(1);
  }
}

function ensureDebianPackages() {
  const missing = debianPackages.filter(([, file]) => !existsSync(file)).map(([pkg]) => pkg);
  if (missing.length === 0) return;
  if (process.getuid?.() !== 0) {
    log(`missing Debian packages: ${missing.join(' ')}`);
    log(`install them with: sudo apt-get install -y ${missing.join(' ')}`);
    process.exit(1);
  }
  log(`installing Debian packages: ${missing.join(' ')}`);
  run('apt-get', ['update', '-q']);
  run('apt-get', ['install', '-y', '-q', '--no-install-recommends', ...missing], {
    env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
  });
}

function newer(a, b) {
  return existsSync(a) && (!existsSync(b) || statSync(a).mtimeMs > statSync(b).mtimeMs);
}

function ensureNodeModules() {
  const marker = join(root, 'node_modules', '.package-lock.json');
  if (existsSync(marker) && !newer(join(root, 'package-lock.json'), marker)) return;
  log('installing npm packages');
  // `npm install`, not `npm ci`: npm 11 writes lock files without other platforms' optional packages (rollup's
  // native builds) and then refuses them in `npm ci`. install follows the lock and leaves it as it is here.
  run('npm', ['install', '--no-audit', '--no-fund']);
}

function build() {
  log('building (tsc)');
  run(join(root, 'node_modules', '.bin', 'tsc'), ['-p', 'tsconfig.json']);
}

function buildNative() {
  run(process.execPath, [join(root, 'scripts', 'build-native.mjs')]);
}

function ensureGuest() {
  run('bash', [join(root, 'scripts', 'guest.sh')]);
}

/** The QEMUs besides the machine's own (tools/qemu/versions.ts CACHED_QEMUS). */
function ensureOtherQemus() {
  for (const name of ['10.0', '5.2']) run('bash', [join(root, 'scripts', 'qemu.sh'), name]);
}

ensureDebianPackages();
ensureNodeModules();
build();
buildNative();
if (forWhat === 'test' || forWhat === 'demo') {
  ensureGuest();
  ensureOtherQemus();
}
