import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { lowRank, type InterventionKind, type LowRankIntervention } from '../../src/interventions/artifact.ts';
import { parsePositions } from '../../src/interventions/positions.ts';
import { parseSafetensors, toFloat32, type SafetensorsFile } from '../../src/model/safetensors.ts';

export const SHARED = join(import.meta.dirname, '..', '..', '..', 'shared');
export const STORIES = join(SHARED, 'models', 'stories260k');
export const FIXTURES = join(SHARED, 'fixtures');

interface CaseIntervention {
  name: string;
  kind: InterventionKind;
  layer: number;
  rank: number;
  positions: string;
  resolved_positions: number[];
}

interface RawCase {
  name: string;
  prompt_len: number;
  completion_len?: number;
  interventions: CaseIntervention[];
  greedy_steps?: number;
}

export interface FixtureCase {
  name: string;
  prompt: number[];
  logits: Float32Array; // [n, vocab]
  greedy: number[];
  spec: CaseIntervention[];
  /** The case's tensors, keyed `iv<K>.<tensor>`. */
  tensors: Record<string, Float32Array>;
  interventions: LowRankIntervention[];
}

const file: SafetensorsFile = parseSafetensors(
  new Uint8Array(readFileSync(join(FIXTURES, 'reference.safetensors'))),
  'reference.safetensors',
);
export const reference = JSON.parse(readFileSync(join(FIXTURES, 'reference.json'), 'utf8')) as { cases: RawCase[] };

export function tensor(name: string): Float32Array {
  const info = file.header.tensors.get(name);
  if (!info) throw new Error(`fixture tensor ${name} missing`);
  return toFloat32(file, info);
}

export function ints(name: string): number[] {
  const info = file.header.tensors.get(name)!;
  const view = new DataView(file.bytes.buffer, file.bytes.byteOffset + info.offset, info.byteLength);
  return Array.from({ length: info.byteLength / 8 }, (_, i) => Number(view.getBigInt64(i * 8, true)));
}

function caseTensors(name: string): Record<string, Float32Array> {
  const out: Record<string, Float32Array> = {};
  for (const key of file.header.tensors.keys()) {
    if (key.startsWith(`${name}.iv`) && !key.endsWith('.grad')) out[key.slice(name.length + 1)] = tensor(key);
  }
  return out;
}

export function fixtureCase(raw: RawCase, d = 64): FixtureCase {
  const tensors = caseTensors(raw.name);
  const interventions = raw.interventions.map((iv, k) => {
    const t: Record<string, Float32Array> = {};
    for (const [key, value] of Object.entries(tensors)) if (key.startsWith(`iv${k}.`)) t[key.slice(`iv${k}.`.length)] = value;
    return lowRank({ kind: iv.kind, layer: iv.layer, rank: iv.rank, positions: parsePositions(iv.positions) }, t, d);
  });
  const has = (n: string) => file.header.tensors.has(n);
  return {
    name: raw.name,
    prompt: ints(has(`${raw.name}.prompt`) ? `${raw.name}.prompt` : `${raw.name}.tokens`),
    logits: has(`${raw.name}.logits`) ? tensor(`${raw.name}.logits`) : new Float32Array(0),
    greedy: has(`${raw.name}.greedy`) ? ints(`${raw.name}.greedy`) : [],
    spec: raw.interventions,
    tensors,
    interventions,
  };
}

/** The inference cases (everything but the gradient case). */
export const inferenceCases = (): FixtureCase[] => reference.cases.filter((c) => c.name !== 'grad').map((c) => fixtureCase(c));
