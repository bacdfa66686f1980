// A `snap-pipe save --listen` child for the tests: when it says it listens, and how it ended (bounded: a save
// still running after `timeoutMs` is killed and the wait fails). And a recording destination: a listener that
// keeps every connection's bytes and sends nothing (as a multifd destination, which sends nothing back).
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer, type Server, type Socket } from 'node:net';

export interface ListeningSave {
  child: ChildProcess;
  /** Resolves when save says it listens (its stderr line). */
  listening: Promise<void>;
  done: Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>;
}

/** Starts `node BIN save ARGS` (ARGS holding --listen); nothing on its stdin or stdout. */
export function startListeningSave(bin: string, args: string[], timeoutMs: number): ListeningSave {
  const child = spawn(process.execPath, [bin, 'save', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  let said: () => void = () => undefined;
  const listening = new Promise<void>((resolve) => (said = resolve));
  child.stderr!.on('data', (d) => {
    stderr += d;
    if (stderr.includes('listening on unix:')) said();
  });
  const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`save did not exit within ${timeoutMs} ms: ${stderr}`));
    }, timeoutMs);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stderr });
    });
  });
  return { child, listening, done };
}

/** Each accepted connection's bytes, in accept order. */
export interface Capture {
  conns: Uint8Array[];
}

/** Accepts every connection on `path` and keeps its bytes until it ends; sends nothing. */
export function recordConnections(path: string): Promise<{ server: Server; done: (timeoutMs: number) => Promise<Capture> }> {
  const chunks: Buffer[][] = [];
  const ended: Promise<void>[] = [];
  const server = createServer((sock: Socket) => {
    const mine: Buffer[] = [];
    chunks.push(mine);
    sock.on('data', (b: Buffer) => mine.push(b));
    ended.push(new Promise((resolve) => sock.on('close', () => resolve())));
  });
  const done = async (timeoutMs: number): Promise<Capture> => {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`connections still open ${timeoutMs} ms after the migration`)), timeoutMs);
    });
    try {
      await Promise.race([Promise.all(ended), timeout]);
    } finally {
      clearTimeout(timer);
      server.close();
    }
    return { conns: chunks.map((c) => new Uint8Array(Buffer.concat(c))) };
  };
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => resolve({ server, done }));
  });
}
