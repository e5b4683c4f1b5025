const kSlot = Symbol('gatehouse.inflight.slot')
type Slotted = object & { [kSlot]?: number }

/**
 * The objects in flight (responses being served): add one, remove it once, walk the rest; no
 * allocation per item once the array has grown to the peak concurrency.
 *
 * Not a Set. A Set that gains and loses an entry per request rebuilds its hash table every few
 * hundred requests, and V8 links each replaced table to its successor (for iterators that may
 * still walk it). When one replaced table has reached the old generation (young collections
 * come every few milliseconds right after an idle spell, when V8 has shrunk the young
 * generation), the scavenger treats it as alive until the next full collection, so the next
 * table survives with every response it ever held, gets promoted in turn, and links the one
 * after: a chain that renews itself for as long as traffic flows, through full collections.
 * Measured on the plain route: 20 % of all allocation promoted to the old generation (4.5 %
 * without the Set), a page fault per request, and young collections ten times slower. An array
 * holds no link to its previous backing store, and a removed slot is cleared at once.
 */
export class InFlight<T extends object> {
  private readonly items: T[] = []

  get size (): number { return this.items.length }

  add (item: T): void {
    (item as Slotted)[kSlot] = this.items.length
    this.items.push(item)
  }

  /** Removes `item`; false if it was not (or no longer) in flight. */
  delete (item: T): boolean {
    const slot = (item as Slotted)[kSlot]
    if (slot === undefined || slot < 0 || this.items[slot] !== item) return false
    const last = this.items.pop() as T
    if (last !== item) {
      this.items[slot] = last
      ;(last as Slotted)[kSlot] = slot
    }
    (item as Slotted)[kSlot] = -1
    return true
  }

  /** A snapshot: removing items while walking it is safe. */
  values (): T[] { return this.items.slice() }
}
