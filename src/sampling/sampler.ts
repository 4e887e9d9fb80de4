import { Rng } from '../rng.ts';
import { applyMask } from '../grammar/row.ts';

/**
 * Next-token selection: repetition penalty, OpenAI's frequency/presence penalties and logit
 * bias, temperature, top-k, top-p, then a draw from a seeded generator (same seed, same tokens).
 * Temperature 0 is greedy. The adjustments cost nothing when off.
 */
export interface SamplingParams {
  temperature: number;
  topK: number; // 0 = off
  topP: number; // 1 = off
  repetitionPenalty: number; // 1 = off
  seed?: number;
  /** Subtracted once per earlier occurrence in the generated tokens (OpenAI's frequency_penalty). */
  frequencyPenalty?: number;
  /** Subtracted once from every token already generated (OpenAI's presence_penalty). */
  presencePenalty?: number;
  /** [token, bias] pairs added to the logits (OpenAI's logit_bias). */
  logitBias?: Array<[number, number]>;
}

export const GREEDY: SamplingParams = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1 };

export function argmax(logits: Float32Array): number {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

/** log Σ exp(logits): log p(t) = logits[t] − logSumExp(logits) under the model's raw distribution. */
export function logSumExp(logits: Float32Array): number {
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i] > max) max = logits[i];
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i] - max);
  return max + Math.log(sum);
}

export class Sampler {
  private readonly rng: Rng;
  private readonly seen = new Set<number>();
  /** Generated tokens' counts, kept only when a frequency or presence penalty is set. */
  private readonly counts: Map<number, number> | null;

  constructor(
    readonly params: SamplingParams,
    promptTokens: readonly number[],
  ) {
    this.rng = new Rng(params.seed ?? Math.floor(Math.random() * 2 ** 32));
    if (params.repetitionPenalty !== 1) for (const t of promptTokens) this.seen.add(t);
    this.counts = params.frequencyPenalty || params.presencePenalty ? new Map() : null;
  }

  /**
   * Picks the next token; `logits` is not modified. `mask` (structured output: bit t set = token t
   * allowed, over the first `maskVocab` ids) applies after the penalties and the bias and before
   * temperature, top-k and top-p, so every way of sampling picks only allowed tokens.
   */
  next(logits: Float32Array, mask?: { bits: Int32Array; vocabSize: number }): number {
    const p = this.params;
    let scores = logits;
    if (p.repetitionPenalty !== 1 && this.seen.size) {
      scores = scratchCopy(logits);
      for (const t of this.seen) scores[t] = scores[t] > 0 ? scores[t] / p.repetitionPenalty : scores[t] * p.repetitionPenalty;
    }
    if ((this.counts && this.counts.size) || p.logitBias?.length) {
      if (scores === logits) scores = scratchCopy(logits);
      const frequency = p.frequencyPenalty ?? 0;
      const presence = p.presencePenalty ?? 0;
      for (const [t, n] of this.counts ?? []) scores[t] -= n * frequency + presence;
      for (const [t, bias] of p.logitBias ?? []) scores[t] += bias;
    }
    if (mask) {
      if (scores === logits) scores = scratchCopy(logits);
      applyMask(scores, mask.bits, mask.vocabSize);
    }
    const token = p.temperature === 0 ? argmax(scores) : this.draw(scores);
    if (p.repetitionPenalty !== 1) this.seen.add(token);
    this.counts?.set(token, (this.counts.get(token) ?? 0) + 1);
    return token;
  }

  /**
   * A draw under temperature, top-k and top-p without sorting the vocabulary (sorting a 128k
   * vocabulary's near-flat candidates took 30-60 ms a row): candidates are binned by score, whole
   * bins are kept from the best down, and only the bin where top-k or top-p cuts is sorted.
   * Tokens more than 40 nats below the best carry < 1e-17 of the mass each and are left out.
   */
  private draw(scores: Float32Array): number {
    const { temperature, topK, topP } = this.params;
    const v = scores.length;
    let max = -Infinity;
    for (let i = 0; i < v; i++) if (scores[i] > max) max = scores[i];
    const floor = max - 40 * temperature;
    if (weights.length < v) [weights, binOf] = [new Float64Array(v), new Uint16Array(v)];
    if (topK === 0 && topP >= 1) return this.drawAll(scores, max, floor);
    const binMass = new Float64Array(BINS);
    const binCount = new Uint32Array(BINS);
    const scale = BINS / (max - floor);
    let candidates = 0;
    for (let i = 0; i < v; i++) {
      if (!(scores[i] >= floor)) {
        weights[i] = 0;
        continue;
      }
      const b = Math.min(BINS - 1, Math.floor((scores[i] - floor) * scale));
      binOf[i] = b;
      binMass[b] += weights[i] = expAbove40((scores[i] - max) / temperature);
      binCount[b]++;
      candidates++;
    }
    // the kept tokens: every candidate in a bin above `cut`, and `partial` (bin `cut`'s best)
    let cut = -1;
    let partial: number[] = [];
    const members = (b: number) => {
      const m: number[] = [];
      for (let i = 0; i < v; i++) if (weights[i] > 0 && binOf[i] === b) m.push(i);
      return m.sort((x, y) => scores[y] - scores[x] || x - y);
    };
    if (topK > 0 && topK < candidates) {
      let n = 0;
      for (cut = BINS - 1; n + binCount[cut] < topK; cut--) n += binCount[cut];
      partial = members(cut).slice(0, topK - n);
    }
    const massAbove = (b: number) => binMass.subarray(b + 1).reduce((a, x) => a + x, 0);
    let kept = massAbove(cut) + partial.reduce((a, i) => a + weights[i], 0);
    if (topP < 1) {
      // nucleus: the smallest best-first prefix whose mass reaches top_p (at least one token)
      const target = topP * kept;
      let mass = 0;
      let b = BINS - 1;
      for (; b > cut && mass + binMass[b] < target; b--) mass += binMass[b];
      const from = b > cut ? members(b) : b === cut ? partial : [];
      let n = 0;
      while (n < from.length && (n === 0 || mass < target)) mass += weights[from[n++]];
      if (b >= cut && from.length) [cut, partial, kept] = [b, from.slice(0, n), mass];
    }
    let u = this.rng.next() * kept;
    let last = partial.at(-1) ?? -1;
    for (let i = 0; i < v; i++) {
      if (weights[i] > 0 && binOf[i] > cut) {
        last = i;
        if ((u -= weights[i]) < 0) return i;
      }
    }
    for (const i of partial) if ((u -= weights[i]) < 0) return i;
    return last;
  }

  /** A draw over every candidate, in token order (no top-k or top-p: nothing to rank or bin). */
  private drawAll(scores: Float32Array, max: number, floor: number): number {
    const t = this.params.temperature;
    let total = 0;
    for (let i = 0; i < scores.length; i++) total += weights[i] = scores[i] >= floor ? expAbove40((scores[i] - max) / t) : 0;
    let u = this.rng.next() * total;
    let last = 0;
    for (let i = 0; i < scores.length; i++) {
      if (weights[i] === 0) continue;
      last = i;
      if ((u -= weights[i]) < 0) return i;
    }
    return last;
  }
}

/**
 * e^x for x in [−40, 0], the draws' weights (candidates are within 40 nats of the best), within
 * 2e-7 of Math.exp (float32's own precision is 1.2e-7): 2^k from a table times a degree-6
 * polynomial for 2^f around f = ½. Math.exp was most of a draw: 1.8 of 1.9 ms over 128k tokens;
 * a draw is 0.7–0.9 ms this way.
 */
const EXP2_TERMS = [1, 2, 3, 4, 5, 6].map((n) => Math.LN2 ** n / [1, 2, 6, 24, 120, 720][n - 1]);
const [E1, E2, E3, E4, E5, E6] = EXP2_TERMS;
const POW2_SQRT2 = Float64Array.from({ length: 64 }, (_, i) => 2 ** (i - 63) * Math.SQRT2);

export function expAbove40(x: number): number {
  const y = x * Math.LOG2E;
  const k = Math.floor(y);
  const f = y - k - 0.5;
  return POW2_SQRT2[k + 63] * (1 + f * (E1 + f * (E2 + f * (E3 + f * (E4 + f * (E5 + f * E6))))));
}

/** Score bins of a draw; the draw's scratch, shared (the sampler runs on one thread, never reentered). */
const BINS = 2048;
let weights = new Float64Array(0);
let binOf = new Uint16Array(0);
/**
 * The scores when they differ from the logits (penalties, bias, a grammar's mask): scratch too.
 * A fresh copy per row and step was 512 KB of garbage a token at 128k tokens, and the collector's
 * time showed in constrained decoding.
 */
let adjusted = new Float32Array(0);

function scratchCopy(logits: Float32Array): Float32Array {
  if (adjusted.length < logits.length) adjusted = new Float32Array(logits.length);
  const scores = adjusted.length === logits.length ? adjusted : adjusted.subarray(0, logits.length);
  scores.set(logits);
  return scores;
}
