import { createHash } from 'node:crypto';
import { interventionDigest } from '../interventions/artifact.ts';
import { positionsFor } from '../interventions/positions.ts';
import type { RequestIntervention } from '../interventions/steer.ts';

/** Tokens of a prefix-cache block. */
export const PREFIX_BLOCK_TOKENS = 64;

/**
 * The keys of a prompt's cacheable blocks: block i holds the keys and values of tokens
 * [64·i, 64·i + 64) and its key is hash(parent key, its tokens, its edits), the first block's
 * parent being the namespace (a tenant, and the request's cache salt). A block's keys and values
 * depend on its tokens, every token before it, and every edit at a position up to its end
 * (REFT.md: an edit changes the residual stream at its position, which later positions read):
 * the chain carries the tokens and edits before the block, and the block adds its own edits,
 * each as what the edit does (the digest of the intervention's factors, not its name), its layer,
 * its strength and its resolved position. So a prompt position counted from the end (`l3`) that
 * falls in a block makes that block the prompt's own, while the blocks before the first edit are
 * the base model's and shared by every intervention and plain request of the namespace.
 *
 * Only full blocks before the last prompt token count: the last token is always computed.
 */
export function prefixBlockKeys(
  tokens: readonly number[],
  interventions: readonly RequestIntervention[],
  namespace: string,
  promptLength = tokens.length,
): string[] {
  const blocks = Math.floor((tokens.length - 1) / PREFIX_BLOCK_TOKENS);
  const edits = editsByBlock(interventions, promptLength, blocks);
  const keys: string[] = [];
  let parent = createHash('sha256').update('reft-prefix-v1\0').update(namespace).digest();
  for (let b = 0; b < blocks; b++) {
    const hash = createHash('sha256').update(parent);
    hash.update(Int32Array.from(tokens.slice(b * PREFIX_BLOCK_TOKENS, (b + 1) * PREFIX_BLOCK_TOKENS)));
    for (const edit of edits[b]) hash.update(edit).update('\n');
    parent = hash.digest();
    keys.push(parent.toString('hex'));
  }
  return keys;
}

/** Each block's edits, as sorted lines `position digest layer strength` (the order edits are given in does not change the sum). */
function editsByBlock(interventions: readonly RequestIntervention[], promptLength: number, blocks: number): string[][] {
  const out: string[][] = Array.from({ length: blocks }, () => []);
  for (const iv of interventions) {
    const digest = interventionDigest(iv);
    for (const p of positionsFor(iv.positions, promptLength)) {
      const b = Math.floor(p / PREFIX_BLOCK_TOKENS);
      if (b < blocks) out[b].push(`${p} ${digest} ${iv.layer} ${iv.strength ?? 1}`);
    }
  }
  for (const lines of out) lines.sort();
  return out;
}

/** The first prompt position any of `interventions` edits (Infinity when none does). */
export function firstEditedPosition(interventions: readonly RequestIntervention[], promptLength: number): number {
  let first = Infinity;
  for (const iv of interventions) for (const p of positionsFor(iv.positions, promptLength)) first = Math.min(first, p);
  return first;
}
