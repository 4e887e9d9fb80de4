import { setPriority } from 'node:os';
import { spawn, type ChildProcess } from 'node:child_process';
import type { Logger } from 'pino';

/** The training worker's CPU niceness (raising it needs no privilege). */
export const WORKER_NICENESS = 10;

/**
 * Keeps one `reft-server worker` child process running next to the server (the single-machine
 * setup): restarts it with backoff when it dies, and stops it with the server.
 */
export class WorkerSupervisor {
  private child: ChildProcess | null = null;
  private stopping = false;
  private failures = 0;
  private timer: NodeJS.Timeout | null = null;

  constructor(
    private readonly argv: string[],
    private readonly log: Logger,
  ) {}

  get pid(): number | undefined {
    return this.child?.pid;
  }

  start(): void {
    if (this.stopping) return;
    const started = Date.now();
    // the IPC channel carries nothing: it closes when the server dies, which tells the worker to stop
    const child = spawn(process.execPath, this.argv, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    this.child = child;
    // Training is batch work beside a latency-bound server on the same cores: the kernel gives the
    // server's threads the CPU first (nice 10 weighs about a tenth of the server's nice 0).
    try {
      if (child.pid) setPriority(child.pid, WORKER_NICENESS);
    } catch {
      // it already exited (ESRCH): the exit handler below restarts it
    }
    this.log.info({ pid: child.pid, niceness: WORKER_NICENESS }, 'training worker started');
    child.once('exit', (code, signal) => {
      this.child = null;
      if (this.stopping) return;
      // a worker that ran a while before dying starts again at once; a crash loop backs off
      this.failures = Date.now() - started > 60_000 ? 0 : this.failures + 1;
      const delay = Math.min(30_000, 500 * 2 ** Math.max(0, this.failures - 1));
      this.log.warn({ code, signal, restartInMs: delay }, 'training worker exited; restarting');
      this.timer = setTimeout(() => this.start(), delay);
    });
  }

  /** SIGTERM (the worker hands its job back), then SIGKILL after `graceMs`. */
  async stop(graceMs = 10_000): Promise<void> {
    this.stopping = true;
    if (this.timer) clearTimeout(this.timer);
    const child = this.child;
    if (!child || child.exitCode !== null) return;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.kill('SIGTERM');
    const kill = setTimeout(() => child.kill('SIGKILL'), graceMs);
    await exited;
    clearTimeout(kill);
  }
}
