import type { Store } from './store.ts';
import { openSqliteStore } from './sqlite-store.ts';

/**
 * The store a process uses: PostgreSQL when `database` is a postgres:// URL (servers and
 * workers on several hosts share it), else the embedded SQLite store under `dataDir`.
 */
export interface StoreLocation {
  database?: string | null;
  dataDir: string;
}

export async function openStore(where: StoreLocation): Promise<Store> {
  if (where.database && /^postgres(ql)?:\/\//.test(where.database)) {
    const { openPostgresStore } = await import('./postgres-store.ts');
    return openPostgresStore(where.database);
  }
  return openSqliteStore(where.dataDir);
}

export function describeStore(where: StoreLocation): string {
  return where.database ? where.database.replace(/\/\/[^@/]*@/, '//***@') : `sqlite:${where.dataDir}`;
}
