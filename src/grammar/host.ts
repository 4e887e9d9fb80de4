import { parentPort, workerData } from 'node:worker_threads';
import { compileJob, createCompiler } from './compile.ts';
import type { CompileJob } from './spec.ts';
import { RowState, rowViews } from './row.ts';
import type { GrammarVocab } from './vocab.ts';
import { loadXGrammar, type CompiledGrammar, type GrammarMatcher } from './xgrammar.ts';

/**
 * A grammar thread: one xgrammar instance (WASM, single-threaded) with the model's TokenizerInfo,
 * the grammars compiled here, and the matchers of the rows that use them. Compiled grammars can't
 * be serialized or moved to another thread (the web build exposes no serialization), so a row's
 * matcher lives where its grammar was compiled, and talks to the engine thread through shared
 * memory (row.ts). The service never sends a compilation to a thread that has live matchers, so
 * a slow compilation never holds up a running row's masks.
 */
export type ToHost =
  | { type: 'compile'; id: number; job: CompileJob }
  | { type: 'open'; id: number; grammar: number; buffer: SharedArrayBuffer }
  | { type: 'drop'; grammar: number };

export type FromHost =
  | { type: 'ready'; ms: number }
  | { type: 'compiled'; id: number; ms: number }
  | { type: 'failed'; id: number; reason: string }
  | { type: 'opened'; id: number }
  | { type: 'closed'; id: number };

interface AtomicsWithWaitAsync {
  waitAsync(array: Int32Array, index: number, value: number): { async: boolean; value: Promise<string> | string };
}
const waitAsync = (Atomics as unknown as AtomicsWithWaitAsync).waitAsync;

const port = parentPort!;
const send = (m: FromHost) => port.postMessage(m);

// xgrammar reports why it refused a schema or grammar only on stderr ("[FATAL] …: Unsupported
// type") before it aborts; Emscripten binds console.error when the module starts, so the sink is
// put in place first and keeps the last lines for the error message.
let lastErrors: string[] = [];
console.error = (...args: unknown[]) => {
  lastErrors.push(args.map(String).join(' '));
  if (lastErrors.length > 8) lastErrors.shift();
};

function reason(e: unknown): string {
  const fatal = lastErrors
    .filter((l) => l.includes('[FATAL]'))
    .map((l) => l.replace(/^\[FATAL\]\s*\S*:\d+:\s*/, '').trim())
    .pop();
  return fatal ?? (e instanceof Error ? e.message : String(e));
}

async function main(vocab: GrammarVocab): Promise<void> {
  const started = performance.now();
  const xg = loadXGrammar();
  const { compiler } = await createCompiler(xg, vocab);
  const grammars = new Map<number, CompiledGrammar>();
  const compile = (job: CompileJob) => compileJob(xg, compiler, job);

  /** Serves one row: accept each token the engine writes, compute the next mask, until closed. */
  async function serve(matcher: GrammarMatcher, buffer: SharedArrayBuffer, id: number): Promise<void> {
    const { control, mask } = rowViews(buffer);
    try {
      for (;;) {
        const wait = waitAsync(control, 0, RowState.MaskReady);
        if (wait.async) await wait.value;
        const state = Atomics.load(control, 0);
        if (state === RowState.Closed || state === RowState.Failed) return;
        if (state !== RowState.Token) continue;
        const token = Atomics.load(control, 1);
        if (!matcher.acceptToken(token)) {
          Atomics.store(control, 0, RowState.Failed);
          Atomics.notify(control, 0);
          return;
        }
        if (!matcher.isTerminated()) mask.set(await matcher.getNextTokenBitmask());
        else mask.fill(0);
        // the row may have been closed meanwhile: then it stays closed
        if (Atomics.compareExchange(control, 0, RowState.Token, RowState.MaskReady) === RowState.Token) Atomics.notify(control, 0);
      }
    } finally {
      matcher.dispose();
      send({ type: 'closed', id });
    }
  }

  port.on('message', (m: ToHost) => {
    void (async () => {
      switch (m.type) {
        case 'compile': {
          lastErrors = [];
          const t0 = performance.now();
          try {
            grammars.set(m.id, await compile(m.job));
            send({ type: 'compiled', id: m.id, ms: performance.now() - t0 });
          } catch (e) {
            send({ type: 'failed', id: m.id, reason: reason(e) });
          }
          break;
        }
        case 'open': {
          const compiled = grammars.get(m.grammar);
          const { control, mask } = rowViews(m.buffer);
          if (!compiled) {
            send({ type: 'failed', id: m.id, reason: 'the grammar was dropped' });
            break;
          }
          const matcher = await xg.GrammarMatcher.createGrammarMatcher(compiled, vocab.stopTokenIds);
          mask.set(await matcher.getNextTokenBitmask());
          // a row closed before it opened stays closed (serve() then disposes the matcher)
          Atomics.compareExchange(control, 0, RowState.Computing, RowState.MaskReady);
          send({ type: 'opened', id: m.id });
          void serve(matcher, m.buffer, m.id);
          break;
        }
        case 'drop':
          grammars.get(m.grammar)?.dispose();
          grammars.delete(m.grammar);
          break;
      }
    })();
  });
  send({ type: 'ready', ms: performance.now() - started });
}

void main((workerData as { vocab: GrammarVocab }).vocab);
