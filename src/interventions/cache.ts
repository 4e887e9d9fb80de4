import { LRUCache } from 'lru-cache';
import { interventionNotFound } from '../errors.ts';
import type { Store } from '../storage/store.ts';
import { parseArtifact, type BaseModelShape, type LowRankIntervention } from './artifact.ts';

/**
 * Parsed interventions, loaded on first use and kept in an LRU bounded in bytes. Entries are
 * keyed by id and version, and `invalidate` drops an id when it is deleted or replaced. The
 * factors live in SharedArrayBuffers so handing them to the engine thread copies nothing.
 */
export interface ResolvedIntervention {
  id: string;
  version: number;
  interventions: LowRankIntervention[];
}

export class InterventionCache {
  private readonly lru: LRUCache<string, ResolvedIntervention>;
  hits = 0;
  misses = 0;

  constructor(
    private readonly store: Store,
    private readonly base: BaseModelShape,
    maxBytes: number,
    private readonly onLookup: (hit: boolean) => void = () => {},
  ) {
    this.lru = new LRUCache({
      maxSize: maxBytes,
      sizeCalculation: (v) => Math.max(1, v.interventions.reduce((s, iv) => s + 4 * (iv.down.length + iv.bias.length + iv.up.length), 0)),
    });
  }

  /**
   * The intervention `idOrName` as `tenantId` sees it, or a 404 on `field` (the request field
   * that named it) that doesn't say whose it is.
   */
  async resolve(tenantId: string | null, idOrName: string, field = 'intervention'): Promise<ResolvedIntervention> {
    const meta = await this.store.findIntervention(tenantId, idOrName);
    if (!meta) throw interventionNotFound({ id: idOrName }, field);
    const cached = this.lru.get(meta.id);
    if (cached && cached.version === meta.version) {
      this.hits++;
      this.onLookup(true);
      return cached;
    }
    this.misses++;
    this.onLookup(false);
    const files = await this.store.readInterventionFiles(meta.id);
    if (!files) throw interventionNotFound({ id: idOrName }, field);
    // validated value by value when it was stored; here the structure is enough
    // factors straight into shared memory: first use allocates (and later collects) less
    const artifact = parseArtifact(files.config, files.weights, this.base, { verifyValues: false, allocate: sharedFloats });
    const resolved: ResolvedIntervention = {
      id: meta.id,
      version: meta.version,
      interventions: artifact.interventions.map((iv, i) => ({ ...iv, key: `${meta.id}@${meta.version}#${i}` })),
    };
    this.lru.set(meta.id, resolved);
    return resolved;
  }

  invalidate(id: string): void {
    this.lru.delete(id);
  }

  get byteSize(): number {
    return this.lru.calculatedSize;
  }
}

function sharedFloats(length: number): Float32Array {
  return new Float32Array(new SharedArrayBuffer(4 * length));
}
