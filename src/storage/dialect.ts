import type { Expression, Kysely, SelectQueryBuilder } from 'kysely';
import type { BlobColumns, EventRow, Json, Tables } from './schema.ts';
import type { UsageRecord } from './store.ts';

/** What differs between SQLite and PostgreSQL (sqlite-store.ts, postgres-store.ts); sql-store.ts is the rest, once. */
export interface Dialect {
  readonly db: Kysely<Tables>;
  /** Now, for timestamps: ISO text, or an expression of the database clock. */
  now(): Value<string>;
  /** Now, and `ms` from now, in the terms of jobs.lease_expires_at. */
  leaseNow(): Value<number | string>;
  leaseUntil(ms: number): Value<number | string>;
  flag(value: boolean): boolean | number;
  /** Locks the rows a select reads until the commit; 'skip' passes over rows others hold. */
  lock<Q extends AnySelect>(query: Q, mode: 'row' | 'skip'): Q;
  /** Appends an event with the job's next seq; undefined when there is no such job. */
  addEvent(tx: Kysely<Tables>, jobId: string, type: string, data: Json, at: Value<string>): Promise<EventRow | undefined>;
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

/** Where file bytes live: in their rows' columns, or in files the columns name. */
export interface Blobs {
  readonly columns: BlobColumns;
  /** Whether column values name files, to release once no row names them. */
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
