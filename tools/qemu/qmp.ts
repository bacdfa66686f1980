// A small QMP client over a unix socket: greeting, qmp_capabilities, execute (errors thrown with QEMU's message),
// events collected. Every wait is bounded. Used by the end-to-end tests and the demo, never by snap-pipe itself.
import { connect, type Socket } from 'node:net';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

/** A command QEMU answered with {"error": {...}}: `qmpClass` is QEMU's error class, the message its desc. */
export class QmpError extends Error {
  readonly qmpClass: string;
  readonly command: string;
  constructor(command: string, qmpClass: string, desc: string) {
    super(`QMP ${command}: ${desc} (${qmpClass})`);
    this.name = 'QmpError';
    this.qmpClass = qmpClass;
    this.command = command;
  }
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

const eventsMax = 10_000; // bound on collected events; the oldest are dropped beyond it
const lineBytesMax = 64 * 1024 * 1024;

export const qmpExecuteTimeoutMsDefault = 30_000;

export class QmpClient {
  /** Events received so far (oldest first, at most eventsMax). */
  readonly events: QmpEvent[] = [];
  readonly greeting: Record<string, unknown>;

  private readonly socket: Socket;
  private readonly pending = new Map<number, Pending>();
  private readonly eventWaiters = new Set<() => void>();
  private nextId = 1;
  private closedError: Error | null = null;

  private constructor(socket: Socket, greeting: Record<string, unknown>, rest: string) {
    this.socket = socket;
    this.greeting = greeting;
    let buffered = rest;
    socket.on('data', (chunk: Buffer) => {
      buffered += chunk.toString('utf8');
      if (buffered.length > lineBytesMax) {
        this.fail(new Error(`QMP: a line longer than ${lineBytesMax} bytes`));
        return;
      }
      let nl: number;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, nl).trim();
        buffered = buffered.slice(nl + 1);
        if (line.length > 0) this.onLine(line);
      }
    });
    socket.on('error', (err) => this.fail(new Error(`QMP socket error: ${err.message}`)));
    socket.on('close', () => this.fail(new Error('QMP connection closed by QEMU')));
    socket.resume();
    if (buffered.includes('\n')) socket.emit('data', Buffer.alloc(0));
  }

  /**
   * Connects to QEMU's QMP socket, retrying while QEMU creates it (bounded by timeoutMs), reads the greeting and
   * negotiates capabilities.
   */
  static async connect(socketPath: string, timeoutMs = 30_000): Promise<QmpClient> {
    const deadline = Date.now() + timeoutMs;
    let lastErr: Error | null = null;
    while (Date.now() < deadline) {
      try {
        const { socket, greeting, rest } = await openAndGreet(socketPath, Math.max(1, deadline - Date.now()));
        const client = new QmpClient(socket, greeting, rest);
        await client.execute('qmp_capabilities', undefined, Math.max(1_000, deadline - Date.now()));
        return client;
      } catch (err) {
        lastErr = err as Error;
        const code = (err as NodeJS.ErrnoException).code;
        if (code !== 'ENOENT' && code !== 'ECONNREFUSED') throw err;
        await delay(50); // polling for the socket QEMU is about to create
      }
    }
    throw new Error(`QMP: cannot connect to ${socketPath} within ${timeoutMs} ms (${lastErr?.message ?? 'timeout'})`);
  }

  /** Runs a command; resolves with its `return` value, rejects with QmpError (QEMU's message) or on timeout. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = qmpExecuteTimeoutMsDefault): Promise<T> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId++;
    const msg: Record<string, unknown> = { execute: command, id };
    if (args !== undefined) msg.arguments = args;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`QMP ${command}: no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.socket.write(JSON.stringify(msg) + '\n');
    });
  }

  /** Waits for an event named `name` received after index `fromIndex` of `events`; returns it. */
  async waitEvent(name: string, timeoutMs: number, fromIndex = 0): Promise<QmpEvent> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = this.events.slice(fromIndex).find((e) => e.event === name);
      if (found) return found;
      if (this.closedError) throw this.closedError;
      const remainingMs = deadline - Date.now();
      if (remainingMs <= 0) throw new Error(`QMP: no ${name} event within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const done = (): void => {
          clearTimeout(timer);
          this.eventWaiters.delete(done);
          resolve();
        };
        const timer = setTimeout(done, remainingMs);
        this.eventWaiters.add(done);
      });
    }
  }

  get closed(): boolean {
    return this.closedError !== null;
  }

  close(): void {
    this.fail(new Error('QMP connection closed'));
    this.socket.destroy();
  }

  private onLine(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      this.fail(new Error(`QMP: unparsable line from QEMU: ${line.slice(0, 200)}`));
      return;
    }
    if (typeof msg.event === 'string') {
      this.events.push(msg as unknown as QmpEvent);
      if (this.events.length > eventsMax) this.events.splice(0, this.events.length - eventsMax);
      const waiters = [...this.eventWaiters];
      this.eventWaiters.clear();
      for (const w of waiters) w();
      return;
    }
    const id = typeof msg.id === 'number' ? msg.id : -1;
    const p = this.pending.get(id);
    if (!p) return; // an answer to a command that already timed out
    this.pending.delete(id);
    clearTimeout(p.timer);
    if (msg.error && typeof msg.error === 'object') {
      const e = msg.error as { class?: string; desc?: string };
      p.reject(new QmpError(p.command, e.class ?? 'GenericError', e.desc ?? JSON.stringify(msg.error)));
    } else {
      p.resolve(msg.return);
    }
  }

  private fail(err: Error): void {
    if (this.closedError) return;
    this.closedError = err;
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(new Error(`QMP ${p.command}: ${err.message}`));
    }
    this.pending.clear();
    const waiters = [...this.eventWaiters];
    this.eventWaiters.clear();
    for (const w of waiters) w();
  }
}

function openAndGreet(
  socketPath: string,
  timeoutMs: number,
): Promise<{ socket: Socket; greeting: Record<string, unknown>; rest: string }> {
  return new Promise((resolve, reject) => {
    const socket = connect(socketPath);
    let buffered = '';
    const timer = setTimeout(() => finish(new Error(`QMP: no greeting within ${timeoutMs} ms`)), timeoutMs);
    function finish(err: Error | null, value?: { socket: Socket; greeting: Record<string, unknown>; rest: string }): void {
      clearTimeout(timer);
      socket.pause();
      socket.off('data', onData);
      socket.off('error', onError);
      socket.off('close', onClose);
      if (err) {
        socket.destroy();
        reject(err);
      } else {
        resolve(value!);
      }
    }
    function onData(chunk: Buffer): void {
      buffered += chunk.toString('utf8');
      const nl = buffered.indexOf('\n');
      if (nl < 0) return;
      let greeting: Record<string, unknown>;
      try {
        greeting = JSON.parse(buffered.slice(0, nl)) as Record<string, unknown>;
      } catch {
        finish(new Error(`QMP: unparsable greeting: ${buffered.slice(0, 200)}`));
        return;
      }
      if (!greeting.QMP) {
        finish(new Error(`QMP: unexpected greeting: ${buffered.slice(0, 200)}`));
        return;
      }
      finish(null, { socket, greeting, rest: buffered.slice(nl + 1) });
    }
    function onError(err: Error): void {
      finish(err);
    }
    function onClose(): void {
      finish(new Error('QMP: connection closed before the greeting'));
    }
    socket.on('data', onData);
    socket.on('error', onError);
    socket.on('close', onClose);
  });
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
