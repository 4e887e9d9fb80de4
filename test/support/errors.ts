import { expect } from 'vitest';
import { ReftError } from '../../src/errors.ts';

/** The ReftError `fn` throws (failing the test if it throws nothing, or something untyped). */
export function thrownBy(fn: () => unknown): ReftError {
  let thrown: unknown = undefined;
  try {
    fn();
  } catch (e) {
    thrown = e;
  }
  expect(thrown, 'expected a ReftError to be thrown').toBeInstanceOf(ReftError);
  return thrown as ReftError;
}
