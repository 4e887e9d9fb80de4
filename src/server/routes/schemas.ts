import { z } from 'zod';

/** RFC 9457 problem details, as every error response carries them. */
export const problemSchema = z.object({
  type: z.string(),
  title: z.string(),
  status: z.number().int(),
  detail: z.string(),
  code: z.string(),
  category: z.string(),
  field: z.string().optional(),
  instance: z.string().optional(),
});

/** Ids and names that end up in URLs and logs: no separators, no dot-dot. */
export const idParam = z
  .string()
  .regex(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/, 'must be letters, digits, "_", "." or "-" (at most 128)')
  .refine((s) => !s.includes('..'), 'must not contain ".."');

export const pageQuery = z.strictObject({
  limit: z.coerce.number().int().min(1).max(100).default(20),
  after: idParam.optional(),
});

export function pageSchema<T extends z.ZodType>(item: T) {
  return z.object({ object: z.literal('list'), data: z.array(item), has_more: z.boolean(), next_cursor: z.string().nullable() });
}

/** A store page as the list body pageSchema describes. */
export function pageBody<T, V>(page: { data: T[]; nextCursor: string | null }, view: (item: T) => V) {
  return { object: 'list' as const, data: page.data.map(view), has_more: page.nextCursor !== null, next_cursor: page.nextCursor };
}
