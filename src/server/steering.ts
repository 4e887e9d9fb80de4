import { ReftError, compositionNested, interventionsWithAdapter, modelNotFound, steerLayerNotInArtifact } from '../errors.ts';
import type { LowRankIntervention } from '../interventions/artifact.ts';
import type { InterventionCache } from '../interventions/cache.ts';
import { parsePositions } from '../interventions/positions.ts';
import { steer, type RequestIntervention } from '../interventions/steer.ts';

/**
 * Request-time control (REFT.md): what a request asks to apply, resolved to the engine's
 * interventions. A request names one artifact or saved composition (`adapter`, OpenAI `model`),
 * or lists items; each item is one stored artifact with its own strength, layers and positions.
 * The artifacts come from the intervention cache, which holds each once: an item only wraps the
 * cached factors with its settings, it never copies them.
 */
export interface SteerItem {
  /** A stored intervention's id or name (never a composition). */
  intervention: string;
  strength?: number;
  layers?: number[];
  positions?: string;
}

/** A saved composition as steering needs it (the store's row has more). */
export interface SavedComposition {
  id: string;
  name: string;
  items: SteerItem[];
}

export interface CompositionLookup {
  findComposition(tenantId: string, idOrName: string): Promise<SavedComposition | null>;
}

export interface Steering {
  /** The intervention or composition id the request named by `adapter`/`model`; null for a list or the base model. */
  id: string | null;
  /** Each tagged with its request item (`applied` is grouped by item): 0 for `adapter`. */
  interventions: RequestIntervention[];
}

const BASE: Steering = { id: null, interventions: [] };

/** Names an item's field in errors: `interventions.1.layers` for a listed item. */
export type ItemField = (key: keyof SteerItem) => string;

/**
 * The item's interventions: its `layers` (each one of the artifact's) kept, its `positions`
 * replacing every intervention's spec, its `strength` and index attached.
 */
export function steerItem(
  artifact: readonly LowRankIntervention[],
  item: Omit<SteerItem, 'intervention'>,
  index: number,
  field: ItemField,
) {
  const layers = new Set(artifact.map((iv) => iv.layer));
  for (const layer of item.layers ?? []) {
    if (!layers.has(layer))
      throw steerLayerNotInArtifact({ field: field('layers'), layer, layers: [...layers].sort((a, b) => a - b) }, field('layers'));
  }
  const positions = item.positions === undefined ? undefined : parsePositions(item.positions, field('positions'));
  return steer(artifact, { strength: item.strength, layers: item.layers, positions }, index);
}

export class SteeringResolver {
  constructor(
    private readonly cache: () => InterventionCache,
    private readonly compositions: CompositionLookup,
  ) {}

  /**
   * What a request applies: `name` (an intervention or composition; the base model when
   * `isBase`), or the `items` list; both at once is a 400 on `interventions`.
   */
  async resolve(
    tenantId: string,
    named: { name: string | null | undefined; field: string; isBase: boolean },
    items: readonly SteerItem[] | undefined,
  ): Promise<Steering> {
    const hasName = named.name != null && !named.isBase;
    if (items && hasName) throw interventionsWithAdapter({ other: named.field }, 'interventions');
    if (items) return { id: null, ...(await this.resolveItems(tenantId, items, (i) => (key) => `interventions.${i}.${key}`)) };
    if (!hasName) return BASE;
    const name = named.name!;
    try {
      const artifact = await this.cache().resolve(tenantId, name, named.field);
      return { id: artifact.id, interventions: steerItem(artifact.interventions, {}, 0, () => named.field) };
    } catch (err) {
      if (!(err instanceof ReftError) || err.code !== 'intervention_not_found') throw err;
      const composition = await this.compositions.findComposition(tenantId, name);
      // an OpenAI `model` names the base model, an intervention or a composition: none is an unknown model
      if (!composition) throw named.field === 'model' ? modelNotFound({ id: name }, 'model') : err;
      // the composition's artifacts were checked when it was saved; one replaced since is checked again here
      return { id: composition.id, ...(await this.resolveItems(tenantId, composition.items, () => () => named.field)) };
    }
  }

  /** The items' interventions, in item order; `field(i)` names item i's fields in errors. */
  async resolveItems(
    tenantId: string,
    items: readonly SteerItem[],
    field: (i: number) => ItemField,
  ): Promise<{ interventions: RequestIntervention[]; ids: string[] }> {
    const interventions: RequestIntervention[] = [];
    const ids: string[] = [];
    for (const [i, item] of items.entries()) {
      const artifact = await this.artifact(tenantId, item.intervention, field(i)('intervention'));
      ids.push(artifact.id);
      interventions.push(...steerItem(artifact.interventions, item, i, field(i)));
    }
    return { interventions, ids };
  }

  /** A stored artifact by id or name; a composition there is a 400, nothing a 404 on `field`. */
  private async artifact(tenantId: string, name: string, field: string) {
    try {
      return await this.cache().resolve(tenantId, name, field);
    } catch (err) {
      if (err instanceof ReftError && err.code === 'intervention_not_found' && (await this.compositions.findComposition(tenantId, name))) {
        throw compositionNested({ field, name }, field);
      }
      throw err;
    }
  }
}
