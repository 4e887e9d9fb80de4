import { catalogue } from '../errors.ts';

/**
 * What the route schemas can't say in the OpenAPI document, added after generation: the multipart
 * bodies of the upload routes (so Swagger's "Try it out" can upload), an example per operation,
 * response descriptions, errors as application/problem+json (OpenAI's error shape on the OpenAI
 * routes), text/event-stream on the streaming routes, and no lock on the routes that need no key.
 */
type Json = Record<string, any>;

const file = (description: string) => ({ type: 'string', format: 'binary', description });
const text = (description: string, extra: Json = {}) => ({ type: 'string', description, ...extra });

/** The multipart/form-data parts each upload route reads. */
const MULTIPART: Record<string, { required: string[]; properties: Json; encoding?: Json }> = {
  'POST /v1/interventions': {
    required: ['config', 'weights'],
    properties: {
      config: file('reft_config.json'),
      weights: file('reft_weights.safetensors'),
      name: text("name to use it by (default: the config's name)", { example: 'polite' }),
      description: text('free text'),
      replace: { type: 'boolean', default: false, description: 'replace an intervention of the same name (version + 1)' },
    },
  },
  'POST /v1/interventions/import/pyreft': {
    required: ['config', 'files', 'positions'],
    properties: {
      config: file("pyreft's config.json"),
      files: { type: 'array', items: file('one intkey_*.bin per intervention'), description: 'the intkey_*.bin files, one part each' },
      positions: text('where the interventions apply (pyreft does not store it): fN, lN or fN+lN', { example: 'f1+l1' }),
      share_weights: {
        type: 'boolean',
        default: false,
        description: 'trained with share_weights=True: first and last positions share one intervention (default false, as training)',
      },
      name: text('name to use it by', { example: 'imported' }),
      description: text('free text'),
    },
  },
  'POST /v1/files': {
    required: ['file'],
    properties: {
      file: file('JSONL: one {"prompt", "completion"} or {"messages": [...]} object per line'),
      purpose: text('only fine-tune', { enum: ['fine-tune'], default: 'fine-tune' }),
    },
  },
};

/** A request example per operation that takes a JSON body. */
const REQUEST_EXAMPLES: Record<string, unknown> = {
  'POST /v1/generate': { adapter: null, prompt: 'Once upon a time', max_new_tokens: 32, temperature: 0.7, seed: 1 },
  'POST /v1/completions': { model: 'stories260k', prompt: 'Once upon a time', max_tokens: 16, temperature: 0 },
  'POST /v1/chat/completions': { model: 'stories260k', messages: [{ role: 'user', content: 'Tell me a story.' }], max_tokens: 32 },
  'POST /tokenize': { prompt: 'Once upon a time', return_token_strs: true },
  'POST /detokenize': { tokens: [1, 403, 407, 261, 378] },
  'POST /v1/training/jobs': {
    data: [{ prompt: 'Once upon a time', completion: ' a frog sang.' }],
    intervention: { kind: 'loreft', rank: 4, layers: 'all', positions: 'f3+l3' },
    hyperparameters: { epochs: 30, learning_rate: 0.01 },
    name: 'frog-song',
  },
  'POST /v1/compositions': {
    name: 'calm-mix',
    interventions: [
      { intervention: 'polite', strength: 0.5 },
      { intervention: 'happy', strength: -1, layers: [2], positions: 'l3' },
    ],
  },
  'POST /v1/admin/tenants': { name: 'acme' },
  'PATCH /v1/admin/tenants/{id}': { name: 'acme-eu' },
};

/** Parameter examples, so "Try it out" starts from values of the right form. */
const PARAMETER_EXAMPLES: Record<string, unknown> = {
  file: 'reft_config.json',
  limit: 20,
  model: 'stories260k',
  code: 'intervention_not_found',
};
const HEX = '0123456789abcdef01234567';
/** An `id` example per collection, in the form the store makes them (prefix + 24 hex). */
const ID_EXAMPLES: Array<[string, string]> = [
  ['/v1/interventions/', `iv_${HEX}`],
  ['/v1/compositions/', `comp_${HEX}`],
  ['/v1/files/', `file_${HEX}`],
  ['/v1/training/jobs/', `job_${HEX}`],
  ['/v1/admin/tenants/', `ten_${HEX}`],
  ['/v1/admin/keys/', `key_${HEX}`],
];

const STREAMING = new Set(['POST /v1/generate', 'POST /v1/completions', 'POST /v1/chat/completions', 'GET /v1/training/jobs/{id}/events']);

const DESCRIPTIONS: Record<string, string> = {
  200: 'OK',
  201: 'Created',
  202: 'Accepted: queued',
  204: 'Done; no body',
  '4XX': 'The request was refused; the body says why and names the field',
  '5XX': 'The server could not do it (overloaded, shutting down, or an internal error)',
};

function isOpenAIRoute(path: string): boolean {
  return (
    path === '/v1/completions' ||
    path === '/v1/chat/completions' ||
    path.startsWith('/v1/models') ||
    path === '/tokenize' ||
    path === '/detokenize'
  );
}

/** The wildcard route of a model name (it may hold slashes) reads as {model}. */
function nameWildcards(doc: Json): void {
  const wild = doc.paths?.['/v1/models/{*}'];
  if (!wild) return;
  for (const op of Object.values(wild) as Json[]) for (const p of op.parameters ?? []) if (p.name === '*') p.name = 'model';
  doc.paths = Object.fromEntries(Object.entries(doc.paths).map(([k, v]) => [k === '/v1/models/{*}' ? '/v1/models/{model}' : k, v]));
}

export function completeOpenapi(doc: Json, openRoutes: ReadonlySet<string>): Json {
  nameWildcards(doc);
  for (const [path, ops] of Object.entries(doc.paths ?? {}) as Array<[string, Json]>) {
    for (const [method, op] of Object.entries(ops) as Array<[string, Json]>) {
      const key = `${method.toUpperCase()} ${path}`;
      if (openRoutes.has(key)) op.security = [];
      const multipart = MULTIPART[key];
      if (multipart) {
        op.requestBody = { required: true, content: { 'multipart/form-data': { schema: { type: 'object', ...multipart } } } };
      }
      const example = REQUEST_EXAMPLES[key];
      const json = op.requestBody?.content?.['application/json'];
      if (example !== undefined && json) json.example = example;
      for (const p of op.parameters ?? []) {
        const example = p.name === 'id' ? ID_EXAMPLES.find(([prefix]) => path.startsWith(prefix))?.[1] : PARAMETER_EXAMPLES[p.name];
        if (p.example === undefined && example !== undefined) p.example = example;
      }
      for (const [status, response] of Object.entries(op.responses ?? {}) as Array<[string, Json]>) {
        if (!response.description || response.description === 'Default Response') response.description = DESCRIPTIONS[status] ?? 'Response';
        const isError = status.startsWith('4') || status.startsWith('5');
        if (isError && response.content?.['application/json'] && !isOpenAIRoute(path)) {
          response.content = { 'application/problem+json': { schema: { $ref: '#/components/schemas/Problem' } } };
        }
        if (STREAMING.has(key) && /^2/.test(status)) {
          response.content = {
            ...response.content,
            'text/event-stream': {
              schema: { type: 'string', description: 'server-sent events, one JSON object per data: line (stream: true)' },
            },
          };
        }
      }
    }
  }
  doc.components = { ...doc.components, schemas: { ...doc.components?.schemas, Problem: problemComponent() } };
  return doc;
}

/** RFC 9457 problem details, with every code the catalogue declares. */
function problemComponent(): Json {
  const entries = catalogue();
  const categories = [...new Set(entries.map((e) => e.category))];
  return {
    type: 'object',
    description: 'RFC 9457 problem details; `code` is the specific error (GET /problems/{code} describes it)',
    required: ['type', 'title', 'status', 'detail', 'code', 'category'],
    properties: {
      type: {
        type: 'string',
        description: "the catalogue entry's page, relative to the server",
        example: '/problems/intervention_not_found',
      },
      title: { type: 'string', description: "the entry's summary, the same for every occurrence" },
      status: { type: 'integer' },
      detail: { type: 'string', description: 'what went wrong this time' },
      code: { type: 'string', enum: entries.map((e) => e.code), description: 'the specific error' },
      category: { type: 'string', enum: categories, description: 'its general kind, which the status follows' },
      field: { type: 'string', description: 'the input at fault (a JSON path, a part, a header)' },
      instance: { type: 'string', description: 'the request path' },
    },
  };
}
