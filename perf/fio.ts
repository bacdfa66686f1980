// The disk's limit, measured the same way by every bench: fio with 1 MiB direct requests through io_uring, 16 in
// flight, its figures as JSON.

/** fio's command line for `op` over the first `sizeMiB` MiB of `file` (a path already quoted for the shell). */
export function fioCommand(op: 'write' | 'read', file: string, sizeMiB: number): string {
  const readOnly = op === 'read' ? ' --readonly' : '';
  return `fio --name=${op} --filename=${file}${readOnly} --rw=${op} --bs=1M --direct=1 --ioengine=io_uring --iodepth=16 --size=${sizeMiB}M --output-format=json`;
}
