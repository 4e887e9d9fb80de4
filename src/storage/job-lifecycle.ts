import type { JobOutcome } from './store.ts';

/**
 * The rules of a job's life: when a claim ends a job instead of running it, and the 'status'
 * event the store appends for each status change it makes (the SQL is in sql-store.ts).
 */

export type EndedStatus = JobOutcome['status'];

/** What a claim does instead of running the job it found: end it with this status and error. */
export interface EndInstead {
  status: 'cancelled' | 'failed';
  error: string | null;
}

/**
 * Decides for the oldest claimable job (queued, or running with an expired lease): null to claim
 * it, or how to end it. A cancel requested before its worker died wins over a retry; a job that
 * has used up `maxAttempts` fails.
 */
export function endInsteadOfClaim(job: { cancelRequested: boolean; attempts: number }, maxAttempts: number): EndInstead | null {
  if (job.cancelRequested) return { status: 'cancelled', error: null };
  if (job.attempts >= maxAttempts) {
    return { status: 'failed', error: `gave up after ${job.attempts} attempt(s): the worker stopped renewing its lease` };
  }
  return null;
}

/** The job columns a worker's outcome sets besides its status. */
export function outcomeColumns(outcome: JobOutcome): { error: string | null; interventionId: string | null } {
  return {
    error: outcome.status === 'failed' ? outcome.error : null,
    interventionId: outcome.status === 'succeeded' ? outcome.interventionId : null,
  };
}

// The data of the 'status' events.

export const queuedEvent = (): { status: 'queued' } => ({ status: 'queued' });

/** `attempt` counts from 1. */
export const runningEvent = (attempt: number): { status: 'running'; attempt: number } => ({ status: 'running', attempt });

/** A job ended: with its error when failed, with its intervention when succeeded. */
export function endedEvent(status: EndedStatus, error: string | null, interventionId: string | null = null): Record<string, unknown> {
  return { status, ...(error !== null && { error }), ...(interventionId !== null && { interventionId }) };
}
