/**
 * Hugging Face config fields of the small random-weight checkpoints the architecture tests write
 * (bench/random-checkpoint.ts): shapes small enough to run in milliseconds, with grouped heads.
 * Each test spreads these and adds what it varies (head_dim, norms, positions, windows).
 */
export const SMALL_SHAPES = {
  hidden_size: 64,
  num_hidden_layers: 3,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  vocab_size: 512,
  bos_token_id: 1,
  eos_token_id: 2,
};

/** Gemma 2's attention and activation: scale, attention and final soft-caps (its window is the test's). */
export const GEMMA2_FIELDS = {
  architectures: ['Gemma2ForCausalLM'],
  model_type: 'gemma2',
  hidden_activation: 'gelu_pytorch_tanh',
  query_pre_attn_scalar: 24,
  attn_logit_softcapping: 3,
  final_logit_softcapping: 4,
};
