import { useRef, useState } from 'preact/hooks';
import { ApiError, call, stream, type Job, type JobEvent } from '../api.ts';
import { Chart } from '../components/chart.tsx';
import { NumberField } from '../components/number-field.tsx';
import { TextField } from '../components/text-field.tsx';
import { FORM, FieldError, describedBy, useFieldErrors } from '../components/field-errors.tsx';

/**
 * Training: JSONL (pasted or dropped) or a small prompt/completion table, the recipe with the
 * server's defaults filled in, a live loss curve and tokens/s from the job's event stream,
 * cancel, and on success one click to Generate with the new intervention.
 */
const KINDS = ['loreft', 'direft', 'noreft', 'consreft', 'lobireft'];
const FIELDS = [
  'data',
  'name',
  'intervention.kind',
  'intervention.rank',
  'intervention.layers',
  'intervention.positions',
  'hyperparameters.epochs',
  'hyperparameters.learning_rate',
];
/** The uploaded file's line errors ("file:line 7") and its quota belong to the data. */
const ALIASES = { file: 'data', training_file: 'data' };

interface Pair {
  key: number;
  prompt: string;
  completion: string;
}
let nextKey = 1;
const pair = (): Pair => ({ key: nextKey++, prompt: '', completion: '' });

interface Live {
  job: Job;
  steps: number[];
  losses: number[];
  tokensPerSecond: number | null;
  total: number | null;
  eta: number | null;
  log: string;
}

export function TrainingPage({ onTrained, onGenerate }: { onTrained: () => void; onGenerate: (name: string) => void }) {
  const [source, setSource] = useState<'jsonl' | 'table'>('jsonl');
  const [jsonl, setJsonl] = useState('');
  const [pairs, setPairs] = useState<Pair[]>([pair(), pair(), pair()]);
  const [name, setName] = useState('');
  const [kind, setKind] = useState('loreft');
  const [rank, setRank] = useState(4);
  const [layers, setLayers] = useState('all');
  const [positions, setPositions] = useState('f3+l3');
  const [epochs, setEpochs] = useState(30);
  const [lr, setLr] = useState(0.01);
  const [live, setLive] = useState<Live | null>(null);
  const [starting, setStarting] = useState(false);
  const fe = useFieldErrors(FIELDS, ALIASES);
  const follow = useRef<AbortController | null>(null);

  const rowsJsonl = () =>
    source === 'jsonl'
      ? jsonl
      : pairs
          .filter((p) => p.prompt || p.completion)
          .map((p) => JSON.stringify({ prompt: p.prompt, completion: p.completion }))
          .join('\n') + '\n';
  const rowCount = () =>
    rowsJsonl()
      .split('\n')
      .filter((l) => l.trim()).length;

  function parseLayerList(): 'all' | number[] {
    if (layers.trim() === 'all' || !layers.trim()) return 'all';
    const list = layers.split(',').map((s) => Number(s.trim()));
    if (list.some((l) => !Number.isInteger(l) || l < 0))
      throw new ApiError({
        status: 0,
        code: 'invalid_input',
        detail: 'layers: "all" or numbers separated by commas',
        field: 'intervention.layers',
      });
    return list;
  }

  async function start(e: Event) {
    e.preventDefault();
    fe.clear();
    setStarting(true);
    try {
      const layerList = parseLayerList();
      const form = new FormData();
      form.append('file', new Blob([rowsJsonl()], { type: 'application/jsonl' }), 'training.jsonl');
      form.append('purpose', 'fine-tune');
      const file = await call<{ id: string }>('POST', '/v1/files', form);
      const job = await call<Job>('POST', '/v1/training/jobs', {
        training_file: file.id,
        ...(name.trim() ? { name: name.trim() } : {}),
        intervention: { kind, rank, layers: layerList, positions },
        hyperparameters: { epochs, learning_rate: lr },
      });
      void watch(job);
    } catch (err) {
      fe.show(err);
    } finally {
      setStarting(false);
    }
  }

  async function watch(job: Job) {
    follow.current?.abort();
    const controller = new AbortController();
    follow.current = controller;
    let state: Live = { job, steps: [], losses: [], tokensPerSecond: null, total: null, eta: null, log: '' };
    setLive(state);
    try {
      for await (const e of stream<JobEvent>('GET', `/v1/training/jobs/${job.id}/events`, undefined, controller.signal)) {
        if (e.type === 'metrics' && e.data?.step !== undefined && e.data.loss !== undefined) {
          state = {
            ...state,
            job: { ...state.job, status: 'running' },
            steps: [...state.steps, e.data.step],
            losses: [...state.losses, e.data.loss],
            tokensPerSecond: e.data.tokens_per_second ?? state.tokensPerSecond,
            total: e.data.total_steps ?? state.total,
            eta: e.data.eta_seconds ?? null,
          };
        } else if (e.type === 'log' && e.data?.message) state = { ...state, log: e.data.message };
        else if (e.type === 'end' && e.job) state = { ...state, job: e.job };
        setLive(state);
      }
      if (state.job.status === 'succeeded') onTrained();
    } catch (err) {
      if (!controller.signal.aborted) fe.show(err);
    }
  }

  async function cancel() {
    if (!live) return;
    try {
      const job = await call<Job>('POST', `/v1/training/jobs/${live.job.id}/cancel`);
      setLive((l) => l && { ...l, job: { ...l.job, status: job.status }, log: 'cancel requested' });
    } catch (err) {
      fe.show(err);
    }
  }

  async function dropFile(e: DragEvent) {
    e.preventDefault();
    const f = e.dataTransfer?.files[0];
    if (f) {
      setSource('jsonl');
      setJsonl(await f.text());
    }
  }

  const errs = fe.errors;
  const done = live && ['succeeded', 'failed', 'cancelled'].includes(live.job.status);
  const resultName = live?.job.name ?? live?.job.intervention_id ?? '';
  const last = live?.losses.at(-1);

  return (
    <>
      <h2 id="training-title">Training</h2>
      <div class="training-layout">
        <form class="stack" onSubmit={start}>
          <fieldset class="inline">
            <legend>Training data</legend>
            <label>
              <input type="radio" name="source" checked={source === 'jsonl'} onChange={() => setSource('jsonl')} /> JSONL
            </label>
            <label>
              <input type="radio" name="source" checked={source === 'table'} onChange={() => setSource('table')} /> Table
            </label>
          </fieldset>
          {source === 'jsonl' ? (
            <>
              <label for="train-jsonl">
                Rows, one JSON object per line: {'{"prompt": …, "completion": …}'} or {'{"messages": […]}'} (paste, or drop a .jsonl file
                here)
              </label>
              <textarea
                id="train-jsonl"
                rows={8}
                value={jsonl}
                onInput={(e) => setJsonl(e.currentTarget.value)}
                onDragOver={(e) => e.preventDefault()}
                onDrop={(e) => void dropFile(e)}
                {...describedBy('train', 'data', errs)}
              />
            </>
          ) : (
            <table class="pairs" aria-describedby={errs.data ? 'train-data-error' : undefined}>
              <caption>Prompt and completion pairs</caption>
              <thead>
                <tr>
                  <th scope="col">Prompt</th>
                  <th scope="col">Completion</th>
                  <th scope="col">
                    <span class="visually-hidden">Remove</span>
                  </th>
                </tr>
              </thead>
              <tbody>
                {pairs.map((p, i) => (
                  <tr key={p.key}>
                    <td>
                      <input
                        aria-label={`Prompt ${i + 1}`}
                        value={p.prompt}
                        onInput={(e) => setPairs((ps) => ps.map((x) => (x.key === p.key ? { ...x, prompt: e.currentTarget.value } : x)))}
                      />
                    </td>
                    <td>
                      <input
                        aria-label={`Completion ${i + 1}`}
                        value={p.completion}
                        onInput={(e) =>
                          setPairs((ps) => ps.map((x) => (x.key === p.key ? { ...x, completion: e.currentTarget.value } : x)))
                        }
                      />
                    </td>
                    <td>
                      <button
                        type="button"
                        class="link"
                        aria-label={`Remove row ${i + 1}`}
                        onClick={() => setPairs((ps) => ps.filter((x) => x.key !== p.key))}
                      >
                        remove
                      </button>
                    </td>
                  </tr>
                ))}
              </tbody>
            </table>
          )}
          {source === 'table' && (
            <button type="button" class="secondary" onClick={() => setPairs((ps) => [...ps, pair()])}>
              Add a row
            </button>
          )}
          <p class="muted" data-testid="train-rows">
            {rowCount()} rows
          </p>
          <FieldError form="train" field="data" errors={errs} />

          <fieldset class="grid">
            <legend>Recipe (the server's defaults)</legend>
            <div class="stack">
              <label for="train-name">Name of the result (optional)</label>
              <input id="train-name" value={name} onInput={(e) => setName(e.currentTarget.value)} {...describedBy('train', 'name', errs)} />
              <FieldError form="train" field="name" errors={errs} />
            </div>
            <div class="stack">
              <label for="train-kind">Kind</label>
              <select
                id="train-kind"
                value={kind}
                onChange={(e) => setKind(e.currentTarget.value)}
                {...describedBy('train', 'intervention.kind', errs)}
              >
                {KINDS.map((k) => (
                  <option key={k} value={k}>
                    {k}
                  </option>
                ))}
              </select>
              <FieldError form="train" field="intervention.kind" errors={errs} />
            </div>
            <NumberField
              form="train"
              min={0}
              id="train-rank"
              label="Rank"
              field="intervention.rank"
              value={rank}
              set={setRank}
              step={1}
              errors={errs}
            />
            <TextField
              form="train"
              id="train-layers"
              label={'Layers ("all" or e.g. 0,2,4)'}
              field="intervention.layers"
              value={layers}
              set={setLayers}
              errors={errs}
            />
            <TextField
              form="train"
              id="train-positions"
              label={'Positions (fN, lN or fN+lN)'}
              field="intervention.positions"
              value={positions}
              set={setPositions}
              errors={errs}
            />
            <NumberField
              form="train"
              min={0}
              id="train-epochs"
              label="Epochs"
              field="hyperparameters.epochs"
              value={epochs}
              set={setEpochs}
              step={1}
              errors={errs}
            />
            <NumberField
              form="train"
              min={0}
              id="train-lr"
              label="Learning rate"
              field="hyperparameters.learning_rate"
              value={lr}
              set={setLr}
              step={0.001}
              errors={errs}
            />
          </fieldset>
          <div class="actions">
            <button type="submit" disabled={starting || (live !== null && !done)}>
              {starting ? 'Starting…' : 'Start training'}
            </button>
            {live && !done && (
              <button type="button" class="secondary" onClick={() => void cancel()}>
                Cancel the job
              </button>
            )}
          </div>
          <FieldError form="train" field={FORM} errors={errs} />
        </form>

        {live && (
          <section aria-labelledby="job-title" class="job">
            <h3 id="job-title">
              Job <code>{live.job.id}</code>
            </h3>
            <p role="status" data-testid="job-status" data-status={live.job.status}>
              Status: <strong>{live.job.status}</strong>
              {live.total !== null && ` · step ${live.steps.at(-1) ?? 0} of ${live.total}`}
              {last !== undefined && ` · loss ${last.toFixed(4)}`}
              {live.tokensPerSecond !== null && ` · ${Math.round(live.tokensPerSecond)} tokens/s`}
              {live.eta !== null && !done && ` · about ${Math.ceil(live.eta)} s left`}
              {live.job.error && ` · ${live.job.error}`}
            </p>
            {live.log && <p class="muted">{live.log}</p>}
            <Chart
              title="Training loss"
              xLabel="step"
              yLabel="loss"
              data={[live.steps, live.losses]}
              series={[{ label: 'loss', stroke: '#1d4ed8' }]}
              testId="loss-chart"
            />
            {live.job.status === 'succeeded' && (
              <button type="button" onClick={() => onGenerate(resultName)}>
                Generate with {resultName}
              </button>
            )}
          </section>
        )}
      </div>
    </>
  );
}
