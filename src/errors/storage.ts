import { defineError } from './reft-error.ts';

/** Storage: the database and the files beside it. */

export const databaseUnavailable = defineError('database_unavailable', 'unavailable', () => 'the database is unavailable');
export const storedFileMissing = defineError(
  'stored_file_missing',
  'internal',
  (p: { where: string }) => `a stored file is missing from ${p.where}`,
);
/** A usage record handed to the store that isn't one (a caller's bug, named by field). */
export const usageRecordInvalid = defineError('usage_record_invalid', 'invalid_request', (p: { problem: string }) => p.problem);
