import { Rng } from '../../src/rng.ts';
import type { InterventionKind } from '../../src/interventions/artifact.ts';
import { encodeSafetensors } from '../../src/model/safetensors.ts';
import type { FixtureCase } from './fixtures.ts';

/** A reft/v1 artifact in memory: the two files as they are uploaded. */
export interface ArtifactFiles {
  config: string;
  weights: Uint8Array;
}

export interface ArtifactIntervention {
  kind: InterventionKind;
  layer: number;
  rank: number;
  positions: string;
  tensors: Record<string, Float32Array>;
}

export function artifact(
  interventions: ArtifactIntervention[],
  extra: Record<string, unknown> = {},
  base = { hidden_size: 64, num_hidden_layers: 5 },
): ArtifactFiles {
  const config = {
    format: 'reft/v1',
    base_model: { architecture: 'LlamaForCausalLM', ...base },
    interventions: interventions.map(({ kind, layer, rank, positions }) => ({ kind, layer, rank, positions })),
    ...extra,
  };
  const tensors: Record<string, { shape: number[]; data: Float32Array }> = {};
  interventions.forEach((iv, i) => {
    for (const [name, data] of Object.entries(iv.tensors)) {
      tensors[`interventions.${i}.${name}`] = { shape: name === 'source.bias' ? [iv.rank] : [iv.rank, base.hidden_size], data };
    }
  });
  return { config: JSON.stringify(config, null, 2), weights: encodeSafetensors(tensors) };
}

/** The artifact of a reference fixture case. */
export function fixtureArtifact(c: FixtureCase): ArtifactFiles {
  return artifact(
    c.spec.map((s, k) => {
      const tensors: Record<string, Float32Array> = {};
      for (const [key, value] of Object.entries(c.tensors)) if (key.startsWith(`iv${k}.`)) tensors[key.slice(`iv${k}.`.length)] = value;
      return { kind: s.kind, layer: s.layer, rank: s.rank, positions: s.positions, tensors };
    }),
    { name: c.name },
  );
}

/** Rows orthonormal (Gram–Schmidt on random vectors). */
export function orthonormalRows(rank: number, d: number, rng: Rng): Float32Array {
  const rows: Float64Array[] = [];
  while (rows.length < rank) {
    const v = Float64Array.from({ length: d }, () => rng.next() * 2 - 1);
    for (const r of rows) {
      const dot = r.reduce((s, x, i) => s + x * v[i], 0);
      for (let i = 0; i < d; i++) v[i] -= dot * r[i];
    }
    const norm = Math.hypot(...v);
    if (norm > 1e-6) rows.push(v.map((x) => x / norm));
  }
  const out = new Float32Array(rank * d);
  rows.forEach((r, i) => out.set(r, i * d));
  return out;
}

/** A random LoReFT intervention strong enough to change what the model writes. */
export function randomLoreft(seed: number, layer: number, rank = 4, positions = 'f3+l3', d = 64, scale = 2): ArtifactIntervention {
  const rng = new Rng(seed);
  const rand = (n: number) => Float32Array.from({ length: n }, () => (rng.next() * 2 - 1) * scale);
  return {
    kind: 'loreft',
    layer,
    rank,
    positions,
    tensors: { rotate: orthonormalRows(rank, d, rng), 'source.weight': rand(rank * d), 'source.bias': rand(rank) },
  };
}
