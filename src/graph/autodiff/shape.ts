import type { Dim } from '../onnx.ts';

/**
 * Static shapes as the tape tracks them. A dimension (the builder's Dim) is a number or a
 * symbol ("B", "S", or a product "B*S"); ranks are always known. Gradient rules need shapes for
 * one thing only: knowing which axes a broadcast expanded, so the gradient can be summed back
 * over them.
 */
export type { Dim };
export type Shape = readonly Dim[];

/** Splits a dimension into its numeric factor and its symbols ("64*B*S" → 64, [B, S]). */
function factors(d: Dim): { num: number; syms: string[] } {
  if (typeof d === 'number') return { num: d, syms: [] };
  let num = 1;
  const syms: string[] = [];
  for (const part of d.split('*')) {
    if (/^\d+$/.test(part)) num *= Number(part);
    else syms.push(part);
  }
  return { num, syms };
}

function join(num: number, syms: string[]): Dim {
  if (syms.length === 0) return num;
  const sorted = [...syms].sort();
  return num === 1 ? sorted.join('*') : [String(num), ...sorted].join('*');
}

/** The product of dims as one Dim: a number when every factor is numeric. */
export function product(dims: Shape): Dim {
  let num = 1;
  const syms: string[] = [];
  for (const d of dims) {
    const f = factors(d);
    num *= f.num;
    syms.push(...f.syms);
  }
  return join(num, syms);
}

/** numerator / denominator, exact (throws when the quotient is not a whole dim). */
function divide(numerator: Dim, denominator: Dim): Dim {
  const a = factors(numerator);
  const b = factors(denominator);
  const syms = [...a.syms];
  for (const s of b.syms) {
    const i = syms.indexOf(s);
    if (i < 0) throw new Error(`shape: cannot divide ${numerator} by ${denominator}`);
    syms.splice(i, 1);
  }
  if (b.num === 0 || a.num % b.num !== 0) throw new Error(`shape: cannot divide ${numerator} by ${denominator}`);
  return join(a.num / b.num, syms);
}

/** Multidirectional (numpy) broadcasting of two shapes. */
export function broadcast(a: Shape, b: Shape): Dim[] {
  const n = Math.max(a.length, b.length);
  const out: Dim[] = [];
  for (let i = 0; i < n; i++) {
    const x = a[a.length - n + i] ?? 1;
    const y = b[b.length - n + i] ?? 1;
    if (x === y || y === 1) out.push(x);
    else if (x === 1) out.push(y);
    else throw new Error(`shape: cannot broadcast [${a}] with [${b}]`);
  }
  return out;
}

/** ONNX Reshape semantics: 0 copies the input dim, -1 takes what is left. */
export function reshape(input: Shape, target: readonly number[]): Dim[] {
  const out: Dim[] = target.map((t, i) => (t === 0 ? input[i] : t));
  const free = target.indexOf(-1);
  if (free >= 0) {
    const known = out.filter((_, i) => i !== free);
    out[free] = divide(product(input), product(known));
  }
  return out;
}

/** Normalises a possibly negative axis against a rank. */
export function axis(a: number, rank: number): number {
  const r = a < 0 ? a + rank : a;
  if (r < 0 || r >= rank) throw new Error(`shape: axis ${a} out of range for rank ${rank}`);
  return r;
}
