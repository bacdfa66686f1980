// The cluster slots of a postcopy load: which plan chunk sits in which of the LoadSource's slots, each slot's state
// (free, reading, loaded) and whom it was taken for (a request: urgent; the background read-ahead). Taking a slot
// queues its cluster's read; reaping checks every cluster that arrived (whole, and its CRC-32C) before its slot
// counts as loaded. Which chunk to read and which to drop is the scheduler's choice, not this room's.
import assert from 'node:assert/strict';
import type { LoadSource } from '../source.js';

const SLOT_FREE = 0;
const SLOT_READING = 1;
const SLOT_LOADED = 2;
/** What the stream stops short of when a cluster's CRC-32C does not match. */
const CRC_STOPS_BEFORE = 'its pages';

export class ClusterCache {
  /** Per plan chunk: the slot holding it, or -1. */
  private readonly chunkSlot: Int32Array;
  /** Per slot: its plan chunk (-1: none), state, and whether a request took it. */
  private readonly slotChunk: Int32Array;
  private readonly slotState: Uint8Array;
  private readonly slotUrgent: Uint8Array;
  private bgSlotsUsed = 0;
  private bgReading = 0;
  private urgentSlotsUsed = 0;
  /** Cluster reads queued for requests, and for the background stream. */
  requestReads = 0;
  backgroundReads = 0;
  /** Time spent waiting for reads to complete. */
  readMs = 0;

  constructor(
    private readonly source: LoadSource,
    private readonly verify: boolean,
  ) {
    this.chunkSlot = new Int32Array(source.plan.chunks.length).fill(-1);
    this.slotChunk = new Int32Array(source.slotCount).fill(-1);
    this.slotState = new Uint8Array(source.slotCount);
    this.slotUrgent = new Uint8Array(source.slotCount);
  }

  /** Background reads kept in flight before LISTEN (the load's queue depth). */
  get depth(): number {
    return this.source.depth;
  }

  /** Slots held for the background stream (reading or loaded), and those of them still reading. */
  get backgroundSlots(): number {
    return this.bgSlotsUsed;
  }

  get backgroundReading(): number {
    return this.bgReading;
  }

  hasFreeSlot(): boolean {
    return this.source.slotCount - this.bgSlotsUsed - this.urgentSlotsUsed > 0;
  }

  /** Plan chunk `ci` has a slot (its read queued, or its cluster loaded). */
  has(ci: number): boolean {
    return this.chunkSlot[ci] >= 0;
  }

  loaded(ci: number): boolean {
    const slot = this.chunkSlot[ci];
    return slot >= 0 && this.slotState[slot] === SLOT_LOADED;
  }

  /** The cluster of loaded plan chunk `ci`. */
  cluster(ci: number): Uint8Array {
    const slot = this.chunkSlot[ci];
    assert(slot >= 0 && this.slotState[slot] === SLOT_LOADED);
    return this.source.slotView(slot);
  }

  /** Takes the first free slot for plan chunk `ci` and queues its cluster's read. */
  take(ci: number, urgent: boolean): void {
    for (let s = 0; s < this.source.slotCount; s++) {
      if (this.slotState[s] !== SLOT_FREE) continue;
      this.slotState[s] = SLOT_READING;
      this.slotChunk[s] = ci;
      this.slotUrgent[s] = urgent ? 1 : 0;
      if (urgent) this.urgentSlotsUsed++;
      else this.bgSlotsUsed++;
      this.chunkSlot[ci] = s;
      this.source.read(ci, s);
      if (urgent) this.requestReads++;
      else {
        this.backgroundReads++;
        this.bgReading++;
      }
      return;
    }
    throw new Error('no free cluster slot');
  }

  /** Frees the slot of plan chunk `ci`, if it has one. */
  drop(ci: number): void {
    const slot = this.chunkSlot[ci];
    if (slot < 0) return;
    this.chunkSlot[ci] = -1;
    if (this.slotUrgent[slot]) this.urgentSlotsUsed--;
    else this.bgSlotsUsed--;
    this.slotChunk[slot] = -1;
    this.slotState[slot] = SLOT_FREE;
    this.slotUrgent[slot] = 0;
  }

  /** The plan chunk in the first loaded background slot, or -1. */
  loadedBackgroundChunk(): number {
    for (let slot = 0; slot < this.source.slotCount; slot++) {
      if (this.slotState[slot] === SLOT_LOADED && !this.slotUrgent[slot]) return this.slotChunk[slot];
    }
    return -1;
  }

  /** Waits for at least one read and checks every cluster that arrived. */
  reap(): void {
    assert(this.source.inFlight > 0, 'waiting for a read that was never queued');
    const t1 = performance.now();
    const done = this.source.reap();
    this.readMs += performance.now() - t1;
    for (const slot of done) this.arrived(slot);
  }

  private arrived(slot: number): void {
    const ci = this.slotChunk[slot];
    assert(ci >= 0 && this.slotState[slot] === SLOT_READING, 'completion for an idle slot');
    this.source.arrived(ci, slot, this.verify, CRC_STOPS_BEFORE);
    this.slotState[slot] = SLOT_LOADED;
    if (!this.slotUrgent[slot]) this.bgReading--;
  }
}
