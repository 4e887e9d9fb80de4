import { weightsFormatUnknown, weightsFormatUnsupported } from '../errors.ts';
import { asymmetricQuantizer, symmetricQuantizer, type QuantScheme } from './blocks.ts';

/**
 * The `--weights` formats. `auto` is f32 (the CPU computes in float32 whatever the checkpoint's
 * dtype); `q8` and `q4` quantize every large matrix at load into MatMulNBits blocks.
 */
export const WEIGHT_FORMATS = ['auto', 'f32', 'f16', 'q8', 'q4'] as const;
export type WeightsFlag = (typeof WEIGHT_FORMATS)[number];
export type WeightFormat = 'f32' | 'q8' | 'q4';

const Q8: QuantScheme = { id: 'q8-sym-search', bits: 8, zeroPoints: false, quantizeBlock: symmetricQuantizer(8, true) };

/**
 * The vocabulary matrix's blocks under q4: 64 weights each. MatMulNBits' int8 kernel runs fewer,
 * longer blocks faster: on the 135M shapes' lm_head (49152 × 576, a fifth of the model) 12% less
 * CPU time at 1 row and 24% less at 8 (one thread). q4's other matrices stay at 32: at 64 their
 * mean KL on stories260k rose from 0.077 to 0.127, over the line against ggml's Q4_0 (0.151).
 */
const Q4_BLOCK = 32;
const VOCAB_BLOCK = 64;

/**
 * q8: symmetric 8-bit, each block's scale searched for the least squared error (stored zero
 * points bought 8-bit blocks nothing measurable). q4: asymmetric 4-bit with zero points and a
 * weighted search, the embedding table / lm_head in q8 (as llama.cpp's Q4_K_M keeps its output
 * matrix at 6 bits: on stories260k it takes the mean KL from 0.097 to 0.077). Measured in
 * test/quantization.test.ts.
 */
export const QUANT_SCHEMES: Record<'q8' | 'q4', QuantScheme> = {
  q8: Q8,
  q4: {
    id: 'q4-asym-search',
    bits: 4,
    zeroPoints: true,
    blockSize: Q4_BLOCK,
    quantizeBlock: asymmetricQuantizer(4, true),
    vocabulary: { ...Q8, id: 'q8-sym-search-b64', blockSize: VOCAB_BLOCK },
  },
};

/** The refinements taken away one by one, to measure what each gains. */
export const ABLATED_SCHEMES: Record<string, QuantScheme> = {
  'q8 round-to-nearest': { id: 'q8-sym-rtn', bits: 8, zeroPoints: false, quantizeBlock: symmetricQuantizer(8, false) },
  'q4 round-to-nearest, all 4-bit': {
    id: 'q4-asym-rtn',
    bits: 4,
    zeroPoints: true,
    blockSize: Q4_BLOCK,
    quantizeBlock: asymmetricQuantizer(4, false),
  },
  'q4 searched, all 4-bit': {
    id: 'q4-asym-search-all4',
    bits: 4,
    zeroPoints: true,
    blockSize: Q4_BLOCK,
    quantizeBlock: asymmetricQuantizer(4, true),
  },
};

/** Every named scheme by id (with the vocabulary schemes they carry): a worker thread rebuilds a scheme from its id. */
export function namedScheme(id: string): QuantScheme | undefined {
  const all = [...Object.values(QUANT_SCHEMES), ...Object.values(ABLATED_SCHEMES)];
  return [...all, ...all.flatMap((s) => (s.vocabulary ? [s.vocabulary] : []))].find((s) => s.id === id);
}

/** Checks a `--weights` value (commander checks the flag; this guards every other way in). */
export function parseWeightsFlag(value: unknown, field = 'weights'): WeightsFlag {
  if (typeof value === 'string' && (WEIGHT_FORMATS as readonly string[]).includes(value)) return value as WeightsFlag;
  throw weightsFormatUnknown({ value: JSON.stringify(value), formats: WEIGHT_FORMATS }, field);
}

/**
 * The format a flag means on this device. f16 is refused on the CPU: ORT's CPU kernels would
 * convert half weights back to float32 at load, the memory and speed of f32 under another name.
 */
export function resolveWeightFormat(flag: WeightsFlag, device: string = 'cpu'): WeightFormat {
  if (flag === 'auto') return 'f32';
  if (flag === 'f16') {
    throw weightsFormatUnsupported({ format: flag, device }, 'weights');
  }
  return flag;
}
