/**
 * Exact grammars for bounded numbers. xgrammar 0.1.27 (the web build) writes wrong rules for
 * JSON Schema's numeric bounds: `{"type":"integer","minimum":0,"maximum":120}` allows 121…129,
 * `{"type":"number","maximum":10}` allows 10.5, a bound of -1.5 lets any character stand for its
 * dot. So a bounded `integer` or `number` is taken out of the schema before xgrammar sees it
 * (a unique string constant stands in for it) and its rule, built here, replaces the constant's
 * rule in the EBNF xgrammar writes for the rest.
 *
 * The rules are exact: every string they allow is a JSON number inside the bounds. A `number`
 * is written with a fixed count of decimals: as many as the bounds have, at least 1, at most 6
 * (3.25 in [0, 10] with 2; 7 in [0, 10] as "7.0"); an integer as an integer. A missing side is
 * taken as ±1e15 so that the digits always end.
 */
const FAR = 1e15;
const MAX_DECIMALS = 6;

export interface NumericBounds {
  type: 'integer' | 'number';
  minimum?: number;
  maximum?: number;
  exclusiveMinimum?: number;
  exclusiveMaximum?: number;
}

function decimalsOf(x: number | undefined): number {
  if (x === undefined || Number.isInteger(x)) return 0;
  const s = x.toString();
  const m = /\.(\d+)/.exec(s);
  const e = /e-(\d+)/.exec(s);
  return Math.max(m ? m[1].length : 0, e ? Number(e[1]) : 0);
}

/** The integers M of the scaled range [lo·10^k, hi·10^k], exclusive sides moved in by one; null if empty. */
function scaledRange(b: NumericBounds, k: number): [bigint, bigint] | null {
  const scale = 10 ** k;
  const lowSide = b.exclusiveMinimum !== undefined && (b.minimum === undefined || b.exclusiveMinimum >= b.minimum);
  const low = lowSide ? b.exclusiveMinimum! : (b.minimum ?? -FAR);
  const highSide = b.exclusiveMaximum !== undefined && (b.maximum === undefined || b.exclusiveMaximum <= b.maximum);
  const high = highSide ? b.exclusiveMaximum! : (b.maximum ?? FAR);
  let lo = Math.ceil(Math.round(low * scale * 1e6) / 1e6);
  let hi = Math.floor(Math.round(high * scale * 1e6) / 1e6);
  if (lowSide && lo === low * scale) lo += 1;
  if (highSide && hi === high * scale) hi -= 1;
  if (lo > hi) return null;
  return [BigInt(lo), BigInt(hi)];
}

const digitClass = (a: number, b: number) => (a === b ? `"${a}"` : `[${a}-${b}]`);

/** Fixed-width digit strings (leading zeros kept) between a and b, both `width` digits. */
function fixedWidth(a: string, b: string): string {
  if (a.length === 0) return '""';
  const da = Number(a[0]);
  const db = Number(b[0]);
  const restA = a.slice(1);
  const restB = b.slice(1);
  const w = restA.length;
  if (da === db) return seq(`"${da}"`, fixedWidth(restA, restB));
  const alts: string[] = [];
  const all9 = '9'.repeat(w);
  const all0 = '0'.repeat(w);
  if (restA === all0 && restB === all9) return seq(digitClass(da, db), anyDigits(w));
  alts.push(seq(`"${da}"`, fixedWidth(restA, all9)));
  if (db - da > 1) alts.push(seq(digitClass(da + 1, db - 1), anyDigits(w)));
  alts.push(seq(`"${db}"`, fixedWidth(all0, restB)));
  return `(${alts.join(' | ')})`;
}

const anyDigits = (w: number) => (w === 0 ? '""' : w === 1 ? '[0-9]' : `[0-9]{${w}}`);
const seq = (a: string, b: string) => (b === '""' ? a : a === '""' ? b : `${a} ${b}`);

/** Non-negative integers between a and b, written without leading zeros. */
function naturals(a: bigint, b: bigint): string {
  const alts: string[] = [];
  for (let n = a.toString().length; n <= b.toString().length; n++) {
    const first = n === 1 ? 0n : 10n ** BigInt(n - 1);
    const last = 10n ** BigInt(n) - 1n;
    const lo = a > first ? a : first;
    const hi = b < last ? b : last;
    if (lo <= hi) alts.push(fixedWidth(lo.toString(), hi.toString()));
  }
  return alts.length === 1 ? alts[0] : `(${alts.join(' | ')})`;
}

/** Non-negative scaled values M in [a, b] written as I.DDD (k decimals; integers when k is 0). */
function magnitudes(a: bigint, b: bigint, k: number): string {
  if (k === 0) return naturals(a, b);
  const s = 10n ** BigInt(k);
  const [ia, da] = [a / s, a % s];
  const [ib, db] = [b / s, b % s];
  const pad = (d: bigint) => d.toString().padStart(k, '0');
  if (ia === ib) return seq(naturals(ia, ia), `"." ${fixedWidth(pad(da), pad(db))}`);
  const alts = [seq(naturals(ia, ia), `"." ${fixedWidth(pad(da), pad(s - 1n))}`)];
  if (ib - ia > 1n) alts.push(seq(naturals(ia + 1n, ib - 1n), `"." ${anyDigits(k)}`));
  alts.push(seq(naturals(ib, ib), `"." ${fixedWidth(pad(0n), pad(db))}`));
  return `(${alts.join(' | ')})`;
}

/** The EBNF expression for a bounded number (null when no number fits the bounds). */
export function numberRangeRule(b: NumericBounds): string | null {
  const k =
    b.type === 'integer'
      ? 0
      : Math.min(
          MAX_DECIMALS,
          Math.max(1, decimalsOf(b.minimum), decimalsOf(b.maximum), decimalsOf(b.exclusiveMinimum), decimalsOf(b.exclusiveMaximum)),
        );
  const range = scaledRange(b, k);
  if (!range) return null;
  const [lo, hi] = range;
  const alts: string[] = [];
  if (hi >= 0n) alts.push(magnitudes(lo > 0n ? lo : 0n, hi, k));
  if (lo < 0n) alts.push(`"-" ${magnitudes(hi < 0n ? -hi : 1n, -lo, k)}`);
  return `(${alts.join(' | ')})`;
}

const BOUNDS = ['minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum'] as const;

/**
 * Replaces every bounded integer or number in a schema by a placeholder constant; returns the
 * new schema and, per placeholder (as xgrammar writes the constant's rule: `"\"…\""`), the rule
 * that replaces it. A numeric schema with anything else (multipleOf, enum, …) is left to xgrammar.
 */
export function extractNumericRanges(schema: unknown): { schema: unknown; rules: Array<[string, string]> } {
  const rules: Array<[string, string]> = [];
  const walk = (node: unknown): unknown => {
    if (Array.isArray(node)) return node.map(walk);
    if (node === null || typeof node !== 'object') return node;
    const o = node as Record<string, unknown>;
    const bounded = (o.type === 'integer' || o.type === 'number') && BOUNDS.some((k) => typeof o[k] === 'number');
    const others = Object.keys(o).filter(
      (k) => k !== 'type' && !(BOUNDS as readonly string[]).includes(k) && k !== 'description' && k !== 'title',
    );
    if (bounded && others.length === 0) {
      const rule = numberRangeRule(o as unknown as NumericBounds);
      if (rule !== null) {
        const name = `reft_number_range_${rules.length}_${Math.random().toString(36).slice(2, 10)}`;
        rules.push([`"\\"${name}\\""`, rule]);
        return { const: name };
      }
    }
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(o))
      out[k] = k === 'properties' || k === '$defs' || k === 'definitions' ? mapValues(v, walk) : walk(v);
    return out;
  };
  return { schema: walk(schema), rules };
}

function mapValues(v: unknown, f: (x: unknown) => unknown): unknown {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) return f(v);
  return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, f(x)]));
}
