import { createHash } from 'node:crypto';
import { z } from 'zod';
import { ReftError, artifactConfigInvalid, artifactConfigNotJson, artifactConfigTooDeep, artifactModelMismatch, artifactRotationNotOrthonormal, artifactTensorDtype, artifactTensorMissing, artifactTensorNonFinite, artifactTensorShape, artifactTensorUnexpected, artifactWeightsInvalid, firstIssue, interventionLayerOutOfRange } from '../errors.ts';
import { parseSafetensors, plainFloats, toFloat32, type FloatAllocator, type SafetensorsFile } from '../model/safetensors.ts';
import { parsePositions, type PositionSpec } from './positions.ts';
import { MAX_JSON_DEPTH, jsonDepth } from '../limits/json-depth.ts';
import { offloadTask } from '../offload/task.ts';

/**
 * The reft/v1 artifact (REFT.md "The intervention artifact"): reft_config.json plus
 * reft_weights.safetensors. `parseArtifact` validates both against a base model and returns the
 * interventions in the single low-rank form every kind shares at inference time:
 *   delta = (h·downᵀ + bias)·up, with down = S − P.
 */
export const INTERVENTION_KINDS = ['loreft', 'direft', 'noreft', 'consreft', 'lobireft'] as const;
export type InterventionKind = (typeof INTERVENTION_KINDS)[number];

/** Tensor names per kind (REFT.md's table); `rotate` is R, orthonormal rows. */
export const KIND_TENSORS: Record<InterventionKind, readonly string[]> = {
  loreft: ['rotate', 'source.weight', 'source.bias'],
  direft: ['source.weight', 'source.bias', 'proj.weight'],
  noreft: ['source.weight', 'source.bias', 'proj.weight'],
  consreft: ['rotate', 'source.bias'],
  lobireft: ['rotate', 'source.bias'],
};

const interventionEntrySchema = z.strictObject({
  kind: z.enum(INTERVENTION_KINDS),
  layer: z.number().int().min(0),
  rank: z.number().int().min(1).max(1024),
  positions: z.string(),
  component: z.literal('block_output').optional(),
});

export const reftConfigSchema = z.strictObject({
  format: z.literal('reft/v1'),
  base_model: z.looseObject({
    architecture: z.string().optional(),
    hidden_size: z.number().int().positive(),
    num_hidden_layers: z.number().int().positive(),
  }),
  interventions: z.array(interventionEntrySchema).min(1).max(1024),
  name: z.string().max(200).optional(),
  description: z.string().max(4000).optional(),
  metadata: z.record(z.string(), z.string()).optional(),
});

export type ReftConfig = z.infer<typeof reftConfigSchema>;

/** What an artifact is checked against. */
export interface BaseModelShape {
  hiddenSize: number;
  numLayers: number;
}

export interface InterventionSpec {
  kind: InterventionKind;
  layer: number;
  rank: number;
  positions: PositionSpec;
}

/** One intervention ready for the engine: delta = (h·downᵀ + bias)·up at `positions`. */
export interface LowRankIntervention extends InterventionSpec {
  /** Identity across copies (e.g. `<id>@<version>#<index>`): rows of one batch using the same key share its rank columns. */
  key?: string;
  down: Float32Array; // [rank, d]
  bias: Float32Array; // [rank]
  up: Float32Array; // [rank, d]
  /** The factors' digest, as `interventionDigest` computes it (set by `lowRank`, so once per artifact). */
  digest?: string;
}

export interface Artifact {
  config: ReftConfig;
  interventions: LowRankIntervention[];
  /** Bytes the engine holds for it (the low-rank factors). */
  byteSize: number;
}

const ORTHONORMAL_TOLERANCE = 1e-3;

/** At most 1024 interventions of 4 tensors: the header never needs more (checked before it is parsed). */
const ARTIFACT_HEADER_LIMITS = { maxHeaderBytes: 1024 * 1024, maxTensors: 4 * 1024 };

export function parseReftConfig(bytes: Uint8Array | string): ReftConfig {
  let json: unknown;
  try {
    json = JSON.parse(typeof bytes === 'string' ? bytes : new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch {
    throw artifactConfigNotJson('reft_config.json');
  }
  if (jsonDepth(json, MAX_JSON_DEPTH) > MAX_JSON_DEPTH) {
    throw artifactConfigTooDeep({ file: 'reft_config.json', limit: MAX_JSON_DEPTH }, 'reft_config.json');
  }
  const parsed = reftConfigSchema.safeParse(json);
  if (!parsed.success) {
    const { field, message } = firstIssue(parsed.error, ['reft_config.json']);
    throw artifactConfigInvalid({ field, problem: message }, field);
  }
  for (const [i, iv] of parsed.data.interventions.entries()) parsePositions(iv.positions, `reft_config.json.interventions.${i}.positions`);
  return parsed.data;
}

/**
 * Validates a whole artifact for a base model (REFT.md "valid for a base model"). With
 * `verifyValues: false` the structure is still checked but not every value (finite, R
 * orthonormal): for artifacts read back from the store, which validated them when they came in.
 * `allocate` says where the factors go (the cache puts them in SharedArrayBuffers at once).
 */
export function parseArtifact(
  configBytes: Uint8Array | string,
  weightBytes: Uint8Array,
  base: BaseModelShape,
  opts: { verifyValues?: boolean; allocate?: FloatAllocator } = {},
): Artifact {
  const verifyValues = opts.verifyValues ?? true;
  const allocate = opts.allocate ?? plainFloats;
  const config = parseReftConfig(configBytes);
  const field = (s: string) => `reft_config.json.${s}`;
  if (config.base_model.hidden_size !== base.hiddenSize) {
    throw artifactModelMismatch({ key: 'hidden_size', theirs: config.base_model.hidden_size, ours: base.hiddenSize }, field('base_model.hidden_size'));
  }
  if (config.base_model.num_hidden_layers !== base.numLayers) {
    throw artifactModelMismatch(
      { key: 'num_hidden_layers', theirs: config.base_model.num_hidden_layers, ours: base.numLayers },
      field('base_model.num_hidden_layers'),
    );
  }
  const file = parseWeights(weightBytes);
  const expected = new Set<string>();
  const interventions = config.interventions.map((entry, i) => {
    if (entry.layer >= base.numLayers) {
      throw interventionLayerOutOfRange({ at: `interventions.${i}.layer`, layer: entry.layer, layers: base.numLayers }, field(`interventions.${i}.layer`));
    }
    const tensors = readTensors(file, i, entry.kind, entry.rank, base.hiddenSize, expected, verifyValues, allocate);
    return lowRank({ kind: entry.kind, layer: entry.layer, rank: entry.rank, positions: parsePositions(entry.positions) }, tensors, base.hiddenSize, allocate);
  });
  for (const name of file.header.tensors.keys()) {
    if (!expected.has(name)) throw artifactTensorUnexpected({ name }, name);
  }
  const byteSize = interventions.reduce((s, iv) => s + 4 * (iv.down.length + iv.bias.length + iv.up.length), 0);
  return { config, interventions, byteSize };
}

function parseWeights(bytes: Uint8Array): SafetensorsFile {
  try {
    return parseSafetensors(bytes, 'reft_weights.safetensors', ARTIFACT_HEADER_LIMITS);
  } catch (e) {
    if (e instanceof ReftError) throw artifactWeightsInvalid({ problem: e.message }, e.field);
    throw e;
  }
}

function readTensors(
  file: SafetensorsFile,
  i: number,
  kind: InterventionKind,
  rank: number,
  d: number,
  expected: Set<string>,
  verifyValues: boolean,
  allocate: FloatAllocator,
): Record<string, Float32Array> {
  const out: Record<string, Float32Array> = {};
  for (const t of KIND_TENSORS[kind]) {
    const name = `interventions.${i}.${t}`;
    expected.add(name);
    const info = file.header.tensors.get(name);
    if (!info) throw artifactTensorMissing({ name, kind }, name);
    if (!['F32', 'F16', 'BF16'].includes(info.dtype)) throw artifactTensorDtype({ name, dtype: info.dtype }, name);
    const shape = t === 'source.bias' ? [rank] : [rank, d];
    if (info.shape.length !== shape.length || info.shape.some((s, k) => s !== shape[k])) {
      throw artifactTensorShape({ name, shape: info.shape, expected: shape, rank }, name);
    }
    const data = toFloat32(file, info, allocate);
    if (verifyValues) {
      const bad = firstNonFinite(data);
      if (bad >= 0) throw artifactTensorNonFinite({ name, index: bad }, name);
      if (t === 'rotate') checkOrthonormalRows(data, rank, d, name);
    }
    out[t] = data;
  }
  return out;
}

/** Index of the first NaN or ±Infinity, or -1. x·0 is NaN exactly for those, so one pass of
 * multiply-adds screens the tensor and only a bad one is searched. */
function firstNonFinite(data: Float32Array): number {
  let acc = 0;
  for (let k = 0; k < data.length; k++) acc += data[k] * 0;
  if (acc === 0) return -1;
  for (let k = 0; k < data.length; k++) if (!Number.isFinite(data[k])) return k;
  return -1;
}

/** In an offload pool thread (checking every value costs rank²·d): `parseArtifact` with every value verified; returns the config. */
export function checkArtifact({ config, weights, base }: { config: Uint8Array; weights: Uint8Array; base: BaseModelShape }): ReftConfig {
  return parseArtifact(config, weights, base).config;
}

export const CHECK_ARTIFACT = offloadTask(import.meta.url, { checkArtifact });

/** max |R·Rᵀ − I| over the entries. */
export function orthonormalityError(r: Float32Array, rank: number, d: number): number {
  let worst = 0;
  for (let i = 0; i < rank; i++) {
    for (let j = i; j < rank; j++) {
      let dot = 0;
      for (let k = 0; k < d; k++) dot += r[i * d + k] * r[j * d + k];
      worst = Math.max(worst, Math.abs(dot - (i === j ? 1 : 0)));
    }
  }
  return worst;
}

function checkOrthonormalRows(r: Float32Array, rank: number, d: number, name: string): void {
  if (rank > d) throw artifactRotationNotOrthonormal({ name, problem: `rank ${rank} exceeds the hidden size ${d}, rows cannot be orthonormal` }, name);
  const err = orthonormalityError(r, rank, d);
  if (!(err <= ORTHONORMAL_TOLERANCE)) {
    throw artifactRotationNotOrthonormal(
      { name, problem: `rows are not orthonormal (max |R·Rᵀ − I| = ${err.toExponential(2)} > ${ORTHONORMAL_TOLERANCE})` },
      name,
    );
  }
}

/** Folds a kind's tensors into delta = (h·downᵀ + bias)·up. */
export function lowRank(spec: InterventionSpec, t: Record<string, Float32Array>, d: number, allocate: FloatAllocator = plainFloats): LowRankIntervention {
  const { down, bias, up } = factors(spec, t, d, allocate);
  return { ...spec, down, bias, up, digest: factorDigest(down, bias, up) };
}

/**
 * What an edit does, whatever its artifact is called or however often it was replaced: a digest
 * of its factors (the prefix cache keys prompt blocks by it).
 */
export function interventionDigest(iv: Pick<LowRankIntervention, 'down' | 'bias' | 'up' | 'digest'>): string {
  return iv.digest ?? factorDigest(iv.down, iv.bias, iv.up);
}

function factorDigest(...tensors: Float32Array[]): string {
  const hash = createHash('sha256');
  for (const t of tensors) hash.update(new Uint8Array(t.buffer, t.byteOffset, t.byteLength)).update('|');
  return hash.digest('hex').slice(0, 32);
}

/** The kind's factors in the engine's one form: delta = (h·downᵀ + bias)·up. */
function factors(spec: InterventionSpec, t: Record<string, Float32Array>, d: number, allocate: FloatAllocator): Pick<LowRankIntervention, 'down' | 'bias' | 'up'> {
  const zeros = () => allocate(spec.rank * d);
  const minus = (a: Float32Array, b: Float32Array) => {
    const out = allocate(a.length);
    for (let k = 0; k < a.length; k++) out[k] = a[k] - b[k];
    return out;
  };
  const bias = t['source.bias'];
  switch (spec.kind) {
    case 'loreft':
      return { down: minus(t['source.weight'], t.rotate), bias, up: t.rotate };
    case 'direft':
      return { down: t['source.weight'], bias, up: t['proj.weight'] };
    case 'noreft':
      return { down: minus(t['source.weight'], t['proj.weight']), bias, up: t['proj.weight'] };
    case 'consreft':
      return { down: minus(zeros(), t.rotate), bias, up: t.rotate };
    case 'lobireft':
      return { down: zeros(), bias, up: t.rotate };
  }
}
