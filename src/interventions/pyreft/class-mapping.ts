import { pyreftClassMismatch } from '../../errors.ts';
import type { InterventionKind } from '../artifact.ts';
import { orthogonalWeight, transpose, type Matrix } from './orthogonal.ts';
import type { PyreftClass } from './saved-config.ts';
import type { TorchTensor } from './tensor.ts';

/**
 * pyreft class → reft/v1 kind and tensors (fixtures/pyreft/README.md "Mapping rules"). pyreft's
 * rotate weight is [d, r]; reft/v1's `rotate` / `proj.weight` is its transpose [r, d]. Values are
 * widened to float64 exactly and rounded to F32 once at the end, so copies stay bit-exact.
 */
export interface ConvertedIntervention {
  kind: InterventionKind;
  rank: number;
  /** reft/v1 tensor name (`rotate`, `source.weight`, ...) → row-major F32 data and shape. */
  tensors: Record<string, { shape: number[]; data: Float32Array }>;
}

const KIND_OF_CLASS: Record<PyreftClass, InterventionKind> = {
  LoreftIntervention: 'loreft',
  NoreftIntervention: 'noreft',
  NodireftIntervention: 'direft',
  DireftIntervention: 'direft',
  ConsreftIntervention: 'consreft',
  LobireftIntervention: 'lobireft',
};

const ORIGINAL = 'rotate_layer.parametrizations.weight.original';
const BASE = 'rotate_layer.parametrizations.weight.0.base';

/** Converts one intervention's state dict; `d` is the model's hidden size. */
export function convertStateDict(cls: PyreftClass, tensors: Map<string, TorchTensor>, d: number, file: string): ConvertedIntervention {
  const sd = new StateDict(tensors, d, file);
  sd.dropDimensionScalars();
  const out = CONVERTERS[cls](sd);
  sd.checkAllUsed(cls);
  return { kind: KIND_OF_CLASS[cls], ...out };
}

type Converter = (sd: StateDict) => Omit<ConvertedIntervention, 'kind'>;

const CONVERTERS: Record<PyreftClass, Converter> = {
  /** pyreft saves LoReFT's rotation already computed, under its own state_dict keys. */
  LoreftIntervention(sd) {
    const rotate = sd.take('rotate_layer');
    const r = sd.rankFromColumns(rotate, 'rotate_layer');
    return output(r, {
      rotate: transpose(sd.matrix(rotate, 'rotate_layer', [sd.d, r])),
      'source.weight': sd.matrix(sd.take('weight'), 'weight', [r, sd.d]),
      'source.bias': sd.vector(sd.take('bias'), 'bias', r),
    });
  },
  /** delta = (h·W1ᵀ + b1 − (h·W2ᵀ + b2))·W2: b2 folds into the source bias. */
  NoreftIntervention(sd) {
    const { r, weight, bias } = learnedSource(sd);
    const projBias = sd.optional('proj_layer.bias');
    const folded = projBias ? subtract(bias, sd.vector(projBias, 'proj_layer.bias', r)) : bias;
    return output(r, { 'source.weight': weight, 'source.bias': folded, 'proj.weight': sd.matrix(sd.take('proj_layer.weight'), 'proj_layer.weight', [r, sd.d]) });
  },
  /** The paper's DiReFT; pyreft never uses proj_layer.bias, so it is dropped. */
  NodireftIntervention(sd) {
    const { r, weight, bias } = learnedSource(sd);
    const proj = sd.matrix(sd.take('proj_layer.weight'), 'proj_layer.weight', [r, sd.d]);
    const projBias = sd.optional('proj_layer.bias');
    if (projBias) sd.vector(projBias, 'proj_layer.bias', r); // shape-checked, then unused
    return output(r, { 'source.weight': weight, 'source.bias': bias, 'proj.weight': proj });
  },
  DireftIntervention(sd) {
    const { r, weight, bias } = learnedSource(sd);
    return output(r, { 'source.weight': weight, 'source.bias': bias, 'proj.weight': transpose(rotation(sd, r)) });
  },
  ConsreftIntervention: constantSourceWithRotation,
  LobireftIntervention: constantSourceWithRotation,
};

/** Consreft and Lobireft: a learned constant `learned_source` [r] and an orthogonal rotation. */
function constantSourceWithRotation(sd: StateDict): Omit<ConvertedIntervention, 'kind'> {
  const r = sd.rankFromColumns(sd.peek(ORIGINAL), ORIGINAL);
  return output(r, { rotate: transpose(rotation(sd, r)), 'source.bias': sd.vector(sd.take('learned_source'), 'learned_source', r) });
}

/** `learned_source` = nn.Linear(d, r): weight [r, d], bias [r]. */
function learnedSource(sd: StateDict): { r: number; weight: Matrix; bias: Float64Array } {
  const w = sd.take('learned_source.weight');
  if (w.shape.length !== 2) throw sd.fail(`"learned_source.weight" has shape [${w.shape}], expected [rank, ${sd.d}]`);
  const r = w.shape[0];
  return { r, weight: sd.matrix(w, 'learned_source.weight', [r, sd.d]), bias: sd.vector(sd.take('learned_source.bias'), 'learned_source.bias', r) };
}

/** W [d, r] from torch's orthogonal parametrization (Householder map, with base). */
function rotation(sd: StateDict, r: number): Matrix {
  const x = sd.matrix(sd.take(ORIGINAL), ORIGINAL, [sd.d, r]);
  const base = sd.matrix(sd.take(BASE), BASE, [sd.d, sd.d]);
  if (r >= sd.d) throw sd.fail(`rank ${r} is not below the hidden size ${sd.d} (torch would use matrix_exp, which is not supported)`);
  return orthogonalWeight(x, base);
}

function subtract(a: Float64Array, b: Float64Array): Float64Array {
  return a.map((v, i) => v - b[i]);
}

function output(rank: number, tensors: Record<string, Matrix | Float64Array>): Omit<ConvertedIntervention, 'kind'> {
  const out: ConvertedIntervention['tensors'] = {};
  for (const [name, t] of Object.entries(tensors)) {
    out[name] = t instanceof Float64Array ? { shape: [t.length], data: Float32Array.from(t) } : { shape: [t.rows, t.cols], data: Float32Array.from(t.data) };
  }
  return { rank, tensors: out };
}

const FLOAT_DTYPES = new Set(['F32', 'BF16', 'F16']);

/** A state dict being consumed: every key must be used by the class's mapping, and shapes checked. */
class StateDict {
  private readonly used = new Set<string>();
  constructor(
    private readonly tensors: Map<string, TorchTensor>,
    readonly d: number,
    private readonly file: string,
  ) {}

  peek(key: string): TorchTensor {
    const t = this.tensors.get(key);
    if (!t) throw this.fail(`state dict has no "${key}" (present: ${[...this.tensors.keys()].join(', ') || 'nothing'})`);
    return t;
  }

  take(key: string): TorchTensor {
    const t = this.peek(key);
    this.used.add(key);
    return t;
  }

  optional(key: string): TorchTensor | undefined {
    return this.tensors.has(key) ? this.take(key) : undefined;
  }

  /** `embed_dim` / `interchange_dim`: int64 scalars that must equal the hidden size; dropped. */
  dropDimensionScalars(): void {
    for (const key of ['embed_dim', 'interchange_dim']) {
      const t = this.optional(key);
      if (!t) continue;
      if (t.dtype !== 'I64' || t.shape.length !== 0) throw this.fail(`"${key}" must be an int64 scalar, got ${t.dtype} [${t.shape}]`);
      if (t.values[0] !== this.d) throw this.fail(`"${key}" is ${t.values[0]} but the model's hidden size is ${this.d}`);
    }
  }

  checkAllUsed(cls: PyreftClass): void {
    const extra = [...this.tensors.keys()].filter((k) => !this.used.has(k));
    if (extra.length) throw this.fail(`state dict has ${extra.map((k) => `"${k}"`).join(', ')}, which ${cls} does not have (does config.json's intervention_types match the file?)`);
  }

  /** r from a [d, r] tensor. */
  rankFromColumns(t: TorchTensor, key: string): number {
    if (t.shape.length !== 2 || t.shape[0] !== this.d) throw this.fail(`"${key}" has shape [${t.shape}], expected [${this.d}, rank]`);
    if (t.shape[1] === 0) throw this.fail(`"${key}" has rank 0`);
    return t.shape[1];
  }

  matrix(t: TorchTensor, key: string, shape: [number, number]): Matrix {
    this.checkFloat(t, key, shape);
    return { rows: shape[0], cols: shape[1], data: t.values };
  }

  vector(t: TorchTensor, key: string, n: number): Float64Array {
    this.checkFloat(t, key, [n]);
    return t.values;
  }

  private checkFloat(t: TorchTensor, key: string, shape: number[]): void {
    if (!FLOAT_DTYPES.has(t.dtype)) throw this.fail(`"${key}" has dtype ${t.dtype}, expected a float type`);
    if (t.shape.length !== shape.length || t.shape.some((s, i) => s !== shape[i])) {
      throw this.fail(`"${key}" has shape [${t.shape}], expected [${shape}] (hidden size ${this.d})`);
    }
  }

  fail(message: string) {
    return pyreftClassMismatch({ file: this.file, problem: message }, this.file);
  }
}
