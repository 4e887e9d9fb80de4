import { readFile } from 'node:fs/promises';
import { join } from 'node:path';

/**
 * What xgrammar needs of a tokenizer (its TokenizerInfo): every id's string as the vocabulary
 * writes it, how to turn those strings into bytes, and which ids end a generation. Read from the
 * model's tokenizer.json, as xgrammar's `TokenizerInfo.from_huggingface` reads a fast tokenizer:
 *
 * - `byte_fallback`: SentencePiece-style BPE (Llama 2, stories260k): `▁` is a space and
 *   `<0xAB>` tokens are single bytes; the decoder has a ByteFallback step.
 * - `byte_level`: GPT-2-style BPE (Llama 3, SmolLM2): each byte is a printable stand-in
 *   (`Ġ` for a space); the decoder is ByteLevel.
 * - `raw`: anything else; a token's string is its text.
 *
 * Special tokens (BOS, EOS, chat markers) are given as empty strings: xgrammar never allows a
 * token whose text is empty, so they can't appear inside the output's text; the ids that end a
 * generation are passed apart as its stop tokens.
 */
export interface GrammarVocab {
  /** Index = token id; length = the model's logits width (config.json vocab_size). */
  encoded: string[];
  type: 'byte_fallback' | 'byte_level' | 'raw';
  prependSpace: boolean;
  stopTokenIds: number[];
}

type Json = Record<string, unknown>;

function steps(node: unknown, list: string): Json[] {
  if (!node || typeof node !== 'object') return [];
  const n = node as Json;
  if (Array.isArray(n[list])) return (n[list] as unknown[]).flatMap((c) => steps(c, list));
  return [n];
}

export function vocabType(tokenizer: Json): GrammarVocab['type'] {
  const decoders = steps(tokenizer.decoder, 'decoders');
  if (decoders.some((d) => d.type === 'ByteFallback')) return 'byte_fallback';
  if (decoders.some((d) => d.type === 'ByteLevel')) return 'byte_level';
  return 'raw';
}

/** Whether tokenization puts a space (`▁`) before the text (a Prepend normalizer or a Metaspace pre-tokenizer that always prepends). */
export function prependsSpace(tokenizer: Json): boolean {
  const normalizers = steps(tokenizer.normalizer, 'normalizers');
  if (normalizers.some((n) => n.type === 'Prepend' && n.prepend === '▁')) return true;
  return steps(tokenizer.pre_tokenizer, 'pretokenizers').some(
    (p) => p.type === 'Metaspace' && (p.prepend_scheme === 'always' || p.add_prefix_space === true),
  );
}

export function grammarVocab(tokenizer: Json, vocabSize: number, stopTokenIds: readonly number[]): GrammarVocab {
  const encoded = new Array<string>(vocabSize).fill('');
  const model = tokenizer.model as { vocab?: Record<string, number> | Array<[string, number]> } | undefined;
  const vocab = model?.vocab;
  if (Array.isArray(vocab)) {
    // Unigram: [piece, score] in id order
    vocab.forEach(([piece], id) => {
      if (id < vocabSize) encoded[id] = piece;
    });
  } else if (vocab) {
    for (const [piece, id] of Object.entries(vocab)) if (id < vocabSize) encoded[id] = piece;
  }
  for (const t of (tokenizer.added_tokens as Array<{ id: number; content: string; special?: boolean }> | undefined) ?? []) {
    if (t.id < vocabSize) encoded[t.id] = t.special ? '' : t.content;
  }
  return { encoded, type: vocabType(tokenizer), prependSpace: prependsSpace(tokenizer), stopTokenIds: [...stopTokenIds] };
}

export async function loadGrammarVocab(modelDir: string, vocabSize: number, stopTokenIds: readonly number[]): Promise<GrammarVocab> {
  const tokenizer = JSON.parse(await readFile(join(modelDir, 'tokenizer.json'), 'utf8')) as Json;
  return grammarVocab(tokenizer, vocabSize, stopTokenIds);
}
