/**
 * Exact grammars for bounded numbers. xgrammar 0.1.27 (the web build) writes wrong rules for
 * JSON Schema's numeric bounds: `{"type":"integer","minimum":0,"maximum":120}` allows 121…129,
 * `{"type":"number","maximum":10}` allows 10.5, a bound of -1.5 lets any character stand for its
 * dot. So a bounded `integer` or `number` gets the rule built here instead (exact-rules.ts).
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
