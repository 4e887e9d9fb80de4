import type { LowRankIntervention } from '../interventions/artifact.ts';
import { positionsFor } from '../interventions/positions.ts';

/**
 * Packs the interventions of a prefill batch into the graph's per-layer inputs (see
 * buildDecoderGraph): the low-rank factors of every distinct intervention on a layer are
 * stacked along the rank axis, and a mask says which rank columns act on which token.
 */
export interface LayerInterventionFeed {
  index: BigInt64Array; // [K, 2] (row, position) pairs, unique
  mask: Float32Array; // [K, R]
  down: Float32Array; // [R, d]
  bias: Float32Array; // [R]
  up: Float32Array; // [R, d]
  k: number;
  r: number;
}

export interface PrefillRow {
  /** Number of prompt tokens of this row, which interventions' positions are counted over. */
  length: number;
  interventions: readonly LowRankIntervention[];
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
  // for each flattened token the intervention indices that apply there.
  const columns = new Map<LowRankIntervention | string, number>();
  const ivs: LowRankIntervention[] = [];
  const byToken = new Map<number, number[]>();
  rows.forEach((row, b) => {
    for (const iv of row.interventions) {
      if (iv.layer !== layer) continue;
      const start = row.start ?? 0;
      // the positions that fall in this run's [start, start + seq), as offsets into it
      const positions = positionsFor(iv.positions, row.length)
        .map((p) => p - start)
        .filter((p) => p >= 0 && p < seq);
      if (positions.length === 0) continue;
      const id = iv.key ?? iv;
      if (!columns.has(id)) {
        columns.set(id, ivs.length);
        ivs.push(iv);
      }
      const index = columns.get(id)!;
      for (const p of positions) {
        const token = b * seq + p;
        const list = byToken.get(token);
        if (list) list.push(index);
        else byToken.set(token, [index]);
      }
    }
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
  const mask = new Float32Array(tokens.length * r);
  tokens.forEach((t, k) => {
    for (const i of byToken.get(t)!) mask.fill(1, k * r + offsets[i], k * r + offsets[i] + ivs[i].rank);
  });
  const index = new BigInt64Array(tokens.length * 2);
  tokens.forEach((t, k) => {
    index[2 * k] = BigInt(Math.floor(t / seq));
    index[2 * k + 1] = BigInt(t % seq);
  });
  return { index, mask, down, bias, up, k: tokens.length, r };
}
