import { describe, expect, it } from 'vitest';
import { expAbove40, Sampler, type SamplingParams } from '../src/sampling/sampler.ts';

/**
 * The sampler's draws against the distribution written the plain way: candidates sorted best
 * first, the top k kept, then the smallest prefix whose mass reaches top_p, renormalized.
 */
function reference(scores: Float32Array, { temperature, topK, topP }: SamplingParams): Float64Array {
  const max = Math.max(...scores);
  const order = [...scores.keys()].filter((i) => scores[i] >= max - 40 * temperature).sort((a, b) => scores[b] - scores[a] || a - b);
  const keep = topK > 0 ? Math.min(topK, order.length) : order.length;
  const w = order.slice(0, keep).map((i) => Math.exp((scores[i] - max) / temperature));
  const total = w.reduce((a, x) => a + x, 0);
  let cut = keep;
  for (let i = 0, mass = 0; topP < 1 && i < keep; i++) {
    mass += w[i] / total;
    if (mass >= topP) {
      cut = i + 1;
      break;
    }
  }
  const kept = w.slice(0, cut).reduce((a, x) => a + x, 0);
  const p = new Float64Array(scores.length);
  for (let i = 0; i < cut; i++) p[order[i]] = w[i] / kept;
  return p;
}

const V = 300;
// nine levels a few hundredths apart within each, so a cut falls inside crowded score ranges
const scores = Float32Array.from({ length: V }, (_, i) => Math.round(Math.sin(i * 12.9898) * 4) + ((i * 7) % 13) * 1e-3);
scores[5] = scores[6]; // a tie

describe('sampling', () => {
  const cases: Array<[number, number, number]> = [
    [1, 0, 1],
    [0.7, 0, 0.9],
    [1, 20, 1],
    [1.3, 50, 0.8],
    [1, 0, 0.05],
    [1, 3, 0.99],
    [0.5, 0, 0.5],
  ];
  for (const [temperature, topK, topP] of cases) {
    it(`temperature ${temperature}, top_k ${topK}, top_p ${topP}: draws follow the sorted reference, never outside its tokens`, () => {
      const params = { temperature, topK, topP, repetitionPenalty: 1, seed: 7 };
      const p = reference(scores, params);
      const sampler = new Sampler(params, []);
      const n = 20_000;
      const counts = new Float64Array(V);
      for (let i = 0; i < n; i++) counts[sampler.next(scores)]++;
      for (let t = 0; t < V; t++) {
        if (p[t] === 0) expect(counts[t], `token ${t} is outside the kept set`).toBe(0);
        // five standard deviations of a count over n draws, and a few draws of a rare token
        else expect(Math.abs(counts[t] - n * p[t])).toBeLessThan(5 * Math.sqrt(n * p[t] * (1 - p[t])) + 3);
      }
    });
  }

  it("a draw's weights are e^x within 2e-7 over the whole range a candidate can have", () => {
    let worst = 0;
    for (let i = 0; i <= 400_000; i++) {
      const x = (-40 * i) / 400_000 - (i === 400_000 ? 1e-9 : 0);
      worst = Math.max(worst, Math.abs(expAbove40(x) / Math.exp(x) - 1));
    }
    expect(worst).toBeLessThan(2e-7);
  });

  it('the same seed draws the same tokens; temperature 0 is the argmax', () => {
    const params = { temperature: 0.9, topK: 40, topP: 0.95, repetitionPenalty: 1, seed: 3 };
    const draw = () => {
      const s = new Sampler(params, []);
      return Array.from({ length: 50 }, () => s.next(scores));
    };
    expect(draw()).toEqual(draw());
    expect(new Sampler({ ...params, temperature: 0 }, []).next(scores)).toBe(scores.indexOf(Math.max(...scores)));
  });
});
