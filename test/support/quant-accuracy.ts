import type { StepRunner } from '../../src/engine/step-runner.ts';
import { Sampler } from '../../src/sampling/sampler.ts';

/**
 * Teacher-forced accuracy of a quantized model against the float one, on text the float model
 * generates itself: every position's next-token distribution compared (mean KL(float ‖ quantized)
 * and top-1 agreement).
 */

/** Samples (temperature 1, seeded) `tokens` new tokens after each prompt on the float engine. */
export async function selfGeneratedText(
  engine: StepRunner,
  prompts: readonly number[][],
  tokens: number,
  seed: number,
): Promise<number[][]> {
  const out: number[][] = [];
  for (const [i, prompt] of prompts.entries()) {
    const sampler = new Sampler({ temperature: 1, topK: 0, topP: 1, repetitionPenalty: 1, seed: seed + i }, prompt);
    const [first] = await engine.prefill([{ tokens: prompt }]);
    const seq = [...prompt, sampler.next(first.logits)];
    while (seq.length < prompt.length + tokens) {
      const logits = (await engine.decode(new Map([[first.id, seq.at(-1)!]]))).get(first.id)!;
      seq.push(sampler.next(logits));
    }
    engine.release(first.id);
    out.push(seq);
  }
  return out;
}

/** The logits of every position of each sequence, [n, vocab] per sequence. */
export async function teacherForced(engine: StepRunner, seqs: readonly number[][]): Promise<Float32Array[]> {
  const out: Float32Array[] = [];
  for (const tokens of seqs) {
    const [o] = await engine.prefill([{ tokens, allLogits: true }]);
    engine.release(o.id);
    out.push(o.logits);
  }
  return out;
}

export interface Agreement {
  positions: number;
  /** Mean KL(p_float ‖ p_quantized) in nats. */
  meanKl: number;
  /** Share of positions whose top-1 token is the float model's. */
  top1: number;
}

function logSoftmax(x: Float32Array, at: number, n: number): Float64Array {
  let max = -Infinity;
  for (let i = 0; i < n; i++) max = Math.max(max, x[at + i]);
  let sum = 0;
  for (let i = 0; i < n; i++) sum += Math.exp(x[at + i] - max);
  const lse = max + Math.log(sum);
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = x[at + i] - lse;
  return out;
}

export function compare(reference: readonly Float32Array[], test: readonly Float32Array[], vocab: number): Agreement {
  let positions = 0;
  let kl = 0;
  let same = 0;
  reference.forEach((ref, s) => {
    for (let at = 0; at < ref.length; at += vocab) {
      const p = logSoftmax(ref, at, vocab);
      const q = logSoftmax(test[s], at, vocab);
      let k = 0;
      let bp = 0;
      let bq = 0;
      for (let i = 0; i < vocab; i++) {
        k += Math.exp(p[i]) * (p[i] - q[i]);
        if (p[i] > p[bp]) bp = i;
        if (q[i] > q[bq]) bq = i;
      }
      kl += k;
      if (bp === bq) same++;
      positions++;
    }
  });
  return { positions, meanKl: kl / positions, top1: same / positions };
}
