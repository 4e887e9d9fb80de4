import { defineError } from './reft-error.ts';

/** Interventions: the reft/v1 artifact, positions, stored interventions, and pyreft imports. */

// the reft/v1 artifact (reft_config.json + reft_weights.safetensors)
export const artifactConfigNotJson = defineError(
  'artifact_config_not_json',
  'invalid_intervention',
  () => 'reft_config.json is not valid JSON',
);
export const artifactConfigTooDeep = defineError(
  'artifact_config_too_deep',
  'invalid_intervention',
  (p: { file: string; limit: number }) => `${p.file} nests deeper than ${p.limit} levels (the JSON depth limit)`,
);
export const artifactConfigInvalid = defineError(
  'artifact_config_invalid',
  'invalid_intervention',
  (p: { field: string; problem: string }) => `${p.field}: ${p.problem}`,
);
export const artifactModelMismatch = defineError(
  'artifact_model_mismatch',
  'invalid_intervention',
  (p: { key: string; theirs: number; ours: number }) => `base_model.${p.key} is ${p.theirs}, the model's is ${p.ours}`,
);
export const interventionLayerOutOfRange = defineError(
  'intervention_layer_out_of_range',
  'invalid_intervention',
  (p: { at: string; layer: number; layers: number }) => `${p.at} ${p.layer} is out of range (the model has ${p.layers} layers)`,
);
export const artifactTensorUnexpected = defineError(
  'artifact_tensor_unexpected',
  'invalid_intervention',
  (p: { name: string }) => `reft_weights.safetensors has unexpected tensor ${p.name}`,
);
export const artifactTensorMissing = defineError(
  'artifact_tensor_missing',
  'invalid_intervention',
  (p: { name: string; kind: string }) => `reft_weights.safetensors is missing tensor ${p.name} (kind ${p.kind})`,
);
export const artifactTensorDtype = defineError(
  'artifact_tensor_dtype',
  'invalid_intervention',
  (p: { name: string; dtype: string }) => `tensor ${p.name} has dtype ${p.dtype}; expected F32, F16 or BF16`,
);
export const artifactTensorShape = defineError(
  'artifact_tensor_shape',
  'invalid_intervention',
  (p: { name: string; shape: readonly number[]; expected: readonly number[]; rank: number }) =>
    `tensor ${p.name} has shape [${p.shape.join(',')}], expected [${p.expected.join(',')}] for rank ${p.rank}`,
);
export const artifactTensorNonFinite = defineError(
  'artifact_tensor_non_finite',
  'invalid_intervention',
  (p: { name: string; index: number }) => `tensor ${p.name} has a non-finite value at index ${p.index}`,
);
export const artifactRotationNotOrthonormal = defineError(
  'artifact_rotation_not_orthonormal',
  'invalid_intervention',
  (p: { name: string; problem: string }) => `tensor ${p.name}: ${p.problem}`,
);
/** reft_weights.safetensors itself is broken (its header or layout). */
export const artifactWeightsInvalid = defineError(
  'artifact_weights_invalid',
  'invalid_intervention',
  (p: { problem: string }) => p.problem,
);
export const artifactFileUnreadable = defineError(
  'artifact_file_unreadable',
  'invalid_intervention',
  (p: { dir: string; file: string; expected: string }) => `${p.dir} has no readable ${p.file}; an intervention folder holds ${p.expected}`,
);

// positions (fN, lN, fN+lN)
export const positionsInvalid = defineError(
  'positions_invalid',
  'invalid_intervention',
  (p: { field: string; spec: string; problem: string }) => `${p.field}: "${p.spec}" ${p.problem}`,
);

// stored interventions
export const interventionNotFound = defineError('intervention_not_found', 'not_found', (p: { id: string }) => `no intervention "${p.id}"`);
export const interventionNameTaken = defineError(
  'intervention_name_taken',
  'conflict',
  (p: { name: string; hint?: string }) => `an intervention named "${p.name}" ${p.hint ? `exists; ${p.hint}` : 'already exists'}`,
);
export const interventionShared = defineError(
  'intervention_shared',
  'forbidden',
  (p: { id: string }) =>
    `intervention "${p.id}" is shared (registered from the server's interventions folder); it can't be deleted through the API`,
);
export const interventionReplaceMissing = defineError(
  'intervention_replace_missing',
  'not_found',
  (p: { id: string }) => `no intervention "${p.id}" to replace`,
);

// saved compositions (interventions applied together, by stored id)
export const compositionNotFound = defineError('composition_not_found', 'not_found', (p: { id: string }) => `no composition "${p.id}"`);
export const compositionNameTaken = defineError(
  'composition_name_taken',
  'conflict',
  (p: { name: string }) => `a composition named "${p.name}" already exists`,
);
export const compositionReplaceMissing = defineError(
  'composition_replace_missing',
  'not_found',
  (p: { id: string }) => `no composition "${p.id}" to replace`,
);
export const interventionInUse = defineError(
  'intervention_in_use',
  'conflict',
  (p: { id: string; compositions: readonly string[] }) =>
    `intervention "${p.id}" is used by composition(s) ${p.compositions.map((c) => `"${c}"`).join(', ')}; delete or change them first`,
);

// pyreft imports (config.json + intkey_*.bin torch zips holding allowlisted pickles)
export const pyreftConfigMissing = defineError(
  'pyreft_config_missing',
  'invalid_request',
  () => 'missing part "config" (pyreft\'s config.json)',
);
export const pyreftPositionsMissing = defineError(
  'pyreft_positions_missing',
  'invalid_request',
  () => 'missing field "positions" (pyreft does not store them: fN, lN or fN+lN)',
);
export const pyreftFileDuplicate = defineError(
  'pyreft_file_duplicate',
  'invalid_request',
  (p: { file: string }) => `file ${p.file} is given twice`,
);
export const pyreftFileMissing = defineError('pyreft_file_missing', 'invalid_intervention', (p: { what: string }) => p.what);
export const pyreftFileUnexpected = defineError(
  'pyreft_file_unexpected',
  'invalid_intervention',
  (p: { file: string }) => `${p.file} is not named by config.json's sorted_keys`,
);
export const pyreftFileTooLarge = defineError(
  'pyreft_file_too_large',
  'invalid_intervention',
  (p: { file: string; bytes: number; limit: number }) => `${p.file} is ${p.bytes} bytes (at most ${p.limit})`,
);
export const pyreftConfigNotJson = defineError(
  'pyreft_config_not_json',
  'invalid_intervention',
  (p: { problem: string }) => `config.json ${p.problem}`,
);
export const pyreftConfigInvalid = defineError(
  'pyreft_config_invalid',
  'invalid_intervention',
  (p: { field: string; problem: string }) => `${p.field}: ${p.problem}`,
);
export const pyreftShareWeightsOdd = defineError(
  'pyreft_share_weights_odd',
  'invalid_request',
  (p: { spec: string; first: number; last: number; count: number }) =>
    `share_weights=false with "${p.spec}" needs an even number of interventions (first half f${p.first}, second half l${p.last}); config.json has ${p.count}`,
);
export const pyreftDimensionMismatch = defineError(
  'pyreft_dimension_mismatch',
  'invalid_intervention',
  (p: { field: string; problem: string }) => `${p.field} ${p.problem}`,
);
/** A torch zip (intkey_*.bin) that isn't one, or whose records don't fit together. */
export const pyreftZipInvalid = defineError(
  'pyreft_zip_invalid',
  'invalid_intervention',
  (p: { file: string; problem: string }) => `${p.file}: ${p.problem}`,
);
/** A pickle outside the allowlist, or malformed, or over a limit: it is never run, only read. */
export const pyreftPickleRefused = defineError(
  'pyreft_pickle_refused',
  'invalid_intervention',
  (p: { file: string; problem: string }) => `${p.problem} in ${p.file}`,
);
export const pyreftPickleTooLarge = defineError(
  'pyreft_pickle_too_large',
  'invalid_intervention',
  (p: { file: string; bytes: number; limit: number }) =>
    `${p.file}: data.pkl is ${p.bytes} bytes, over the pickle limit of ${p.limit} bytes`,
);
/** A tensor's storage record, shape or strides that don't add up. */
export const pyreftTensorInvalid = defineError(
  'pyreft_tensor_invalid',
  'invalid_intervention',
  (p: { file: string; problem: string }) => `${p.file}: ${p.problem}`,
);
export const pyreftStateDictInvalid = defineError(
  'pyreft_state_dict_invalid',
  'invalid_intervention',
  (p: { file: string; problem: string }) => `${p.file}: ${p.problem}`,
);
/** A state dict that doesn't match its pyreft class (missing, extra or mis-shaped parameters). */
export const pyreftClassMismatch = defineError(
  'pyreft_class_mismatch',
  'invalid_intervention',
  (p: { file: string; problem: string }) => `${p.file}: ${p.problem}`,
);

// request-time control (REFT.md "Request-time control"): interventions lists and compositions
export const interventionsWithAdapter = defineError(
  'interventions_with_adapter',
  'invalid_request',
  (p: { other: string }) => `give \`${p.other}\` naming an intervention or \`interventions\`, not both`,
);
export const steerLayerNotInArtifact = defineError(
  'steer_layer_not_in_artifact',
  'invalid_request',
  (p: { field: string; layer: number; layers: readonly number[] }) =>
    `${p.field}: layer ${p.layer} is not one of the artifact's layers (${p.layers.join(', ')})`,
);
export const compositionNested = defineError(
  'composition_nested',
  'invalid_request',
  (p: { field: string; name: string }) =>
    `${p.field}: "${p.name}" is a composition; a list's items are interventions (list its items instead of nesting it)`,
);
export const quotaCompositions = defineError(
  'quota_compositions',
  'quota_exceeded',
  (p: { stored: number; limit: number }) => `${p.stored} compositions stored; the limit is ${p.limit} (delete one first)`,
);
