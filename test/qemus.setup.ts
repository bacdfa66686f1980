// Vitest global setup: names the QEMUs the end-to-end suites run against, once at the start of every run, so the
// log says which versions were tested. Fails the run (never skips) when one of them is missing.
import { testedQemus } from '../tools/qemu/versions.js';

export default function setup(): void {
  const qemus = testedQemus();
  process.stdout.write(`end-to-end tests run under ${qemus.map((q) => `${q.label} (${q.system})`).join(' and ')}\n`);
}
