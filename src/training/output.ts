import { KIND_TENSORS, parseArtifact, type Artifact, type InterventionSpec, type ReftConfig } from '../interventions/artifact.ts';
import { formatPositions } from '../interventions/positions.ts';
import type { ModelConfig } from '../model/config.ts';
import { encodeSafetensors } from '../model/safetensors.ts';
import { tensorShape, type KindTensors } from './kinds.ts';

/** A trained intervention as the two reft/v1 files, already validated against the base model. */
export interface TrainedArtifact {
  /** reft_config.json */
  configJson: string;
  /** reft_weights.safetensors */
  weights: Uint8Array;
  /** The parsed, validated form (what the engine loads). */
  parsed: Artifact;
}

export interface ArtifactInfo {
  name?: string;
  description?: string;
  metadata?: Record<string, string>;
}

export function buildArtifact(
  specs: readonly InterventionSpec[],
  params: readonly KindTensors[],
  model: ModelConfig,
  info: ArtifactInfo = {},
): TrainedArtifact {
  const config: ReftConfig = {
    format: 'reft/v1',
    base_model: { architecture: model.architecture, hidden_size: model.hiddenSize, num_hidden_layers: model.numLayers },
    interventions: specs.map((s) => ({
      kind: s.kind,
      layer: s.layer,
      rank: s.rank,
      positions: formatPositions(s.positions),
      component: 'block_output' as const,
    })),
    // unset ones are undefined, which JSON leaves out
    name: info.name,
    description: info.description,
    metadata: info.metadata,
  };
  const tensors: Record<string, { shape: number[]; data: Float32Array }> = {};
  specs.forEach((s, i) => {
    for (const name of KIND_TENSORS[s.kind])
      tensors[`interventions.${i}.${name}`] = { shape: tensorShape(name, s.rank, model.hiddenSize), data: params[i][name] };
  });
  const configJson = `${JSON.stringify(config, null, 2)}\n`;
  const weights = encodeSafetensors(tensors);
  // what we write must be what we would accept
  const parsed = parseArtifact(configJson, weights, { hiddenSize: model.hiddenSize, numLayers: model.numLayers });
  return { configJson, weights, parsed };
}
