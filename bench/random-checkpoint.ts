import { mkdir, open, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { expectedTensors } from '../src/model/checkpoint.ts';
import { parseModelConfig } from '../src/model/config.ts';
import { Rng } from '../src/engine/sampler.ts';

/** SmolLM2-135M's shapes (HuggingFaceTB/SmolLM2-135M config.json). */
export const SMOL_135M_CONFIG = {
  architectures: ['LlamaForCausalLM'],
  model_type: 'llama',
  hidden_size: 576,
  intermediate_size: 1536,
  num_hidden_layers: 30,
  num_attention_heads: 9,
  num_key_value_heads: 3,
  head_dim: 64,
  vocab_size: 49152,
  max_position_embeddings: 8192,
  rms_norm_eps: 1e-5,
  rope_theta: 100000,
  hidden_act: 'silu',
  tie_word_embeddings: true,
  bos_token_id: 0,
  eos_token_id: 0,
  torch_dtype: 'float32',
};

/**
 * Writes a random-weight F32 checkpoint with SmolLM2-135M's shapes (538 MB) into `dir`, once.
 * Norm weights are 1 and matrices N(0, 0.02)-like, so activations stay in a realistic range.
 * The tokenizer files are copied from `tokenizerFrom` (token ids are all the bench uses).
 */
export async function randomCheckpoint(dir: string, tokenizerFrom: string): Promise<string> {
  const done = join(dir, '.complete');
  if (await stat(done).then(() => true, () => false)) return dir;
  await mkdir(dir, { recursive: true });
  const config = parseModelConfig(SMOL_135M_CONFIG);
  const tensors = expectedTensors(config);
  const header: Record<string, unknown> = {};
  let offset = 0;
  for (const t of tensors) {
    const bytes = t.shape.reduce((a, b) => a * b, 1) * 4;
    header[t.name] = { dtype: 'F32', shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - ((8 + json.length) % 8)) % 8);
  const fh = await open(join(dir, 'model.safetensors'), 'w');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  await fh.write(len);
  await fh.write(Buffer.from(json));
  const rng = new Rng(1234);
  for (const t of tensors) {
    const n = t.shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n);
    if (t.shape.length === 1) data.fill(1);
    else for (let i = 0; i < n; i++) data[i] = (rng.next() + rng.next() + rng.next() - 1.5) * 0.04;
    await fh.write(new Uint8Array(data.buffer));
  }
  await fh.close();
  await writeFile(join(dir, 'config.json'), JSON.stringify(SMOL_135M_CONFIG, null, 2));
  await writeFile(join(dir, 'generation_config.json'), JSON.stringify({ bos_token_id: 0, eos_token_id: 0 }));
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) {
    const { readFile } = await import('node:fs/promises');
    await writeFile(join(dir, f), await readFile(join(tokenizerFrom, f)));
  }
  await writeFile(done, '');
  return dir;
}
