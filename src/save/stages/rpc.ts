// Control plane between the main thread and the stage workers: comlink over worker_threads. The data plane is the
// shared rings; these calls only start stages, hand over configuration and collect results.
import * as Comlink from 'comlink/dist/esm/comlink.mjs';
import nodeEndpoint from 'comlink/dist/esm/node-adapter.mjs';
import { parentPort, Worker } from 'node:worker_threads';
import { serializeError, type SerializedError } from '../../errors.js';
import { Aborted } from '../ring/wait.js';

/** Wall-clock time in ms (epoch), comparable between threads: each thread's performance.now() has its own origin. */
export function epochMs(): number {
  return performance.timeOrigin + performance.now();
}

/** When this thread's stage module had loaded (set by exposeStage), as epochMs(). */
export let stageReadyAtMs = 0;

export type Outcome<T> = { ok: true; value: T } | { ok: false; aborted: boolean; error: SerializedError };

/** Runs a stage body, turning any throw into a serialisable outcome (comlink would drop the error's code). */
export function outcome<T>(body: () => T): Outcome<T> {
  try {
    return { ok: true, value: body() };
  } catch (err) {
    return { ok: false, aborted: err instanceof Aborted, error: serializeError(err) };
  }
}

/** What every stage answers besides its own API: ready() resolves once its modules have loaded (their time). */
export interface StageBase {
  ready(): number;
}

export function exposeStage(api: object): void {
  if (!parentPort) throw new Error('a stage module must run in a worker thread');
  stageReadyAtMs = epochMs();
  const base: StageBase = { ready: () => stageReadyAtMs };
  Comlink.expose({ ...api, ...base }, nodeEndpoint(parentPort as unknown as Parameters<typeof nodeEndpoint>[0]));
}

export interface StageHandle<T> {
  worker: Worker;
  api: Comlink.Remote<T & StageBase>;
  /** Rejects if the thread dies without answering (uncaught error, exit). */
  died: Promise<never>;
}

export function startStage<T>(url: URL, name: string): StageHandle<T> {
  const worker = new Worker(url, { name });
  const api = Comlink.wrap<T & StageBase>(nodeEndpoint(worker as unknown as Parameters<typeof nodeEndpoint>[0]));
  const died = new Promise<never>((_, reject) => {
    worker.once('error', (err) => reject(new Error(`${name} worker crashed: ${err.message}`)));
    worker.once('exit', (code) => reject(new Error(`${name} worker exited (code ${code})`)));
  });
  died.catch(() => undefined);
  return { worker, api, died };
}
