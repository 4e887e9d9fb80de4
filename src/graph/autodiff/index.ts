export { Tape } from './tape.ts';
export type { Shape } from './shape.ts';
