import { copyFile, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ReftError } from '../src/errors.ts';
import { parseModelConfig, type ModelConfig } from '../src/model/config.ts';
import { loadTokenizer, type TextTokenizer } from '../src/model/tokenizer.ts';

import { STORIES as MODEL_DIR } from './support/fixtures.ts';
import { thrownBy } from './support/errors.ts';
const TOKENIZER_FILES = ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json'];

/** Greedy continuation of "Once upon a time" by the base stories260k model. */
const CONTINUATION = [
  432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426,
  385, 328, 432, 358, 394, 261, 370, 432, 352, 266, 268, 388, 426, 338, 391, 266, 267, 337, 335, 312, 432, 398, 312, 286, 267, 414, 270,
  333, 415, 426, 13, 438, 310,
];

const CHATML =
  '{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}' +
  '{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}';

async function readJson(path: string): Promise<Record<string, unknown>> {
  return JSON.parse(await readFile(path, 'utf8'));
}

async function modelConfig(dir = MODEL_DIR): Promise<ModelConfig> {
  return parseModelConfig(await readJson(join(dir, 'config.json')), await readJson(join(dir, 'generation_config.json')));
}

/** Deterministic PRNG so failures reproduce. */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

function streamAll(tok: TextTokenizer, ids: number[]): string[] {
  const decoder = tok.createStreamDecoder();
  const chunks = ids.map((id) => decoder.push(id));
  chunks.push(decoder.flush());
  return chunks;
}

const tempDirs: string[] = [];

/** A temp copy of stories260k's tokenizer files, with some files replaced or added. */
async function variant(overrides: Record<string, string | ((text: string) => string)>): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'reft-tok-'));
  tempDirs.push(dir);
  for (const f of TOKENIZER_FILES) await copyFile(join(MODEL_DIR, f), join(dir, f));
  for (const [f, v] of Object.entries(overrides)) {
    const text = typeof v === 'string' ? v : v(await readFile(join(dir, f), 'utf8'));
    await writeFile(join(dir, f), text);
  }
  return dir;
}

function withConfig(patch: Record<string, unknown>): (text: string) => string {
  return (text) => JSON.stringify({ ...JSON.parse(text), ...patch });
}

afterAll(async () => {
  for (const d of tempDirs) await rm(d, { recursive: true, force: true });
});

describe('stories260k tokenizer', () => {
  let tok: TextTokenizer;
  beforeAll(async () => {
    tok = await loadTokenizer(MODEL_DIR, await modelConfig());
  });

  it('encodes with BOS as the checkpoint says', () => {
    expect(tok.encode('Once upon a time')).toEqual([1, 403, 407, 261, 378]);
    expect(tok.encode('')).toEqual([1]);
    expect(tok.bosTokenId).toBe(1);
    expect(tok.eosTokenIds).toEqual([2]);
    expect(tok.vocabSize).toBe(512);
    expect(tok.hasChatTemplate).toBe(false);
  });

  it("decodes the base model's continuation", () => {
    expect(tok.decode(CONTINUATION).startsWith(', there was a little girl named Lily.')).toBe(true);
  });

  it('skips special tokens when decoding', () => {
    expect(tok.decode([1, 403, 407, 261, 378, 2])).toBe('Once upon a time');
    expect(tok.decode([1, 2, 0])).toBe('');
    expect(tok.decode([])).toBe('');
  });

  it('round-trips text, including byte-fallback characters', () => {
    for (const text of [
      'Once upon a time, there was a little girl named Lily.',
      '  two  spaces\nand a newline\n\n',
      'héllo 😀 wörld — 日本語',
      'Tab\there',
    ]) {
      const ids = tok.encode(text);
      expect(ids[0]).toBe(1);
      expect(tok.decode(ids)).toBe(text);
    }
  });

  it('streams exactly decode() over random id sequences', () => {
    const rand = rng(42);
    for (let n = 0; n < 400; n++) {
      const ids = Array.from({ length: 1 + Math.floor(rand() * 48) }, () => Math.floor(rand() * tok.vocabSize));
      expect(streamAll(tok, ids).join(''), JSON.stringify(ids)).toBe(tok.decode(ids));
    }
  });

  it('streams real text token by token without broken characters', () => {
    const text = 'Héllo wörld 😀 — 日本語 ok.  Two  spaces\n\nnew para';
    const ids = [...tok.encode(text), 2];
    const chunks = streamAll(tok, ids);
    expect(chunks.join('')).toBe(text);
    for (const c of chunks) expect(c).not.toContain('\uFFFD');
    // SentencePiece word starts keep their space mid-stream; only the very first is dropped.
    expect(chunks.slice(1, 6)).toEqual(['H', 'é', 'll', 'o', ' w']);
    expect(chunks).toContain('😀');

    const story = streamAll(tok, CONTINUATION);
    expect(story.join('')).toBe(tok.decode(CONTINUATION));
    expect(story[0]).toBe(',');
    expect(story[1]).toBe(' there');
  });

  it('can keep streaming after a flush', () => {
    const ids = tok.encode('Once upon a time').slice(1);
    const decoder = tok.createStreamDecoder();
    let out = decoder.push(ids[0]) + decoder.push(ids[1]) + decoder.flush();
    out += decoder.push(ids[2]) + decoder.push(ids[3]) + decoder.flush();
    expect(out).toBe('Once upon a time');
  });

  it('refuses chat messages without a chat template', () => {
    let err: unknown;
    try {
      tok.encodeChat([{ role: 'user', content: 'hi' }]);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ReftError);
    expect(err).toMatchObject({ code: 'chat_template_missing', category: 'invalid_request', field: 'messages' });
  });
});

describe('tokenizer configs', () => {
  it('follows add_bos_token / add_eos_token over the post-processor', async () => {
    const config = await modelConfig();
    const noBos = await loadTokenizer(await variant({ 'tokenizer_config.json': withConfig({ add_bos_token: false }) }), config);
    expect(noBos.encode('Once upon a time')).toEqual([403, 407, 261, 378]);
    const withEos = await loadTokenizer(await variant({ 'tokenizer_config.json': withConfig({ add_eos_token: true }) }), config);
    expect(withEos.encode('Once upon a time')).toEqual([1, 403, 407, 261, 378, 2]);
  });

  it('falls back to the post-processor when tokenizer_config.json says nothing', async () => {
    const dir = await variant({
      'tokenizer_config.json': (text) => {
        const { add_bos_token: _bos, add_eos_token: _eos, ...rest } = JSON.parse(text);
        return JSON.stringify(rest);
      },
    });
    const tok = await loadTokenizer(dir, await modelConfig());
    expect(tok.encode('Once upon a time')).toEqual([1, 403, 407, 261, 378]);
  });

  it('collects EOS ids from config, generation_config and tokenizer_config', async () => {
    const dir = await variant({
      'generation_config.json': JSON.stringify({ bos_token_id: 1, eos_token_id: [2, 5] }),
      'tokenizer_config.json': withConfig({ eos_token: '<unk>' }),
    });
    const raw = await readJson(join(MODEL_DIR, 'config.json'));
    const tok = await loadTokenizer(dir, parseModelConfig(raw));
    expect([...tok.eosTokenIds].sort((a, b) => a - b)).toEqual([0, 2, 5]);
  });

  it('fails clearly without tokenizer.json', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'reft-tok-'));
    tempDirs.push(dir);
    await expect(loadTokenizer(dir, await modelConfig())).rejects.toMatchObject({
      code: 'tokenizer_missing',
      category: 'invalid_model',
      field: 'tokenizer.json',
    });
  });
});

describe('chat template', () => {
  const messages = [
    { role: 'system', content: 'You tell stories.' },
    { role: 'user', content: 'Tell me about Lily.' },
  ];
  const rendered = '<s><|im_start|>system\nYou tell stories.<|im_end|>\n<|im_start|>user\nTell me about Lily.<|im_end|>\n';

  /** What transformers does: encode the rendered text without adding special tokens. */
  async function reference(text: string): Promise<number[]> {
    const raw = new Tokenizer(await readJson(join(MODEL_DIR, 'tokenizer.json')), await readJson(join(MODEL_DIR, 'tokenizer_config.json')));
    return raw.encode(text, { add_special_tokens: false }).ids;
  }

  it('renders a template from tokenizer_config.json and encodes it without a second BOS', async () => {
    const tok = await loadTokenizer(await variant({ 'tokenizer_config.json': withConfig({ chat_template: CHATML }) }), await modelConfig());
    expect(tok.hasChatTemplate).toBe(true);
    const ids = tok.encodeChat(messages);
    expect(ids).toEqual(await reference(rendered));
    expect(ids[0]).toBe(1);
    expect(ids[1]).not.toBe(1);
    expect(tok.decode(ids)).toBe(rendered.slice('<s>'.length));

    const prompted = tok.encodeChat(messages, { addGenerationPrompt: true });
    expect(prompted).toEqual(await reference(`${rendered}<|im_start|>assistant\n`));
    expect(tok.decode(prompted).endsWith('<|im_end|>\n<|im_start|>assistant\n')).toBe(true);
  });

  it('picks the default of a list of named templates', async () => {
    const dir = await variant({
      'tokenizer_config.json': withConfig({
        chat_template: [
          { name: 'tool_use', template: 'TOOLS{{ messages[0].content }}' },
          { name: 'default', template: CHATML },
        ],
      }),
    });
    const tok = await loadTokenizer(dir, await modelConfig());
    expect(tok.encodeChat(messages)).toEqual(await reference(rendered));
  });

  it('prefers a chat_template.jinja file', async () => {
    const dir = await variant({
      'tokenizer_config.json': withConfig({ chat_template: 'IGNORED' }),
      'chat_template.jinja': '{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}',
    });
    const tok = await loadTokenizer(dir, await modelConfig());
    expect(tok.decode(tok.encodeChat(messages))).toBe('system: You tell stories.\nuser: Tell me about Lily.\n');
  });

  it("reports the template's own errors against the messages", async () => {
    const template = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}";
    const tok = await loadTokenizer(
      await variant({ 'tokenizer_config.json': withConfig({ chat_template: template }) }),
      await modelConfig(),
    );
    const err = thrownBy(() => tok.encodeChat(messages));
    expect(err).toMatchObject({ code: 'chat_messages_rejected', category: 'invalid_request', field: 'messages' });
    expect(err.message).toContain('first message must be from the user'); // the template's own words come along
  });
});

// ---------------------------------------------------------------------------------------------
// A byte-level BPE (GPT-2 / Llama 3 / Qwen style) built in place: the other decoder family, with
// multi-byte characters split across tokens and, optionally, tokenization-space clean-up.
// ---------------------------------------------------------------------------------------------

/** GPT-2's reversible byte -> printable character map. */
function bytesToUnicode(): string[] {
  const printable: number[] = [];
  for (let b = 33; b <= 126; b++) printable.push(b);
  for (let b = 161; b <= 172; b++) printable.push(b);
  for (let b = 174; b <= 255; b++) printable.push(b);
  const chars: string[] = new Array(256);
  let extra = 0;
  for (let b = 0; b < 256; b++) chars[b] = String.fromCodePoint(printable.includes(b) ? b : 256 + extra++);
  return chars;
}

async function byteLevelTokenizer(cleanUp: boolean): Promise<TextTokenizer> {
  const vocab: Record<string, number> = {};
  bytesToUnicode().forEach((c, b) => (vocab[c] = b));
  Object.assign(vocab, { Ġt: 256, he: 257, Ġthe: 258, '<|eot|>': 259 });
  const dir = await mkdtemp(join(tmpdir(), 'reft-tok-'));
  tempDirs.push(dir);
  const byteLevel = { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true };
  await writeFile(
    join(dir, 'tokenizer.json'),
    JSON.stringify({
      version: '1.0',
      truncation: null,
      padding: null,
      added_tokens: [{ id: 259, content: '<|eot|>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }],
      normalizer: null,
      pre_tokenizer: byteLevel,
      post_processor: byteLevel,
      decoder: byteLevel,
      model: {
        type: 'BPE',
        dropout: null,
        unk_token: null,
        byte_fallback: false,
        vocab,
        merges: [
          ['Ġ', 't'],
          ['h', 'e'],
          ['Ġt', 'he'],
        ],
      },
    }),
  );
  await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify({ eos_token: '<|eot|>', clean_up_tokenization_spaces: cleanUp }));
  const raw = await readJson(join(MODEL_DIR, 'config.json'));
  return loadTokenizer(dir, parseModelConfig({ ...raw, vocab_size: 260, bos_token_id: null, eos_token_id: 259 }));
}

describe('byte-level tokenizer stream decoding', () => {
  for (const cleanUp of [false, true]) {
    it(`matches decode() over random ids (clean-up ${cleanUp})`, async () => {
      const tok = await byteLevelTokenizer(cleanUp);
      expect(tok.bosTokenId).toBeNull();
      expect(tok.eosTokenIds).toEqual([259]);
      const text = "the cat. 日本 😀 isn't";
      const ids = tok.encode(text);
      expect(tok.decode(ids)).toBe(cleanUp ? "the cat. 日本 😀 isn't" : text);
      expect(streamAll(tok, [...ids, 259]).join('')).toBe(tok.decode(ids));

      // Bias towards the interesting ids: spaces, '.', "'", 'n', lead and continuation bytes, merges, EOS.
      const pool = [32, 46, 39, 110, 116, 0xe6, 0x97, 0xa5, 0xf0, 0x9f, 0x98, 0x80, 0xc3, 0xa9, 256, 257, 258, 259];
      const rand = rng(cleanUp ? 7 : 8);
      for (let n = 0; n < 1500; n++) {
        const ids = Array.from({ length: 1 + Math.floor(rand() * 32) }, () =>
          rand() < 0.5 ? Math.floor(rand() * 260) : pool[Math.floor(rand() * pool.length)],
        );
        expect(streamAll(tok, ids).join(''), JSON.stringify(ids)).toBe(tok.decode(ids));
      }
    });
  }
});
