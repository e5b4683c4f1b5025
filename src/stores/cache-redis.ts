import type { Redis } from 'ioredis'
import type { CacheStore, CachedEntry } from '../cache/store.js'
import { decodeEntry, encodeEntry } from '../cache/store.js'

/**
 * Response store shared by every gateway instance: one Redis hash per URL (`<prefix>cache:<url>`),
 * one field per variant, the hash expiring with its longest-lived variant; and one set per route
 * listing its URLs, for purge by route (it lives as long as its longest-lived URL). Redis errors
 * make the cache miss, never fail a request.
 */
export class RedisCacheStore implements CacheStore {
  private readonly redis: Redis
  private readonly prefix: string
  private readonly connected: Promise<void>

  constructor (redis: Redis, keyPrefix: string, connectTimeout = 2000) {
    this.redis = redis
    this.prefix = keyPrefix + 'cache:'
    // The shared client has no offline queue: commands sent before the first connection fail.
    // Until then (bounded), a command waits for it; after it, an outage fails commands at once.
    this.connected = redis.status === 'ready'
      ? Promise.resolve()
      : new Promise<void>((resolve) => {
        const timer = setTimeout(done, connectTimeout)
        function done (): void { clearTimeout(timer); redis.off('ready', done); resolve() }
        redis.once('ready', done)
      })
  }

  private key (primary: string): string { return this.prefix + 'u:' + primary }
  private routeKey (route: string): string { return this.prefix + 'r:' + route }

  async get (key: string): Promise<CachedEntry[]> {
    let fields: Record<string, Buffer>
    await this.connected
    try {
      fields = await this.redis.hgetallBuffer(this.key(key))
    } catch {
      return []
    }
    const out: CachedEntry[] = []
    for (const value of Object.values(fields)) {
      const entry = decodeEntry(value)
      if (entry !== undefined) out.push(entry)
    }
    return out.sort((a, b) => b.responseTime - a.responseTime)
  }

  async set (key: string, entry: CachedEntry, ttl: number): Promise<void> {
    const k = this.key(key)
    const ms = Math.max(1000, Math.ceil(ttl))
    await this.connected
    try {
      // PEXPIRE ... GT keeps the longest TTL of the variants; a new hash has none, so set it first.
      await this.redis.multi()
        .hset(k, entry.variant, encodeEntry(entry))
        .pexpire(k, ms, 'NX')
        .pexpire(k, ms, 'GT')
        .sadd(this.routeKey(entry.route), key)
        .pexpire(this.routeKey(entry.route), ms, 'NX')
        .pexpire(this.routeKey(entry.route), ms, 'GT')
        .exec()
    } catch {
      // The cache is an optimisation: a failed store only costs a later miss.
    }
  }

  async delete (key: string): Promise<number> {
    await this.connected
    try {
      return await this.redis.del(this.key(key))
    } catch {
      return 0
    }
  }

  async purgeRoute (route: string): Promise<number> {
    const rk = this.routeKey(route)
    let removed = 0
    await this.connected
    try {
      let cursor = '0'
      do {
        const [next, keys] = await this.redis.sscan(rk, cursor, 'COUNT', 500)
        cursor = next
        if (keys.length > 0) removed += await this.redis.del(...keys.map((k) => this.key(k)))
      } while (cursor !== '0')
      await this.redis.del(rk)
    } catch {
      return removed
    }
    return removed
  }

  async close (): Promise<void> {
    // The client is the process's shared one (src/redis.ts); its owner closes it.
  }
}
