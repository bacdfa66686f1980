#!/usr/bin/env node
// Builds the io_uring addon (build/Release/uring.node) with node-gyp when liburing's header is installed.
// Without liburing-dev it says so in one line and exits 0: snap-pipe then uses the sync backend.
// A no-op when the .node is newer than its sources. Exits 1 when liburing is there but the build fails.
import { spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const addon = join(root, 'build', 'Release', 'uring.node');
const sources = [join(root, 'native', 'uring.c'), join(root, 'binding.gyp'), fileURLToPath(import.meta.url)];
const header = ['/usr/include/liburing.h', '/usr/local/include/liburing.h'].find((f) => existsSync(f));

function fail(msg) {
  process.stderr.write(`build-native: ${msg}\n`);
  process.exit(1);
}

if (existsSync(addon)) {
  const builtMs = statSync(addon).mtimeMs;
  if (sources.every((f) => statSync(f).mtimeMs < builtMs)) process.exit(0);
}

if (!header) {
  process.stderr.write(
    'io_uring backend not built: install liburing-dev (apt-get install liburing-dev); using the sync backend\n',
  );
  process.exit(0);
}

// node-gyp ships inside npm; look next to this node first, then the usual global prefixes.
const nodeGyp = [
  join(dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
  '/usr/lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js',
  '/usr/local/lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js',
  '/usr/share/nodejs/node-gyp/bin/node-gyp.js',
].find((f) => existsSync(f));
if (!nodeGyp) fail('node-gyp not found (it ships with npm); cannot build the io_uring addon');

// Use the installed headers (no download): nodedir is the prefix holding include/node/node_api.h.
const args = [nodeGyp, 'rebuild', '--silent'];
const nodedir = join(dirname(process.execPath), '..');
if (existsSync(join(nodedir, 'include', 'node', 'node_api.h'))) args.push(`--nodedir=${nodedir}`);

process.stderr.write('build-native: building the io_uring addon (node-gyp)\n');
const r = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit' });
if (r.status !== 0) fail(`node-gyp failed (exit ${r.status ?? r.signal})`);
if (!existsSync(addon)) fail(`node-gyp succeeded but ${addon} is missing`);
