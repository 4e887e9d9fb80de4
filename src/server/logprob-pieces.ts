import type { TokenLogprob } from '../engine/generation.ts';
import type { TextTokenizer } from '../model/tokenizer.ts';

/**
 * Logprob entries with each token's text as it reads in the generated text (after the token
 * before it, so leading spaces stay and the chosen tokens join up to the text); alternatives
 * read after the same token as the chosen one.
 */
export interface Piece {
  token: number;
  text: string;
  bytes: number[];
  logprob: number;
}

export interface LogprobPiece extends Piece {
  top?: Piece[];
}

export function logprobPieces(
  tokenizer: TextTokenizer,
  promptTokens: readonly number[],
  logprobs: readonly TokenLogprob[],
): LogprobPiece[] {
  return logprobs.map((lp, i) => {
    const previous = i === 0 ? promptTokens.at(-1) : logprobs[i - 1].token;
    const piece = (token: number, logprob: number): Piece => ({ token, logprob, ...tokenizer.piece(token, previous) });
    return { ...piece(lp.token, lp.logprob), ...(lp.top ? { top: lp.top.map((t) => piece(t.token, t.logprob)) } : {}) };
  });
}
