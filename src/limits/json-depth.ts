/**
 * JSON nesting bound. JSON.parse copes with deep nesting, but the code after it (validation,
 * serialization, a database's JSON type) recurses and fails with an internal error; configs
 * and request bodies are refused above this depth instead.
 */
export const MAX_JSON_DEPTH = 64;

/** The nesting depth of a parsed JSON value (a scalar is 0), walked without recursion. */
export function jsonDepth(value: unknown, stopAbove = Infinity): number {
  let deepest = 0;
  const pending: Array<[unknown, number]> = [[value, 0]];
  while (pending.length) {
    const [v, depth] = pending.pop()!;
    if (v === null || typeof v !== 'object') continue;
    const here = depth + 1;
    if (here > deepest) deepest = here;
    if (deepest > stopAbove) return deepest;
    for (const child of Array.isArray(v) ? v : Object.values(v)) {
      if (child !== null && typeof child === 'object') pending.push([child, here]);
    }
  }
  return deepest;
}
