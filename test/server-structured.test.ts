import { Ajv } from 'ajv';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sharedInterventionsFolder, storiesWithChatTemplate } from './support/model-copies.ts';
import { json, metricValue, sse, type Api } from './support/http.ts';
import { startServerProcess, type ServerProcess } from './support/server.ts';

/**
 * Structured output (issue 26) through a real server process over HTTP, on stories260k with a
 * chat template: JSON Schemas, json_object, choices and an EBNF grammar, on /v1/completions,
 * /v1/chat/completions and /v1/generate, streamed and not, with and without an intervention;
 * every sample parsed and validated with ajv. Then the refusals, and a slow schema beside a plain
 * request.
 */
let server: ServerProcess;
let api: Api;
let client: OpenAI;

beforeAll(async () => {
  server = await startServerProcess({
    args: ['--model', storiesWithChatTemplate(), '--interventions-dir', sharedInterventionsFolder(), '--max-batch-size', '64'],
  });
  api = { url: server.url };
  client = new OpenAI({ baseURL: `${api.url}/v1`, apiKey: 'unused', maxRetries: 0 });
}, 120_000);
afterAll(async () => {
  expect(await server.stop()).toBe(0);
});

const SAMPLES = 20;

const strictObject = (properties: Record<string, unknown>) => ({
  type: 'object',
  properties,
  required: Object.keys(properties),
  additionalProperties: false,
});

/** Each kind the issue lists: required fields, enums, booleans, integer and number ranges, bounded arrays, nesting, bounded strings. */
const SCHEMAS: Record<string, Record<string, unknown>> = {
  person: strictObject({
    name: { type: 'string', maxLength: 16 },
    age: { type: 'integer', minimum: 0, maximum: 120 },
    happy: { type: 'boolean' },
  }),
  enums: strictObject({
    color: { enum: ['red', 'green', 'blue'] },
    size: { type: 'string', enum: ['small', 'big'] },
    ok: { type: 'boolean' },
  }),
  ranges: strictObject({
    level: { type: 'integer', minimum: -5, maximum: 25 },
    score: { type: 'number', minimum: -1.5, maximum: 2.25 },
    share: { type: 'number', exclusiveMinimum: 0, exclusiveMaximum: 1 },
  }),
  arrays: strictObject({
    tags: { type: 'array', items: { type: 'string', maxLength: 6 }, minItems: 1, maxItems: 3 },
    counts: { type: 'array', items: { type: 'integer', minimum: 0, maximum: 9 }, minItems: 2, maxItems: 4 },
  }),
  nested: strictObject({
    title: { type: 'string', maxLength: 10 },
    author: strictObject({
      name: { type: 'string', maxLength: 8 },
      home: strictObject({ town: { type: 'string', maxLength: 8 }, far: { type: 'boolean' } }),
    }),
    pages: { type: 'array', items: strictObject({ n: { type: 'integer', minimum: 1, maximum: 500 } }), minItems: 1, maxItems: 2 },
  }),
};

const ajv = new Ajv();
const validators = Object.fromEntries(Object.entries(SCHEMAS).map(([k, s]) => [k, ajv.compile(s)]));

type Route = 'completions' | 'chat' | 'generate';

/** SAMPLES seeded samples at temperature 1 through one route: their texts and finish reasons. */
async function samples(
  route: Route,
  schema: Record<string, unknown>,
  stream: boolean,
  model: string,
): Promise<Array<{ text: string; finish: string }>> {
  const rf = { type: 'json_schema', json_schema: { name: 'out', schema, strict: true } };
  const common = { temperature: 1, seed: 7, response_format: rf };
  if (route === 'generate') {
    const body = (seed: number) => ({
      prompt: 'Once upon a time',
      max_new_tokens: 256,
      temperature: 1,
      seed,
      response_format: rf,
      stream,
      ...(model === 'house-style' ? { adapter: model } : {}),
    });
    return Promise.all(
      Array.from({ length: SAMPLES }, async (_, seed) => {
        if (!stream) {
          const res = await json(api, 'POST', '/v1/generate', body(seed));
          expect(res.status, JSON.stringify(res.body)).toBe(200);
          return { text: res.body.text, finish: res.body.finish_reason };
        }
        const res = await fetch(`${api.url}/v1/generate`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify(body(seed)),
        });
        const events = (await sse(res)) as Array<Record<string, any>>;
        const done = events.find((e) => e.type === 'done')!;
        const streamed = events
          .filter((e) => e.type === 'token')
          .map((e) => e.text)
          .join('');
        expect(streamed).toBe(done.text);
        return { text: streamed, finish: done.finish_reason };
      }),
    );
  }
  // n ≤ 16 per request: two requests of SAMPLES / 2 choices, seeds 7… and 107…
  const halves = await Promise.all(
    [7, 107].map(async (seed) => {
      const n = SAMPLES / 2;
      const path = route === 'chat' ? '/v1/chat/completions' : '/v1/completions';
      const input = route === 'chat' ? { messages: [{ role: 'user', content: 'Tell me a story.' }] } : { prompt: 'Once upon a time' };
      const body = { model, ...input, ...common, seed, n, max_tokens: 256, stream };
      if (!stream) {
        const res = await json(api, 'POST', path, body);
        expect(res.status, JSON.stringify(res.body)).toBe(200);
        return res.body.choices.map((c: any) => ({ text: route === 'chat' ? c.message.content : c.text, finish: c.finish_reason }));
      }
      const res = await fetch(api.url + path, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
      const chunks = ((await sse(res)) as any[]).filter((c) => c !== '[DONE]');
      const out = Array.from({ length: n }, () => ({ text: '', finish: '' }));
      for (const c of chunks)
        for (const ch of c.choices) {
          out[ch.index].text += (route === 'chat' ? ch.delta.content : ch.text) ?? '';
          if (ch.finish_reason) out[ch.index].finish = ch.finish_reason;
        }
      return out;
    }),
  );
  return halves.flat();
}

describe('structured output over HTTP', () => {
  for (const route of ['completions', 'chat', 'generate'] as const)
    for (const stream of [false, true])
      it(`${route}${stream ? ', streamed' : ''}: ${SAMPLES} samples at temperature 1 per schema, with and without an intervention, all parse, validate and stop`, async () => {
        for (const [name, schema] of Object.entries(SCHEMAS))
          for (const model of ['stories260k', 'house-style']) {
            const out = await samples(route, schema, stream, model === 'stories260k' ? await baseName() : model);
            expect(out).toHaveLength(SAMPLES);
            for (const { text, finish } of out) {
              expect(finish, `${name} ${model}: ${text}`).toBe('stop');
              const value = JSON.parse(text);
              expect(validators[name](value), `${name} ${model}: ${text} ${JSON.stringify(validators[name].errors)}`).toBe(true);
            }
          }
      }, 240_000);

  it('json_object always yields a JSON object; a choice is one of the choices; an EBNF grammar is obeyed', async () => {
    const base = await baseName();
    const obj = await json(api, 'POST', '/v1/chat/completions', {
      model: base,
      messages: [{ role: 'user', content: 'Hi' }],
      n: 16,
      temperature: 1,
      seed: 3,
      max_tokens: 400,
      response_format: { type: 'json_object' },
    });
    expect(obj.status, JSON.stringify(obj.body)).toBe(200);
    for (const c of obj.body.choices) {
      expect(c.finish_reason).toBe('stop');
      const v = JSON.parse(c.message.content);
      expect(typeof v === 'object' && v !== null && !Array.isArray(v)).toBe(true);
    }
    const choices = ['yes', 'no', 'once upon a time'];
    const ch = await json(api, 'POST', '/v1/completions', {
      model: base,
      prompt: 'Is it?',
      n: 16,
      temperature: 1,
      seed: 1,
      max_tokens: 20,
      structured_outputs: { choice: choices },
    });
    expect(ch.status).toBe(200);
    for (const c of ch.body.choices) {
      expect(choices).toContain(c.text);
      expect(c.finish_reason).toBe('stop');
    }
    const grammar = 'root ::= "The " animal " is " ("big" | "small") "."\nanimal ::= "cat" | "dog" | "frog"\n';
    for (let seed = 0; seed < 8; seed++) {
      const g = await json(api, 'POST', '/v1/generate', {
        prompt: 'Once upon a time',
        temperature: 1,
        seed,
        max_new_tokens: 30,
        structured_outputs: { grammar },
      });
      expect(g.status).toBe(200);
      expect(g.body.text).toMatch(/^The (cat|dog|frog) is (big|small)\.$/);
      expect(g.body.finish_reason).toBe('stop');
    }
  });

  it('works with logprobs, stop strings and request-time steering', async () => {
    const schema = SCHEMAS.enums;
    const res = await json(api, 'POST', '/v1/generate', {
      prompt: 'Once upon a time',
      temperature: 1,
      seed: 5,
      max_new_tokens: 100,
      logprobs: true,
      top_logprobs: 2,
      interventions: [{ intervention: 'house-style', strength: -1 }],
      response_format: { type: 'json_schema', json_schema: { schema } },
    });
    expect(res.status, JSON.stringify(res.body)).toBe(200);
    expect(validators.enums(JSON.parse(res.body.text))).toBe(true);
    expect(res.body.logprobs.map((l: any) => l.text).join('')).toBe(res.body.text);
    const cut = await json(api, 'POST', '/v1/generate', {
      prompt: 'Once upon a time',
      temperature: 0,
      max_new_tokens: 100,
      stop: ['"size"'],
      response_format: { type: 'json_schema', json_schema: { schema } },
    });
    expect(cut.body.finish_reason).toBe('stop');
    expect(cut.body.stop_reason).toBe('"size"');
    expect(cut.body.text).toMatch(/^\{"color":"(red|green|blue)",$/);
  });

  it("the official openai client: response_format and extra_body's structured_outputs", async () => {
    const base = await baseName();
    const schema = SCHEMAS.person;
    const chat = await client.chat.completions.create({
      model: 'house-style',
      messages: [{ role: 'user', content: 'Who?' }],
      temperature: 1,
      seed: 2,
      max_tokens: 200,
      response_format: { type: 'json_schema', json_schema: { name: 'person', schema, strict: true } },
    });
    expect(chat.choices[0].finish_reason).toBe('stop');
    expect(validators.person(JSON.parse(chat.choices[0].message.content!))).toBe(true);
    const done = await client.completions.create({
      model: base,
      prompt: 'The answer is',
      max_tokens: 10,
      temperature: 1,
      seed: 4,
      // @ts-expect-error extra body fields, as extra_body sends them
      structured_outputs: { choice: ['left', 'right'] },
    });
    expect(['left', 'right']).toContain(done.choices[0].text);
    const stream = await client.chat.completions.create({
      model: base,
      messages: [{ role: 'user', content: 'Which?' }],
      stream: true,
      max_tokens: 400,
      response_format: { type: 'json_object' },
      temperature: 0,
    });
    let text = '';
    for await (const c of stream) text += c.choices[0]?.delta?.content ?? '';
    expect(typeof JSON.parse(text)).toBe('object');
  });

  it("json_object's grammar is compiled when the server starts: its first request compiles nothing", async () => {
    const until = Date.now() + 30_000;
    while ((await metricValue(api, 'reft_grammar_cached')) < 1 && Date.now() < until) await new Promise((r) => setTimeout(r, 100));
    const compiles = await metricValue(api, 'reft_grammar_compiles_total');
    const hits = await metricValue(api, 'reft_grammar_cache_hits_total');
    const res = await json(api, 'POST', '/v1/generate', { prompt: 'x', response_format: { type: 'json_object' }, max_new_tokens: 300 });
    expect(res.status).toBe(200);
    expect(typeof JSON.parse(res.body.text)).toBe('object');
    expect(await metricValue(api, 'reft_grammar_compiles_total')).toBe(compiles);
    expect(await metricValue(api, 'reft_grammar_cache_hits_total')).toBe(hits + 1);
    // the row's matcher is let go (its grammar thread reports it closed soon after the response)
    const released = Date.now() + 5_000;
    while ((await metricValue(api, 'reft_grammar_rows')) > 0 && Date.now() < released) await new Promise((r) => setTimeout(r, 50));
    expect(await metricValue(api, 'reft_grammar_rows')).toBe(0);
  });

  it('bad, oversized and too deep schemas and unknown types are 400s naming the field', async () => {
    const base = await baseName();
    const chat = (response_format: unknown) =>
      json(api, 'POST', '/v1/chat/completions', { model: base, messages: [{ role: 'user', content: 'x' }], response_format });
    const bad = await chat({ type: 'json_schema', json_schema: { name: 'x', schema: { type: 'nope' } } });
    expect(bad.status).toBe(400);
    expect(bad.body.error.param).toBe('response_format.json_schema.schema');
    expect(bad.body.error.code).toBe('grammar_invalid');
    expect(bad.body.error.message).toContain('nope');
    const big = await chat({
      type: 'json_schema',
      json_schema: { name: 'x', schema: { enum: Array.from({ length: 5000 }, (_, i) => `value number ${i}`) } },
    });
    expect(big.status).toBe(400);
    expect(big.body.error).toMatchObject({ param: 'response_format.json_schema.schema', code: 'grammar_too_large' });
    // bounded strings compile one rule per character of their bounds: a budget of them, in all
    const long = await chat({
      type: 'json_schema',
      json_schema: {
        name: 'x',
        schema: {
          type: 'array',
          items: [
            { type: 'string', maxLength: 3000 },
            { type: 'string', minLength: 2000 },
          ],
        },
      },
    });
    expect(long.status).toBe(400);
    expect(long.body.error).toMatchObject({ param: 'response_format.json_schema.schema', code: 'grammar_invalid' });
    expect(long.body.error.message).toContain('minLength and maxLength add up to 5002 characters');
    let deep: Record<string, unknown> = { type: 'integer' };
    for (let i = 0; i < 20; i++) deep = { type: 'object', properties: { a: deep }, required: ['a'] };
    const tooDeep = await chat({ type: 'json_schema', json_schema: { name: 'x', schema: deep } });
    expect(tooDeep.status).toBe(400);
    expect(tooDeep.body.error).toMatchObject({ param: 'response_format.json_schema.schema', code: 'grammar_too_deep' });
    const unknown = await chat({ type: 'xml' });
    expect(unknown.status).toBe(400);
    expect(unknown.body.error.param).toMatch(/^response_format/);
    // /v1/generate answers problem+json, with the field
    const gen = await json(api, 'POST', '/v1/generate', { prompt: 'x', structured_outputs: { grammar: 'root ::= "a" | ' } });
    expect(gen.status).toBe(400);
    expect(gen.body).toMatchObject({ code: 'grammar_invalid', field: 'structured_outputs.grammar' });
    const both = await json(api, 'POST', '/v1/generate', {
      prompt: 'x',
      response_format: { type: 'json_object' },
      structured_outputs: { choice: ['a'] },
    });
    expect(both.status).toBe(400);
    expect(both.body).toMatchObject({ code: 'structured_output_ambiguous', field: 'structured_outputs' });
    // the server still constrains after the refusals (a refused compilation ends only its own grammar thread)
    const after = await json(api, 'POST', '/v1/generate', { prompt: 'x', structured_outputs: { choice: ['ok'] }, max_new_tokens: 5 });
    expect(after.body.text).toBe('ok');
  });

  it('a schema that takes long to compile does not delay a concurrent plain request, nor a running constrained one', async () => {
    const plain = { prompt: 'Once upon a time', max_new_tokens: 24, ignore_eos: true };
    const alone: number[] = [];
    for (let i = 0; i < 3; i++) {
      const t = performance.now();
      expect((await json(api, 'POST', '/v1/generate', plain)).status).toBe(200);
      alone.push(performance.now() - t);
    }
    // a running constrained stream: its tokens keep coming while the slow schema compiles
    const gaps: number[] = [];
    const running = (async () => {
      const res = await fetch(`${api.url}/v1/generate`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({
          prompt: 'Once upon a time',
          max_new_tokens: 400,
          temperature: 1,
          seed: 1,
          stream: true,
          structured_outputs: { grammar: 'root ::= ("a" | "b" | " ")+\n' },
        }),
      });
      const reader = res.body!.getReader();
      let last = performance.now();
      for (;;) {
        const { done } = await reader.read();
        if (done) break;
        const now = performance.now();
        gaps.push(now - last);
        last = now;
      }
    })();
    await new Promise((r) => setTimeout(r, 100));
    const slowSchema = { enum: Array.from({ length: 1400 }, (_, i) => `w${i}_` + 'abcdefghij'.repeat(3)) };
    const t0 = performance.now();
    const slow = json(api, 'POST', '/v1/generate', {
      prompt: 'x',
      max_new_tokens: 40,
      response_format: { type: 'json_schema', json_schema: { schema: slowSchema } },
    }).then((r) => ({ r, at: performance.now() - t0 }));
    await new Promise((r) => setTimeout(r, 20));
    const t1 = performance.now();
    const res = await json(api, 'POST', '/v1/generate', plain);
    const plainMs = performance.now() - t1;
    const slowDone = await slow;
    await running;
    expect(res.status).toBe(200);
    expect(slowDone.r.status).toBe(200);
    expect(slowSchema.enum).toContain(JSON.parse(slowDone.r.body.text));
    const baseline = Math.max(...alone);
    console.log({ alone, plainMs, slowMs: slowDone.at, maxGap: Math.max(...gaps) });
    // the plain request answered before the slow schema's, in about its time alone
    expect(plainMs).toBeLessThan(slowDone.at);
    expect(plainMs).toBeLessThan(baseline * 2 + 150);
    expect(Math.max(...gaps)).toBeLessThan(Math.max(250, slowDone.at / 2));
  });
});

let base: string | null = null;
async function baseName(): Promise<string> {
  base ??= (await json(api, 'GET', '/v1/models')).body.data[0].id as string;
  return base;
}
