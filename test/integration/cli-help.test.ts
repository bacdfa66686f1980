// `snap-pipe help COMMAND` through the real CLI (built dist/): the same help as `COMMAND --help`, on stdout, exit 0,
// for every command; an unknown one is a usage error (exit 2, one line).
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { ROOT, runCli } from '../helpers/cli.js';

beforeAll(() => {
  if (!existsSync(join(ROOT, 'dist', 'main.js'))) throw new Error('dist/ is missing: run npm run build');
});

describe('snap-pipe help COMMAND', () => {
  for (const command of ['save', 'load', 'info', 'verify']) {
    it(`help ${command} shows what ${command} --help shows`, async () => {
      const viaHelp = await runCli(['help', command]);
      expect(viaHelp.code, viaHelp.stderr).toBe(0);
      expect(viaHelp.stderr).toBe('');
      expect(viaHelp.stdout).toMatch(new RegExp(`^usage: snap-pipe ${command} IMG`, 'm'));
      const viaFlag = await runCli([command, '--help']);
      expect(viaFlag.code, viaFlag.stderr).toBe(0);
      expect(viaHelp.stdout).toBe(viaFlag.stdout);
    });
  }

  it('help alone shows the command list', async () => {
    const r = await runCli(['help']);
    expect(r.code).toBe(0);
    for (const command of ['save', 'load', 'info', 'verify']) expect(r.stdout).toMatch(new RegExp(`^  ${command} IMG`, 'm'));
  });

  it('help for an unknown command, or two of them: exit 2, one line', async () => {
    for (const [args, error] of [
      [['help', 'frobnicate'], /^snap-pipe: help: unknown command 'frobnicate'/],
      [['help', 'save', 'load'], /^snap-pipe: help: unexpected argument 'load'/],
    ] as const) {
      const r = await runCli([...args]);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stdout).toBe('');
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(error);
    }
  });
});
