import { numberRangeRule, type NumericBounds } from './ranges.ts';
import { stringLengthRule } from './string-lengths.ts';

/**
 * The schema nodes whose grammar we write ourselves instead of xgrammar: bounded numbers (its
 * rules are wrong, ranges.ts) and strings of bounded length (its rules are wrong and slow,
 * string-lengths.ts). Each such node is taken out of the schema before xgrammar sees it: a
 * unique string constant stands in for it, and our expression replaces the constant's rule
 * (`"\"…\""`) in the EBNF xgrammar writes for the rest.
 */
export interface ExactRule {
  /** The constant's rule as xgrammar writes it. */
  placeholder: string;
  expr: string;
  /** Rules the expression uses, appended to the grammar. */
  defs?: string;
}

export interface ExactRules {
  schema: unknown;
  rules: ExactRule[];
  /** Rules written for bounded strings, in all: one per character of each bound. */
  stringRules: number;
}

const NUMBER_BOUNDS = ['minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum'] as const;
const STRING_BOUNDS = ['minLength', 'maxLength'] as const;
/** Keywords that change nothing about what a value may be. */
const NOTES = ['description', 'title'];
/** Keywords whose values are data, not schemas: never rewritten. */
const DATA = new Set(['const', 'enum', 'default', 'examples']);
/** Keywords whose values map names to schemas. */
const SCHEMA_MAPS = new Set(['properties', '$defs', 'definitions']);

/** Whether the node says `type: <type>`, some of `bounds`, and nothing else that constrains it. */
function onlyBounds(o: Record<string, unknown>, type: string, bounds: readonly string[]): boolean {
  if (o.type !== type || !bounds.some((k) => o[k] !== undefined)) return false;
  return Object.keys(o).every((k) => k === 'type' || bounds.includes(k) || NOTES.includes(k));
}

const isCount = (x: unknown): x is number | undefined => x === undefined || (Number.isInteger(x) && (x as number) >= 0);

export function extractExactRules(schema: unknown): ExactRules {
  const rules: ExactRule[] = [];
  let stringRules = 0;
  const placeholder = (kind: string): { name: string; constant: string } => {
    const name = `reft_${kind}_${rules.length}_${Math.random().toString(36).slice(2, 10)}`;
    return { name, constant: `"\\"${name}\\""` };
  };
  const exact = (o: Record<string, unknown>): unknown => {
    if (onlyBounds(o, 'integer', NUMBER_BOUNDS) || onlyBounds(o, 'number', NUMBER_BOUNDS)) {
      if (!NUMBER_BOUNDS.every((k) => o[k] === undefined || typeof o[k] === 'number')) return null;
      const expr = numberRangeRule(o as unknown as NumericBounds);
      if (expr === null) return null;
      const { name, constant } = placeholder('number_range');
      rules.push({ placeholder: constant, expr });
      return { const: name };
    }
    if (onlyBounds(o, 'string', STRING_BOUNDS) && isCount(o.minLength) && isCount(o.maxLength)) {
      const { name, constant } = placeholder('string_length');
      const rule = stringLengthRule(name, (o.minLength as number | undefined) ?? 0, o.maxLength as number | undefined);
      if (rule === null) return null;
      rules.push({ placeholder: constant, expr: rule.expr, defs: rule.defs });
      stringRules += rule.rules;
      return { const: name };
    }
    return null;
  };
  const walk = (node: unknown): unknown => {
    if (Array.isArray(node)) return node.map(walk);
    if (node === null || typeof node !== 'object') return node;
    const o = node as Record<string, unknown>;
    const replaced = exact(o);
    if (replaced !== null) return replaced;
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(o)) out[k] = DATA.has(k) ? v : SCHEMA_MAPS.has(k) ? mapValues(v, walk) : walk(v);
    return out;
  };
  return { schema: walk(schema), rules, stringRules };
}

function mapValues(v: unknown, f: (x: unknown) => unknown): unknown {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) return f(v);
  return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, f(x)]));
}
