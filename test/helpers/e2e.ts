// Shared pieces of the end-to-end tests: exec: URIs for snap-pipe; the dump comparison lives in tools/qemu/compare.ts.
import { shellQuote, snapPipeBin } from '../../tools/qemu/guest.js';

export function saveUri(img: string, args: string[] = []): string {
  return `exec:${[snapPipeBin(), 'save', img, ...args].map(shellQuote).join(' ')}`;
}

export function loadUri(img: string, args: string[] = []): string {
  return `exec:${[snapPipeBin(), 'load', img, ...args].map(shellQuote).join(' ')}`;
}

export { firstDifference, LEGACY_WINDOW } from '../../tools/qemu/compare.js';
