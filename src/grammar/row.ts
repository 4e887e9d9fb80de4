/**
 * The shared-memory channel between one constrained row's Generation (on the engine thread)
 * and its xgrammar matcher (on a grammar thread). xgrammar's WASM objects can't leave the thread
 * that made them, and a Generation picks its token synchronously inside the engine's step, so
 * the two sides meet in a SharedArrayBuffer (which crosses the engine's postMessage by structured
 * clone, shared, not copied):
 *
 *   control: [state, token, generation, unused] (Int32), then the token bitmask (ceil(V/32) words).
 *
 * The grammar thread writes the mask of the next token and sets MASK_READY; the engine thread
 * waits for MASK_READY (Atomics.wait; the mask is computed while the model runs its step, so it
 * is almost always ready), masks the logits, picks a token, writes it and sets TOKEN; the grammar
 * thread accepts it and computes the next mask. Either side (or the main thread, when the request
 * settles) sets CLOSED; the grammar thread then disposes the matcher.
 */
export const RowState = {
  /** The grammar thread is computing the next mask. */
  Computing: 0,
  MaskReady: 1,
  /** The engine wrote the chosen token; the grammar thread accepts it next. */
  Token: 2,
  Closed: 3,
  /** The grammar thread refused a token or died; the row can't go on. */
  Failed: 4,
} as const;

const HEADER_WORDS = 4;

/** What a GenerationRequest carries for a constrained row (structured-cloned; the buffer is shared). */
export interface RowGrammar {
  buffer: SharedArrayBuffer;
  /** Bits in the mask: the tokenizer's vocabulary as the grammar compiler saw it. */
  vocabSize: number;
  /** For messages: the grammar's cache key (kind and canonical text's hash). */
  key: string;
}

export function maskWords(vocabSize: number): number {
  return Math.ceil(vocabSize / 32);
}

export function newRowBuffer(vocabSize: number): SharedArrayBuffer {
  return new SharedArrayBuffer((HEADER_WORDS + maskWords(vocabSize)) * 4);
}

export function rowViews(buffer: SharedArrayBuffer): { control: Int32Array; mask: Int32Array } {
  return { control: new Int32Array(buffer, 0, HEADER_WORDS), mask: new Int32Array(buffer, HEADER_WORDS * 4) };
}

/** Closes a row from any thread (idempotent): its matcher is disposed, its waits end. */
export function closeRow(buffer: SharedArrayBuffer): void {
  const { control } = rowViews(buffer);
  Atomics.store(control, 0, RowState.Closed);
  Atomics.notify(control, 0);
}

/** How long the engine waits for a mask before giving the row up (a grammar thread that died). */
const MASK_WAIT_MS = 30_000;

/**
 * The engine side of one row's channel: waits for the mask, applies it, hands back the chosen
 * token. Synchronous (Atomics.wait): a worker thread may block, and the engine's step does.
 */
export class RowMatcher {
  private readonly control: Int32Array;
  readonly mask: Int32Array;

  constructor(readonly grammar: RowGrammar) {
    const views = rowViews(grammar.buffer);
    this.control = views.control;
    this.mask = views.mask;
  }

  /** Blocks until the next token's mask is ready; false if the row was closed or failed. */
  waitMask(): boolean {
    if (Atomics.load(this.control, 0) === RowState.MaskReady) return true; // the usual case: computed during the step
    const started = performance.now();
    for (;;) {
      const state = Atomics.load(this.control, 0);
      if (state === RowState.MaskReady) return true;
      if (state === RowState.Closed || state === RowState.Failed) return false;
      if (performance.now() - started > MASK_WAIT_MS) return false;
      Atomics.wait(this.control, 0, state, 1000);
    }
  }

  /** Whether the mask allows `token` (call after waitMask). */
  allows(token: number): boolean {
    return token < this.grammar.vocabSize && ((this.mask[token >>> 5] >>> (token & 31)) & 1) === 1;
  }

  /** Hands the chosen token to the grammar thread, which accepts it and computes the next mask. */
  accept(token: number): void {
    Atomics.store(this.control, 1, token);
    if (Atomics.compareExchange(this.control, 0, RowState.MaskReady, RowState.Token) === RowState.MaskReady) {
      Atomics.notify(this.control, 0);
    }
  }

  close(): void {
    closeRow(this.grammar.buffer);
  }
}

/**
 * Sets every logit the mask forbids to −∞, in place (ids past the mask's vocabulary too). Words
 * that allow all 32 of their tokens are skipped, so a mask that allows most of a large vocabulary
 * (inside a JSON string) costs little.
 */
export function applyMask(scores: Float32Array, mask: Int32Array, vocabSize: number): void {
  const n = Math.min(scores.length, vocabSize);
  const words = maskWords(n);
  for (let w = 0; w < words; w++) {
    const bits = mask[w];
    if (bits === -1) continue;
    const base = w << 5;
    const end = Math.min(base + 32, n);
    if (bits === 0) {
      scores.fill(-Infinity, base, end);
      continue;
    }
    for (let i = base; i < end; i++) if (((bits >>> (i - base)) & 1) === 0) scores[i] = -Infinity;
  }
  if (scores.length > n) scores.fill(-Infinity, n);
}
