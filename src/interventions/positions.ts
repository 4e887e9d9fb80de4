import { positionsInvalid } from '../errors.ts';

/** A position spec `fN`, `lN` or `fN+lN`: the first and/or last N prompt tokens. */
export interface PositionSpec {
  first: number;
  last: number;
}

const SPEC = /^(?:f(\d+)(?:\+l(\d+))?|l(\d+))$/;

export function parsePositions(spec: string, field = 'positions'): PositionSpec {
  const m = SPEC.exec(spec);
  if (!m) throw positionsInvalid({ field, spec, problem: 'is not a position spec (fN, lN or fN+lN)' }, field);
  const first = Number(m[1] ?? 0);
  const last = Number(m[2] ?? m[3] ?? 0);
  if (first + last === 0) throw positionsInvalid({ field, spec, problem: 'selects no positions' }, field);
  if (first > 4096 || last > 4096) throw positionsInvalid({ field, spec, problem: 'is too large (at most 4096 each side)' }, field);
  return { first, last };
}

export function formatPositions(p: PositionSpec): string {
  if (p.first && p.last) return `f${p.first}+l${p.last}`;
  return p.first ? `f${p.first}` : `l${p.last}`;
}

/**
 * The prompt positions an intervention edits, pyreft's `get_intervention_locations`: each side is
 * capped at n // 2, so the two sides never overlap.
 */
export function positionsFor(spec: PositionSpec, n: number): number[] {
  const cap = Math.floor(n / 2);
  const first = Math.min(spec.first, cap);
  const last = Math.min(spec.last, cap);
  const out: number[] = [];
  for (let i = 0; i < first; i++) out.push(i);
  for (let i = n - last; i < n; i++) out.push(i);
  return out;
}
