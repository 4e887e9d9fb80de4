/** A store's in-process listeners for one kind of change; it emits after its write has committed. */
export class Listeners<A extends unknown[]> {
  private readonly listeners = new Set<(...args: A) => void>();

  add(listener: (...args: A) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  emit(...args: A): void {
    for (const listener of [...this.listeners]) {
      try {
        listener(...args);
      } catch (e) {
        // A listener's bug must not fail the store call that already committed.
        process.emitWarning(`store listener threw: ${(e as Error)?.message ?? e}`);
      }
    }
  }
}
