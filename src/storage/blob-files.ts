import { randomBytes } from 'node:crypto';
import { closeSync, fsyncSync, openSync, readdirSync, renameSync, rmSync, statSync } from 'node:fs';
import { readFile, rm, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import type { BlobColumns } from './schema.ts';
import type { BlobKind, Blobs, StagedBlobs } from './dialect.ts';

/**
 * The SQLite store's file bytes: files in a blobs/ directory, named by their rows. A blob is
 * written whole to a temp file and fsynced (outside any lock), then renamed to its final name
 * inside the write transaction that inserts the row naming it, so a final name is always either
 * referenced by a committed row or an orphan of a crash, which `sweep` removes at open.
 */

/** Failure-injection points for tests (crash simulation); never set in production. */
export type FaultPoint = 'blobs-written' | 'blobs-renamed';

/** A temp blob this old is abandoned whoever wrote it (covers writers in other pid namespaces). */
const STALE_TEMP_MS = 60 * 60 * 1000;
/** Temp files are named tmp~<host>~<pid>~<random> so a sweeper can tell whether the writer lives. */
const TEMP_PREFIX = 'tmp~';
/** Final blob names: <row id>.<random>.<kind>; anything else in blobs/ is left alone. */
const FINAL_NAME = /^(iv|file|job)_[0-9a-f]{24}\.[0-9a-f]{8}\.(config|weights|data|ckpt)$/;

/** The columns that name each row's blob files. */
export const BLOB_FILE_COLUMNS: BlobColumns = { config: 'config_blob', weights: 'weights_blob', file: 'blob', checkpoint: 'blob' };

export class BlobFiles implements Blobs {
  readonly columns = BLOB_FILE_COLUMNS;
  readonly external = true;

  constructor(
    readonly where: string,
    private readonly faultHook?: (point: FaultPoint) => void,
  ) {}

  async stage(owner: string, kinds: BlobKind[], bytes: Uint8Array[]): Promise<StagedBlobs> {
    // Final names are fresh random ones, so removing them never touches another call's blob.
    const names = kinds.map((kind) => `${owner}.${randomBytes(4).toString('hex')}.${kind}`);
    const temps: string[] = [];
    try {
      for (const b of bytes) temps.push(await this.writeTemp(b));
    } catch (e) {
      await this.release(temps);
      throw e;
    }
    this.faultHook?.('blobs-written');
    let promoted = false;
    return {
      values: names,
      promote: () => {
        names.forEach((name, i) => this.promote(temps[i], name));
        promoted = true;
        this.faultHook?.('blobs-renamed');
      },
      // A rolled-back transaction left no row naming any of these files.
      settle: (committed) => this.release(committed ? (promoted ? [] : temps) : [...temps, ...names]),
    };
  }

  async read(names: unknown[]): Promise<Uint8Array[] | null> {
    const missing = (e: NodeJS.ErrnoException) => (e.code === 'ENOENT' ? null : Promise.reject(e));
    const readOne = (name: string) => readFile(this.path(name)).then((b) => new Uint8Array(b.buffer, b.byteOffset, b.byteLength), missing);
    const data = await Promise.all((names as string[]).map(readOne));
    return data.every((d) => d !== null) ? (data as Uint8Array[]) : null;
  }

  /**
   * Removes blobs no committed row names any more. Never throws: the caller's write has already
   * committed (or already failed with its own error), and a file left behind is swept at open.
   */
  async release(names: unknown[]): Promise<void> {
    await Promise.all((names as string[]).map((n) => rm(this.path(n), { force: true }))).catch((e) =>
      process.emitWarning(`could not remove unused blobs: ${(e as Error).message}`),
    );
  }

  /**
   * Removes what crashes leave behind: temp files whose writer is gone (or that are too old to
   * be anyone's), and final blobs no row references. Sync: the caller holds the write lock, so
   * no other process is between a rename and its commit.
   */
  sweep(referenced: Set<string>): void {
    const now = Date.now();
    for (const name of readdirSync(this.where)) {
      const orphan = name.startsWith(TEMP_PREFIX) ? this.abandonedTemp(name, now) : FINAL_NAME.test(name) && !referenced.has(name);
      if (orphan) rmSync(this.path(name), { force: true });
    }
  }

  private path(name: string): string {
    return join(this.where, name);
  }

  /** Writes bytes to a new temp file, fsynced; returns its name. */
  private async writeTemp(bytes: Uint8Array): Promise<string> {
    const name = `${TEMP_PREFIX}${hostname()}~${process.pid}~${randomBytes(8).toString('hex')}`;
    await writeFile(this.path(name), bytes, { flag: 'wx', flush: true }).catch(async (e) => {
      await this.release([name]);
      throw e;
    });
    return name;
  }

  /** Gives a temp file its final name and makes the rename durable. Sync: runs inside a transaction. */
  private promote(temp: string, final: string): void {
    renameSync(this.path(temp), this.path(final));
    // Without this a power cut could keep the committed row but lose the rename.
    const fd = openSync(this.where, 'r');
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  }

  private abandonedTemp(name: string, now: number): boolean {
    const stat = statSync(this.path(name), { throwIfNoEntry: false });
    if (!stat) return false;
    if (now - stat.mtimeMs > STALE_TEMP_MS) return true;
    const [, host, pid] = name.split('~');
    // A pid means something only on this host (and in this pid namespace, hence also the age rule).
    if (host !== hostname()) return false;
    try {
      process.kill(Number(pid), 0);
      return false;
    } catch (e) {
      return (e as NodeJS.ErrnoException).code !== 'EPERM'; // EPERM: alive, another user's
    }
  }
}
