#!/usr/bin/env node
// Builds the native addons with node-gyp: build/Release/fastmem.node (CRC-32C and page copies; needs only a C
// compiler) always, and build/Release/uring.node (io_uring) when liburing's header is installed. Without
// liburing-dev it says so in one line: snap-pipe then uses the sync backend.
// A no-op when the addons are newer than their sources. Exits 1 when a build fails.
import { spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const header = ['/usr/include/liburing.h', '/usr/local/include/liburing.h'].find((f) => existsSync(f));
const addons = [join(root, 'build', 'Release', 'fastmem.node')];
if (header) addons.push(join(root, 'build', 'Release', 'uring.node'));
const sources = ['uring.c', 'fastmem.c', 'napi-bytes.h'].map((f) => join(root, 'native', f));
sources.push(join(root, 'binding.gyp'), fileURLToPath(import.meta.url));

function fail(msg) {
  process.stderr.write(`build-native: ${msg}\n`);
  process.exit(1);
}

if (addons.every((a) => existsSync(a))) {
  const builtMs = Math.min(...addons.map((a) => statSync(a).mtimeMs));
  if (sources.every((f) => statSync(f).mtimeMs < builtMs)) process.exit(0);
}

if (!header) {
  process.stderr.write(
    'io_uring backend not built: install liburing-dev (apt-get install liburing-dev); using the sync backend\n',
  );
}

// node-gyp ships inside npm; look next to this node first, then the usual global prefixes.
const nodeGyp = [
  join(dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
  '/usr/lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js',
  '/usr/local/lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js',
  '/usr/share/nodejs/node-gyp/bin/node-gyp.js',
].find((f) => existsSync(f));
if (!nodeGyp) fail('node-gyp not found (it ships with npm); cannot build the native addons');

// Use the installed headers (no download): nodedir is the prefix holding include/node/node_api.h.
const args = [nodeGyp, 'rebuild', '--silent', `--with_uring=${header ? 1 : 0}`];
const nodedir = join(dirname(process.execPath), '..');
if (existsSync(join(nodedir, 'include', 'node', 'node_api.h'))) args.push(`--nodedir=${nodedir}`);

process.stderr.write(`build-native: building the native addons (node-gyp): ${addons.map((a) => a.split('/').pop()).join(', ')}\n`);
const r = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit' });
if (r.status !== 0) {
  // Without liburing only fastmem was asked for; snap-pipe runs without it (JavaScript CRC-32C and copies, slower).
  if (!header) {
    process.stderr.write(`build-native: node-gyp failed (exit ${r.status ?? r.signal}); snap-pipe will use slower JavaScript checksums and copies\n`);
    process.exit(0);
  }
  fail(`node-gyp failed (exit ${r.status ?? r.signal})`);
}
for (const a of addons) if (!existsSync(a)) fail(`node-gyp succeeded but ${a} is missing`);
