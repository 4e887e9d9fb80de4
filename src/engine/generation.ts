import { promptTooLong } from '../errors.ts';
import type { RequestIntervention } from '../interventions/steer.ts';
import { RowMatcher, type RowGrammar } from '../grammar/row.ts';
import { Sampler, logSumExp, type SamplingParams } from '../sampling/sampler.ts';

export type { RequestIntervention } from '../interventions/steer.ts';

/**
 * What one intervention of a request did (REFT.md "Request-time control"): at each of its
 * prompt positions, ascending, the coefficient vector c(h) (r values) before the strength.
 */
export interface AppliedEdit {
  layer: number;
  positions: number[];
  coefficients: number[][];
}

/**
 * One request's generation: what to feed, how to pick tokens, and when to stop. The scheduler
 * owns the batching; this object owns the per-sequence decisions (sampling, EOS, stop strings,
 * budgets) and turns tokens into text deltas.
 */
export interface GenerationRequest {
  /** Whose request it is: tenants take turns for batch slots. */
  tenant?: string;
  tokens: number[];
  interventions: readonly RequestIntervention[];
  /** Report each intervention's coefficients (`applied`) in the result and the first token event. */
  returnCoefficients?: boolean;
  sampling: SamplingParams;
  maxNewTokens: number;
  stop: string[];
  ignoreEos: boolean;
  logprobs: boolean;
  topLogprobs: number;
  /**
   * Structured output: this row's channel to its grammar matcher (src/grammar/row.ts). Every token
   * is picked under the matcher's mask; the row ends ("stop") when the grammar is complete.
   */
  grammar?: RowGrammar;
  /**
   * Reuse and keep the prompt's blocks in the prefix cache, within `namespace` (a tenant, and the
   * request's cache salt): blocks are shared only within one. Absent: the prompt is computed whole.
   */
  prefixCache?: { namespace: string };
}

export type FinishReason = 'stop' | 'length' | 'cancelled';

export interface TokenLogprob {
  token: number;
  logprob: number;
  top?: Array<{ token: number; logprob: number }>;
}

/** What a step produced for one sequence. */
export interface TokenEvent {
  token: number;
  /** Text that became final with this token (may be empty while a stop string could still match). */
  text: string;
  logprob?: TokenLogprob;
  /** On the first token event only, with `returnCoefficients`: as GenerationResult.applied. */
  applied?: AppliedEdit[][];
}

export interface GenerationResult {
  tokens: number[];
  text: string;
  finishReason: FinishReason;
  promptTokens: number;
  /** Prompt tokens whose keys and values came from the prefix cache (not computed). */
  cachedTokens: number;
  logprobs?: TokenLogprob[];
  /** Name of the stop string or 'eos' when finishReason is 'stop'; 'grammar' when a constrained row's matcher failed (finishReason 'cancelled'). */
  stoppedBy?: string;
  /**
   * With `returnCoefficients`: per request item (by `item`, in item order), per intervention of
   * that item in the order given in `interventions`, what it did to the prompt.
   */
  applied?: AppliedEdit[][];
}

export interface StreamDecoder {
  push(id: number): string;
  flush(): string;
}

export interface Detokenizer {
  /** `context`: the prompt, which the first generated token's text follows. */
  createStreamDecoder(context?: readonly number[]): StreamDecoder;
}

/** The one check every entry point makes: a prompt must leave room for one new token. */
export function checkPromptFits(promptTokens: number, context: number): void {
  if (promptTokens >= context) {
    throw promptTooLong({ tokens: promptTokens, context, newToken: true }, 'prompt');
  }
}

export class Generation {
  readonly tokens: number[] = [];
  private readonly sampler: Sampler;
  private readonly decoder: StreamDecoder;
  private readonly logprobs: TokenLogprob[] = [];
  /** Text decided so far (emitted) and text held back because a stop string may be starting. */
  private emitted = '';
  private pending = '';
  finishReason: FinishReason | null = null;
  stoppedBy: string | undefined;
  /** What the prompt's interventions did, when the request asked (set by the prefill). */
  private applied: AppliedEdit[][] | undefined;
  /** Structured output: the row's matcher (on a grammar thread, reached through shared memory). */
  private readonly matcher: RowMatcher | null;

  constructor(
    readonly request: GenerationRequest,
    private readonly eosTokenIds: ReadonlySet<number>,
    private readonly contextLength: number,
    detokenizer: Detokenizer,
  ) {
    this.sampler = new Sampler(request.sampling, request.tokens);
    this.decoder = detokenizer.createStreamDecoder(request.tokens);
    this.matcher = request.grammar ? new RowMatcher(request.grammar) : null;
  }

  get done(): boolean {
    return this.finishReason !== null;
  }

  /**
   * Whether the next token is plain greedy over the model's logits with at most its own
   * logprob reported, so a device can pick it (argmax in the graph) without sending the logits.
   */
  get samplesGreedily(): boolean {
    const p = this.request.sampling;
    const adjusted = p.repetitionPenalty !== 1 || !!p.frequencyPenalty || !!p.presencePenalty || !!p.logitBias?.length;
    return p.temperature === 0 && !adjusted && this.request.topLogprobs === 0 && !this.matcher;
  }

  /** Prompt tokens the prefix cache supplied (set at admission). */
  cachedTokens = 0;

  /** Records the prefill's readout; the first token event and the result carry it. */
  setApplied(applied: AppliedEdit[][] | undefined): void {
    if (this.request.returnCoefficients) this.applied = applied ?? [];
  }

  /** Picks the next token from `logits`, records it, and decides whether generation ends. */
  accept(logits: Float32Array): TokenEvent {
    const m = this.matcher;
    if (m && !m.waitMask()) {
      // the grammar thread is gone: the row can't go on (the service reports it as an error)
      const token = this.sampler.next(logits);
      this.finish('cancelled', 'grammar');
      return { token, text: '' };
    }
    const token = this.sampler.next(logits, m ? { bits: m.mask, vocabSize: m.grammar.vocabSize } : undefined);
    m?.accept(token);
    return this.take(token, this.request.logprobs ? tokenLogprob(logits, token, this.request.topLogprobs) : undefined);
  }

  /** Records a token picked on the device (only when `samplesGreedily`), with its logprob. */
  acceptSampled(token: number, logprob: number): TokenEvent {
    if (!this.samplesGreedily) throw new Error('acceptSampled: this generation needs the logits to pick its tokens');
    return this.take(token, this.request.logprobs ? { token, logprob } : undefined);
  }

  private take(token: number, lp: TokenLogprob | undefined): TokenEvent {
    if (lp) this.logprobs.push(lp);
    this.tokens.push(token);
    const applied = this.tokens.length === 1 && this.applied ? { applied: this.applied } : {};
    // under a grammar a stop token is allowed only where the grammar is complete: it always ends
    const isEos = (!this.request.ignoreEos || !!this.matcher) && this.eosTokenIds.has(token);
    if (isEos) {
      this.finish('stop', 'eos');
      return { token, text: this.release(this.decoder.flush(), true), logprob: lp, ...applied };
    }
    let text = this.release(this.decoder.push(token), false);
    const outOfRoom =
      this.tokens.length >= this.request.maxNewTokens || this.request.tokens.length + this.tokens.length >= this.contextLength;
    if (!this.done && outOfRoom) {
      this.finish('length');
      text += this.release(this.decoder.flush(), true);
    }
    return { token, text, logprob: lp, ...applied };
  }

  /** Ends the generation early (client gone, server stopping). */
  cancel(): void {
    if (!this.done) this.finish('cancelled');
  }

  private finish(reason: FinishReason, by?: string): void {
    this.finishReason = reason;
    this.stoppedBy = by;
    this.matcher?.close();
  }

  /**
   * Adds decoded text, cuts at the first stop string, and returns what can be emitted now: the
   * text minus the longest tail that is still a prefix of a stop string (unless `final`).
   */
  private release(delta: string, final: boolean): string {
    const stops = this.request.stop;
    let text = this.pending + delta;
    for (const s of stops) {
      const at = (this.emitted + text).indexOf(s, Math.max(0, this.emitted.length - s.length + 1));
      if (at >= 0) {
        text = (this.emitted + text).slice(this.emitted.length, at);
        this.finish('stop', s);
        final = true;
        break;
      }
    }
    let hold = 0;
    if (!final) for (const s of stops) hold = Math.max(hold, partialStopLength(text, s));
    const out = text.slice(0, text.length - hold);
    this.pending = text.slice(text.length - hold);
    this.emitted += out;
    return out;
  }

  result(): GenerationResult {
    return {
      tokens: this.tokens,
      text: this.emitted,
      finishReason: this.finishReason ?? 'length',
      promptTokens: this.request.tokens.length,
      cachedTokens: this.cachedTokens,
      logprobs: this.request.logprobs ? this.logprobs : undefined,
      stoppedBy: this.stoppedBy,
      ...(this.applied ? { applied: this.applied } : {}),
    };
  }
}

/** Length of the longest suffix of `text` that is a proper prefix of `stop`. */
function partialStopLength(text: string, stop: string): number {
  for (let n = Math.min(stop.length - 1, text.length); n > 0; n--) {
    if (text.endsWith(stop.slice(0, n))) return n;
  }
  return 0;
}

function tokenLogprob(logits: Float32Array, token: number, top: number): TokenLogprob {
  const lse = logSumExp(logits);
  const lp: TokenLogprob = { token, logprob: logits[token] - lse };
  if (top > 0) {
    const best: number[] = [];
    for (let i = 0; i < logits.length; i++) {
      if (best.length < top || logits[i] > logits[best[best.length - 1]]) {
        best.push(i);
        best.sort((a, b) => logits[b] - logits[a]);
        if (best.length > top) best.pop();
      }
    }
    lp.top = best.map((t) => ({ token: t, logprob: logits[t] - lse }));
  }
  return lp;
}
