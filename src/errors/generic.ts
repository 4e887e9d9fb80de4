import { CATEGORY_STATUS, defineError, type Category } from './reft-error.ts';

/**
 * One generic entry per category, whose code is the category itself: what `new ReftError(category,
 * message)` builds (the HTTP edge's fallbacks in server/problem.ts, `ReftError.from`), and what
 * an error of a code this build doesn't know becomes. Everything else uses the specific entries.
 */
const generic = (category: Category) => defineError(category, category, (message: string) => message);

export const GENERIC = Object.fromEntries((Object.keys(CATEGORY_STATUS) as Category[]).map((c) => [c, generic(c)])) as {
  [C in Category]: ReturnType<typeof generic>;
};
