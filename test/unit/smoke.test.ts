import { describe, expect, it } from 'vitest';
import { alignedShared } from '../../src/ring/memory.js';

describe('alignedShared', () => {
  it('rounds up to 64 KiB pages', () => {
    expect(alignedShared(1).byteLength).toBe(65536);
    expect(alignedShared(65537).byteLength).toBe(131072);
  });
});
