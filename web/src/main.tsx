import { render } from 'preact';
import { useCallback, useEffect, useState } from 'preact/hooks';
import { ApiError, apiKey, call } from './api.ts';
import { AccessPage, type Access } from './pages/access.tsx';
import { GeneratePage } from './pages/generate.tsx';
import { InterventionsPage } from './pages/interventions.tsx';
import { TrainingPage } from './pages/training.tsx';
import { UsagePage } from './pages/usage.tsx';
import './styles.css';

/**
 * The playground's shell: a tab per page (hash routes, so / and /ui/ serve the same file), and
 * the access check that asks for an API key when the server has keys on. Pages stay mounted
 * while hidden, so a training run keeps streaming while you generate.
 */
const PAGES = [
  { id: 'generate', title: 'Generate' },
  { id: 'interventions', title: 'Interventions' },
  { id: 'training', title: 'Training' },
  { id: 'usage', title: 'Usage' },
  { id: 'access', title: 'Access' },
] as const;
type PageId = (typeof PAGES)[number]['id'];

function parseHash(): { page: PageId; params: URLSearchParams } {
  const [path, query] = location.hash.replace(/^#\/?/, '').split('?');
  const page = PAGES.find((p) => p.id === path)?.id ?? 'generate';
  return { page, params: new URLSearchParams(query ?? '') };
}

/** Whether the server wants a key, and whether the tab's key (if any) is taken. */
async function checkAccess(): Promise<Access> {
  try {
    await call('GET', '/v1/interventions?limit=1');
    return { mode: apiKey.get() ? 'keys' : 'open', ok: true };
  } catch (err) {
    if (err instanceof ApiError && (err.problem.status === 401 || err.problem.status === 403)) {
      return { mode: 'keys', ok: false, refused: apiKey.get() ? err.problem : undefined };
    }
    throw err;
  }
}

function App() {
  const [route, setRoute] = useState(parseHash);
  const [access, setAccess] = useState<Access | null>(null);
  const [fatal, setFatal] = useState<string | null>(null);
  /** Bumped when something changes the intervention list (upload, delete, training). */
  const [revision, setRevision] = useState(0);

  useEffect(() => {
    const onHash = () => setRoute(parseHash());
    addEventListener('hashchange', onHash);
    return () => removeEventListener('hashchange', onHash);
  }, []);

  const recheck = useCallback(() => {
    checkAccess()
      .then((a) => {
        if (!a.ok && a.refused) apiKey.clear();
        setAccess(a);
      })
      .catch((e: Error) => setFatal(e.message));
  }, []);
  useEffect(recheck, [recheck]);

  const changed = useCallback(() => setRevision((r) => r + 1), []);
  const go = (page: PageId, query = '') => (location.hash = `#/${page}${query ? `?${query}` : ''}`);

  if (fatal) return <p role="alert">The server did not answer as expected: {fatal}</p>;
  if (!access) return <p aria-busy="true">Connecting…</p>;
  const locked = !access.ok;
  const page: PageId = locked ? 'access' : route.page;

  return (
    <>
      <header>
        <h1>reft-server playground</h1>
        <nav aria-label="Pages">
          <ul>
            {PAGES.map((p) => (
              <li key={p.id}>
                <a
                  href={`#/${p.id}`}
                  aria-current={page === p.id ? 'page' : undefined}
                  aria-disabled={locked && p.id !== 'access' ? 'true' : undefined}
                >
                  {p.title}
                </a>
              </li>
            ))}
          </ul>
        </nav>
        <p class="muted" data-testid="access-mode">
          {access.mode === 'open' ? 'Single-tenant: no key needed' : access.ok ? 'Using your API key' : 'API key needed'}
        </p>
      </header>
      <main>
        <section hidden={page !== 'access'} aria-labelledby="access-title">
          <AccessPage access={access} onChange={recheck} />
        </section>
        {!locked && (
          <>
            <section hidden={page !== 'generate'} aria-labelledby="generate-title">
              <GeneratePage
                active={page === 'generate'}
                revision={revision}
                preselect={page === 'generate' ? route.params.get('intervention') : null}
              />
            </section>
            <section hidden={page !== 'interventions'} aria-labelledby="interventions-title">
              <InterventionsPage active={page === 'interventions'} revision={revision} onChange={changed} />
            </section>
            <section hidden={page !== 'training'} aria-labelledby="training-title">
              <TrainingPage onTrained={changed} onGenerate={(name) => go('generate', `intervention=${encodeURIComponent(name)}`)} />
            </section>
            <section hidden={page !== 'usage'} aria-labelledby="usage-title">
              <UsagePage active={page === 'usage'} />
            </section>
          </>
        )}
      </main>
    </>
  );
}

render(<App />, document.getElementById('app')!);
