// A `snap-pipe save --listen` child for the tests: when it says it listens, and how it ended (bounded: a save
// still running after `timeoutMs` is killed and the wait fails).
import { spawn, type ChildProcess } from 'node:child_process';

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
