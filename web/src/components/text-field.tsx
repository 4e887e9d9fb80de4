import { FieldError, describedBy, type FieldErrors } from './field-errors.tsx';

/** A labelled text input with the server's error for its field shown beneath it. */
export function TextField(p: {
  form: string;
  id: string;
  label: string;
  field: string;
  value: string;
  set: (v: string) => void;
  errors: FieldErrors;
}) {
  return (
    <div class="stack">
      <label for={p.id}>{p.label}</label>
      <input id={p.id} value={p.value} onInput={(e) => p.set(e.currentTarget.value)} {...describedBy(p.form, p.field, p.errors)} />
      <FieldError form={p.form} field={p.field} errors={p.errors} />
    </div>
  );
}
