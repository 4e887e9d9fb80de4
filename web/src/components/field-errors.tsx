import { useState } from 'preact/hooks';
import { ApiError } from '../api.ts';

/**
 * The server's errors next to the control they name: a problem's `field` ("weights",
 * "intervention.rank", "file:line 7", "interventions.0.strength") is matched to the form's
 * field names, exactly or by prefix; one that matches none is shown for the whole form.
 */
export type FieldErrors = Record<string, string>;

export const FORM = '_form';

/** How a form reads the server's field names: the alias of a name, or of its longest aliased prefix. */
export type Aliases = Record<string, string>;

export function matchField(field: string | undefined, fields: readonly string[], aliases: Aliases = {}): string {
  if (!field) return FORM;
  const aliased = Object.keys(aliases)
    .sort((a, b) => b.length - a.length)
    .find((a) => field === a || field.startsWith(a + '.') || field.startsWith(a + ':'));
  const name = aliased ? aliases[aliased] : field;
  if (fields.includes(name)) return name;
  const prefix = [...fields].sort((a, b) => b.length - a.length).find((f) => ['.', ':', '['].some((sep) => name.startsWith(f + sep)));
  return prefix ?? FORM;
}

export function useFieldErrors(fields: readonly string[], aliases: Aliases = {}) {
  const [errors, setErrors] = useState<FieldErrors>({});
  return {
    errors,
    clear: () => setErrors({}),
    /** Shows an error where it belongs; other exceptions go to the form. */
    show(err: unknown): void {
      if (err instanceof ApiError) {
        const at = matchField(err.problem.field, fields, aliases);
        setErrors({ [at]: `${err.problem.detail} (${err.problem.code})` });
      } else setErrors({ [FORM]: err instanceof Error ? err.message : String(err) });
    },
  };
}

/** The id of a field's error message, for aria-describedby. */
export const errorId = (form: string, field: string) => `${form}-${field.replace(/[^\w-]/g, '-')}-error`;

/** Props a control takes so that its error is announced with it. */
export function describedBy(form: string, field: string, errors: FieldErrors) {
  return errors[field]
    ? { 'aria-invalid': true as const, 'aria-describedby': errorId(form, field) }
    : { 'aria-invalid': false as const, 'aria-describedby': undefined };
}

export function FieldError({ form, field, errors }: { form: string; field: string; errors: FieldErrors }) {
  const message = errors[field];
  if (!message) return null;
  return (
    <p id={errorId(form, field)} class="field-error" role="alert" data-field={field}>
      <span aria-hidden="true">⚠ </span>
      {message}
    </p>
  );
}
