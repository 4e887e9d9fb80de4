/**
 * Which prompt blocks the runner holds (the prefix cache's bookkeeping, on the scheduler's side:
 * the runner holds the keys and values by block id and does what the plans say). A block is
 * found by its key (src/prefix-cache/block-keys.ts); `match` gives the longest run of a prompt's
 * blocks held from its start, `allocate` ids for the ones a prefill will save, within the
 * byte budget, evicting the least recently used blocks no step in flight uses.
 *
 * A block is copied into a row's own cache when the row starts, so a running row never depends
 * on one: a block is pinned only from the plan that loads or saves it until that plan has run.
 */
export type BlockId = number;

interface Block {
  id: BlockId;
  key: string;
  /** Saved by the runner (until then no prompt may load it). */
  ready: boolean;
  pins: number;
}

export interface PrefixCacheStats {
  blocks: number;
  bytes: number;
  evictions: number;
}

export class PrefixCache {
  /** By key, least recently used first (a use moves a block to the end). */
  private readonly blocks = new Map<string, Block>();
  private readonly byId = new Map<BlockId, Block>();
  private nextId = 1;
  /** Evicted since the last plan: the next one has the runner free them. */
  private dropped: BlockId[] = [];
  private evictions = 0;

  constructor(
    readonly budgetBytes: number,
    readonly blockBytes: number,
  ) {}

  get stats(): PrefixCacheStats {
    return { blocks: this.blocks.size, bytes: this.blocks.size * this.blockBytes, evictions: this.evictions };
  }

  /** The saved blocks of `keys` from the first on, up to the first that is not held; each is used (and pinned). */
  match(keys: readonly string[]): BlockId[] {
    const ids: BlockId[] = [];
    for (const key of keys) {
      const block = this.blocks.get(key);
      if (!block?.ready) break;
      this.use(block);
      block.pins++;
      ids.push(block.id);
    }
    return ids;
  }

  /** How many of `keys`, from the first on, are held and saved (nothing is used or pinned). */
  peek(keys: readonly string[]): number {
    let n = 0;
    while (n < keys.length && this.blocks.get(keys[n])?.ready) n++;
    return n;
  }

  /** Evicts the least recently used unpinned blocks until the blocks hold at most `bytes` (rows on a device take their memory). */
  shrink(bytes: number): void {
    for (const block of this.blocks.values()) {
      if (this.blocks.size * this.blockBytes <= bytes) return;
      if (block.pins > 0) continue;
      this.forget(block);
      this.evictions++;
    }
  }

  /**
   * Ids for saving the blocks of `keys` (from `first` on) not held yet, pinned: as many as fit the
   * budget once unpinned blocks are evicted, the earliest first. A block already held or being
   * saved by another prompt is skipped.
   */
  allocate(keys: readonly string[], first: number): Array<{ index: number; id: BlockId }> {
    const out: Array<{ index: number; id: BlockId }> = [];
    for (let index = first; index < keys.length; index++) {
      const held = this.blocks.get(keys[index]);
      if (held) {
        this.use(held);
        continue;
      }
      if (!this.makeRoom()) break;
      const block: Block = { id: this.nextId++, key: keys[index], ready: false, pins: 1 };
      this.blocks.set(block.key, block);
      this.byId.set(block.id, block);
      out.push({ index, id: block.id });
    }
    return out;
  }

  /** The runner saved these blocks: prompts may load them from now on. */
  saved(ids: Iterable<BlockId>): void {
    for (const id of ids) {
      const block = this.byId.get(id);
      if (block) block.ready = true;
    }
  }

  /** The plan that pinned these has run. A block it was to save and did not (its prefill failed) is forgotten. */
  unpin(ids: Iterable<BlockId>): void {
    for (const id of ids) {
      const block = this.byId.get(id);
      if (!block) continue;
      block.pins--;
      if (!block.ready && block.pins === 0) this.forget(block);
    }
  }

  /** Blocks evicted since the last call, for the runner to free. */
  takeDropped(): BlockId[] {
    return this.dropped.splice(0);
  }

  private use(block: Block): void {
    this.blocks.delete(block.key);
    this.blocks.set(block.key, block);
  }

  /** Whether one more block fits, after evicting the least recently used unpinned ones. */
  private makeRoom(): boolean {
    this.shrink(this.budgetBytes - this.blockBytes);
    return (this.blocks.size + 1) * this.blockBytes <= this.budgetBytes;
  }

  private forget(block: Block): void {
    this.blocks.delete(block.key);
    this.byId.delete(block.id);
    this.dropped.push(block.id);
  }
}
