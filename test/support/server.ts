import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { STORIES } from './fixtures.ts';
import { createDatabase, dropDatabase, type Backend } from './databases.ts';

export const BIN = join(import.meta.dirname, '..', '..', 'bin', 'reft-server.js');

export interface ServerProcess {
  url: string;
  proc: ChildProcess;
  dataDir: string;
  database: string | null;
  /** Parsed JSON log lines so far. */
  logs: Array<Record<string, unknown>>;
  stderr: () => string;
  /** SIGTERM and wait; resolves with the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

export interface ServerProcessOptions {
  args?: string[];
  env?: Record<string, string>;
  dataDir?: string;
  /** Wait for the model to be loaded (default true). */
  waitReady?: boolean;
  /** sqlite (the data dir) or postgres (a fresh database, dropped on stop); default sqlite. */
  backend?: Backend;
  /** An existing database to share between processes (overrides backend). */
  database?: string;
}

/** A real `reft-server serve` process on a free loopback port, on stories260k. */
export async function startServerProcess(opts: ServerProcessOptions = {}): Promise<ServerProcess> {
  const dataDir = opts.dataDir ?? mkdtempSync(join(tmpdir(), 'reft-data-'));
  const ownDatabase = !opts.database && opts.backend === 'postgres' ? await createDatabase() : null;
  const database = opts.database ?? ownDatabase;
  const args = [
    BIN,
    'serve',
    '--model',
    STORIES,
    '--port',
    '0',
    '--data-dir',
    dataDir,
    ...(database ? ['--database', database] : []),
    ...(opts.args ?? []),
  ];
  const proc = spawn(process.execPath, args, {
    env: { ...process.env, REFT_CACHE_DIR: join(dataDir, 'cache'), REFT_LOG_LEVEL: 'info', ...opts.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const logs: Array<Record<string, unknown>> = [];
  let stderr = '';
  proc.stderr!.on('data', (d) => (stderr += d));
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  const url = await new Promise<string>((resolve, reject) => {
    let listening = '';
    const lines = createInterface({ input: proc.stdout! });
    lines.on('line', (line) => {
      let entry: Record<string, unknown>;
      try {
        entry = JSON.parse(line);
      } catch {
        return;
      }
      logs.push(entry);
      if (entry.msg === 'listening') {
        listening = String(entry.url);
        if (opts.waitReady === false) resolve(listening);
      }
      if (entry.msg === 'model ready' && listening) resolve(listening);
    });
    void exited.then((code) => reject(new Error(`server exited with ${code} before it was ready: ${stderr}`)));
  });
  return {
    url,
    proc,
    dataDir,
    database,
    logs,
    stderr: () => stderr,
    async stop(signal = 'SIGTERM') {
      if (proc.exitCode === null) proc.kill(signal);
      const code = await exited;
      if (ownDatabase) await dropDatabase(ownDatabase);
      return code;
    },
  };
}

/** Runs the CLI without blocking this process (spawnSync would starve servers running in it). */
export function runCli(
  args: string[],
  env: Record<string, string | undefined> = process.env,
): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const proc = spawn(process.execPath, [BIN, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    proc.stdout!.on('data', (d) => (stdout += d));
    proc.stderr!.on('data', (d) => (stderr += d));
    proc.once('exit', (status) => resolve({ status, stdout, stderr }));
  });
}

export interface WorkerProcess {
  proc: ChildProcess;
  logs: Array<Record<string, unknown>>;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/**
 * A standalone `reft-server worker` on a shared database, or (`database` undefined) on the
 * embedded store in `dataDir`, a server's.
 */
export async function startWorkerProcess(
  database: string | undefined,
  args: string[] = [],
  dataDir = mkdtempSync(join(tmpdir(), 'reft-worker-')),
): Promise<WorkerProcess> {
  const store = database ? ['--database', database] : [];
  const proc = spawn(process.execPath, [BIN, 'worker', '--model', STORIES, ...store, '--data-dir', dataDir, ...args], {
    env: { ...process.env, REFT_CACHE_DIR: join(dataDir, 'cache') },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const logs: Array<Record<string, unknown>> = [];
  let stderr = '';
  proc.stderr!.on('data', (d) => (stderr += d));
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  await new Promise<void>((resolve, reject) => {
    createInterface({ input: proc.stdout! }).on('line', (line) => {
      try {
        const entry = JSON.parse(line);
        logs.push(entry);
        if (entry.msg === 'training worker ready') resolve();
      } catch {
        /* not a log line */
      }
    });
    void exited.then((code) => reject(new Error(`worker exited with ${code}: ${stderr}`)));
  });
  return {
    proc,
    logs,
    async stop(signal = 'SIGTERM') {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      return exited;
    },
  };
}
