import { compileJob, createCompiler } from '../src/grammar/compile.ts';
import { canonicalGrammar, DEFAULT_GRAMMAR_BUDGETS, JSON_LAYOUT, JSON_OBJECT_EBNF } from '../src/grammar/spec.ts';
import type { GrammarVocab } from '../src/grammar/vocab.ts';
import { loadXGrammar, type CompiledGrammar } from '../src/grammar/xgrammar.ts';
import { Rng } from '../src/rng.ts';
import { round } from './machine.ts';

/**
 * What one token mask costs xgrammar, by grammar, over the bench's vocabulary: a random walk
 * (each token drawn uniformly from those the mask allows, as a random-weight model nearly does),
 * 4 walks of up to 60 tokens, timing every `getNextTokenBitmask`. Our rules for bounded strings
 * (string-lengths.ts) beside xgrammar's own for the same schema, and json_object's grammar beside
 * the `char{0,32}` strings it had before.
 */
const lines = (item: Record<string, unknown>) =>
  JSON.stringify({
    type: 'object',
    properties: { lines: { type: 'array', items: { type: 'string', ...item }, minItems: 12, maxItems: 12 } },
    required: ['lines'],
    additionalProperties: false,
  });

const OLD_JSON_OBJECT_STRINGS = String.raw`string ::= "\"" char{0,32} "\""
char ::= [^\0-\x1f\"\\] | "\\" ([\"\\/bfnrt] | "u" [0-9a-fA-F]{4})`;

export async function benchGrammarMasks(vocab: GrammarVocab, log: (s: string) => void): Promise<Record<string, unknown>> {
  const xg = loadXGrammar();
  const { info, compiler } = await createCompiler(xg, vocab);
  const { anyWhitespace, indent, separators } = JSON_LAYOUT;
  const ours = (schemaText: string) =>
    compileJob(
      xg,
      compiler,
      canonicalGrammar({ kind: 'json_schema', schema: JSON.parse(schemaText), field: 'bench' }, DEFAULT_GRAMMAR_BUDGETS).job(),
    );
  const oldJsonObject = JSON_OBJECT_EBNF.split('\n')
    .filter((l) => !/^string(_chars_\d+)? ::=/.test(l))
    .concat(OLD_JSON_OBJECT_STRINGS)
    .join('\n');

  const grammars: Array<[string, () => Promise<CompiledGrammar>]> = [
    ['strings of 40-80 characters (ours)', () => ours(lines({ minLength: 40, maxLength: 80 }))],
    [
      'strings of 40-80 characters (xgrammar 0.1.27)',
      () => compiler.compileJSONSchema(lines({ minLength: 40, maxLength: 80 }), anyWhitespace, indent, separators, true),
    ],
    ['strings of any length', () => compiler.compileJSONSchema(lines({}), anyWhitespace, indent, separators, true)],
    ['json_object (ours)', () => compiler.compileGrammar(JSON_OBJECT_EBNF, 'root')],
    ['json_object (strings as char{0,32})', () => compiler.compileGrammar(oldJsonObject, 'root')],
  ];
  const out: Record<string, unknown> = {};
  for (const [name, compile] of grammars) {
    const t0 = performance.now();
    const grammar = await compile();
    const compileMs = performance.now() - t0;
    const rng = new Rng(7);
    const times: number[] = [];
    for (let walk = 0; walk < 4; walk++) {
      const matcher = await xg.GrammarMatcher.createGrammarMatcher(grammar, vocab.stopTokenIds);
      for (let step = 0; step < 60 && !matcher.isTerminated(); step++) {
        const t = performance.now();
        const mask = await matcher.getNextTokenBitmask();
        times.push(performance.now() - t);
        const allowed: number[] = [];
        for (let i = 0; i < vocab.encoded.length; i++) if ((mask[i >>> 5] >>> (i & 31)) & 1) allowed.push(i);
        if (!matcher.acceptToken(allowed[Math.floor(rng.next() * allowed.length)]))
          throw new Error(`${name}: a token its mask allowed was refused`);
      }
      matcher.dispose();
    }
    grammar.dispose();
    times.sort((a, b) => a - b);
    const result = {
      compile_ms: round(compileMs, 0),
      masks: times.length,
      mean_ms: round(times.reduce((a, b) => a + b, 0) / times.length, 3),
      p90_ms: round(times[Math.floor(times.length * 0.9)], 3),
      max_ms: round(times.at(-1)!, 2),
    };
    out[name] = result;
    log(
      `grammar masks: ${name}: mean ${result.mean_ms} ms, p90 ${result.p90_ms}, max ${result.max_ms} (${result.masks} masks); compiled in ${result.compile_ms} ms`,
    );
  }
  compiler.dispose();
  info.dispose();
  return out;
}
