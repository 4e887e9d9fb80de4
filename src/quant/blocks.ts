/**
 * Block quantization of [rows, cols] matrices into com.microsoft MatMulNBits' layout: each row is
 * cut into blocks of the scheme's size (32 unless it says otherwise) along the input (cols)
 * dimension, the last one padded; a block stores `bits`-bit codes q, one float scale s and a zero
 * point z, and decodes to (q − z)·s. Without stored zero points z is 2^(bits−1) (symmetric).
 *
 * Layout (ORT's contrib op spec): data [rows, blocks, size·bits/8] (4-bit: element 2i in the low
 * nibble of byte i); scales [rows·blocks]; zero points (8-bit) [rows·blocks] bytes, (4-bit)
 * [rows·⌈blocks/2⌉] with block 2j in the low nibble.
 */
export const BLOCK_SIZE = 32;
/** The largest block a scheme may take (MatMulNBits takes 16 to 256). */
const MAX_BLOCK_SIZE = 256;

export interface BlockFit {
  scale: number;
  zero: number;
}

/**
 * Fits one block: x[0..n) (n ≤ the block size; the rest is padding the kernel never reads) into codes[0..n),
 * returning the block's scale and zero point.
 */
export type BlockQuantizer = (x: Float32Array, n: number, codes: Uint8Array) => BlockFit;

export interface QuantScheme {
  /** Names the scheme in cache keys and reports. */
  id: string;
  bits: 4 | 8;
  /** Whether per-block zero points are stored (otherwise each block's is 2^(bits−1)). */
  zeroPoints: boolean;
  /** Weights per block along the input dimension (a power of two, 16 to 256); 32 when absent. */
  blockSize?: number;
  quantizeBlock: BlockQuantizer;
  /** The embedding table and the lm_head, when they take another scheme (llama.cpp's _M mixes do). */
  vocabulary?: QuantScheme;
}

export interface QuantizedMatrix {
  rows: number;
  cols: number;
  bits: 4 | 8;
  blockSize: number;
  blocks: number;
  data: Uint8Array;
  scales: Float32Array;
  zeros: Uint8Array | null;
}

/**
 * Math.round for the codes' range: the same value (half rounds up) except within an ulp of a
 * half, and three times faster in the block loops (Math.round's correction branch mispredicts).
 */
const roundHalfUp = (v: number) => Math.floor(v + 0.5);

const clampCode = (v: number, maxq: number) => (v < 0 ? 0 : v > maxq ? maxq : v);

/** Codes of x[0..n) at (scale, zero) and their squared error. */
function encode(x: Float32Array, n: number, scale: number, zero: number, maxq: number, codes: Uint8Array): number {
  const inv = scale === 0 ? 0 : 1 / scale;
  let err = 0;
  for (let i = 0; i < n; i++) {
    const q = clampCode(roundHalfUp(x[i] * inv) + zero, maxq);
    codes[i] = q;
    const d = (q - zero) * scale - x[i];
    err += d * d;
  }
  return err;
}

function absMax(x: Float32Array, n: number): number {
  let m = 0;
  for (let i = 0; i < n; i++) m = Math.max(m, Math.abs(x[i]));
  return m;
}

/**
 * Symmetric: z = 2^(bits−1), scale from the largest magnitude (round-to-nearest), or, with
 * `search`, the scale among shrunken candidates (each refitted by least squares on its codes)
 * whose block has the least squared error. Each candidate takes two passes over the block: its
 * codes and least-squares sums together, then the refitted scale's error; the winner's codes
 * are written once at the end (the same result as encoding every candidate, a third the work).
 */
export function symmetricQuantizer(bits: 4 | 8, search: boolean): BlockQuantizer {
  const zero = 1 << (bits - 1);
  const maxq = (1 << bits) - 1;
  const half = zero - 1; // codes zero ± half keep both signs' range
  /** Squared error of x[0..n) at `scale` (> 0). */
  const error = (x: Float32Array, n: number, scale: number): number => {
    const inv = 1 / scale;
    let err = 0;
    for (let i = 0; i < n; i++) {
      const q = clampCode(roundHalfUp(x[i] * inv) + zero, maxq);
      const d = (q - zero) * scale - x[i];
      err += d * d;
    }
    return err;
  };
  /** The least-squares scale Σx(q−z) / Σ(q−z)² of the codes x[0..n) takes at `scale` (> 0). */
  const refit = (x: Float32Array, n: number, scale: number): number => {
    const inv = 1 / scale;
    let num = 0;
    let den = 0;
    for (let i = 0; i < n; i++) {
      const c = clampCode(roundHalfUp(x[i] * inv) + zero, maxq) - zero;
      num += x[i] * c;
      den += c * c;
    }
    return den === 0 ? 0 : num / den;
  };
  return (x, n, codes) => {
    const amax = absMax(x, n);
    if (amax === 0) {
      codes.fill(zero, 0, n);
      return { scale: 0, zero };
    }
    let best = amax / half;
    if (!search) {
      encode(x, n, best, zero, maxq, codes);
      return { scale: best, zero };
    }
    let bestErr = error(x, n, best);
    for (let step = 0; step <= 16; step++) {
      // from the largest magnitude on the negative side's extra code (−2^(bits−1)) down to 0.85×
      const s0 = (amax / half) * (1 - step * 0.01) * (step === 0 ? half / zero : 1);
      const s = refit(x, n, s0);
      if (!(s > 0)) continue;
      const err = error(x, n, s);
      if (err < bestErr) {
        bestErr = err;
        best = s;
      }
    }
    encode(x, n, best, zero, maxq, codes);
    return { scale: best, zero };
  };
}

/**
 * Asymmetric: the block's [min, max] (0 included) spread over every code, z = round(−min/s)
 * (round-to-nearest). With `search`: candidate ranges from 0.8× to 1.1× of it, each with its zero
 * point and the two next to it, the scale refitted by least squares on its codes, keeping the
 * candidate of least squared error weighted by rms(block) + |x| (llama.cpp's K-quant weights
 * without an importance matrix: large weights count more; measured better than plain squared
 * error on stories260k, KL 0.097 against 0.105). The three zero points of a range share its
 * rounded x/s, and only the winner's codes are written (the same result as encoding every
 * candidate, with about a third of the passes over the block).
 */
export function asymmetricQuantizer(bits: 4 | 8, search: boolean): BlockQuantizer {
  const maxq = (1 << bits) - 1;
  const weight = new Float64Array(MAX_BLOCK_SIZE);
  const rounded = new Float64Array(MAX_BLOCK_SIZE);
  /** Weighted squared error of x[0..n) at (scale > 0, zero). */
  const error = (x: Float32Array, n: number, scale: number, zero: number): number => {
    const inv = 1 / scale;
    let err = 0;
    for (let i = 0; i < n; i++) {
      const q = clampCode(roundHalfUp(x[i] * inv) + zero, maxq);
      const d = (q - zero) * scale - x[i];
      err += weight[i] * d * d;
    }
    return err;
  };
  /** The weighted least-squares scale for the codes clamp(rounded + zero). */
  const refit = (x: Float32Array, n: number, zero: number): number => {
    let num = 0;
    let den = 0;
    for (let i = 0; i < n; i++) {
      const c = clampCode(rounded[i] + zero, maxq) - zero;
      num += weight[i] * x[i] * c;
      den += weight[i] * c * c;
    }
    return den === 0 ? 0 : num / den;
  };
  return (x, n, codes) => {
    let min = 0;
    let max = 0;
    let squares = 0;
    for (let i = 0; i < n; i++) {
      min = Math.min(min, x[i]);
      max = Math.max(max, x[i]);
      squares += x[i] * x[i];
    }
    if (max === min) {
      codes.fill(0, 0, n);
      return { scale: 0, zero: 0 };
    }
    const base = (max - min) / maxq;
    let bestScale = base;
    let bestZero = clampCode(Math.round(-min / base), maxq);
    if (!search) {
      encode(x, n, bestScale, bestZero, maxq, codes);
      return { scale: bestScale, zero: bestZero };
    }
    const rms = Math.sqrt(squares / n);
    for (let i = 0; i < n; i++) weight[i] = rms + Math.abs(x[i]);
    let bestErr = error(x, n, bestScale, bestZero);
    for (let step = 0; step <= 15; step++) {
      const s0 = base * (0.8 + step * 0.02);
      const inv0 = 1 / s0;
      for (let i = 0; i < n; i++) rounded[i] = roundHalfUp(x[i] * inv0);
      const z0 = Math.round(-min / s0);
      let previous = -1;
      for (let dz = -1; dz <= 1; dz++) {
        const z = clampCode(z0 + dz, maxq);
        if (z === previous) continue; // clamped onto the candidate just tried
        previous = z;
        const s = refit(x, n, z);
        if (!(s > 0)) continue;
        const err = error(x, n, s, z);
        if (err < bestErr) {
          bestErr = err;
          bestScale = s;
          bestZero = z;
        }
      }
    }
    encode(x, n, bestScale, bestZero, maxq, codes);
    return { scale: bestScale, zero: bestZero };
  };
}

/** A scheme's block size. */
export const blockSizeOf = (scheme: QuantScheme): number => scheme.blockSize ?? BLOCK_SIZE;

/** Quantizes a row-major [rows, cols] matrix block by block. */
export function quantizeMatrix(w: Float32Array, rows: number, cols: number, scheme: QuantScheme): QuantizedMatrix {
  const { bits } = scheme;
  const size = blockSizeOf(scheme);
  if (!(size >= 16 && size <= MAX_BLOCK_SIZE && (size & (size - 1)) === 0)) {
    throw new Error(`quantizer ${scheme.id}: block size ${size} is not a power of two from 16 to ${MAX_BLOCK_SIZE}`);
  }
  const blocks = Math.ceil(cols / size);
  const blob = (size * bits) / 8;
  const data = new Uint8Array(rows * blocks * blob);
  const scales = new Float32Array(rows * blocks);
  const zeroBytesPerRow = bits === 8 ? blocks : Math.ceil(blocks / 2);
  const zeros = scheme.zeroPoints ? new Uint8Array(rows * zeroBytesPerRow) : null;
  const x = new Float32Array(size);
  const codes = new Uint8Array(size);
  for (let r = 0; r < rows; r++) {
    for (let b = 0; b < blocks; b++) {
      const start = b * size;
      const n = Math.min(size, cols - start);
      x.set(w.subarray(r * cols + start, r * cols + start + n));
      const fit = scheme.quantizeBlock(x, n, codes);
      if (!scheme.zeroPoints && fit.zero !== 1 << (bits - 1)) {
        throw new Error(`quantizer ${scheme.id}: a scheme without zero points must use ${1 << (bits - 1)}`);
      }
      codes.fill(fit.zero, n); // padding decodes to 0
      const i = r * blocks + b;
      scales[i] = fit.scale;
      const out = i * blob;
      if (bits === 8) data.set(codes, out);
      else for (let k = 0; k < size; k += 2) data[out + k / 2] = codes[k] | (codes[k + 1] << 4);
      if (zeros) {
        if (bits === 8) zeros[i] = fit.zero;
        else zeros[r * zeroBytesPerRow + (b >> 1)] |= fit.zero << ((b & 1) * 4);
      }
    }
  }
  return { rows, cols, bits, blockSize: size, blocks, data, scales, zeros };
}

/** The float matrix a quantized one stands for (tests, and the training graph's reference). */
export function dequantizeMatrix(q: QuantizedMatrix): Float32Array {
  const { rows, cols, bits, blocks, blockSize } = q;
  const out = new Float32Array(rows * cols);
  const blob = (blockSize * bits) / 8;
  const zeroBytesPerRow = bits === 8 ? blocks : Math.ceil(blocks / 2);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const b = Math.floor(c / blockSize);
      const i = r * blocks + b;
      const k = c % blockSize;
      const byte = q.data[i * blob + (bits === 8 ? k : k >> 1)];
      const code = bits === 8 ? byte : (byte >> ((k & 1) * 4)) & 15;
      const zero = !q.zeros ? 1 << (bits - 1) : bits === 8 ? q.zeros[i] : (q.zeros[r * zeroBytesPerRow + (b >> 1)] >> ((b & 1) * 4)) & 15;
      out[r * cols + c] = (code - zero) * q.scales[i];
    }
  }
  return out;
}
