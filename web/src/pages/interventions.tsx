import type { Ref } from 'preact';
import { useEffect, useRef, useState } from 'preact/hooks';
import { call, download, listAll, type Intervention } from '../api.ts';
import { FORM, FieldError, describedBy, useFieldErrors, type FieldErrors } from '../components/field-errors.tsx';

/**
 * Interventions: the tenant's and the shared ones, with what each does (kind, rank, layers,
 * positions) and its size, version and date; upload a reft/v1 artifact or a pyreft folder (file
 * inputs, or drop the files or the folder), download, replace and delete.
 */
type Format = 'reft' | 'pyreft';

const FIELDS = ['config', 'weights', 'files', 'positions', 'share_weights', 'name', 'description', 'replace'];
/** The server names artifact problems by file and tensor; they belong to these inputs. */
const ALIASES = {
  'reft_config.json': 'config',
  'config.json': 'config',
  'reft_weights.safetensors': 'weights',
  interventions: 'weights',
  intkey: 'files',
};

const unique = <T,>(xs: T[]) => [...new Set(xs)];

function summary(iv: Intervention) {
  const items = iv.config?.interventions ?? [];
  return {
    kind: unique(items.map((x) => x.kind)).join(', '),
    rank: unique(items.map((x) => x.rank)).join(', '),
    layers: unique(items.map((x) => x.layer))
      .sort((a, b) => a - b)
      .join(', '),
    positions: unique(items.map((x) => x.positions)).join(', '),
  };
}

function size(bytes: number): string {
  return bytes < 1024 ? `${bytes} B` : bytes < 1024 ** 2 ? `${(bytes / 1024).toFixed(1)} KiB` : `${(bytes / 1024 ** 2).toFixed(1)} MiB`;
}

/** The files of a dropped folder (one level of subfolders is enough for both formats). */
async function droppedFiles(dt: DataTransfer): Promise<File[]> {
  const entries = [...dt.items].map((i) => i.webkitGetAsEntry()).filter((e): e is FileSystemEntry => e !== null);
  if (entries.length === 0) return [...dt.files];
  const out: File[] = [];
  const visit = async (entry: FileSystemEntry, depth: number): Promise<void> => {
    if (entry.isFile) out.push(await new Promise<File>((res, rej) => (entry as FileSystemFileEntry).file(res, rej)));
    else if (entry.isDirectory && depth < 2) {
      const reader = (entry as FileSystemDirectoryEntry).createReader();
      const children = await new Promise<FileSystemEntry[]>((res, rej) => reader.readEntries(res, rej));
      for (const c of children) await visit(c, depth + 1);
    }
  };
  for (const e of entries) await visit(e, 0);
  return out;
}

/** One file of the upload form (`up-<field>`), what was chosen, and the server's error for it. */
function FileField(p: {
  field: string;
  label: string;
  accept: string;
  file: File | null;
  set: (f: File | null) => void;
  errors: FieldErrors;
  inputRef?: Ref<HTMLInputElement>;
}) {
  return (
    <>
      <label for={`up-${p.field}`}>{p.label}</label>
      <input
        id={`up-${p.field}`}
        ref={p.inputRef}
        type="file"
        accept={p.accept}
        onChange={(e) => p.set(e.currentTarget.files?.[0] ?? null)}
        {...describedBy('up', p.field, p.errors)}
      />
      <span class="muted">{p.file ? `chosen: ${p.file.name} (${size(p.file.size)})` : 'none chosen'}</span>
      <FieldError form="up" field={p.field} errors={p.errors} />
    </>
  );
}

export function InterventionsPage({ active, revision, onChange }: { active: boolean; revision: number; onChange: () => void }) {
  const [list, setList] = useState<Intervention[] | null>(null);
  const [listError, setListError] = useState<string | null>(null);
  const [status, setStatus] = useState('');
  const [confirming, setConfirming] = useState<string | null>(null);
  const [rowError, setRowError] = useState<{ id: string; message: string } | null>(null);
  const [format, setFormat] = useState<Format>('reft');
  const [config, setConfig] = useState<File | null>(null);
  const [weights, setWeights] = useState<File | null>(null);
  const [files, setFiles] = useState<File[]>([]);
  const [positions, setPositions] = useState('f1+l1');
  const [shareWeights, setShareWeights] = useState(false);
  const [name, setName] = useState('');
  const [description, setDescription] = useState('');
  const [replace, setReplace] = useState(false);
  const [busy, setBusy] = useState(false);
  const [dragging, setDragging] = useState(false);
  const fe = useFieldErrors(FIELDS, ALIASES);
  const configInput = useRef<HTMLInputElement>(null);

  const refresh = () =>
    listAll<Intervention>('/v1/interventions').then(
      (l) => {
        setList(l);
        setListError(null);
      },
      (e: Error) => setListError(e.message),
    );
  useEffect(() => {
    if (active) void refresh();
  }, [active, revision]);

  function take(dropped: File[]) {
    fe.clear();
    const byName = (test: (n: string) => boolean) => dropped.filter((f) => test(f.name));
    const reftConfig = byName((n) => n === 'reft_config.json')[0];
    const safetensors = byName((n) => n.endsWith('.safetensors'))[0];
    const pyConfig = byName((n) => n === 'config.json')[0];
    const bins = byName((n) => /^intkey_.*\.bin$/.test(n));
    if (reftConfig || safetensors) {
      setFormat('reft');
      if (reftConfig) setConfig(reftConfig);
      if (safetensors) setWeights(safetensors);
    } else if (pyConfig || bins.length) {
      setFormat('pyreft');
      if (pyConfig) setConfig(pyConfig);
      if (bins.length) setFiles(bins);
    } else
      fe.show(
        new Error(`none of ${dropped.map((f) => f.name).join(', ')} is reft_config.json, *.safetensors, config.json or intkey_*.bin`),
      );
  }

  async function submit(e: Event) {
    e.preventDefault();
    fe.clear();
    setStatus('');
    const form = new FormData();
    if (config) form.append('config', config, config.name);
    if (format === 'reft') {
      if (weights) form.append('weights', weights, weights.name);
      form.append('replace', String(replace));
    } else {
      for (const f of files) form.append('files', f, f.name);
      form.append('positions', positions);
      form.append('share_weights', String(shareWeights));
    }
    if (name.trim()) form.append('name', name.trim());
    if (description.trim()) form.append('description', description.trim());
    setBusy(true);
    try {
      const stored = await call<Intervention>('POST', format === 'reft' ? '/v1/interventions' : '/v1/interventions/import/pyreft', form);
      setStatus(`Stored ${stored.name} (version ${stored.version}).`);
      (e.target as HTMLFormElement).reset();
      setConfig(null);
      setWeights(null);
      setFiles([]);
      setName('');
      setDescription('');
      setReplace(false);
      await refresh();
      onChange();
    } catch (err) {
      fe.show(err);
    } finally {
      setBusy(false);
    }
  }

  async function remove(iv: Intervention) {
    setRowError(null);
    try {
      await call('DELETE', `/v1/interventions/${encodeURIComponent(iv.id)}`);
      setConfirming(null);
      setStatus(`Deleted ${iv.name}.`);
      await refresh();
      onChange();
    } catch (err) {
      setRowError({ id: iv.id, message: err instanceof Error ? err.message : String(err) });
    }
  }

  async function save(iv: Intervention, file: 'reft_config.json' | 'reft_weights.safetensors') {
    setRowError(null);
    try {
      await download(
        `/v1/interventions/${encodeURIComponent(iv.id)}/files/${file}`,
        file === 'reft_config.json' ? `${iv.name}.reft_config.json` : `${iv.name}.reft_weights.safetensors`,
      );
    } catch (err) {
      setRowError({ id: iv.id, message: err instanceof Error ? err.message : String(err) });
    }
  }

  const errs = fe.errors;

  return (
    <>
      <h2 id="interventions-title">Interventions</h2>
      <p role="status" class="status" data-testid="iv-status">
        {status}
      </p>
      {listError && <p role="alert">Could not list interventions: {listError}</p>}
      {list && (
        <div class="table-scroll">
          <table data-testid="iv-table">
            <caption>{list.length === 1 ? '1 intervention' : `${list.length} interventions`} you can use</caption>
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">Owner</th>
                <th scope="col">Kind</th>
                <th scope="col">Rank</th>
                <th scope="col">Layers</th>
                <th scope="col">Positions</th>
                <th scope="col">Size</th>
                <th scope="col">Version</th>
                <th scope="col">Updated</th>
                <th scope="col">Actions</th>
              </tr>
            </thead>
            <tbody>
              {list.map((iv) => {
                const s = summary(iv);
                return (
                  <tr key={iv.id} data-name={iv.name}>
                    <th scope="row">
                      {iv.name}
                      {iv.description && <div class="muted">{iv.description}</div>}
                    </th>
                    <td>{iv.shared ? 'shared (read-only)' : 'yours'}</td>
                    <td>{s.kind}</td>
                    <td>{s.rank}</td>
                    <td>{s.layers}</td>
                    <td>{s.positions}</td>
                    <td>{size(iv.bytes)}</td>
                    <td>{iv.version}</td>
                    <td>
                      <time dateTime={iv.updated_at}>{iv.updated_at.replace('T', ' ').slice(0, 16)}</time>
                    </td>
                    <td class="row-actions">
                      <button
                        type="button"
                        class="link"
                        onClick={() => void save(iv, 'reft_config.json')}
                        aria-label={`Download ${iv.name}'s reft_config.json`}
                      >
                        config
                      </button>
                      <button
                        type="button"
                        class="link"
                        onClick={() => void save(iv, 'reft_weights.safetensors')}
                        aria-label={`Download ${iv.name}'s weights`}
                      >
                        weights
                      </button>
                      {!iv.shared && (
                        <button
                          type="button"
                          class="link"
                          aria-label={`Replace ${iv.name}`}
                          onClick={() => {
                            setFormat('reft');
                            setName(iv.name);
                            setReplace(true);
                            configInput.current?.focus();
                          }}
                        >
                          replace
                        </button>
                      )}
                      {!iv.shared &&
                        (confirming === iv.id ? (
                          <>
                            <button type="button" class="danger" onClick={() => void remove(iv)}>
                              Confirm delete {iv.name}
                            </button>
                            <button type="button" class="link" onClick={() => setConfirming(null)}>
                              cancel
                            </button>
                          </>
                        ) : (
                          <button type="button" class="link" aria-label={`Delete ${iv.name}`} onClick={() => setConfirming(iv.id)}>
                            delete
                          </button>
                        ))}
                      {rowError?.id === iv.id && (
                        <p role="alert" class="field-error">
                          {rowError.message}
                        </p>
                      )}
                    </td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        </div>
      )}

      <h3>Upload</h3>
      <form
        class={`stack dropzone${dragging ? ' dragging' : ''}`}
        aria-label="Upload an intervention"
        onSubmit={submit}
        onDragOver={(e) => {
          e.preventDefault();
          setDragging(true);
        }}
        onDragLeave={() => setDragging(false)}
        onDrop={(e) => {
          e.preventDefault();
          setDragging(false);
          if (e.dataTransfer) void droppedFiles(e.dataTransfer).then(take);
        }}
      >
        <p class="muted">Choose the files below, or drop them (or their folder) anywhere on this form.</p>
        <fieldset class="inline">
          <legend>Format</legend>
          <label>
            <input type="radio" name="format" checked={format === 'reft'} onChange={() => setFormat('reft')} /> reft/v1 artifact
          </label>
          <label>
            <input type="radio" name="format" checked={format === 'pyreft'} onChange={() => setFormat('pyreft')} /> pyreft folder
          </label>
        </fieldset>

        <FileField
          field="config"
          label={format === 'reft' ? 'reft_config.json' : "pyreft's config.json"}
          accept=".json,application/json"
          file={config}
          set={setConfig}
          errors={errs}
          inputRef={configInput}
        />

        {format === 'reft' ? (
          <>
            <FileField
              field="weights"
              label="reft_weights.safetensors"
              accept=".safetensors"
              file={weights}
              set={setWeights}
              errors={errs}
            />
          </>
        ) : (
          <>
            <label for="up-files">intkey_*.bin files</label>
            <input
              id="up-files"
              type="file"
              multiple
              accept=".bin"
              onChange={(e) => setFiles([...(e.currentTarget.files ?? [])])}
              {...describedBy('up', 'files', errs)}
            />
            <span class="muted">{files.length ? `chosen: ${files.map((f) => f.name).join(', ')}` : 'none chosen'}</span>
            <FieldError form="up" field="files" errors={errs} />
            <label for="up-positions">Positions (pyreft does not store them)</label>
            <input
              id="up-positions"
              value={positions}
              onInput={(e) => setPositions(e.currentTarget.value)}
              {...describedBy('up', 'positions', errs)}
            />
            <FieldError form="up" field="positions" errors={errs} />
            <label class="check">
              <input
                type="checkbox"
                checked={shareWeights}
                onChange={(e) => setShareWeights(e.currentTarget.checked)}
                {...describedBy('up', 'share_weights', errs)}
              />{' '}
              Trained with share_weights=True
            </label>
            <FieldError form="up" field="share_weights" errors={errs} />
          </>
        )}

        <label for="up-name">Name (optional: the config's name)</label>
        <input id="up-name" value={name} onInput={(e) => setName(e.currentTarget.value)} {...describedBy('up', 'name', errs)} />
        <FieldError form="up" field="name" errors={errs} />
        <label for="up-description">Description (optional)</label>
        <input
          id="up-description"
          value={description}
          onInput={(e) => setDescription(e.currentTarget.value)}
          {...describedBy('up', 'description', errs)}
        />
        <FieldError form="up" field="description" errors={errs} />
        {format === 'reft' && (
          <>
            <label class="check">
              <input
                type="checkbox"
                checked={replace}
                onChange={(e) => setReplace(e.currentTarget.checked)}
                {...describedBy('up', 'replace', errs)}
              />{' '}
              Replace the intervention of this name (version + 1)
            </label>
            <FieldError form="up" field="replace" errors={errs} />
          </>
        )}
        <div class="actions">
          <button type="submit" disabled={busy}>
            {busy ? 'Uploading…' : 'Upload'}
          </button>
        </div>
        <FieldError form="up" field={FORM} errors={errs} />
      </form>
    </>
  );
}
