/**
 * Request collapsing: the first miss for a key goes upstream (the leader); concurrent misses for
 * the same key wait until the leader's response is stored (or not), then look the cache up again.
 * A waiter waits at most `bound` ms, then goes upstream itself.
 */
export class Collapser {
  private readonly pending = new Map<string, { done: Promise<void>, release: () => void }>()

  /** Becomes the leader for `key` (returns its release function), or undefined when one exists. */
  lead (key: string): (() => void) | undefined {
    if (this.pending.has(key)) return undefined
    let release!: () => void
    const done = new Promise<void>((resolve) => { release = resolve })
    const slot = { done, release: () => { if (this.pending.get(key) === slot) this.pending.delete(key); release() } }
    this.pending.set(key, slot)
    return slot.release
  }

  /** Waits for the leader of `key`; false when there is none. */
  async wait (key: string, bound: number): Promise<boolean> {
    const slot = this.pending.get(key)
    if (slot === undefined) return false
    let timer: NodeJS.Timeout | undefined
    await Promise.race([slot.done, new Promise<void>((resolve) => { timer = setTimeout(resolve, bound) })])
    clearTimeout(timer)
    return true
  }
}
