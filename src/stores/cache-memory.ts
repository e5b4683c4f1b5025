import type { CacheStore, CachedEntry } from '../cache/store.js'
import { entrySize } from '../cache/store.js'

interface Slot {
  primary: string
  entry: CachedEntry
  size: number
  expires: number
  /** The store's insertion count when this slot was last (re)inserted. */
  seq: number
}

/**
 * In-process response store: an LRU over variants, bounded by `maxBytes` (bodies, headers and
 * keys counted). A Map keeps insertion order, so re-inserting on use makes the first key the
 * least recently used one. A hit re-inserts only a slot in the older half of that order (lazy
 * promotion, as CLOCK-like caches do): a delete and re-insert on every hit rebuilt the Map's
 * table every few hundred hits, and the replaced tables chained into the old generation
 * (src/inflight.ts). A slot in the newer half is not near eviction anyway.
 */
export class MemoryCacheStore implements CacheStore {
  private readonly slots = new Map<string, Slot>()
  /** primary key -> its variant slot keys */
  private readonly index = new Map<string, Set<string>>()
  private bytes = 0
  private seq = 0
  readonly maxBytes: number

  constructor (maxBytes: number) {
    this.maxBytes = maxBytes
  }

  get size (): number { return this.bytes }

  async get (key: string): Promise<CachedEntry[]> {
    const variants = this.index.get(key)
    if (variants === undefined) return []
    const now = Date.now()
    const out: CachedEntry[] = []
    for (const slotKey of [...variants]) {
      const slot = this.slots.get(slotKey) as Slot
      if (slot.expires <= now) { this.remove(slotKey); continue }
      if (this.seq - slot.seq > this.slots.size / 2) {
        this.slots.delete(slotKey)
        this.slots.set(slotKey, slot)
        slot.seq = ++this.seq
      }
      out.push(slot.entry)
    }
    return out.sort((a, b) => b.responseTime - a.responseTime)
  }

  async set (key: string, entry: CachedEntry, ttl: number): Promise<void> {
    const slotKey = key + '\u0000' + entry.variant
    this.remove(slotKey)
    const size = entrySize(slotKey, entry)
    if (size > this.maxBytes) return
    while (this.bytes + size > this.maxBytes) {
      const oldest = this.slots.keys().next().value as string
      this.remove(oldest)
    }
    this.slots.set(slotKey, { primary: key, entry, size, expires: Date.now() + ttl, seq: ++this.seq })
    this.bytes += size
    let variants = this.index.get(key)
    if (variants === undefined) this.index.set(key, variants = new Set())
    variants.add(slotKey)
  }

  async delete (key: string): Promise<number> {
    const variants = this.index.get(key)
    if (variants === undefined) return 0
    for (const slotKey of [...variants]) this.remove(slotKey)
    return 1
  }

  async purgeRoute (route: string): Promise<number> {
    const primaries = new Set<string>()
    for (const [slotKey, slot] of this.slots) {
      if (slot.entry.route === route) { primaries.add(slot.primary); this.remove(slotKey) }
    }
    return primaries.size
  }

  async close (): Promise<void> {
    this.slots.clear()
    this.index.clear()
    this.bytes = 0
  }

  private remove (slotKey: string): void {
    const slot = this.slots.get(slotKey)
    if (slot === undefined) return
    this.slots.delete(slotKey)
    this.bytes -= slot.size
    const variants = this.index.get(slot.primary)
    variants?.delete(slotKey)
    if (variants?.size === 0) this.index.delete(slot.primary)
  }
}
