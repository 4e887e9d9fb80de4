import type { LowRankIntervention } from './artifact.ts';
import { parsePositions, type PositionSpec } from './positions.ts';

/**
 * An intervention as one request applies it (REFT.md "Request-time control"). Spread from the
 * cached artifact's LowRankIntervention ({...iv, strength, positions, item}) so the factors are
 * shared, never copied; `key` stays the artifact's so rows share rank columns.
 */
export interface RequestIntervention extends LowRankIntervention {
  /** a in h + a·c(h)·A; default 1. */
  strength?: number;
  /** Index of the request item (artifact) it came from, which `applied` is grouped by; default 0. */
  item?: number;
}

/** One request item's settings for its artifact (REFT.md "Request-time control"). */
export interface SteerSettings {
  /** Default 1. */
  strength?: number;
  /** The artifact's layers to keep (default all); the caller has checked they are the artifact's. */
  layers?: readonly number[];
  /** A spec (`fN`, `lN`, `fN+lN`) replacing every intervention's own; default: their own. */
  positions?: string | PositionSpec;
}

/**
 * The interventions of one request item: the artifact's, on the kept layers, in its config's
 * order, each with the item's strength and positions. A bad positions spec is a
 * positions_invalid error naming `interventions.<item>.positions`.
 */
export function steer(interventions: readonly LowRankIntervention[], settings: SteerSettings = {}, item = 0): RequestIntervention[] {
  const { strength, layers } = settings;
  const positions =
    typeof settings.positions === 'string' ? parsePositions(settings.positions, `interventions.${item}.positions`) : settings.positions;
  const kept = layers ? interventions.filter((iv) => layers.includes(iv.layer)) : interventions;
  return kept.map((iv) => ({
    ...iv,
    ...(positions ? { positions } : {}),
    ...(strength !== undefined ? { strength } : {}),
    item,
  }));
}
