import { ropeInverseFrequencies, type ModelConfig } from '../model/config.ts';

/**
 * Rotary position embedding tables in the rotate-half layout (HF Llama): for position p and
 * pair i < head_dim/2, (x[i], x[i + half]) ↦ (x[i]·cos − x[i+half]·sin, x[i+half]·cos + x[i]·sin).
 * The graph feeds them to ORT's rotary kernels; the engine applies the same tables to new keys
 * when the graph rotates them inside GroupQueryAttention and returns them unrotated.
 */
export interface RopeTables {
  cos: Float32Array; // [max_positions, half]
  sin: Float32Array;
  half: number;
  positions: number;
}

export function ropeTables(config: ModelConfig): RopeTables {
  const inv = ropeInverseFrequencies(config);
  const half = inv.length;
  const positions = config.maxPositions;
  const cos = new Float32Array(positions * half);
  const sin = new Float32Array(positions * half);
  for (let p = 0; p < positions; p++) {
    for (let i = 0; i < half; i++) {
      const angle = Math.fround(p * Math.fround(inv[i]));
      cos[p * half + i] = Math.cos(angle);
      sin[p * half + i] = Math.sin(angle);
    }
  }
  return { cos, sin, half, positions };
}

/** Rotates `heads` consecutive heads of `src` (from `from`) at `position` into `dst` (at `to`). */
export function rotateHeads(
  t: RopeTables,
  src: Float32Array,
  from: number,
  dst: Float32Array,
  to: number,
  heads: number,
  position: number,
): void {
  const { half } = t;
  const c = position * half;
  for (let h = 0; h < heads; h++) {
    const s = from + 2 * half * h;
    const d = to + 2 * half * h;
    for (let i = 0; i < half; i++) {
      const x1 = src[s + i];
      const x2 = src[s + i + half];
      const cos = t.cos[c + i];
      const sin = t.sin[c + i];
      dst[d + i] = x1 * cos - x2 * sin;
      dst[d + i + half] = x2 * cos + x1 * sin;
    }
  }
}
