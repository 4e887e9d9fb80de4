import type { Expression, Kysely, SelectQueryBuilder } from 'kysely';
import type { BlobColumns, Tables } from './schema.ts';
import type { UsageRecord } from './store.ts';

/** What differs between SQLite and PostgreSQL (sqlite-store.ts, postgres-store.ts); sql-store.ts is the rest, once. */
export interface Dialect {
  readonly db: Kysely<Tables>;
  /** Now, for timestamps: ISO text, or the database clock (so hosts with skewed clocks agree on leases). */
  now(): Value<string>;
  /** `ms` from now, in the terms of jobs.lease_expires_at. */
  leaseAt(ms: number): Value<number | string>;
  /**
   * Locks the rows a select reads until the commit: 'skip' passes over rows others hold, 'share' is a foreign key check's
   * lock, 'delete' a delete's (it waits for, and keeps out, 'share').
   */
  lock<Q extends AnySelect>(query: Q, mode: 'row' | 'skip' | 'share' | 'delete'): Q;
  /** Adds a usageBatch's rows (of tenants that exist) to the stored counts, in one transaction of its own. */
  addUsage(db: Kysely<Tables>, rows: UsageRecord[]): Promise<void>;
  /** Tells other processes, on commit (where the database can). */
  notify(tx: Kysely<Tables>, channel: 'interventionChanged' | 'jobQueued', payload: string): Promise<void>;
  violation(e: unknown): 'unique' | 'foreignKey' | undefined;
  /** Whether a failed transaction is run again (deadlock, serialization failure). */
  retryable(e: unknown): boolean;
  /** The error a caller sees for one of the database. */
  toStoreError(e: unknown): unknown;
  readonly blobs: Blobs;
  close(): Promise<void>;
}

export type Value<T> = T | Expression<T>;
export type AnySelect = SelectQueryBuilder<any, any, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
export type BlobKind = 'config' | 'weights' | 'data' | 'ckpt';

/** Where file bytes live: in their rows' columns, or in files the columns name (`external`, released once no row names them). */
export interface Blobs {
  readonly columns: BlobColumns;
  readonly external: boolean;
  /** Where they are (for errors). */
  readonly where: string;
  /** Before a write transaction: the column values for `bytes`. */
  stage(owner: string, kinds: BlobKind[], bytes: Uint8Array[]): Promise<StagedBlobs>;
  /** The bytes of column values; null if a file vanished (replaced or deleted meanwhile: read the row again). */
  read(values: unknown[]): Promise<Uint8Array[] | null>;
  /** After a commit: drops files no row names any more. */
  release(values: unknown[]): Promise<void>;
}

export interface StagedBlobs {
  readonly values: unknown[];
  /** Inside the write transaction, before writing the rows that name them. */
  promote(): void;
  /** After the transaction: cleans up what no committed row names. */
  settle(committed: boolean): Promise<void>;
}
