import { FieldError, describedBy, type FieldErrors } from './field-errors.tsx';

/** A labelled number input with the server's error for its field shown beneath it. */
export function NumberField(p: {
  form: string;
  id: string;
  label: string;
  field: string;
  value: number;
  set: (v: number) => void;
  min?: number;
  max?: number;
  step: number;
  errors: FieldErrors;
}) {
  return (
    <div class="stack">
      <label for={p.id}>{p.label}</label>
      <input
        id={p.id}
        type="number"
        min={p.min}
        max={p.max}
        step={p.step}
        value={p.value}
        onInput={(e) => p.set(Number(e.currentTarget.value))}
        {...describedBy(p.form, p.field, p.errors)}
      />
      <FieldError form={p.form} field={p.field} errors={p.errors} />
    </div>
  );
}
