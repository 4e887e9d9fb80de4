import { defineError } from './reft-error.ts';

/** The base model: where it comes from (a folder or the Hub), its config, tokenizer and weights. */

// where the model comes from
export const modelSpecInvalid = defineError(
  'model_spec_invalid',
  'invalid_model',
  (p: { spec: string }) => `model "${p.spec}" is neither an existing directory nor a Hugging Face repo id (org/name or org/name@revision)`,
);
export const modelFileUnreadable = defineError(
  'model_file_unreadable',
  'invalid_model',
  (p: { dir: string; file: string }) =>
    `${p.dir} has no readable ${p.file}; a model folder needs config.json, model.safetensors and tokenizer.json`,
);
export const modelFileNotJson = defineError(
  'model_file_not_json',
  'invalid_model',
  (p: { file: string; object?: boolean }) => `${p.file} is not ${p.object ? 'a valid JSON object' : 'valid JSON'}`,
);
export const hubRepoIncomplete = defineError(
  'hub_repo_incomplete',
  'invalid_model',
  (p: { where: string; missing: string; hint: string }) => `Hub repo ${p.where} has no ${p.missing}; ${p.hint}`,
);
export const hubShardMissing = defineError(
  'hub_shard_missing',
  'invalid_model',
  (p: { where: string; index: string; shard: string }) => `Hub repo ${p.where}: ${p.index} names ${p.shard}, which the repo doesn't have`,
);
export const hubRepoNotFound = defineError(
  'hub_repo_not_found',
  'invalid_model',
  (p: { where: string; endpoint: string; detail: string }) => `Hub repo ${p.where} was not found on ${p.endpoint} (404)${p.detail}`,
);
export const hubUnauthorized = defineError(
  'hub_unauthorized',
  'invalid_model',
  (p: { where: string; endpoint: string; hasToken: boolean; detail: string }) =>
    `Hub repo ${p.where} was not found on ${p.endpoint}, or ${p.hasToken ? 'the token is not authorized for it' : 'it is private and needs a token (set HF_TOKEN)'} (401)${p.detail}`,
);
export const hubForbidden = defineError(
  'hub_forbidden',
  'invalid_model',
  (p: { where: string; detail: string }) =>
    `access to Hub repo ${p.where} is forbidden (403)${p.detail}; gated models need their terms accepted on the Hub and a token (HF_TOKEN)`,
);
export const hubDownloadFailed = defineError(
  'hub_download_failed',
  'unavailable',
  (p: { where: string; endpoint: string; reason: string }) => `downloading ${p.where} from ${p.endpoint} failed${p.reason}`,
);
export const hubUnreachable = defineError(
  'hub_unreachable',
  'unavailable',
  (p: { spec: string; endpoint: string; reason: string; hint: string }) =>
    `could not download model ${p.spec} from ${p.endpoint} (${p.reason}); ${p.hint}`,
);

// config.json
export const modelConfigInvalid = defineError(
  'model_config_invalid',
  'invalid_model',
  (p: { field: string; problem: string }) => `config.json: ${p.field}: ${p.problem}`,
);
export const architectureUnsupported = defineError(
  'architecture_unsupported',
  'unsupported_model',
  (p: { architecture: string; supported: readonly string[] }) =>
    `unsupported architecture ${p.architecture}; supported: ${p.supported.join(', ')}`,
);
export const attentionHeadsMismatch = defineError(
  'attention_heads_mismatch',
  'invalid_model',
  (p: { heads: number; kvHeads: number }) => `num_attention_heads ${p.heads} is not a multiple of num_key_value_heads ${p.kvHeads}`,
);
export const headDimUnsupported = defineError(
  'head_dim_unsupported',
  'unsupported_model',
  (p: { headDim: number }) => `head dimension ${p.headDim} must be an even integer`,
);
export const ropeScalingUnsupported = defineError(
  'rope_scaling_unsupported',
  'unsupported_model',
  (p: { type: unknown }) => `unsupported rope_scaling type ${JSON.stringify(p.type)}; supported: linear, llama3`,
);
export const activationUnsupported = defineError(
  'activation_unsupported',
  'unsupported_model',
  (p: { field: string; name: string }) => `unsupported ${p.field} "${p.name}"; supported: silu, gelu_pytorch_tanh`,
);

// tokenizer and chat template
export const tokenizerMissing = defineError(
  'tokenizer_missing',
  'invalid_model',
  (p: { dir: string }) => `${p.dir} has no tokenizer.json (only fast-tokenizer checkpoints are supported)`,
);
export const tokenizerInvalid = defineError(
  'tokenizer_invalid',
  'invalid_model',
  (p: { reason: string }) => `tokenizer.json could not be loaded: ${p.reason}`,
);
export const chatTemplateInvalid = defineError(
  'chat_template_invalid',
  'invalid_model',
  (p: { reason: string }) => `the model's chat template could not be parsed: ${p.reason}`,
);

// weights (a checkpoint's safetensors files)
export const weightIndexInvalid = defineError(
  'weight_index_invalid',
  'invalid_checkpoint',
  (p: { problem: string }) => `model.safetensors.index.json ${p.problem}`,
);
export const weightsMissing = defineError('weights_missing', 'invalid_checkpoint', (p: { what: string }) => p.what);
export const weightTensorDuplicate = defineError(
  'weight_tensor_duplicate',
  'invalid_checkpoint',
  (p: { name: string }) => `tensor ${p.name} appears in two weight files`,
);
export const weightFilesScattered = defineError(
  'weight_files_scattered',
  'invalid_checkpoint',
  (p: { dir: string; folders: number }) => `the weight files of ${p.dir} resolve to ${p.folders} different folders; put them in one folder`,
);
export const weightTensorMissing = defineError(
  'weight_tensor_missing',
  'invalid_checkpoint',
  (p: { name: string }) => `checkpoint is missing tensor ${p.name}`,
);
export const weightTensorShape = defineError(
  'weight_tensor_shape',
  'invalid_checkpoint',
  (p: { name: string; shape: readonly number[]; expected: readonly number[] }) =>
    `tensor ${p.name} has shape [${p.shape.join(',')}], config.json implies [${p.expected.join(',')}]`,
);
export const weightDtypeUnsupported = defineError(
  'weight_dtype_unsupported',
  'unsupported_model',
  (p: { name: string; dtype: string }) => `tensor ${p.name} has dtype ${p.dtype}; supported: F32, F16, BF16`,
);
/** A safetensors file (a checkpoint's or an intervention's) whose header or layout is broken. */
export const safetensorsInvalid = defineError(
  'safetensors_invalid',
  'invalid_checkpoint',
  (p: { source: string; problem: string }) => `${p.source}: ${p.problem}`,
);
export const safetensorsDtypeUnsupported = defineError(
  'safetensors_dtype_unsupported',
  'invalid_checkpoint',
  (p: { name: string; dtype: string }) => `tensor "${p.name}" has dtype ${p.dtype}, expected F32, F16 or BF16`,
);
