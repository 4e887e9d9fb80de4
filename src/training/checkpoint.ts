import { createHash } from 'node:crypto';
import { checkpointInvalid } from '../errors.ts';
import { KIND_TENSORS, type InterventionSpec } from '../interventions/artifact.ts';
import { encodeSafetensors, parseSafetensors, toFloat32 } from '../model/safetensors.ts';
import type { TrainingExample } from './batch.ts';
import type { KindTensors } from './kinds.ts';
import type { AdamMoments } from './optimizer.ts';
import type { Recipe } from './recipe.ts';

/**
 * Everything a training job needs to continue exactly where it stopped: after restoring it,
 * the remaining steps produce bit for bit what an uninterrupted run would have. Taken between
 * optimizer steps, so no gradient is half accumulated.
 */
export interface TrainingCheckpoint {
  /** Optimizer steps done. */
  step: number;
  totalSteps: number;
  recipe: Recipe;
  /** Identifies the tokenized data the job was started with. */
  dataFingerprint: string;
  /** The dropout stream's state. */
  rngState: number[];
  /** Data order of the epoch in progress (each epoch's order is a function of the seed). */
  epoch: number;
  order: number[];
  specs: InterventionSpec[];
  params: KindTensors[];
  moments: Array<Record<string, AdamMoments>>;
}

export function dataFingerprint(examples: readonly TrainingExample[]): string {
  const h = createHash('sha256');
  for (const e of examples) h.update(`${e.promptLength}:${e.tokens.join(',')};`);
  return h.digest('hex');
}

const META_KEY = 'reft_training_checkpoint';

/** A checkpoint as one safetensors file: tensors (F32, exact) plus the rest as JSON metadata. */
export function encodeCheckpoint(c: TrainingCheckpoint): Uint8Array {
  const tensors: Record<string, { shape: number[]; data: Float32Array }> = {};
  c.specs.forEach((s, i) => {
    for (const name of KIND_TENSORS[s.kind]) {
      const shape = [c.params[i][name].length];
      tensors[`params.${i}.${name}`] = { shape, data: c.params[i][name] };
      tensors[`adam_m.${i}.${name}`] = { shape, data: c.moments[i][name].m };
      tensors[`adam_v.${i}.${name}`] = { shape, data: c.moments[i][name].v };
    }
  });
  const { params: _p, moments: _m, ...rest } = c;
  return encodeSafetensors(tensors, { [META_KEY]: JSON.stringify(rest) });
}

export function decodeCheckpoint(bytes: Uint8Array): TrainingCheckpoint {
  const file = parseSafetensors(bytes, 'training checkpoint');
  const meta = file.header.metadata?.[META_KEY];
  if (!meta) throw checkpointInvalid({ problem: 'not a training checkpoint (no reft_training_checkpoint metadata)' }, 'checkpoint');
  const rest = JSON.parse(meta) as Omit<TrainingCheckpoint, 'params' | 'moments'>;
  const read = (name: string): Float32Array => {
    const info = file.header.tensors.get(name);
    if (!info) throw checkpointInvalid({ problem: `training checkpoint is missing tensor ${name}` }, 'checkpoint');
    return toFloat32(file, info);
  };
  const params: KindTensors[] = [];
  const moments: Array<Record<string, AdamMoments>> = [];
  rest.specs.forEach((s, i) => {
    params.push({});
    moments.push({});
    for (const name of KIND_TENSORS[s.kind]) {
      params[i][name] = read(`params.${i}.${name}`);
      moments[i][name] = { m: read(`adam_m.${i}.${name}`), v: read(`adam_v.${i}.${name}`) };
    }
  });
  return { ...rest, params, moments };
}
