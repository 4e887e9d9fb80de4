import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Template } from '@huggingface/jinja';
import { Tokenizer } from '@huggingface/tokenizers';
import {
  chatMessagesRejected,
  chatTemplateInvalid,
  chatTemplateMissing,
  modelFileNotJson,
  tokenizerInvalid,
  tokenizerMissing,
} from '../errors.ts';
import type { ModelConfig } from './config.ts';

export interface ChatMessage {
  role: string;
  content: string;
}

export interface StreamDecoder {
  /** Adds one generated id; returns the text that became stable (often ''). */
  push(id: number): string;
  /** Returns whatever is still held back; call once the sequence has ended. */
  flush(): string;
}

export interface TextTokenizer {
  /** Largest accepted token id + 1: the model's logits width (config.json vocab_size). */
  readonly vocabSize: number;
  readonly bosTokenId: number | null;
  /** Every id that ends generation: config.json, generation_config.json and the tokenizer's eos_token. */
  readonly eosTokenIds: number[];
  readonly hasChatTemplate: boolean;
  /** Encodes plain text, adding BOS/EOS exactly as the checkpoint's tokenizer configs say (unless `addSpecialTokens` is false). */
  encode(text: string, opts?: { addSpecialTokens?: boolean }): number[];
  /** Renders the chat template and encodes the result without adding special tokens again. */
  encodeChat(messages: ChatMessage[], opts?: { addGenerationPrompt?: boolean }): number[];
  /** Decodes ids, skipping special tokens. */
  decode(ids: number[]): string;
  /** The vocabulary's string for an id ("▁was", "<s>"), or null for an id it lacks. */
  tokenString(id: number): string | null;
  /**
   * Incremental detokenizer: the concatenation of all pushes plus flush is the text the pushed ids
   * add after `context` (the prompt), so a first token keeps the leading space a decode of the
   * generated ids alone would strip.
   */
  createStreamDecoder(context?: readonly number[]): StreamDecoder;
  /**
   * One token's text and bytes as it reads after `previous` (leading space kept), for logprobs;
   * a byte-fallback token's bytes are its one raw byte.
   */
  piece(id: number, previous?: number): { text: string; bytes: number[] };
}

/** Prompt tokens the stream decoder keeps as context: enough for any decoder rule to see a real token. */
const STREAM_CONTEXT_TOKENS = 5;

type Json = Record<string, unknown>;

async function readText(path: string): Promise<string | null> {
  return readFile(path, 'utf8').catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'ENOENT') return null;
    throw e;
  });
}

async function readJson(path: string, name: string): Promise<Json | null> {
  const text = await readText(path);
  if (text === null) return null;
  try {
    const value: unknown = JSON.parse(text);
    if (value === null || typeof value !== 'object' || Array.isArray(value)) throw new Error('not an object');
    return value as Json;
  } catch {
    throw modelFileNotJson({ file: name, object: true }, name);
  }
}

/** Special tokens appear in tokenizer_config.json either as strings or as serialized AddedToken objects. */
function tokenContent(value: unknown): string | null {
  if (typeof value === 'string') return value;
  if (value && typeof value === 'object' && typeof (value as { content?: unknown }).content === 'string') {
    return (value as { content: string }).content;
  }
  return null;
}

/**
 * The chat template, as transformers picks it: a separate chat_template.jinja wins over
 * tokenizer_config.json, whose `chat_template` is a string or a list of named templates ("default" is used).
 */
function pickChatTemplate(fromFile: string | null, fromConfig: unknown): string | null {
  if (fromFile !== null && fromFile.trim() !== '') return fromFile;
  if (typeof fromConfig === 'string') return fromConfig;
  if (Array.isArray(fromConfig)) {
    const named = fromConfig.filter(
      (t): t is { name: string; template: string } => typeof t?.name === 'string' && typeof t?.template === 'string',
    );
    return (named.find((t) => t.name === 'default') ?? named[0])?.template ?? null;
  }
  return null;
}

function findSubsequence(haystack: number[], needle: number[]): number {
  for (let i = 0; i + needle.length <= haystack.length; i++) {
    if (needle.every((v, j) => haystack[i + j] === v)) return i;
  }
  return -1;
}

/**
 * The ids the tokenizer.json post-processor wraps around a single sequence, found by encoding a
 * probe with and without special tokens (works for every post-processor type).
 */
function postProcessorAffixes(tok: Tokenizer): { prefix: number[]; suffix: number[] } {
  const probe = 'a';
  const bare = tok.encode(probe, { add_special_tokens: false }).ids;
  const full = tok.encode(probe).ids;
  const at = findSubsequence(full, bare);
  if (at < 0) return { prefix: [], suffix: [] };
  return { prefix: full.slice(0, at), suffix: full.slice(at + bare.length) };
}

/** tokenizer_config.json's add_bos_token / add_eos_token, when present, override the post-processor (as transformers does). */
function applyAddFlags(
  affixes: { prefix: number[]; suffix: number[] },
  tc: Json,
  bos: number | null,
  eos: number | null,
): { prefix: number[]; suffix: number[] } {
  let { prefix, suffix } = affixes;
  if (bos !== null && typeof tc.add_bos_token === 'boolean') {
    prefix = prefix.filter((id) => id !== bos);
    if (tc.add_bos_token) prefix = [bos, ...prefix];
  }
  if (eos !== null && typeof tc.add_eos_token === 'boolean') {
    suffix = suffix.filter((id) => id !== eos);
    if (tc.add_eos_token) suffix = [...suffix, eos];
  }
  return { prefix, suffix };
}

function idList(v: unknown): number[] {
  if (typeof v === 'number' && Number.isInteger(v)) return [v];
  if (Array.isArray(v)) return v.filter((x): x is number => typeof x === 'number' && Number.isInteger(x));
  return [];
}

export async function loadTokenizer(modelDir: string, config: ModelConfig): Promise<TextTokenizer> {
  const tokenizerJson = await readJson(join(modelDir, 'tokenizer.json'), 'tokenizer.json');
  if (!tokenizerJson) {
    throw tokenizerMissing({ dir: modelDir }, 'tokenizer.json');
  }
  const specialMap = (await readJson(join(modelDir, 'special_tokens_map.json'), 'special_tokens_map.json')) ?? {};
  // special_tokens_map.json only fills in what tokenizer_config.json leaves out.
  const tc: Json = { ...specialMap, ...((await readJson(join(modelDir, 'tokenizer_config.json'), 'tokenizer_config.json')) ?? {}) };
  const generation = (await readJson(join(modelDir, 'generation_config.json'), 'generation_config.json')) ?? {};
  const templateFile = await readText(join(modelDir, 'chat_template.jinja'));

  let tok: Tokenizer;
  try {
    // transformers (>= 4.45) no longer cleans up tokenization spaces unless the config asks for it.
    tok = new Tokenizer(tokenizerJson, { ...tc, clean_up_tokenization_spaces: tc.clean_up_tokenization_spaces === true });
  } catch (e) {
    throw tokenizerInvalid({ reason: (e as Error).message }, 'tokenizer.json');
  }
  return new HfTextTokenizer(tok, config, tc, generation, pickChatTemplate(templateFile, tc.chat_template));
}

class HfTextTokenizer implements TextTokenizer {
  readonly vocabSize: number;
  readonly bosTokenId: number | null;
  readonly eosTokenIds: number[];
  readonly hasChatTemplate: boolean;
  private readonly prefix: number[];
  private readonly suffix: number[];
  private readonly specialContents: Set<string>;
  private readonly cleanUpSpaces: boolean;
  private readonly templateVars: Record<string, string>;
  private template: Template | null = null;
  private templateError: string | null = null;

  constructor(
    private readonly tok: Tokenizer,
    config: ModelConfig,
    tc: Json,
    generation: Json,
    templateSource: string | null,
  ) {
    const idOf = (key: string): number | null => {
      const content = tokenContent(tc[key]);
      return content === null ? null : (tok.token_to_id(content) ?? null);
    };
    const tokenizerBos = idOf('bos_token');
    const tokenizerEos = idOf('eos_token');
    this.vocabSize = config.vocabSize;
    this.bosTokenId = tokenizerBos ?? config.bosTokenId;
    this.eosTokenIds = [
      ...new Set([...config.eosTokenIds, ...idList(generation.eos_token_id), ...(tokenizerEos === null ? [] : [tokenizerEos])]),
    ];
    ({ prefix: this.prefix, suffix: this.suffix } = applyAddFlags(postProcessorAffixes(tok), tc, this.bosTokenId, tokenizerEos));
    this.specialContents = new Set([...tok.get_added_tokens_decoder().values()].filter((t) => t.special).map((t) => t.content));
    for (const t of Array.isArray(tc.additional_special_tokens) ? tc.additional_special_tokens : []) {
      if (typeof t === 'string') this.specialContents.add(t);
    }
    this.cleanUpSpaces = tc.clean_up_tokenization_spaces === true;
    // transformers hands the template every special token string of the tokenizer.
    this.templateVars = {};
    for (const key of ['bos_token', 'eos_token', 'unk_token', 'pad_token', 'sep_token', 'cls_token', 'mask_token']) {
      const content = tokenContent(tc[key]);
      if (content !== null) this.templateVars[key] = content;
    }
    this.hasChatTemplate = templateSource !== null;
    if (templateSource !== null) {
      try {
        this.template = new Template(templateSource);
      } catch (e) {
        // A template this Jinja engine can't parse shouldn't stop plain completions; chat requests report it.
        this.templateError = (e as Error).message;
      }
    }
  }

  encode(text: string, opts: { addSpecialTokens?: boolean } = {}): number[] {
    if (opts.addSpecialTokens === false) return this.encodeBare(text);
    return [...this.prefix, ...this.encodeBare(text), ...this.suffix];
  }

  tokenString(id: number): string | null {
    return this.tok.id_to_token(id) ?? null;
  }

  encodeChat(messages: ChatMessage[], opts: { addGenerationPrompt?: boolean } = {}): number[] {
    if (!this.hasChatTemplate) {
      throw chatTemplateMissing('messages');
    }
    if (!this.template) {
      throw chatTemplateInvalid({ reason: String(this.templateError) }, 'chat_template');
    }
    let rendered: string;
    try {
      rendered = this.template.render({
        ...this.templateVars,
        messages: messages.map((m) => ({ role: m.role, content: m.content })),
        add_generation_prompt: opts.addGenerationPrompt ?? false,
      });
    } catch (e) {
      throw chatMessagesRejected({ reason: (e as Error).message }, 'messages');
    }
    // The template already wrote any BOS it wants; adding it again would double it.
    return this.encodeBare(rendered);
  }

  decode(ids: number[]): string {
    // tokenizers.js refuses an empty list.
    return ids.length === 0 ? '' : this.tok.decode(ids, { skip_special_tokens: true });
  }

  createStreamDecoder(context: readonly number[] = []): StreamDecoder {
    const seed = context.filter((id) => !this.isSpecial(id)).slice(-STREAM_CONTEXT_TOKENS);
    return new WindowStreamDecoder(
      (ids) => this.decode(ids),
      (id) => this.isSpecial(id),
      (text) => this.isUnstable(text),
      seed,
    );
  }

  piece(id: number, previous?: number): { text: string; bytes: number[] } {
    let text = this.decode([id]);
    if (previous !== undefined && !this.isSpecial(previous) && !this.isSpecial(id)) {
      const before = this.decode([previous]);
      const both = this.decode([previous, id]);
      if (both.startsWith(before)) text = both.slice(before.length);
    }
    const byte = /^<0x([0-9A-Fa-f]{2})>$/.exec(this.tok.id_to_token(id) ?? '');
    return { text, bytes: byte ? [parseInt(byte[1], 16)] : [...Buffer.from(text, 'utf8')] };
  }

  private encodeBare(text: string): number[] {
    return text === '' ? [] : this.tok.encode(text, { add_special_tokens: false }).ids;
  }

  /** Same test as the library's skip_special_tokens: the id's token string (unknown ids read as unk) is special. */
  private isSpecial(id: number): boolean {
    const content = this.tok.id_to_token(id) ?? this.tok.model?.unk_token;
    return content !== undefined && this.specialContents.has(content);
  }

  /**
   * Text that later tokens may still change: a trailing U+FFFD is an unfinished UTF-8 sequence, and with
   * clean-up on, a space near the end may yet be removed (" ." -> ".", " n't" -> "n't").
   */
  private isUnstable(text: string): boolean {
    if (text.endsWith('\uFFFD')) return true;
    return this.cleanUpSpaces && text.slice(-3).includes(' ');
  }
}

/**
 * Decodes a sliding window rather than single tokens: SentencePiece-style decoders drop the leading
 * space of the first token and byte-fallback tokens only form characters together, so a token's
 * text is decode(window) minus decode(window without it). Special tokens are dropped up front so
 * the window always starts at a real token, as decode's skip_special_tokens would see it. The
 * prompt's last tokens seed the window, so the first generated token reads as it does after them.
 */
class WindowStreamDecoder implements StreamDecoder {
  private readonly ids: number[];
  /** Start of the window, one emission step behind `readOffset`, for context. */
  private prefixOffset = 0;
  /** Everything before this index has been emitted (or is context). */
  private readOffset: number;

  constructor(
    private readonly decodeIds: (ids: number[]) => string,
    private readonly isSpecial: (id: number) => boolean,
    private readonly isUnstable: (text: string) => boolean,
    context: number[],
  ) {
    this.ids = context;
    this.readOffset = context.length;
  }

  push(id: number): string {
    if (this.isSpecial(id)) return '';
    this.ids.push(id);
    return this.emit(false);
  }

  flush(): string {
    return this.emit(true);
  }

  private emit(final: boolean): string {
    if (this.readOffset === this.ids.length) return '';
    let window = this.decodeWindow();
    if (window === null) {
      // The window's context disagrees with itself (a non-local decoder rule); widen it to the start.
      this.prefixOffset = 0;
      window = this.decodeWindow();
      if (window === null) return '';
    }
    if (!final && (window.delta === '' || this.isUnstable(window.text))) return '';
    this.prefixOffset = this.readOffset;
    this.readOffset = this.ids.length;
    return window.delta;
  }

  /**
   * The window's text and its part after readOffset (`delta`); null if decoding the window
   * doesn't extend decoding its already-emitted prefix.
   */
  private decodeWindow(): { text: string; delta: string } | null {
    const before = this.decodeIds(this.ids.slice(this.prefixOffset, this.readOffset));
    const text = this.decodeIds(this.ids.slice(this.prefixOffset));
    return text.startsWith(before) ? { text, delta: text.slice(before.length) } : null;
  }
}
