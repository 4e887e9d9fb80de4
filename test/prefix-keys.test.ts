import { describe, expect, it } from 'vitest';
import { lowRank, type LowRankIntervention } from '../src/interventions/artifact.ts';
import { parsePositions } from '../src/interventions/positions.ts';
import { steer } from '../src/interventions/steer.ts';
import { PREFIX_BLOCK_TOKENS, prefixBlockKeys } from '../src/prefix-cache/block-keys.ts';
import { Rng } from '../src/rng.ts';

/**
 * Which prompt blocks two requests may share (REFT.md: an edit changes the residual stream at
 * its position, which every later position reads): the keys of src/engine/prefix-keys.ts, for
 * every way two requests could share a block wrongly.
 */
const D = 16;
const B = PREFIX_BLOCK_TOKENS;

function intervention(seed: number, layer: number, positions: string, kind: 'loreft' | 'direft' = 'loreft'): LowRankIntervention {
  const rng = new Rng(seed);
  const values = (n: number) => Float32Array.from({ length: n }, () => rng.uniform(-1, 1));
  const t = { rotate: values(2 * D), 'source.weight': values(2 * D), 'source.bias': values(2), 'proj.weight': values(2 * D) };
  return lowRank({ kind, layer, rank: 2, positions: parsePositions(positions) }, t, D);
}

const tokens = (n: number, seed = 1) => Array.from({ length: n }, (_, i) => 1 + ((i * 7919 + seed * 104729) % 500));
const keys = (t: number[], ivs: LowRankIntervention[] = [], ns = 'tenant:a') => prefixBlockKeys(t, ivs, ns);
/** How many leading blocks two key lists share. */
const shared = (a: string[], b: string[]) => {
  let n = 0;
  while (n < a.length && n < b.length && a[n] === b[n]) n++;
  return n;
};

describe('prefix-cache block keys', () => {
  it('cover the full blocks before the last prompt token, chained: a change in block i changes every key from i on', () => {
    expect(keys(tokens(B))).toHaveLength(0); // the last token is always computed
    expect(keys(tokens(B + 1))).toHaveLength(1);
    expect(keys(tokens(3 * B + 1))).toHaveLength(3);
    const a = tokens(4 * B);
    const b = [...a];
    b[B + 5] += 1;
    expect(shared(keys(a), keys(b))).toBe(1);
  });

  it('two different l-only interventions and a plain request share the base blocks of a common prefix', () => {
    const prompt = tokens(4 * B + 10);
    const plain = keys(prompt);
    const one = keys(prompt, [intervention(1, 2, 'l3')]);
    const other = keys(prompt, [intervention(2, 4, 'l5'), intervention(3, 1, 'l1')]);
    expect(plain).toHaveLength(4);
    expect(one).toEqual(plain); // the last positions fall after every full block
    expect(other).toEqual(plain);
    // an l edit reaching back into a block makes it, and the ones after, the request's own
    const long = keys(prompt, [intervention(1, 2, 'l20')]);
    expect(shared(long, plain)).toBe(3);
  });

  it("an f edit never shares another artifact's, strength's or layer's blocks, nor base blocks after its position", () => {
    const prompt = tokens(3 * B + 1);
    const plain = keys(prompt);
    const a = intervention(1, 2, 'f3');
    const withA = keys(prompt, [a]);
    expect(shared(withA, plain)).toBe(0);
    expect(shared(withA, keys(prompt, [intervention(9, 2, 'f3')]))).toBe(0); // another artifact
    expect(shared(withA, keys(prompt, [intervention(1, 3, 'f3')]))).toBe(0); // the same factors on another layer
    expect(shared(withA, keys(prompt, steer([a], { strength: 0.5 })))).toBe(0);
    expect(keys(prompt, steer([a], { strength: 1 }))).toEqual(withA); // strength 1 is the artifact as it is
    // the last 96 of 193 positions: edits from position 97 (block 1) on, so block 0 is the base model's
    const late = { ...a, positions: { first: 0, last: 96 } };
    expect(shared(keys(prompt, [late]), plain)).toBe(1);
  });

  it('the same f edit shares its blocks between prompts that differ only after the shared prefix', () => {
    const a = intervention(1, 2, 'f3');
    const prefix = tokens(3 * B);
    const one = keys([...prefix, ...tokens(40, 2)], [a]);
    const two = keys([...prefix, ...tokens(90, 3)], [a]);
    expect(shared(one, two)).toBe(3);
  });

  it("a replaced artifact's new factors never hit the old one's blocks; the same factors do, whatever they are called", () => {
    const prompt = tokens(2 * B + 1);
    const v1 = intervention(1, 2, 'f3');
    const v2 = intervention(2, 2, 'f3');
    expect(shared(keys(prompt, [{ ...v1, key: 'iv_x@1#0' }]), keys(prompt, [{ ...v2, key: 'iv_x@2#0' }]))).toBe(0);
    expect(keys(prompt, [{ ...v1, key: 'iv_x@1#0' }])).toEqual(keys(prompt, [{ ...v1, key: 'iv_y@7#0' }]));
    // the digest is of the factors: a kind that folds to other factors is another edit
    expect(shared(keys(prompt, [intervention(1, 2, 'f3', 'direft')]), keys(prompt, [v1]))).toBe(0);
  });

  it('namespaces: another tenant, or another salt, never shares a block', () => {
    const prompt = tokens(2 * B + 1);
    expect(shared(keys(prompt, [], 'tenant:a'), keys(prompt, [], 'tenant:b'))).toBe(0);
    expect(shared(keys(prompt, [], 'tenant:a'), keys(prompt, [], 'tenant:a\0salt:x'))).toBe(0);
    expect(keys(prompt, [], 'tenant:a\0salt:x')).toEqual(keys(prompt, [], 'tenant:a\0salt:x'));
  });

  it("positions follow pyreft's n // 2 cap: the same spec edits other positions in a longer prompt", () => {
    const a = intervention(1, 2, 'f80');
    const prefix = tokens(2 * B);
    // 129 tokens: positions 0..63 (block 0 only); 201 tokens: 0..79, so block 1 is edited too
    const short = keys([...prefix, 7], [a]);
    const long = keys([...prefix, ...tokens(73, 5)], [a]);
    expect(short).toHaveLength(2);
    expect(shared(short, long)).toBe(1);
    // a request-time positions override is another edit
    expect(shared(keys([...prefix, 7], steer([a], { positions: 'f2' })), short)).toBe(0);
  });

  it('several artifacts: the edits at a position count whatever order the request lists them in', () => {
    const prompt = tokens(2 * B + 1);
    const [a, b] = [intervention(1, 2, 'f3'), intervention(2, 3, 'f5')];
    expect(keys(prompt, [a, b])).toEqual(keys(prompt, [b, a]));
    expect(shared(keys(prompt, [a, b]), keys(prompt, [a]))).toBe(0);
  });
});
