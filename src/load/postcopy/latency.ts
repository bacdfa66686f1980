// The fault-latency histogram of a postcopy load: log-linear buckets (8 per power of two) over microseconds, with
// the exact count, min, max and mean, and the summary the report carries. Pure: no I/O, no clock.

const SUB_BUCKETS = 8;
const BUCKETS = 40 * SUB_BUCKETS; // up to 2^40 us

export interface LatencySummary {
  count: number;
  minMs: number;
  meanMs: number;
  p50Ms: number;
  p90Ms: number;
  p99Ms: number;
  maxMs: number;
  /** Non-empty buckets: upper bound (ms) and count. */
  buckets: { leMs: number; count: number }[];
}

export class LatencyHistogram {
  private readonly counts = new Float64Array(BUCKETS);
  count = 0;
  private sum = 0;
  private min = Infinity;
  private max = 0;

  /**
   * Bucket i holds values in (upper(i-1), upper(i)] microseconds: 1 us wide up to 8 us, then 8 buckets for each
   * power of two ((8, 16] in steps of 1, (16, 32] in steps of 2, ...).
   */
  static upperUs(i: number): number {
    if (i < SUB_BUCKETS) return i + 1;
    const k = 3 + Math.floor((i - SUB_BUCKETS) / SUB_BUCKETS);
    const sub = (i - SUB_BUCKETS) % SUB_BUCKETS;
    return 2 ** k * (1 + (sub + 1) / SUB_BUCKETS);
  }

  static indexOf(us: number): number {
    let i: number;
    if (us <= SUB_BUCKETS) {
      i = Math.max(0, Math.ceil(us) - 1);
    } else {
      const k = Math.floor(Math.log2(us));
      const base = 2 ** k;
      i = SUB_BUCKETS + (k - 3) * SUB_BUCKETS + Math.ceil(((us - base) / base) * SUB_BUCKETS) - 1;
    }
    // Floating-point edges: make sure the value is within the bucket's bounds.
    while (i > 0 && us <= LatencyHistogram.upperUs(i - 1)) i--;
    while (i < BUCKETS - 1 && us > LatencyHistogram.upperUs(i)) i++;
    return Math.max(0, Math.min(i, BUCKETS - 1));
  }

  add(ms: number): void {
    const v = Math.max(0, ms);
    this.counts[LatencyHistogram.indexOf(v * 1000)]++;
    this.count++;
    this.sum += v;
    if (v < this.min) this.min = v;
    if (v > this.max) this.max = v;
  }

  /** Upper bound of the bucket holding the q-quantile, capped at the exact maximum. */
  quantileMs(q: number): number {
    if (this.count === 0) return 0;
    const rank = Math.max(1, Math.ceil(q * this.count));
    let seen = 0;
    for (let i = 0; i < BUCKETS; i++) {
      seen += this.counts[i];
      if (seen >= rank) return Math.min(LatencyHistogram.upperUs(i) / 1000, this.max);
    }
    return this.max;
  }

  summary(): LatencySummary {
    const buckets: { leMs: number; count: number }[] = [];
    for (let i = 0; i < BUCKETS; i++) if (this.counts[i] > 0) buckets.push({ leMs: LatencyHistogram.upperUs(i) / 1000, count: this.counts[i] });
    return {
      count: this.count,
      minMs: this.count ? this.min : 0,
      meanMs: this.count ? this.sum / this.count : 0,
      p50Ms: this.quantileMs(0.5),
      p90Ms: this.quantileMs(0.9),
      p99Ms: this.quantileMs(0.99),
      maxMs: this.max,
      buckets,
    };
  }
}
