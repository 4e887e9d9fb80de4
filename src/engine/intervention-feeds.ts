import type { LowRankIntervention } from '../interventions/artifact.ts';
import { positionsFor } from '../interventions/positions.ts';
import type { RequestIntervention } from '../interventions/steer.ts';

/**
 * Packs the interventions of a prefill batch into the graph's per-layer inputs (see
 * buildDecoderGraph): the low-rank factors of every distinct intervention on a layer are
 * stacked along the rank axis, and a mask says how strongly which rank columns act on which
 * token (the intervention's strength, summed where one applies there more than once).
 */
export interface LayerInterventionFeed {
  index: BigInt64Array; // [K, 2] (row, position) pairs, unique
  mask: Float32Array; // [K, R]
  down: Float32Array; // [R, d]
  bias: Float32Array; // [R]
  up: Float32Array; // [R, d]
  k: number;
  r: number;
  /** Where each edit's coefficients are in the graph's [K, R] coefficients output. */
  readout: CoefficientCell[];
}

/**
 * Row `row`'s intervention number `intervention` (in the row's list) at prompt position
 * `position`: its coefficients are row k, columns [column, column + rank) of the output.
 */
export interface CoefficientCell {
  row: number;
  intervention: number;
  position: number;
  k: number;
  column: number;
  rank: number;
}

export interface PrefillRow {
  /** Number of prompt tokens of this row, which interventions' positions are counted over. */
  length: number;
  interventions: readonly RequestIntervention[];
  /** The prompt position of this run's first token (a chunk of a long prompt); default 0. */
  start?: number;
}

export function interventionFeeds(rows: readonly PrefillRow[], seq: number, numLayers: number, d: number): LayerInterventionFeed[] {
  const feeds: LayerInterventionFeed[] = [];
  for (let l = 0; l < numLayers; l++) feeds.push(layerFeed(rows, seq, l, d));
  return feeds;
}

function layerFeed(rows: readonly PrefillRow[], seq: number, layer: number, d: number): LayerInterventionFeed {
  // Distinct interventions on this layer (rows sharing an intervention share its columns), and
  // for each flattened token the intervention indices that apply there, with their strengths.
  const columns = new Map<LowRankIntervention | string, number>();
  const ivs: LowRankIntervention[] = [];
  const byToken = new Map<number, Array<{ index: number; strength: number }>>();
  const cells: Array<{ row: number; intervention: number; position: number; token: number; index: number }> = [];
  rows.forEach((row, b) => {
    row.interventions.forEach((iv, i) => {
      if (iv.layer !== layer) return;
      const start = row.start ?? 0;
      // the positions that fall in this run's [start, start + seq)
      const positions = positionsFor(iv.positions, row.length).filter((p) => p >= start && p < start + seq);
      if (positions.length === 0) return;
      const id = iv.key ?? iv;
      if (!columns.has(id)) {
        columns.set(id, ivs.length);
        ivs.push(iv);
      }
      const index = columns.get(id)!;
      const strength = iv.strength ?? 1;
      for (const p of positions) {
        const token = b * seq + p - start;
        const list = byToken.get(token);
        if (list) list.push({ index, strength });
        else byToken.set(token, [{ index, strength }]);
        cells.push({ row: b, intervention: i, position: p, token, index });
      }
    });
  });
  const offsets: number[] = [];
  let r = 0;
  for (const iv of ivs) {
    offsets.push(r);
    r += iv.rank;
  }
  const down = new Float32Array(r * d);
  const up = new Float32Array(r * d);
  const bias = new Float32Array(r);
  ivs.forEach((iv, i) => {
    down.set(iv.down, offsets[i] * d);
    up.set(iv.up, offsets[i] * d);
    bias.set(iv.bias, offsets[i]);
  });
  const tokens = [...byToken.keys()].sort((a, b) => a - b);
  const kOf = new Map(tokens.map((t, k) => [t, k]));
  const mask = new Float32Array(tokens.length * r);
  tokens.forEach((t, k) => {
    for (const { index: i, strength } of byToken.get(t)!) {
      for (let j = k * r + offsets[i]; j < k * r + offsets[i] + ivs[i].rank; j++) mask[j] += strength;
    }
  });
  const readout = cells.map(({ row, intervention, position, token, index }) => ({
    row,
    intervention,
    position,
    k: kOf.get(token)!,
    column: offsets[index],
    rank: ivs[index].rank,
  }));
  const index = new BigInt64Array(tokens.length * 2);
  tokens.forEach((t, k) => {
    index[2 * k] = BigInt(Math.floor(t / seq));
    index[2 * k + 1] = BigInt(t % seq);
  });
  return { index, mask, down, bias, up, k: tokens.length, r, readout };
}
