import { readFileSync } from 'node:fs';

/** snap-pipe's version, from package.json (one level above dist/ and src/). */
export const VERSION: string = (() => {
  try {
    return (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;
  } catch {
    return 'unknown';
  }
})();
