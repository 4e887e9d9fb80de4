export { Tape } from './tape.ts';
export { RULES } from './rules/index.ts';
export type { Dim, Shape } from './shape.ts';
export type { Backward, OpRule, ShapeQuery, TapeNode } from './types.ts';
