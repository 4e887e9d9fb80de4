import type { Worker } from 'node:worker_threads';
import { LRUCache } from 'lru-cache';
import { grammarCompileTimeout, grammarInvalid, ReftError } from '../errors.ts';
import { spawnTypeScriptWorker } from '../offload/typescript-worker.ts';
import {
  canonicalGrammar,
  DEFAULT_GRAMMAR_BUDGETS,
  type CanonicalGrammar,
  type CompileJob,
  type GrammarBudgets,
  type GrammarSpec,
} from './spec.ts';
import type { FromHost, ToHost } from './host.ts';
import { closeRow, newRowBuffer, RowState, type RowGrammar } from './row.ts';
import type { GrammarVocab } from './vocab.ts';

/**
 * Structured output's compiler and matchers, off the event loop and off the engine's step.
 *
 * Grammars compile on grammar threads (host.ts), each with its own xgrammar instance. A compiled
 * grammar can't leave its thread, so the rows that use it get their matcher there too and reach
 * the engine through shared memory. The rule that keeps a slow compilation from stalling anyone
 * else: a compilation only ever runs on a thread with no live rows (an idle one, or a new one up
 * to `maxThreads`; past that it waits for one to go idle). Rows of a grammar whose thread is
 * compiling wait only until it is done (their request waits, nobody's step does). A compilation
 * past the time budget, or one xgrammar aborts on (its WASM instance is then unusable), ends the
 * thread, with the grammars cached there.
 *
 * The cache maps the canonical text (spec.ts) to the compiled grammar, for this model's tokenizer.
 */
export interface GrammarServiceOptions {
  budgets?: Partial<GrammarBudgets>;
  /** Grammar threads at most (each holds the tokenizer's vocabulary: ~100 MB for 128k tokens). */
  maxThreads?: number;
  /** Compiled grammars kept. */
  cacheSize?: number;
}

interface Host {
  worker: Worker;
  ready: Promise<void>;
  /** Rows whose matchers live here. */
  live: number;
  /** A compilation is running (the thread answers nothing else until it ends). */
  compiling: Promise<void> | null;
  endCompile: () => void;
  /** The live rows' buffers: failed at once if the thread dies. */
  rows: Map<number, SharedArrayBuffer>;
  grammars: Set<number>;
  waiters: Map<number, { resolve(v: FromHost): void; reject(e: Error): void }>;
  dead: boolean;
}

interface Entry {
  id: number;
  host: Host;
}

export interface PreparedGrammar {
  /** Opens one row's matcher (each row of a request gets its own). */
  open(): Promise<RowGrammar>;
}

export interface GrammarStats {
  threads: number;
  cached: number;
  liveRows: number;
  compiles: number;
  cacheHits: number;
}

function spawnHost(vocab: GrammarVocab): Worker {
  return spawnTypeScriptWorker(new URL('./host.ts', import.meta.url), { vocab });
}

export class GrammarService {
  readonly budgets: GrammarBudgets;
  private readonly maxThreads: number;
  private readonly hosts: Host[] = [];
  private readonly cache: LRUCache<string, Entry>;
  /** Compilations under way, by key (a second request for the same text waits for the first). */
  private readonly inflight = new Map<string, Promise<Entry>>();
  private readonly idleWaiters: Array<() => void> = [];
  private nextId = 1;
  private compiles = 0;
  private cacheHits = 0;
  private closed = false;

  constructor(
    private readonly vocab: GrammarVocab,
    opts: GrammarServiceOptions = {},
  ) {
    this.budgets = { ...DEFAULT_GRAMMAR_BUDGETS, ...opts.budgets };
    this.maxThreads = Math.max(1, opts.maxThreads ?? 4);
    this.cache = new LRUCache<string, Entry>({
      max: Math.max(1, opts.cacheSize ?? 64),
      dispose: (entry) => this.drop(entry),
    });
    this.addHost(); // one thread warm, so the first compilation doesn't wait for the vocabulary
  }

  /** Whether close() was called (a compilation it cut short fails with no fault of its grammar). */
  get isClosed(): boolean {
    return this.closed;
  }

  get vocabSize(): number {
    return this.vocab.encoded.length;
  }

  stats(): GrammarStats {
    return {
      threads: this.hosts.length,
      cached: this.cache.size,
      liveRows: this.hosts.reduce((n, h) => n + h.live, 0),
      compiles: this.compiles,
      cacheHits: this.cacheHits,
    };
  }

  /**
   * Checks the spec's budgets, then compiles it (or takes it from the cache). Throws a 400 naming
   * `spec.field` for a spec over a budget, one xgrammar refuses, or one that compiles too slowly.
   */
  async prepare(spec: GrammarSpec): Promise<PreparedGrammar> {
    const canonical = canonicalGrammar(spec, this.budgets);
    if (this.cache.has(canonical.key)) this.cacheHits++;
    else await this.compile(canonical, spec);
    return { open: () => this.open(canonical, spec) };
  }

  /** Ends a row's matcher (from the main thread, when its request has settled; idempotent). */
  release(row: RowGrammar): void {
    closeRow(row.buffer);
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.all(this.hosts.map((h) => h.worker.terminate()));
    this.hosts.length = 0;
  }

  private async compile(canonical: CanonicalGrammar, spec: GrammarSpec): Promise<Entry> {
    const running = this.inflight.get(canonical.key);
    if (running) return running;
    const job = canonical.job(); // a refusal here is the request's own 400, before any thread is taken
    const work = this.compileOnIdleHost(canonical.key, job, spec).finally(() => this.inflight.delete(canonical.key));
    this.inflight.set(canonical.key, work);
    return work;
  }

  private async compileOnIdleHost(key: string, job: CompileJob, spec: GrammarSpec): Promise<Entry> {
    const host = await this.idleHost(); // reserved: host.compiling is set
    const id = this.nextId++;
    this.compiles++;
    const what =
      spec.kind === 'json_schema'
        ? 'schema'
        : spec.kind === 'json_object'
          ? 'JSON grammar'
          : spec.kind === 'choice'
            ? 'choice list'
            : 'grammar';
    const limit = this.budgets.compileTimeoutMs;
    let timer: NodeJS.Timeout | undefined;
    try {
      const reply = await Promise.race([
        this.ask(host, id, { type: 'compile', id, job }),
        new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), limit))),
      ]);
      if (reply === 'timeout') {
        this.kill(host);
        throw grammarCompileTimeout({ what, limit }, spec.field);
      }
      if (reply.type === 'failed') {
        // xgrammar aborted: its WASM instance can't be trusted any more
        this.kill(host);
        throw grammarInvalid({ what, reason: reply.reason }, spec.field);
      }
      const entry: Entry = { id, host };
      host.grammars.add(id);
      this.cache.set(key, entry);
      return entry;
    } finally {
      clearTimeout(timer);
      host.compiling = null;
      host.endCompile();
      this.wakeIdleWaiters();
    }
  }

  private async open(canonical: CanonicalGrammar, spec: GrammarSpec): Promise<RowGrammar> {
    const key = canonical.key;
    for (let attempt = 0; ; attempt++) {
      let entry = this.cache.get(key);
      if (!entry || entry.host.dead) entry = await this.compile(canonical, spec);
      const host = entry.host;
      host.live++; // from here no compilation is sent to this thread
      const id = this.nextId++;
      try {
        if (host.compiling) await host.compiling; // one sent before: wait for it, only this request
        if (host.dead) throw new Error('grammar thread ended');
        const buffer = newRowBuffer(this.vocabSize);
        host.rows.set(id, buffer);
        const reply = await this.ask(host, id, { type: 'open', id, grammar: entry.id, buffer });
        if (reply.type !== 'opened') throw new Error(reply.type === 'failed' ? reply.reason : 'unexpected reply');
        const row: RowGrammar = { buffer, vocabSize: this.vocabSize, key };
        return row;
      } catch (e) {
        host.live--;
        host.rows.delete(id);
        this.wakeIdleWaiters();
        if (attempt >= 1) throw ReftError.from(e, 'structured output: ');
        this.cache.delete(key);
      }
    }
  }

  private ask(host: Host, id: number, message: ToHost): Promise<FromHost> {
    return new Promise((resolve, reject) => {
      host.waiters.set(id, { resolve, reject });
      host.worker.postMessage(message);
    });
  }

  private addHost(): Host {
    const worker = spawnHost(this.vocab);
    let ready!: () => void;
    const host: Host = {
      worker,
      ready: new Promise((r) => (ready = r)),
      live: 0,
      compiling: null,
      endCompile: () => {},
      rows: new Map(),
      grammars: new Set(),
      waiters: new Map(),
      dead: false,
    };
    worker.on('message', (m: FromHost) => {
      if (m.type === 'ready') return ready();
      if (m.type === 'closed') {
        host.rows.delete(m.id);
        host.live = Math.max(0, host.live - 1);
        if (host.live === 0) this.wakeIdleWaiters();
        return;
      }
      const waiter = host.waiters.get(m.id);
      host.waiters.delete(m.id);
      waiter?.resolve(m);
    });
    const fail = (reason: string) => {
      ready(); // whoever waits for it sees it dead
      if (host.dead) return;
      this.kill(host);
      for (const w of host.waiters.values()) w.reject(new Error(reason));
      host.waiters.clear();
    };
    worker.on('error', (e) => fail(`grammar thread crashed: ${e.message}`));
    worker.on('exit', () => fail('grammar thread exited'));

    this.hosts.push(host);
    return host;
  }

  /** Ends a thread and forgets what was compiled there (its live rows, if any, fail: they can't go on). */
  private kill(host: Host): void {
    if (host.dead) return;
    host.dead = true;
    const i = this.hosts.indexOf(host);
    if (i >= 0) this.hosts.splice(i, 1);
    for (const [key, entry] of this.cache.entries()) if (entry.host === host) this.cache.delete(key);
    void host.worker.terminate();
    for (const buffer of host.rows.values()) {
      const control = new Int32Array(buffer, 0, 1);
      Atomics.store(control, 0, RowState.Failed);
      Atomics.notify(control, 0);
    }
    host.rows.clear();
    this.wakeIdleWaiters();
  }

  private drop(entry: Entry): void {
    entry.host.grammars.delete(entry.id);
    if (!entry.host.dead) entry.host.worker.postMessage({ type: 'drop', grammar: entry.id } satisfies ToHost);
  }

  /** A thread with no live rows and no compilation, the emptiest first; a new one if none and there's room; else waits. */
  private async idleHost(): Promise<Host> {
    for (;;) {
      if (this.closed) throw new Error('grammar service closed');
      const idle = this.hosts.filter((h) => h.live === 0 && !h.compiling && !h.dead).sort((a, b) => a.grammars.size - b.grammars.size)[0];
      const host = idle ?? (this.hosts.length < this.maxThreads ? this.addHost() : null);
      if (host) {
        await host.ready;
        if (host.live === 0 && !host.compiling && !host.dead) {
          host.compiling = new Promise((r) => (host.endCompile = r));
          return host;
        }
        continue;
      }
      await new Promise<void>((r) => this.idleWaiters.push(r));
    }
  }

  private wakeIdleWaiters(): void {
    for (const w of this.idleWaiters.splice(0)) w();
  }
}
