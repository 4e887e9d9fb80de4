import { useState } from 'preact/hooks';
import { apiKey, type Problem } from '../api.ts';
import { FieldError, describedBy, type FieldErrors } from '../components/field-errors.tsx';

/**
 * With REFT_ADMIN_KEY set the server wants a tenant's API key: asked for once, kept for this
 * tab (sessionStorage), sent as the Bearer header. Single-tenant servers need none.
 */
export interface Access {
  mode: 'open' | 'keys';
  /** The API answers with the tab's key (or without one, when open). */
  ok: boolean;
  /** Why the last key was refused. */
  refused?: Problem;
}

export function AccessPage({ access, onChange }: { access: Access; onChange: () => void }) {
  const [key, setKey] = useState('');
  const errors: FieldErrors = access.refused ? { key: `${access.refused.detail} (${access.refused.code})` } : {};
  const held = apiKey.get();

  return (
    <>
      <h2 id="access-title">Access</h2>
      {access.mode === 'open' ? (
        <p>This server is single-tenant (no REFT_ADMIN_KEY): every page works without a key.</p>
      ) : access.ok && held ? (
        <>
          <p>
            Signed in with the API key <code>{held.slice(0, 12)}…</code>, kept for this tab only. You see only your tenant's interventions,
            jobs and usage, and the shared interventions.
          </p>
          <button
            type="button"
            onClick={() => {
              apiKey.clear();
              onChange();
            }}
          >
            Forget the key
          </button>
        </>
      ) : (
        <form
          class="stack narrow"
          onSubmit={(e) => {
            e.preventDefault();
            apiKey.set(key.trim());
            setKey('');
            onChange();
          }}
        >
          <p>This server has API keys. Enter your tenant's key (from the administrator); it is kept for this tab only.</p>
          <label for="access-key">API key</label>
          <input
            id="access-key"
            name="key"
            type="password"
            autocomplete="off"
            required
            value={key}
            onInput={(e) => setKey(e.currentTarget.value)}
            {...describedBy('access', 'key', errors)}
          />
          <FieldError form="access" field="key" errors={errors} />
          <button type="submit">Use this key</button>
        </form>
      )}
    </>
  );
}
