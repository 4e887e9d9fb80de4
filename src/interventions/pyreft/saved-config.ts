import { artifactConfigTooDeep, pyreftConfigInvalid, pyreftConfigNotJson } from '../../errors.ts';
import { MAX_JSON_DEPTH, jsonDepth } from '../../limits/json-depth.ts';

/**
 * The `config.json` pyvene's `IntervenableModel.save` writes next to the `intkey_*.bin` files
 * (fixtures/pyreft/README.md "config.json"). Entry i of `representations`, `intervention_types`,
 * `sorted_keys` and `intervention_dimensions` is one intervention; everything here is checked
 * against what reft/v1 can express, and anything else is refused naming the field.
 */
const PYREFT_CLASSES = [
  'LoreftIntervention',
  'NoreftIntervention',
  'NodireftIntervention',
  'DireftIntervention',
  'ConsreftIntervention',
  'LobireftIntervention',
] as const;
export type PyreftClass = (typeof PYREFT_CLASSES)[number];

export interface SavedIntervention {
  index: number;
  pyreftClass: PyreftClass;
  layer: number;
  /** `low_rank_dimension`: null when pyreft left it unset; checked against the tensors later. */
  lowRankDimension: number | null;
  /** `intervention_dimensions[i]`. */
  dimension: number;
  /** `intkey_<sorted_keys[i]>.bin`. */
  file: string;
}

const CONFIG = 'config.json';

/** Representation slots by position; pyvene before 0.1.3 has no `latent_dim` (13 entries). */
const SLOT = {
  layer: 0,
  component: 1,
  unit: 2,
  maxNumberOfUnits: 3,
  lowRankDimension: 4,
  subspacePartition: 7,
  interventionLinkKey: 9,
} as const;

/** The file names `sorted_keys` names, in order (for reading a folder before anything else). */
export function savedFileNames(configBytes: Uint8Array): string[] {
  const json = parseJson(configBytes);
  return stringArray(json, 'sorted_keys').map((key, i) => fileForKey(key, i));
}

/** Parses and checks config.json; `layers` bounds the layer of each intervention. */
export function parseSavedConfig(configBytes: Uint8Array, layers: number): SavedIntervention[] {
  const json = parseJson(configBytes);
  const keys = stringArray(json, 'sorted_keys');
  const types = stringArray(json, 'intervention_types');
  const dims = array(json, 'intervention_dimensions');
  const reps = array(json, 'representations');
  if (keys.length === 0) throw fail('sorted_keys', 'names no interventions');
  for (const [name, list] of [['intervention_types', types], ['intervention_dimensions', dims], ['representations', reps]] as const) {
    if (list.length !== keys.length) throw fail(name, `has ${list.length} entries but sorted_keys has ${keys.length}`);
  }
  checkConstantSources(json, keys.length);
  const files = keys.map((key, i) => fileForKey(key, i));
  const dup = files.find((f, i) => files.indexOf(f) !== i);
  if (dup !== undefined) throw fail('sorted_keys', `names ${dup} twice`);
  return keys.map((_, i) => ({
    index: i,
    pyreftClass: parseClass(types[i], i),
    ...parseRepresentation(reps[i], i, layers),
    dimension: positiveInt(dims[i], `intervention_dimensions.${i}`),
    file: files[i],
  }));
}

/** `sorted_keys[i]` → `intkey_<key>.bin`, taken verbatim (both pyvene spellings) but never a path. */
function fileForKey(key: string, i: number): string {
  if (key === '' || /[/\\\0]/.test(key)) throw fail(`sorted_keys.${i}`, `${JSON.stringify(key)} is not a usable key (empty or contains a path separator)`);
  return `intkey_${key}.bin`;
}

/** `"<class 'pyreft.interventions.LoreftIntervention'>"` → `LoreftIntervention`. */
function parseClass(type: string, i: number): PyreftClass {
  const m = /^<class 'pyreft\.interventions\.(\w+)'>$/.exec(type);
  const name = m?.[1] as PyreftClass | undefined;
  if (name === undefined || !PYREFT_CLASSES.includes(name)) {
    throw fail(`intervention_types.${i}`, `${JSON.stringify(type)} is not supported (one of pyreft.interventions ${PYREFT_CLASSES.join(', ')})`);
  }
  return name;
}

function parseRepresentation(rep: unknown, i: number, layers: number): { layer: number; lowRankDimension: number | null } {
  const field = `representations.${i}`;
  if (!Array.isArray(rep) || (rep.length !== 13 && rep.length !== 14)) {
    throw fail(field, 'must be a list of 13 or 14 entries [layer, component, unit, max_number_of_units, low_rank_dimension, ...]');
  }
  const slot = (name: keyof typeof SLOT) => rep[SLOT[name]] as unknown;
  if (slot('unit') !== 'pos') throw fail(`${field}.unit`, `unit ${JSON.stringify(slot('unit'))} is not supported (only "pos")`);
  if (slot('maxNumberOfUnits') !== 1) throw fail(`${field}.max_number_of_units`, `is ${JSON.stringify(slot('maxNumberOfUnits'))}; only 1 is supported`);
  if (slot('subspacePartition') !== null) throw fail(`${field}.subspace_partition`, 'must be null (subspace interventions are not supported)');
  if (slot('interventionLinkKey') !== null) throw fail(`${field}.intervention_link_key`, 'must be null (linked interventions are not supported)');
  const layer = layerOf(slot('component'), slot('layer'), field);
  if (layer >= layers) throw fail(`${field}.layer`, `layer ${layer} is out of range (the model has ${layers} layers)`);
  const rank = slot('lowRankDimension');
  return { layer, lowRankDimension: rank === null ? null : positiveInt(rank, `${field}.low_rank_dimension`) };
}

/** `block_output` at representation[0], or a module path `[base_model.model.]model.layers[N].output`. */
function layerOf(component: unknown, layerSlot: unknown, field: string): number {
  if (component === 'block_output') return nonNegativeInt(layerSlot, `${field}.layer`);
  const m = typeof component === 'string' ? /^(?:base_model\.model\.)?model\.layers\[(\d+)\]\.output$/.exec(component) : null;
  if (m) return Number(m[1]); // representation[0] holds pyvene's default 0 here: ignored
  throw fail(`${field}.component`, `component ${JSON.stringify(component)} is not supported (block_output or model.layers[N].output)`);
}

/** reft/v1 interventions take no source input: every source must be pyvene's constant one. */
function checkConstantSources(json: Record<string, unknown>, n: number): void {
  if (!('intervention_constant_sources' in json)) return;
  const sources = array(json, 'intervention_constant_sources');
  if (sources.length !== n) throw fail('intervention_constant_sources', `has ${sources.length} entries but sorted_keys has ${n}`);
  const k = sources.findIndex((s) => s !== true);
  if (k >= 0) throw fail(`intervention_constant_sources.${k}`, 'must be true (interventions with a source input are not supported)');
}

function parseJson(bytes: Uint8Array): Record<string, unknown> {
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch {
    throw pyreftConfigNotJson({ problem: 'is not valid JSON' }, CONFIG);
  }
  if (jsonDepth(json, MAX_JSON_DEPTH) > MAX_JSON_DEPTH) throw artifactConfigTooDeep({ file: CONFIG, limit: MAX_JSON_DEPTH }, CONFIG);
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw pyreftConfigNotJson({ problem: 'is not a JSON object' }, CONFIG);
  return json as Record<string, unknown>;
}

function array(json: Record<string, unknown>, key: string): unknown[] {
  const v = json[key];
  if (!Array.isArray(v)) throw fail(key, v === undefined ? 'is missing (not a pyvene/pyreft config.json?)' : 'must be a list');
  return v;
}

function stringArray(json: Record<string, unknown>, key: string): string[] {
  const v = array(json, key);
  const k = v.findIndex((s) => typeof s !== 'string');
  if (k >= 0) throw fail(`${key}.${k}`, 'must be a string');
  return v as string[];
}

function nonNegativeInt(v: unknown, field: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw fail(field, `must be a non-negative integer, got ${JSON.stringify(v)}`);
  return v;
}

function positiveInt(v: unknown, field: string): number {
  if (nonNegativeInt(v, field) === 0) throw fail(field, 'must be positive');
  return v as number;
}

function fail(field: string, message: string) {
  const path = `${CONFIG}.${field}`;
  return pyreftConfigInvalid({ field: path, problem: message }, path);
}
