// The COMMAND sections load --postcopy sends, byte for byte as QEMU 7.2 writes them (savevm.c
// qemu_savevm_command_send and the qemu_savevm_send_* functions), and what goes into the PACKAGED command.
import { describe, expect, it } from 'vitest';
import {
  adviseCommand,
  deviceSectionsEnd,
  discardCommand,
  listenCommand,
  openReturnPathCommand,
  packagedCommand,
  pingCommand,
  postcopyPackage,
  runCommand,
} from '../../src/format/stream/commands.js';
import { StreamBuilder } from '../../src/format/stream/encoder.js';

describe('postcopy stream pieces', () => {
  it('commands as QEMU 7.2 writes them', () => {
    expect(Buffer.from(adviseCommand()).toString('hex')).toBe('0800030010' + '0000000000001000' + '0000000000001000');
    expect(Buffer.from(pingCommand(3)).toString('hex')).toBe('080002000400000003');
    const name = 'pc.ram';
    expect(Buffer.from(discardCommand(name, [[0x2000, 0x3000], [2 ** 33, 4096]])).toString('hex')).toBe(
      '080006' + '0029' + '00' + '06' + Buffer.from('pc.ram').toString('hex') + '00' +
        '0000000000002000' + '0000000000003000' + '0000000200000000' + '0000000000001000',
    );
  });

  it('finds the end of the device sections before EOF + VMDESCRIPTION, or before a bare EOF', () => {
    const b = new StreamBuilder().device(3, 'timer', new Uint8Array([0, 6, 0, 0, 0, 2]));
    const sectionsOnly = b.build().slice();
    const withDesc = new StreamBuilder().bytes(sectionsOnly).eof().build();
    expect(deviceSectionsEnd(withDesc)).toBe(sectionsOnly.length);
    const bare = new StreamBuilder().bytes(sectionsOnly).eof(undefined).build();
    expect(deviceSectionsEnd(bare)).toBe(sectionsOnly.length);
    expect(sectionsOnly[sectionsOnly.length - 1]).not.toBe(0);
    expect(() => deviceSectionsEnd(sectionsOnly)).toThrow(/does not end with EOF/);
  });
});

describe('the other commands and the package', () => {
  it('OPEN_RETURN_PATH, LISTEN and RUN carry no payload; PACKAGED carries the package length', () => {
    expect(Buffer.from(openReturnPathCommand()).toString('hex')).toBe('0800010000');
    expect(Buffer.from(listenCommand()).toString('hex')).toBe('0800040000');
    expect(Buffer.from(runCommand()).toString('hex')).toBe('0800050000');
    expect(Buffer.from(packagedCommand(0x12345)).toString('hex')).toBe('080007000400012345');
  });

  it('a discard names its block as the parser reads it (latin1) and takes 1 to 12 ranges', () => {
    const hex = Buffer.from(discardCommand('r\xe9m', [[0, 4096]])).toString('hex');
    expect(hex.slice(0, 22)).toBe('080006' + '0016' + '00' + '03' + '72e96d' + '00');
    expect(() => discardCommand('pc.ram', [])).toThrow(RangeError);
    expect(() => discardCommand('pc.ram', Array.from({ length: 13 }, (_, i): [number, number] => [i * 8192, 4096]))).toThrow(RangeError);
  });

  it('the package is LISTEN, the device sections, PING, RUN', () => {
    const dev = new StreamBuilder().device(3, 'timer', new Uint8Array([1, 2, 3])).build();
    const pkg = postcopyPackage(dev, 3);
    expect(Buffer.compare(pkg, Buffer.concat([listenCommand(), dev, pingCommand(3), runCommand()]))).toBe(0);
    expect(pkg.length).toBe(5 + dev.length + 9 + 5);
  });
});
