import { Ajv } from 'ajv';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StepRunner } from '../src/engine/step-runner.ts';
import type { GenerationRequest, GenerationResult } from '../src/engine/generation.ts';
import { DEFAULT_LIMITS, Scheduler } from '../src/engine/scheduler.ts';
import { GrammarService } from '../src/grammar/service.ts';
import type { GrammarSpec } from '../src/grammar/spec.ts';
import { loadGrammarVocab } from '../src/grammar/vocab.ts';
import { loadModel, type LoadedModel } from '../src/model/load.ts';
import { testCacheDir } from './support/engine.ts';
import { STORIES } from './support/fixtures.ts';

/**
 * Structured output at the engine's level: the real stories260k engine and scheduler (on this
 * thread), the real grammar service (xgrammar on its own threads), rows constrained by a matcher
 * each, mixed in one batch with unconstrained rows.
 */
let model: LoadedModel;
let engine: StepRunner;
let scheduler: Scheduler;
let grammars: GrammarService;

beforeAll(async () => {
  model = await loadModel(STORIES);
  engine = await StepRunner.create(model.config, model.checkpoint, { cacheDir: testCacheDir });
  scheduler = new Scheduler(engine, model.tokenizer, new Set(model.tokenizer.eosTokenIds), DEFAULT_LIMITS);
  grammars = new GrammarService(await loadGrammarVocab(STORIES, model.config.vocabSize, model.tokenizer.eosTokenIds));
});
afterAll(async () => {
  await grammars?.close();
  engine?.close();
});

let keys = 0;
function run(request: GenerationRequest): Promise<GenerationResult> {
  return new Promise((resolve, reject) => scheduler.submit(`k${keys++}`, request, { onToken: () => {}, onDone: resolve, onError: reject }));
}

function base(prompt: string, seed: number, over: Partial<GenerationRequest> = {}): GenerationRequest {
  return {
    tokens: model.tokenizer.encode(prompt),
    interventions: [],
    sampling: { temperature: 1, topK: 0, topP: 1, repetitionPenalty: 1, seed },
    maxNewTokens: 200,
    stop: [],
    ignoreEos: false,
    logprobs: false,
    topLogprobs: 0,
    ...over,
  };
}

async function constrained(spec: GrammarSpec, prompt: string, seed: number, over: Partial<GenerationRequest> = {}) {
  const prepared = await grammars.prepare(spec);
  const grammar = await prepared.open();
  try {
    return await run({ ...base(prompt, seed, over), grammar });
  } finally {
    grammars.release(grammar);
  }
}

const person = {
  type: 'object',
  properties: {
    name: { type: 'string', maxLength: 12 },
    age: { type: 'integer', minimum: 0, maximum: 120 },
    happy: { type: 'boolean' },
    color: { enum: ['red', 'green', 'blue'] },
    pets: { type: 'array', items: { type: 'string', maxLength: 6 }, minItems: 1, maxItems: 3 },
    home: {
      type: 'object',
      properties: { town: { type: 'string', maxLength: 8 }, size: { type: 'number', minimum: 0, maximum: 10 } },
      required: ['town', 'size'],
      additionalProperties: false,
    },
  },
  required: ['name', 'age', 'happy', 'color', 'pets', 'home'],
  additionalProperties: false,
};

describe('structured output in the engine', () => {
  it('sampled rows at temperature 1 always parse and validate, ending with stop, beside plain rows in the same batch', async () => {
    const validate = new Ajv().compile(person);
    const rows = await Promise.all([
      ...Array.from({ length: 8 }, (_, i) => constrained({ kind: 'json_schema', schema: person, field: 's' }, 'Once upon a time', i)),
      ...Array.from({ length: 4 }, (_, i) => run(base('Once upon a time', i, { maxNewTokens: 40 }))),
    ]);
    for (const r of rows.slice(0, 8)) {
      expect(r.finishReason, r.text).toBe('stop');
      const value = JSON.parse(r.text);
      expect(validate(value), `${r.text} ${JSON.stringify(validate.errors)}`).toBe(true);
    }
    console.log(rows.slice(0, 3).map((r) => r.text));
  });

  it('a choice is always one of the choices; an EBNF grammar is obeyed', async () => {
    const choices = ['yes', 'no', 'maybe so'];
    for (let seed = 0; seed < 10; seed++) {
      const r = await constrained({ kind: 'choice', choices, field: 'c' }, 'Is the sky blue?', seed);
      expect(choices).toContain(r.text);
      expect(r.finishReason).toBe('stop');
    }
    const ebnf = 'root ::= "The " animal " is " ("big" | "small") "."\nanimal ::= "cat" | "dog" | "frog"\n';
    for (let seed = 0; seed < 10; seed++) {
      const r = await constrained({ kind: 'grammar', ebnf, field: 'g' }, 'Once upon a time', seed);
      expect(r.text).toMatch(/^The (cat|dog|frog) is (big|small)\.$/);
    }
  });
});
