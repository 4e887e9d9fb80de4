import { pyreftDimensionMismatch, pyreftFileMissing, pyreftFileUnexpected, pyreftShareWeightsOdd } from '../../errors.ts';
import { encodeSafetensors } from '../../model/safetensors.ts';
import { offloadTask } from '../../offload/task.ts';
import { parseArtifact, type ReftConfig } from '../artifact.ts';
import { formatPositions, parsePositions } from '../positions.ts';
import { convertStateDict, type ConvertedIntervention } from './class-mapping.ts';
import { parseSavedConfig, type SavedIntervention } from './saved-config.ts';
import { readStateDict } from './state-dict.ts';

/**
 * Converts what pyreft's `ReftModel.save` wrote (config.json + one intkey_*.bin per intervention)
 * into a reft/v1 artifact, validated for the base model before it is returned.
 */
export interface PyreftImportInput {
  /** The bytes of config.json. */
  config: Uint8Array;
  /** intkey_*.bin bytes by file name; exactly the files config.json's sorted_keys name. */
  files: Map<string, Uint8Array>;
  /** pyreft's position spec (`fN`, `lN`, `fN+lN`): pyreft does not store it. */
  positions: string;
  /** pyreft's `share_weights`: not stored either. */
  shareWeights: boolean;
  /** Optional reft/v1 `name`. */
  name?: string;
}

export interface PyreftBaseModel {
  hiddenSize: number;
  numLayers: number;
  architecture: string;
}

export interface PyreftImportResult {
  config: ReftConfig;
  /** reft_config.json. */
  configBytes: Uint8Array;
  /** reft_weights.safetensors (F32). */
  weightBytes: Uint8Array;
}

export async function importPyreft(input: PyreftImportInput, base: PyreftBaseModel): Promise<PyreftImportResult> {
  const saved = parseSavedConfig(input.config, base.numLayers);
  checkFilesMatch(saved, input.files);
  const positions = assignPositions(saved.length, input.positions, input.shareWeights);
  const converted: ConvertedIntervention[] = [];
  for (const entry of saved) converted.push(await convertOne(entry, input.files.get(entry.file) as Uint8Array, base.hiddenSize));
  const config = reftConfig(saved, converted, positions, base, input.name);
  const configBytes = new TextEncoder().encode(`${JSON.stringify(config, null, 2)}\n`);
  const weightBytes = encodeSafetensors(weightTensors(converted));
  parseArtifact(configBytes, weightBytes, base); // whatever leaves here is valid for the base model
  return { config, configBytes, weightBytes };
}

/** `importPyreft` in an offload pool thread (a task takes one argument). */
export function importPyreftUpload({ input, base }: { input: PyreftImportInput; base: PyreftBaseModel }): Promise<PyreftImportResult> {
  return importPyreft(input, base);
}

export const IMPORT_PYREFT = offloadTask(import.meta.url, { importPyreftUpload });

/** Every file sorted_keys names is there, and nothing else is. */
function checkFilesMatch(saved: SavedIntervention[], files: Map<string, Uint8Array>): void {
  for (const entry of saved) {
    if (!files.has(entry.file)) {
      throw pyreftFileMissing({ what: `config.json.sorted_keys.${entry.index} names ${entry.file}, which is missing` }, entry.file);
    }
  }
  const named = new Set(saved.map((s) => s.file));
  for (const name of files.keys()) {
    if (!named.has(name)) throw pyreftFileUnexpected({ file: name }, name);
  }
}

/**
 * pyreft's positions per intervention. With share_weights=false and fN+lN it trains one set for the
 * first N tokens (the first half, in sorted_keys order) and one for the last N (the second half).
 */
function assignPositions(count: number, spec: string, shareWeights: boolean): string[] {
  const p = parsePositions(spec, 'positions');
  if (shareWeights || !(p.first && p.last)) return new Array<string>(count).fill(formatPositions(p));
  if (count % 2 !== 0) {
    throw pyreftShareWeightsOdd({ spec, first: p.first, last: p.last, count }, 'share_weights');
  }
  const half = count / 2;
  return [...new Array<string>(half).fill(`f${p.first}`), ...new Array<string>(half).fill(`l${p.last}`)];
}

/** reft/v1's largest rank (artifact.ts). */
const MAX_RANK = 1024;

/**
 * Elements one intervention's state dict may declare: a few [rank, d] matrices and rank-vectors,
 * rank at most min(d, MAX_RANK). Anything larger cannot be an intervention for this model.
 */
export function stateDictElementLimit(d: number): number {
  const rank = Math.min(d, MAX_RANK);
  return 4 * rank * d + 4 * rank;
}

async function convertOne(entry: SavedIntervention, bytes: Uint8Array, d: number): Promise<ConvertedIntervention> {
  if (entry.dimension !== d) {
    const field = `config.json.intervention_dimensions.${entry.index}`;
    throw pyreftDimensionMismatch({ field, problem: `is ${entry.dimension} but the model's hidden size is ${d}` }, field);
  }
  const out = convertStateDict(entry.pyreftClass, await readStateDict(bytes, entry.file, stateDictElementLimit(d)), d, entry.file);
  if (entry.lowRankDimension !== null && entry.lowRankDimension !== out.rank) {
    const field = `config.json.representations.${entry.index}.low_rank_dimension`;
    throw pyreftDimensionMismatch({ field, problem: `is ${entry.lowRankDimension} but ${entry.file} holds rank ${out.rank}` }, field);
  }
  return out;
}

/** reft_config.json in the key order of the reference artifacts. */
function reftConfig(saved: SavedIntervention[], converted: ConvertedIntervention[], positions: string[], base: PyreftBaseModel, name?: string): ReftConfig {
  return {
    format: 'reft/v1',
    base_model: { architecture: base.architecture, hidden_size: base.hiddenSize, num_hidden_layers: base.numLayers },
    interventions: saved.map((s, i) => ({ kind: converted[i].kind, layer: s.layer, rank: converted[i].rank, positions: positions[i] })),
    ...(name !== undefined ? { name } : {}),
  };
}

function weightTensors(converted: ConvertedIntervention[]): Record<string, { shape: number[]; data: Float32Array }> {
  const out: Record<string, { shape: number[]; data: Float32Array }> = {};
  converted.forEach((c, i) => {
    for (const [name, t] of Object.entries(c.tensors)) out[`interventions.${i}.${name}`] = t;
  });
  return out;
}
