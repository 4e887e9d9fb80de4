/**
 * Whether a value follows a JSON Schema, for the Generate page's structured-output box: the
 * keywords the server's structured output honours (type, properties, required,
 * additionalProperties, enum, const, numeric bounds, string lengths, items, item counts, anyOf).
 * The page can't run ajv: its strict CSP (no 'unsafe-eval') forbids the code ajv generates.
 * Returns null when it follows, else where and why it doesn't.
 */
type Schema = Record<string, unknown>;

export function schemaProblem(value: unknown, schema: Schema, at = '$'): string | null {
  const type = schema.type as string | string[] | undefined;
  if (type !== undefined) {
    const types = Array.isArray(type) ? type : [type];
    if (!types.some((t) => typeMatches(value, t))) return `${at}: not ${types.join(' or ')}`;
  }
  if (Array.isArray(schema.enum) && !schema.enum.some((e) => JSON.stringify(e) === JSON.stringify(value)))
    return `${at}: not one of the enum`;
  if ('const' in schema && JSON.stringify(schema.const) !== JSON.stringify(value)) return `${at}: not the const`;
  if (Array.isArray(schema.anyOf) && !schema.anyOf.some((s) => schemaProblem(value, s as Schema, at) === null))
    return `${at}: matches no anyOf`;
  if (typeof value === 'number') {
    const n = (k: string) => schema[k] as number | undefined;
    if (n('minimum') !== undefined && value < n('minimum')!) return `${at}: below ${n('minimum')}`;
    if (n('maximum') !== undefined && value > n('maximum')!) return `${at}: above ${n('maximum')}`;
    if (n('exclusiveMinimum') !== undefined && value <= n('exclusiveMinimum')!) return `${at}: not above ${n('exclusiveMinimum')}`;
    if (n('exclusiveMaximum') !== undefined && value >= n('exclusiveMaximum')!) return `${at}: not below ${n('exclusiveMaximum')}`;
  }
  if (typeof value === 'string') {
    const length = [...value].length;
    if (typeof schema.minLength === 'number' && length < schema.minLength) return `${at}: shorter than ${schema.minLength}`;
    if (typeof schema.maxLength === 'number' && length > schema.maxLength) return `${at}: longer than ${schema.maxLength}`;
  }
  if (Array.isArray(value)) {
    if (typeof schema.minItems === 'number' && value.length < schema.minItems) return `${at}: fewer than ${schema.minItems} items`;
    if (typeof schema.maxItems === 'number' && value.length > schema.maxItems) return `${at}: more than ${schema.maxItems} items`;
    if (schema.items && typeof schema.items === 'object')
      for (const [i, item] of value.entries()) {
        const p = schemaProblem(item, schema.items as Schema, `${at}[${i}]`);
        if (p) return p;
      }
  }
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
    const o = value as Record<string, unknown>;
    const properties = (schema.properties ?? {}) as Record<string, Schema>;
    for (const k of (schema.required as string[] | undefined) ?? []) if (!(k in o)) return `${at}: missing "${k}"`;
    for (const [k, v] of Object.entries(o)) {
      if (properties[k]) {
        const p = schemaProblem(v, properties[k], `${at}.${k}`);
        if (p) return p;
      } else if (schema.additionalProperties === false) return `${at}: "${k}" is not allowed`;
    }
  }
  return null;
}

function typeMatches(v: unknown, t: string): boolean {
  switch (t) {
    case 'object':
      return v !== null && typeof v === 'object' && !Array.isArray(v);
    case 'array':
      return Array.isArray(v);
    case 'integer':
      return Number.isInteger(v);
    case 'number':
      return typeof v === 'number';
    case 'null':
      return v === null;
    default:
      return typeof v === t;
  }
}
