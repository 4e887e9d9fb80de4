import { useEffect, useRef, useState } from 'preact/hooks';
import { schemaProblem } from '../schema-check.ts';
import { ApiError, call, listAll, stream, type AppliedEdit, type GenerateEvent, type Intervention } from '../api.ts';
import { FORM, FieldError, describedBy, useFieldErrors } from '../components/field-errors.tsx';
import { HeatStrip } from '../components/heat-strip.tsx';
import { NumberField } from '../components/number-field.tsx';
import { features, type Features } from '../features.ts';

/**
 * Generate: a prompt, the sampling settings, and interventions each with a strength (−3…3) and
 * optional layer and position overrides. "Compare" streams the base model and the intervened
 * generation side by side with the same seed.
 */
interface Row {
  key: number;
  intervention: string;
  strength: number;
  layers: string;
  positions: string;
}

interface Pane {
  text: string;
  state: 'idle' | 'running' | 'done' | 'error';
  note: string;
}

const IDLE: Pane = { text: '', state: 'idle', note: '' };
let nextKey = 1;
const newRow = (intervention = ''): Row => ({ key: nextKey++, intervention, strength: 1, layers: '', positions: '' });

/** The sampling settings, named as the request's fields. */
type Sampling = { max_new_tokens: number; temperature: number; top_p: number; top_k: number; seed: number };

/** One number input per sampling setting, in the form's order. */
const SAMPLING_INPUTS: Array<{ field: keyof Sampling; id: string; label: string; min: number; max: number; step: number }> = [
  { field: 'max_new_tokens', id: 'gen-max', label: 'Max new tokens', min: 1, max: 4096, step: 1 },
  { field: 'temperature', id: 'gen-temp', label: 'Temperature (0 = greedy)', min: 0, max: 10, step: 0.1 },
  { field: 'top_p', id: 'gen-top-p', label: 'Top p', min: 0.01, max: 1, step: 0.01 },
  { field: 'top_k', id: 'gen-top-k', label: 'Top k (0 = off)', min: 0, max: 100000, step: 1 },
  { field: 'seed', id: 'gen-seed', label: 'Seed (both sides)', min: 0, max: 2 ** 32 - 1, step: 1 },
];

const SAMPLING_FIELDS = ['prompt', 'messages', ...SAMPLING_INPUTS.map((i) => i.field)];

class LocalError extends ApiError {
  constructor(field: string, detail: string) {
    super({ status: 0, code: 'invalid_input', detail, field });
  }
}

function parseLayers(raw: string, field: string): number[] | undefined {
  if (!raw.trim()) return undefined;
  const layers = raw.split(',').map((s) => Number(s.trim()));
  if (layers.some((l) => !Number.isInteger(l) || l < 0)) throw new LocalError(field, 'layers are numbers separated by commas, e.g. 1,3');
  return layers;
}

/** The request's intervention part: `interventions` where the server has request-time control, else `adapter`. */
function steering(rows: Row[], f: Features): Record<string, unknown> {
  const chosen = rows.filter((r) => r.intervention);
  if (chosen.length === 0) return {};
  if (f.steering) {
    return {
      interventions: chosen.map((r) => {
        const i = rows.indexOf(r);
        const layers = parseLayers(r.layers, `interventions.${i}.layers`);
        return {
          intervention: r.intervention,
          strength: r.strength,
          ...(layers ? { layers } : {}),
          ...(r.positions.trim() ? { positions: r.positions.trim() } : {}),
        };
      }),
      return_coefficients: true,
    };
  }
  const [only] = chosen;
  if (chosen.length > 1 || only.strength !== 1 || only.layers.trim() || only.positions.trim()) {
    throw new LocalError(
      `interventions.${rows.indexOf(only)}.strength`,
      'this server applies one intervention at strength 1 only (it has no request-time control)',
    );
  }
  return { adapter: only.intervention };
}

/** With a schema: whether the output parses and follows it (checked here, as a reader would). */
function validation(text: string, schema: Record<string, unknown> | null): string {
  if (!schema) return '';
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return ' · not JSON';
  }
  const problem = schemaProblem(value, schema);
  return problem ? ` · does not follow the schema (${problem})` : ' · valid: follows the schema';
}

export function GeneratePage({ active, revision, preselect }: { active: boolean; revision: number; preselect: string | null }) {
  const [info, setInfo] = useState<Features | null>(null);
  const [list, setList] = useState<Intervention[]>([]);
  const [prompt, setPrompt] = useState('Once upon a time');
  /** Structured output: a JSON Schema the output must follow (empty: none). */
  const [schemaText, setSchemaText] = useState('');
  const [chat, setChat] = useState(false);
  const [sampling, setSampling] = useState<Sampling>({ max_new_tokens: 24, temperature: 0, top_p: 1, top_k: 0, seed: 1 });
  const [rows, setRows] = useState<Row[]>([newRow()]);
  const [base, setBase] = useState<Pane>(IDLE);
  const [steered, setSteered] = useState<Pane>(IDLE);
  const [shownPrompt, setShownPrompt] = useState('');
  const [applied, setApplied] = useState<{ edits: AppliedEdit[][]; tokens: string[]; names: string[] } | null>(null);
  const running = useRef<AbortController | null>(null);
  /** Counts runs, so a reader can tell this run's output from the last one's. */
  const [runs, setRuns] = useState(0);
  const fieldNames = [
    ...SAMPLING_FIELDS,
    'response_format.json_schema.schema',
    ...rows.flatMap((_, i) => ['intervention', 'strength', 'layers', 'positions'].map((k) => `interventions.${i}.${k}`)),
  ];
  const fe = useFieldErrors(fieldNames, { adapter: 'interventions.0.intervention', messages: 'prompt' });

  useEffect(() => {
    features().then(setInfo, (e: Error) => fe.show(e));
  }, []);
  useEffect(() => {
    if (active) listAll<Intervention>('/v1/interventions').then(setList, (e) => fe.show(e));
  }, [active, revision]);
  useEffect(() => {
    if (preselect) setRows([newRow(preselect)]);
  }, [preselect]);

  const update = (key: number, patch: Partial<Row>) => setRows((rs) => rs.map((r) => (r.key === key ? { ...r, ...patch } : r)));

  const input = () => (chat ? { messages: [{ role: 'user', content: prompt }] } : { prompt });

  async function runPane(
    body: Record<string, unknown>,
    schema: Record<string, unknown> | null,
    set: (p: Pane) => void,
    signal: AbortSignal,
    onApplied?: (a: AppliedEdit[][], tokens?: string[]) => void,
  ) {
    let text = '';
    let readout = false;
    set({ text, state: 'running', note: 'streaming…' });
    try {
      for await (const e of stream<GenerateEvent>('POST', '/v1/generate', { ...body, stream: true }, signal)) {
        // the readout comes once, before the first token (and again in `done`)
        if ('applied' in e && e.applied && onApplied && !readout) {
          readout = true;
          onApplied(e.applied, e.prompt_token_texts);
        }
        if (e.type === 'token') {
          text += e.text;
          set({ text, state: 'running', note: 'streaming…' });
        } else if (e.type === 'done') {
          set({
            text: e.text,
            state: 'done',
            note: `done: ${e.usage.completion_tokens} tokens, finish ${e.finish_reason}; prompt ${e.usage.prompt_tokens} tokens, ${e.usage.prompt_tokens_details.cached_tokens} cached${validation(e.text, schema)}`,
          });
          return;
        } else if (e.type === 'error') throw new ApiError(e.error);
      }
      set({ text, state: 'error', note: 'the stream ended early' });
    } catch (err) {
      set({ text, state: 'error', note: err instanceof Error ? err.message : String(err) });
      throw err;
    }
  }

  async function run(compare: boolean) {
    if (!info) return;
    fe.clear();
    running.current?.abort();
    const controller = new AbortController();
    running.current = controller;
    let steer: Record<string, unknown>;
    try {
      steer = steering(rows, info);
    } catch (err) {
      fe.show(err);
      return;
    }
    const names = rows.filter((r) => r.intervention).map((r) => r.intervention);
    let schema: Record<string, unknown> | null = null;
    if (schemaText.trim()) {
      try {
        schema = JSON.parse(schemaText);
      } catch (err) {
        fe.show(
          new ApiError({
            status: 400,
            code: 'grammar_invalid',
            detail: `not JSON: ${(err as Error).message}`,
            field: 'response_format.json_schema.schema',
          }),
        );
        return;
      }
    }
    const format = schema ? { response_format: { type: 'json_schema', json_schema: { name: 'playground', schema } } } : {};
    const common = { ...input(), ...sampling, ...format };
    setShownPrompt(prompt);
    setRuns((n) => n + 1);
    setApplied(null);
    setBase(IDLE);
    setSteered(IDLE);
    const onApplied = (edits: AppliedEdit[][], tokens?: string[]) => {
      if (tokens) return setApplied({ edits, tokens, names });
      call<{ token_strs: string[] }>('POST', '/tokenize', { ...input(), return_token_strs: true }).then(
        (t) => setApplied({ edits, tokens: t.token_strs, names }),
        () => setApplied({ edits, tokens: [], names }),
      );
    };
    const jobs = [runPane({ ...common, ...steer }, schema, setSteered, controller.signal, onApplied)];
    if (compare) jobs.push(runPane(common, schema, setBase, controller.signal));
    const results = await Promise.allSettled(jobs);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed && !controller.signal.aborted) fe.show(failed.reason);
  }

  const options = [
    ...list.map((iv) => ({ value: iv.name, label: `${iv.name}${iv.shared ? ' (shared)' : ''}` })),
    ...rows
      .filter((r) => r.intervention && !list.some((iv) => iv.name === r.intervention))
      .map((r) => ({ value: r.intervention, label: r.intervention })),
  ];
  const chosen = rows.some((r) => r.intervention);
  const busy = base.state === 'running' || steered.state === 'running';
  const errs = fe.errors;

  return (
    <>
      <h2 id="generate-title">Generate</h2>
      {info && (
        <p class="muted">
          Model <strong>{info.model}</strong>
          {info.contextLength ? `, ${info.contextLength} tokens of context` : ''}.{' '}
          {info.steering ? 'Strength, layers and positions apply per request.' : 'This server applies one intervention at strength 1.'}
        </p>
      )}
      <form
        class="stack"
        onSubmit={(e) => {
          e.preventDefault();
          void run(true);
        }}
      >
        {info?.chat && (
          <fieldset class="inline">
            <legend>Input</legend>
            <label>
              <input type="radio" name="mode" checked={!chat} onChange={() => setChat(false)} /> Text
            </label>
            <label>
              <input type="radio" name="mode" checked={chat} onChange={() => setChat(true)} /> Chat (one user message, the model's template)
            </label>
          </fieldset>
        )}
        <label for="gen-prompt">{chat ? 'Message' : 'Prompt'}</label>
        <textarea
          id="gen-prompt"
          rows={3}
          value={prompt}
          onInput={(e) => setPrompt(e.currentTarget.value)}
          {...describedBy('gen', 'prompt', errs)}
        />
        <FieldError form="gen" field="prompt" errors={errs} />

        <label for="gen-schema">JSON Schema (optional: the output follows it)</label>
        <textarea
          id="gen-schema"
          rows={3}
          placeholder='{"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}}, "required": ["name"]}'
          value={schemaText}
          onInput={(e) => setSchemaText(e.currentTarget.value)}
          {...describedBy('gen', 'response_format.json_schema.schema', errs)}
        />
        <FieldError form="gen" field="response_format.json_schema.schema" errors={errs} />

        <fieldset class="grid">
          <legend>Sampling</legend>
          {SAMPLING_INPUTS.map((f) => (
            <NumberField
              key={f.field}
              form="gen"
              {...f}
              value={sampling[f.field]}
              set={(v) => setSampling((s) => ({ ...s, [f.field]: v }))}
              errors={errs}
            />
          ))}
        </fieldset>

        <fieldset>
          <legend>Interventions</legend>
          {rows.map((r, i) => (
            <div class="iv-row" key={r.key} data-testid={`iv-row-${i}`}>
              <div class="stack">
                <label for={`gen-iv-${r.key}`}>Intervention {i + 1}</label>
                <select
                  id={`gen-iv-${r.key}`}
                  value={r.intervention}
                  onChange={(e) => update(r.key, { intervention: e.currentTarget.value })}
                  {...describedBy('gen', `interventions.${i}.intervention`, errs)}
                >
                  <option value="">(none: base model)</option>
                  {options.map((o) => (
                    <option key={o.value} value={o.value}>
                      {o.label}
                    </option>
                  ))}
                </select>
                <FieldError form="gen" field={`interventions.${i}.intervention`} errors={errs} />
              </div>
              <div class="stack">
                <label for={`gen-strength-${r.key}`}>
                  Strength <output for={`gen-strength-${r.key}`}>{r.strength.toFixed(1)}</output>
                </label>
                <input
                  id={`gen-strength-${r.key}`}
                  type="range"
                  min={-3}
                  max={3}
                  step={0.1}
                  value={r.strength}
                  onInput={(e) => update(r.key, { strength: Math.round(Number(e.currentTarget.value) * 10) / 10 })}
                  {...describedBy('gen', `interventions.${i}.strength`, errs)}
                />
                <FieldError form="gen" field={`interventions.${i}.strength`} errors={errs} />
              </div>
              <div class="stack">
                <label for={`gen-layers-${r.key}`}>Layers (optional)</label>
                <input
                  id={`gen-layers-${r.key}`}
                  placeholder="all, or e.g. 1,3"
                  value={r.layers}
                  onInput={(e) => update(r.key, { layers: e.currentTarget.value })}
                  {...describedBy('gen', `interventions.${i}.layers`, errs)}
                />
                <FieldError form="gen" field={`interventions.${i}.layers`} errors={errs} />
              </div>
              <div class="stack">
                <label for={`gen-positions-${r.key}`}>Positions (optional)</label>
                <input
                  id={`gen-positions-${r.key}`}
                  placeholder="as saved, or e.g. f2+l2"
                  value={r.positions}
                  onInput={(e) => update(r.key, { positions: e.currentTarget.value })}
                  {...describedBy('gen', `interventions.${i}.positions`, errs)}
                />
                <FieldError form="gen" field={`interventions.${i}.positions`} errors={errs} />
              </div>
              <button
                type="button"
                class="secondary"
                onClick={() => setRows((rs) => rs.filter((x) => x.key !== r.key))}
                aria-label={`Remove intervention ${i + 1}`}
              >
                Remove
              </button>
            </div>
          ))}
          <button type="button" class="secondary" disabled={rows.length >= 8} onClick={() => setRows((rs) => [...rs, newRow()])}>
            Add an intervention
          </button>
        </fieldset>

        <div class="actions">
          <button type="submit" disabled={!info || !chosen}>
            Compare
          </button>
          <button type="button" disabled={!info} onClick={() => void run(false)}>
            Generate
          </button>
          {busy && (
            <button type="button" class="secondary" onClick={() => running.current?.abort()}>
              Stop
            </button>
          )}
        </div>
        {!chosen && <p class="muted">Choose an intervention to compare it with the base model.</p>}
        <FieldError form="gen" field={FORM} errors={errs} />
      </form>

      {applied && <HeatStrip edits={applied.edits} tokens={applied.tokens} names={applied.names} />}

      <div class="panes">
        <OutputPane title="Base model" testId="base" prompt={shownPrompt} pane={base} run={runs} />
        <OutputPane title="With interventions" testId="steered" prompt={shownPrompt} pane={steered} run={runs} />
      </div>
    </>
  );
}

function OutputPane({ title, testId, prompt, pane, run }: { title: string; testId: string; prompt: string; pane: Pane; run: number }) {
  return (
    <article class="pane" aria-labelledby={`pane-${testId}`}>
      <h3 id={`pane-${testId}`}>{title}</h3>
      <p class="output" aria-live="polite">
        {pane.state !== 'idle' && <span class="prompt-echo">{prompt}</span>}
        <span data-testid={`text-${testId}`}>{pane.text}</span>
      </p>
      <p
        class="muted"
        data-testid={`state-${testId}`}
        data-state={pane.state}
        data-run={run}
        role={pane.state === 'error' ? 'alert' : undefined}
      >
        {pane.state === 'error' ? `Error: ${pane.note}` : pane.note}
      </p>
    </article>
  );
}
