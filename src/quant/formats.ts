import { ReftError } from '../errors.ts';
import { asymmetricQuantizer, symmetricQuantizer, type QuantScheme } from './blocks.ts';

/**
 * The `--weights` formats. `auto` is f32 (the CPU computes in float32 whatever the checkpoint's
 * dtype); `q8` and `q4` quantize every large matrix at load into MatMulNBits blocks.
 */
export const WEIGHT_FORMATS = ['auto', 'f32', 'f16', 'q8', 'q4'] as const;
export type WeightsFlag = (typeof WEIGHT_FORMATS)[number];
export type WeightFormat = 'f32' | 'q8' | 'q4';

/**
 * q8: symmetric 8-bit, each block's scale searched for the least squared error (zero points buy
 * 8-bit blocks nothing measurable). q4: asymmetric 4-bit with zero points and the same search.
 * Measured on stories260k in test/quantization.test.ts.
 */
export const QUANT_SCHEMES: Record<'q8' | 'q4', QuantScheme> = {
  q8: { id: 'q8-sym-search', bits: 8, zeroPoints: false, quantizeBlock: symmetricQuantizer(8, true) },
  q4: { id: 'q4-asym-search', bits: 4, zeroPoints: true, quantizeBlock: asymmetricQuantizer(4, true) },
};

/** Round-to-nearest counterparts of the schemes, kept to measure what the search gains. */
export const ROUND_TO_NEAREST_SCHEMES: Record<'q8' | 'q4', QuantScheme> = {
  q8: { id: 'q8-sym-rtn', bits: 8, zeroPoints: false, quantizeBlock: symmetricQuantizer(8, false) },
  q4: { id: 'q4-asym-rtn', bits: 4, zeroPoints: true, quantizeBlock: asymmetricQuantizer(4, false) },
};

/** Checks a `--weights` value (commander checks the flag; this guards every other way in). */
export function parseWeightsFlag(value: unknown, field = 'weights'): WeightsFlag {
  if (typeof value === 'string' && (WEIGHT_FORMATS as readonly string[]).includes(value)) return value as WeightsFlag;
  throw new ReftError('invalid_request', `unknown weights format ${JSON.stringify(value)}; one of ${WEIGHT_FORMATS.join(', ')}`, field);
}

/**
 * The format a flag means on this device. f16 is refused on the CPU: ORT's CPU kernels would
 * convert half weights back to float32 at load, the memory and speed of f32 under another name.
 */
export function resolveWeightFormat(flag: WeightsFlag, device: string = 'cpu'): WeightFormat {
  if (flag === 'auto') return 'f32';
  if (flag === 'f16') {
    throw new ReftError(
      'invalid_request',
      `--weights f16 is not supported on the ${device} device: its kernels compute float16 weights as float32; use f32, q8 or q4`,
      'weights',
    );
  }
  return flag;
}
