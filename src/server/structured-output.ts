import { z } from 'zod';
import { grammarInvalid, parameterUnsupported, structuredOutputAmbiguous } from '../errors.ts';
import type { GrammarSpec } from '../grammar/spec.ts';

/**
 * The request fields that constrain the output, shared by /v1/generate, /v1/completions and
 * /v1/chat/completions:
 *
 * - `response_format` (OpenAI's): `{"type": "text"}` (nothing), `{"type": "json_object"}`,
 *   `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
 * - `structured_outputs` (vLLM's, through `extra_body` for the OpenAI clients): exactly one of
 *   `json` (a JSON Schema), `choice` (a list of strings), `grammar` (xgrammar's EBNF, rule `root`).
 *
 * One of the two at most. The schema's own checks (its size, depth, whether xgrammar takes it,
 * how long it compiles) happen in the grammar service, each refusal a 400 naming the field.
 */
const MAX_CHOICES = 1024;

const jsonSchemaValue = z.record(z.string(), z.unknown()).describe('a JSON Schema (an object)');

export const responseFormatSchema = z
  .discriminatedUnion('type', [
    z.strictObject({ type: z.literal('text') }),
    z.strictObject({ type: z.literal('json_object') }),
    z.strictObject({
      type: z.literal('json_schema'),
      json_schema: z.strictObject({
        name: z.string().min(1).max(64).optional().describe("the schema's name (kept for compatibility; unused)"),
        description: z.string().max(4096).optional(),
        schema: jsonSchemaValue.optional().describe('the JSON Schema the output follows; absent: any JSON object'),
        strict: z.boolean().nullish().describe('always strict: the output always follows the schema'),
      }),
    }),
  ])
  .describe('constrain the output: `json_object` (any JSON object) or `json_schema` (one that follows the schema)');

export const structuredOutputsSchema = z
  .strictObject({
    json: z
      .union([jsonSchemaValue, z.string().max(1 << 20)])
      .optional()
      .describe('a JSON Schema (an object, or its JSON text)'),
    choice: z.array(z.string().min(1).max(4096)).min(1).max(MAX_CHOICES).optional().describe('the output is exactly one of these strings'),
    grammar: z
      .string()
      .min(1)
      .max(1 << 20)
      .optional()
      .describe("xgrammar's EBNF (W3C-style, `root ::= …` is the start rule)"),
    regex: z.unknown().optional().describe('not supported'),
    json_object: z.boolean().optional().describe('true: any JSON object'),
  })
  .describe("vLLM's structured outputs: exactly one of `json`, `choice`, `grammar`, `json_object`");

export const structuredOutputFields = {
  response_format: responseFormatSchema.nullish(),
  structured_outputs: structuredOutputsSchema.nullish(),
};

export interface StructuredOutputFields {
  response_format?: z.infer<typeof responseFormatSchema> | null;
  structured_outputs?: z.infer<typeof structuredOutputsSchema> | null;
}

/** The grammar a request asks for (null: none), with the field that names it for errors. */
export function grammarSpecOf(b: StructuredOutputFields): GrammarSpec | null {
  const rf = b.response_format;
  const so = b.structured_outputs;
  const fromFormat = rf && rf.type !== 'text';
  if (fromFormat && so) throw structuredOutputAmbiguous({ given: ['response_format', 'structured_outputs'] }, 'structured_outputs');
  if (rf?.type === 'json_object') return { kind: 'json_object', field: 'response_format' };
  if (rf?.type === 'json_schema') {
    const schema = rf.json_schema.schema;
    return schema === undefined
      ? { kind: 'json_object', field: 'response_format.json_schema' }
      : { kind: 'json_schema', schema, field: 'response_format.json_schema.schema' };
  }
  if (!so) return null;
  if (so.regex !== undefined && so.regex !== null)
    throw parameterUnsupported({ name: 'structured_outputs.regex' }, 'structured_outputs.regex');
  const given = (['json', 'choice', 'grammar', 'json_object'] as const).filter((k) => so[k] !== undefined && so[k] !== false);
  if (given.length !== 1) {
    throw structuredOutputAmbiguous(
      { given: given.map((k) => `structured_outputs.${k}`) },
      given[1] ? `structured_outputs.${given[1]}` : 'structured_outputs',
    );
  }
  switch (given[0]) {
    case 'json': {
      const field = 'structured_outputs.json';
      let schema: unknown = so.json;
      if (typeof schema === 'string') {
        try {
          schema = JSON.parse(schema);
        } catch (e) {
          throw grammarInvalid({ what: 'schema', reason: `it is not JSON: ${(e as Error).message}` }, field);
        }
      }
      return { kind: 'json_schema', schema, field };
    }
    case 'choice':
      return { kind: 'choice', choices: so.choice!, field: 'structured_outputs.choice' };
    case 'grammar':
      return { kind: 'grammar', ebnf: so.grammar!, field: 'structured_outputs.grammar' };
    case 'json_object':
      return { kind: 'json_object', field: 'structured_outputs.json_object' };
  }
}
