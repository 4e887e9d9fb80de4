import type { InterventionSpec } from '../interventions/artifact.ts';
import { positionsFor } from '../interventions/positions.ts';
import type { Rng } from '../rng.ts';
import type { LayerTrainingFeed, LowRankFactors, TrainingBatch } from './step-session.ts';

/** A tokenized training row: the prompt (edited) followed by the completion (scored). */
export interface TrainingExample {
  tokens: readonly number[];
  promptLength: number;
}

/** Where one intervention's rank columns sit in its layer's stacked factors. */
export interface InterventionSlot {
  spec: InterventionSpec;
  offset: number;
}

/**
 * The fixed column layout of a training job: per layer, its interventions stacked along the
 * rank axis in declaration order. It never changes between batches, so gradients always map
 * back to the same columns.
 */
export class StackLayout {
  readonly layers: number[];
  readonly slots = new Map<number, InterventionSlot[]>();
  readonly rankOf = new Map<number, number>();
  /** Each intervention's slot, in declaration order. */
  private readonly bySpec: InterventionSlot[];

  constructor(specs: readonly InterventionSpec[]) {
    this.bySpec = specs.map((spec) => {
      const slot = { spec, offset: this.rankOf.get(spec.layer) ?? 0 };
      const slots = this.slots.get(spec.layer);
      if (slots) slots.push(slot);
      else this.slots.set(spec.layer, [slot]);
      this.rankOf.set(spec.layer, slot.offset + spec.rank);
      return slot;
    });
    this.layers = [...this.slots.keys()].sort((a, b) => a - b);
  }

  slotOf(index: number): InterventionSlot {
    return this.bySpec[index];
  }
}

/** The current low-rank factors of every intervened layer (the trainer rewrites them each step). */
export type LayerFactors = Map<number, LowRankFactors>;

export function allocateFactors(layout: StackLayout, d: number): LayerFactors {
  const out: LayerFactors = new Map();
  for (const l of layout.layers) {
    const r = layout.rankOf.get(l)!;
    out.set(l, { down: new Float32Array(r * d), bias: new Float32Array(r), up: new Float32Array(r * d) });
  }
  return out;
}

export interface DropoutOptions {
  p: number;
  rng: Rng;
}

/**
 * Pads `examples` into one batch (right padding) with the intervention feeds:
 * targets[b, s] = tokens[s + 1], scored (loss_mask 1) when token s + 1 is a completion token.
 */
export function packBatch(
  examples: readonly TrainingExample[],
  layout: StackLayout,
  factors: LayerFactors,
  d: number,
  dropout?: DropoutOptions,
): TrainingBatch {
  const batch = examples.length;
  const seq = Math.max(...examples.map((e) => e.tokens.length));
  const n = batch * seq;
  const inputIds = new BigInt64Array(n);
  const attentionMask = new BigInt64Array(n);
  const positionIds = new BigInt64Array(n);
  const targets = new BigInt64Array(n);
  const lossMask = new Float32Array(n);
  examples.forEach((e, b) => {
    const at = b * seq;
    for (let s = 0; s < seq; s++) positionIds[at + s] = BigInt(s);
    e.tokens.forEach((tok, s) => {
      inputIds[at + s] = BigInt(tok);
      attentionMask[at + s] = 1n;
      if (s + 1 < e.tokens.length) {
        targets[at + s] = BigInt(e.tokens[s + 1]);
        if (s + 1 >= e.promptLength) lossMask[at + s] = 1;
      }
    });
  });
  const layers = new Map<number, LayerTrainingFeed>();
  for (const l of layout.layers) layers.set(l, layerFeed(examples, seq, layout.slots.get(l)!, factors.get(l)!, d, dropout));
  return { batch, seq, inputIds, attentionMask, positionIds, targets, lossMask, layers };
}

function layerFeed(
  examples: readonly TrainingExample[],
  seq: number,
  slots: readonly InterventionSlot[],
  f: LowRankFactors,
  d: number,
  dropout?: DropoutOptions,
): LayerTrainingFeed {
  // for each flattened token, the slots that edit it
  const byToken = new Map<number, InterventionSlot[]>();
  examples.forEach((e, b) => {
    for (const slot of slots) {
      for (const p of positionsFor(slot.spec.positions, e.promptLength)) {
        const token = b * seq + p;
        const list = byToken.get(token);
        if (list) list.push(slot);
        else byToken.set(token, [slot]);
      }
    }
  });
  const tokens = [...byToken.keys()].sort((a, b) => a - b);
  const k = tokens.length;
  const r = f.bias.length;
  const mask = new Float32Array(k * r);
  tokens.forEach((t, i) => {
    for (const s of byToken.get(t)!) mask.fill(1, i * r + s.offset, i * r + s.offset + s.spec.rank);
  });
  return { rows: BigInt64Array.from(tokens, BigInt), mask, down: f.down, bias: f.bias, up: f.up, dropout: dropoutMask(k * d, dropout) };
}

/** pyreft's nn.Dropout on the edited rows: keep with probability 1 − p, scaled by 1/(1 − p). */
function dropoutMask(n: number, dropout?: DropoutOptions): Float32Array {
  const out = new Float32Array(n);
  if (!dropout || dropout.p === 0) return out.fill(1);
  const scale = 1 / (1 - dropout.p);
  for (let i = 0; i < n; i++) out[i] = dropout.rng.next() < dropout.p ? 0 : scale;
  return out;
}
