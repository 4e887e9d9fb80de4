import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';

/**
 * A worker thread whose entry is TypeScript: it registers tsx's loader first (a loader registered
 * by the host, tsx's or vitest's, does not carry over to worker threads), then imports `entry`.
 */
export function spawnTypeScriptWorker(entry: URL, workerData: unknown): Worker {
  // import.meta.resolve is missing under vitest; require.resolve finds tsx's CommonJS build, beside its ESM one
  const tsx =
    typeof import.meta.resolve === 'function'
      ? import.meta.resolve('tsx/esm/api')
      : pathToFileURL(
          createRequire(import.meta.url)
            .resolve('tsx/esm/api')
            .replace(/\.cjs$/, '.mjs'),
        ).href;
  const bootstrap = `import(${JSON.stringify(tsx)}).then((m) => { m.register(); return import(${JSON.stringify(entry.href)}); });`;
  return new Worker(bootstrap, { eval: true, workerData });
}
