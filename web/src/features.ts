import { call } from './api.ts';

/**
 * What this server offers, read once: the base model's name and context, whether its tokenizer
 * has a chat template, and whether /v1/generate takes request-time control (the `interventions`
 * list with strengths, layer and position overrides, and `return_coefficients`), read from the
 * OpenAPI document the server serves.
 */
export interface Features {
  model: string;
  contextLength: number | null;
  chat: boolean;
  steering: boolean;
}

let loaded: Promise<Features> | null = null;

async function load(): Promise<Features> {
  const [models, doc, chat] = await Promise.all([
    call<{ data: Array<{ id: string; max_model_len?: number }> }>('GET', '/v1/models'),
    fetch('/openapi.json').then((r) => r.json()),
    call('POST', '/tokenize', { messages: [{ role: 'user', content: 'hi' }] }).then(
      () => true,
      () => false,
    ),
  ]);
  const body = doc?.paths?.['/v1/generate']?.post?.requestBody?.content?.['application/json']?.schema?.properties ?? {};
  return {
    model: models.data[0]?.id ?? 'base model',
    contextLength: models.data[0]?.max_model_len ?? null,
    chat,
    steering: 'interventions' in body && 'return_coefficients' in body,
  };
}

export function features(): Promise<Features> {
  loaded ??= load().catch((e) => {
    loaded = null;
    throw e;
  });
  return loaded;
}
