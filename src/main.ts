// snap-pipe's command line: dispatch to commands/, and the only place that exits.
//   save IMG     QEMU's migration stream on stdin -> QCOW2 image (commands/save.ts; stdout only for QEMU's return path)
//   load IMG     image -> migration stream on stdout (commands/load.ts; --postcopy serves QEMU's page requests)
//   info IMG     what an image holds (commands/info.ts)
//   verify IMG   structure and every checksum (commands/verify.ts)
import { usage } from './commands/args.js';
import { cmdSave } from './commands/save.js';
import { SnapPipeError } from './errors.js';
import { printable } from './format/text.js';
import { printErr, printOut, tellErr } from './output.js';
import { VERSION } from './version.js';

const EXIT_USAGE = 2;

const MAIN_HELP = `snap-pipe ${VERSION}: save and restore QEMU VM memory through the migration stream

usage: snap-pipe COMMAND [options]

commands:
  save IMG      store the migration stream read from stdin in IMG (QCOW2, 1 MiB clusters)
  load IMG      write the migration stream stored in IMG to stdout (for migrate_incoming exec:)
  info IMG      show what IMG holds (--json for JSON)
  verify IMG    read all of IMG, check its structure and every checksum (exit 0 only if sound)
  help COMMAND  show a command's options

'snap-pipe COMMAND --help' shows each command's options.
`;


// load, verify and info are imported when run: save (under QEMU, whose migration waits for it) starts ~30 ms sooner
// without compiling their modules.
async function cmdInfo(argv: string[]): Promise<number> {
  return (await import('./commands/info.js')).cmdInfo(argv);
}

async function cmdLoad(argv: string[]): Promise<number> {
  return (await import('./commands/load.js')).cmdLoad(argv);
}

async function cmdVerify(argv: string[]): Promise<number> {
  return (await import('./commands/verify.js')).cmdVerify(argv);
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'save':
      return cmdSave(rest);
    case 'load':
      return cmdLoad(rest);
    case 'verify':
      return cmdVerify(rest);
    case 'info':
      return cmdInfo(rest);
    case 'help':
      if (rest.length > 1) return usage(`help: unexpected argument '${rest[1]}'`);
      switch (rest[0]) {
        case 'save':
          return cmdSave(['--help']);
        case 'load':
          return cmdLoad(['--help']);
        case 'info':
          return cmdInfo(['--help']);
        case 'verify':
          return cmdVerify(['--help']);
        case undefined:
          printOut(MAIN_HELP);
          return 0;
        default:
          return usage(`help: unknown command '${rest[0]}' (see snap-pipe --help)`);
      }
    case '--help':
    case '-h':
      printOut(MAIN_HELP);
      return 0;
    case '--version':
      printOut(`snap-pipe ${VERSION}\n`);
      return 0;
    case undefined:
      printErr(MAIN_HELP);
      return EXIT_USAGE;
    default:
      return usage(`unknown command '${command}' (see snap-pipe --help)`);
  }
}

// Every print above is complete when its call returns (output.ts), so nothing is lost to process.exit(), which ends
// the process without waiting for writes Node still holds.
main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    if (err instanceof SnapPipeError) {
      // One line: a name read from an image or a stream may hold a newline or a terminal's control sequence.
      tellErr(`snap-pipe: ${printable(err.message)}\n`);
      process.exit(err.code === 'USAGE' ? EXIT_USAGE : 1);
    }
    tellErr(`snap-pipe: internal error: ${(err as Error)?.stack ?? String(err)}\n`);
    process.exit(1);
  },
);
