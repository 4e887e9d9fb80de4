import { createHash } from 'node:crypto';
import { grammarTooDeep, grammarTooLarge, grammarInvalid } from '../errors.ts';
import { jsonDepth } from '../limits/json-depth.ts';
import { extractExactRules, type ExactRule } from './exact-rules.ts';
import { stringLengthRule } from './string-lengths.ts';

/**
 * What a request constrains its output to, whichever API field said it:
 * - `json_schema`: a JSON Schema (response_format json_schema; structured_outputs.json)
 * - `json_object`: any JSON object (response_format json_object)
 * - `choice`: exactly one of the strings (structured_outputs.choice)
 * - `grammar`: xgrammar's EBNF, root rule `root` (structured_outputs.grammar)
 *
 * `field` names the input, for errors. Everything here runs before any compilation: the text a
 * grammar is compiled from, its size and nesting, checked against the budgets.
 */
export type GrammarSpec =
  | { kind: 'json_schema'; schema: unknown; field: string }
  | { kind: 'json_object'; field: string }
  | { kind: 'choice'; choices: string[]; field: string }
  | { kind: 'grammar'; ebnf: string; field: string };

export interface GrammarBudgets {
  /** Bytes of a schema's canonical JSON text, of an EBNF grammar, of all choices together. */
  maxBytes: number;
  /** Nesting depth of a schema (JSON objects and arrays). */
  maxDepth: number;
  /** Milliseconds one compilation may take; a compilation past it is stopped and the request refused. */
  compileTimeoutMs: number;
}

export const DEFAULT_GRAMMAR_BUDGETS: GrammarBudgets = { maxBytes: 64 * 1024, maxDepth: 16, compileTimeoutMs: 10_000 };

/**
 * How a JSON grammar spaces its output: compact (`{"a":1,"b":[2]}`), on one line, with no free
 * whitespace. A sampled model inside a grammar that allows whitespace can emit it until it runs
 * out of tokens (a known failure of other servers); with none allowed, a schema whose strings and
 * arrays are bounded always ends.
 */
export const JSON_LAYOUT = { anyWhitespace: false, indent: -1, separators: [',', ':'] as [string, string] };

/**
 * "Any JSON object" (response_format json_object), bounded so that a sampled model always closes
 * it: an object of at most 6 members whose values are scalars or objects or arrays of at most 6
 * scalars, strings (keys too) of at most 32 characters, numbers of at most 12 digits (6 decimals). Unbounded,
 * a small sampled model writes one string until it runs out of tokens. Compact, like JSON_LAYOUT.
 * Its strings are string-lengths.ts's: written as `char{0,32}`, a mask took 29 ms on average
 * over a 128k vocabulary, and 0.09 ms this way.
 */
const JSON_OBJECT_STRING = stringLengthRule('string_chars', 0, 32)!;
export const JSON_OBJECT_EBNF = String.raw`root ::= object1
object1 ::= "{" (member1 ("," member1){0,5})? "}"
member1 ::= string ":" value0
value0 ::= scalar | object0 | array0
object0 ::= "{" (member0 ("," member0){0,5})? "}"
member0 ::= string ":" scalar
array0 ::= "[" (scalar ("," scalar){0,5})? "]"
scalar ::= string | number | "true" | "false" | "null"
string ::= ${JSON_OBJECT_STRING.expr}
number ::= "-"? ("0" | [1-9] [0-9]{0,11}) ("." [0-9]{1,6})? ([eE] [+-]? [1-9] [0-9]?)?
${JSON_OBJECT_STRING.defs}
`;

/**
 * Bounded strings' rules a schema may have in all (one per character of each bound,
 * string-lengths.ts): past it the text alone is large, and compiling it takes minutes (about
 * 45 ms a rule over a 128k vocabulary on 2 cores; the compile-time budget stops it sooner).
 */
export const MAX_STRING_RULES = 4096;

/** What a grammar thread compiles: the kind and the canonical text (the cache key's source). */
export interface CompileJob {
  kind: 'json_schema' | 'json_object' | 'grammar';
  text: string;
  /** json_schema: whether properties the schema doesn't list are allowed (json_object: yes). */
  strict: boolean;
  /** json_schema: rules that replace placeholders in the EBNF xgrammar writes (exact-rules.ts). */
  rules?: ExactRule[];
}

export interface CanonicalGrammar {
  /** Cache key: kind and SHA-256 of the canonical text (the tokenizer is the service's own). */
  key: string;
  /**
   * What to compile, built only when the key isn't cached (a schema's exact rules,
   * exact-rules.ts). Throws a 400 for a schema whose bounded strings are over their budget.
   */
  job(): CompileJob;
}

function byteLength(s: string): number {
  return Buffer.byteLength(s, 'utf8');
}

/**
 * Checks a spec's budgets and returns the text it compiles from: a schema as compact JSON in its
 * own key order (the order of an object's properties is the order the output writes them), a
 * choice list as an EBNF alternation of string literals, a grammar as given.
 */
export function canonicalGrammar(spec: GrammarSpec, budgets: GrammarBudgets): CanonicalGrammar {
  let source: CompileJob;
  let job = (): CompileJob => source;
  switch (spec.kind) {
    case 'json_schema': {
      const { schema, field } = spec;
      if (schema === null || typeof schema !== 'object' || Array.isArray(schema)) {
        // JSON Schema also allows `true`, but a grammar for "anything" is json_object's job
        throw grammarInvalid({ what: 'schema', reason: 'a JSON Schema must be an object' }, field);
      }
      const depth = jsonDepth(schema, budgets.maxDepth);
      if (depth > budgets.maxDepth) throw grammarTooDeep({ depth, limit: budgets.maxDepth }, field);
      const text = JSON.stringify(schema);
      const bytes = byteLength(text);
      if (bytes > budgets.maxBytes) throw grammarTooLarge({ what: 'schema', bytes, limit: budgets.maxBytes }, field);
      source = { kind: 'json_schema', text, strict: true };
      job = () => schemaJob(schema, text, field);
      break;
    }
    case 'json_object':
      source = { kind: 'grammar', text: JSON_OBJECT_EBNF, strict: false };
      break;
    case 'choice': {
      const bytes = spec.choices.reduce((n, c) => n + byteLength(c), 0);
      if (bytes > budgets.maxBytes) throw grammarTooLarge({ what: 'choice list', bytes, limit: budgets.maxBytes }, spec.field);
      source = { kind: 'grammar', text: `root ::= ${spec.choices.map(ebnfString).join(' | ')}\n`, strict: false };
      break;
    }
    case 'grammar': {
      const bytes = byteLength(spec.ebnf);
      if (bytes > budgets.maxBytes) throw grammarTooLarge({ what: 'grammar', bytes, limit: budgets.maxBytes }, spec.field);
      if (!/^\s*root\s*::=/m.test(spec.ebnf)) {
        throw grammarInvalid({ what: 'grammar', reason: 'it has no `root ::= …` rule' }, spec.field);
      }
      source = { kind: 'grammar', text: spec.ebnf, strict: false };
      break;
    }
  }
  const hash = createHash('sha256').update(`${source.kind}\0${source.strict}\0${source.text}`).digest('hex').slice(0, 32);
  return { key: `${source.kind}:${hash}`, job };
}

/** A schema's compile job: its bounded numbers and strings taken out for our exact rules. */
function schemaJob(schema: object, text: string, field: string): CompileJob {
  const exact = extractExactRules(schema);
  if (exact.stringRules > MAX_STRING_RULES) {
    const reason = `its strings' minLength and maxLength add up to ${exact.stringRules} characters, over the ${MAX_STRING_RULES} a schema may bound`;
    throw grammarInvalid({ what: 'schema', reason }, field);
  }
  if (!exact.rules.length) return { kind: 'json_schema', text, strict: true };
  return { kind: 'json_schema', text: JSON.stringify(exact.schema), strict: true, rules: exact.rules };
}

/** A string as an EBNF literal: printable ASCII kept, `"` and `\` escaped, everything else as \uXXXX (\UXXXXXXXX past the BMP). */
export function ebnfString(s: string): string {
  let out = '"';
  for (const ch of s) {
    const cp = ch.codePointAt(0)!;
    if (ch === '"' || ch === '\\') out += `\\${ch}`;
    else if (cp >= 0x20 && cp < 0x7f) out += ch;
    else if (cp <= 0xffff) out += `\\u${cp.toString(16).padStart(4, '0')}`;
    else out += `\\U${cp.toString(16).padStart(8, '0')}`;
  }
  return `${out}"`;
}
