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
      scores = Float32Array.from(logits);
      for (const t of this.seen) scores[t] = scores[t] > 0 ? scores[t] / p.repetitionPenalty : scores[t] * p.repetitionPenalty;
    }
    if ((this.counts && this.counts.size) || p.logitBias?.length) {
      if (scores === logits) scores = Float32Array.from(logits);
      const frequency = p.frequencyPenalty ?? 0;
      const presence = p.presencePenalty ?? 0;
      for (const [t, n] of this.counts ?? []) scores[t] -= n * frequency + presence;
      for (const [t, bias] of p.logitBias ?? []) scores[t] += bias;
    }
    if (mask) {
      if (scores === logits) scores = logits.slice();
      applyMask(scores, mask.bits, mask.vocabSize);
    }
    const token = p.temperature === 0 ? argmax(scores) : this.draw(scores);
    if (p.repetitionPenalty !== 1) this.seen.add(token);
    this.counts?.set(token, (this.counts.get(token) ?? 0) + 1);
    return token;
  }

  private draw(scores: Float32Array): number {
    const { temperature, topK, topP } = this.params;
    // Tokens more than 40 nats below the best carry < 1e-17 of the mass each: leave them out
    // of the sort, which otherwise dominates a sampled step over a large vocabulary.
    let max = -Infinity;
    for (let i = 0; i < scores.length; i++) if (scores[i] > max) max = scores[i];
    const floor = max - 40 * temperature;
    const order: number[] = [];
    for (let i = 0; i < scores.length; i++) if (scores[i] >= floor) order.push(i);
    order.sort((a, b) => scores[b] - scores[a]);
    const keep = topK > 0 ? Math.min(topK, order.length) : order.length;
    const probs = new Float64Array(keep);
    let total = 0;
    for (let i = 0; i < keep; i++) total += probs[i] = Math.exp((scores[order[i]] - max) / temperature);
    // nucleus: the smallest prefix whose mass reaches top_p (always at least one token)
    let cut = keep;
    if (topP < 1) {
      let mass = 0;
      for (let i = 0; i < keep; i++) {
        mass += probs[i] / total;
        if (mass >= topP) {
          cut = i + 1;
          break;
        }
      }
    }
    let kept = 0;
    for (let i = 0; i < cut; i++) kept += probs[i];
    let u = this.rng.next() * kept;
    for (let i = 0; i < cut; i++) {
      u -= probs[i];
      if (u < 0) return order[i];
    }
    return order[cut - 1];
  }
}
