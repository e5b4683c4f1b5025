import { createHash } from 'node:crypto'
import type { Redis } from 'ioredis'
import { Counter } from 'prom-client'
import type { FastifyBaseLogger } from 'fastify'
import { registry } from '../metrics.js'

/*
 * Rate-limit counters behind one small async interface. Both stores count with GCRA (the generic
 * cell rate algorithm): a key holds one number, its "theoretical arrival time". A limit of `max`
 * per `window` admits a burst of `max`, then one request every window/max; unlike
 * @fastify/rate-limit's fixed windows it never admits 2 x max across a window edge, and it needs
 * no per-request log. The Redis store runs the whole check-and-update as one Lua script, with
 * Redis's clock, so several gateway instances enforce one exact limit.
 */

export interface RateLimitResult {
  allowed: boolean
  /** Requests still admitted right now after this one. */
  remaining: number
  /** ms until the key is back to a full quota. */
  resetMs: number
  /** When refused, ms until the next request would be admitted; 0 when allowed. */
  retryAfterMs: number
}

export interface RateLimitStore {
  consume: (key: string, max: number, windowMs: number) => Promise<RateLimitResult>
}

/** Float slack, in ms: the max-th request of a burst lands exactly on the window. */
const EPSILON = 0.01

/** One process's counters; the default, and the fallback while Redis is unreachable. */
export class MemoryRateLimitStore implements RateLimitStore {
  private readonly tats = new Map<string, number>()
  private readonly maxKeys: number
  private readonly now: () => number

  constructor (options: { maxKeys?: number, now?: () => number } = {}) {
    this.maxKeys = options.maxKeys ?? 100_000
    // Milliseconds since the process started, not since 1970: a TAT near 1.8e12 has a resolution
    // of 0.00024 ms, so a limit admitting a request more often than that (max over 250 million a
    // minute) never moved its counter. The counts never leave the process.
    this.now = options.now ?? (() => performance.now())
  }

  get size (): number { return this.tats.size }

  async consume (key: string, max: number, windowMs: number): Promise<RateLimitResult> {
    return this.consumeSync(key, max, windowMs)
  }

  consumeSync (key: string, max: number, windowMs: number): RateLimitResult {
    const now = this.now()
    const interval = windowMs / max
    const stored = this.tats.get(key)
    const tat = stored !== undefined && stored > now ? stored : now
    const next = tat + interval
    const ahead = next - now
    if (ahead > windowMs + EPSILON) {
      return { allowed: false, remaining: 0, resetMs: tat - now, retryAfterMs: ahead - windowMs }
    }
    // Set in place. A delete and re-insert per request (to keep the Map in least-recently-used
    // order) rebuilt its table every few hundred requests, and the replaced tables chained into
    // the old generation (src/inflight.ts): 47 bytes promoted per request against 1 without.
    this.tats.set(key, next)
    if (this.tats.size > this.maxKeys) this.evict(now)
    return { allowed: true, remaining: Math.floor((windowMs - ahead) / interval + 1e-9), resetMs: ahead, retryAfterMs: 0 }
  }

  /** Drops expired keys; if every key is live, the first inserted ones (they get a fresh quota). */
  private evict (now: number): void {
    for (const [k, tat] of this.tats) if (tat <= now) this.tats.delete(k)
    const over = this.tats.size - this.maxKeys
    if (over <= 0) return
    let n = 0
    for (const k of this.tats.keys()) {
      if (n++ >= over) break
      this.tats.delete(k)
    }
  }
}

/*
 * KEYS[1] the counter; ARGV[1] max, ARGV[2] window in ms. Returns
 * { allowed (0|1), remaining, resetMs, retryAfterMs } with the times as strings (Redis would
 * truncate Lua numbers to integers). Redis's own clock keeps instances with skewed clocks exact.
 */
const GCRA_LUA = `
local max = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = window / max
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local nxt = tat + interval
local ahead = nxt - now
if ahead > window + ${EPSILON} then
  return {0, 0, string.format('%.3f', tat - now), string.format('%.3f', ahead - window)}
end
redis.call('SET', KEYS[1], string.format('%.3f', nxt), 'PX', math.ceil(ahead) + 1)
return {1, math.floor((window - ahead) / interval + 0.000000001), string.format('%.3f', ahead), '0'}
`

type GcraClient = Redis & { gatehouseGcra: (key: string, max: number, windowMs: number) => Promise<[number, number, string, string]> }

export const storeFailures = new Counter({
  name: 'gatehouse_rate_limit_store_errors_total',
  help: 'Rate-limit checks that could not reach Redis and fell back to this instance\'s own counters',
  registers: [registry]
})

/**
 * Counters in Redis, shared by every instance. When Redis cannot answer, the check falls back to
 * this process's memory store (fail open: requests keep flowing, under a per-instance limit),
 * counted in gatehouse_rate_limit_store_errors_total and logged once per outage; the shared
 * client reconnects by itself and the next check uses Redis again.
 */
export class RedisRateLimitStore implements RateLimitStore {
  private readonly client: GcraClient
  private readonly prefix: string
  private readonly fallback = new MemoryRateLimitStore()
  private readonly log: FastifyBaseLogger | undefined
  private degraded = false
  /** Until the first connection, a miss is start-up, not an outage: counted, not logged. */
  private connected: boolean
  /** Checks made while the client first connects wait for it (bounded), so counts are shared from the start. */
  private firstConnect: Promise<void> | undefined

  constructor (client: Redis, options: { keyPrefix: string, log?: FastifyBaseLogger, connectTimeout?: number }) {
    if (typeof (client as unknown as Partial<GcraClient>).gatehouseGcra !== 'function') {
      client.defineCommand('gatehouseGcra', { numberOfKeys: 1, lua: GCRA_LUA })
    }
    this.client = client as GcraClient
    this.prefix = options.keyPrefix + 'rl:'
    this.log = options.log
    // Connection errors surface as failed checks (logged once per outage); without a listener
    // ioredis would print every reconnect attempt.
    client.on('error', () => {})
    this.connected = client.status === 'ready'
    client.once('ready', () => { this.connected = true })
    if (!this.connected) {
      this.firstConnect = new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, options.connectTimeout ?? 2000)
        timer.unref()
        client.once('ready', () => { clearTimeout(timer); resolve() })
      }).then(() => { this.firstConnect = undefined })
    }
  }

  async consume (key: string, max: number, windowMs: number): Promise<RateLimitResult> {
    if (this.firstConnect !== undefined) await this.firstConnect
    if (this.client.status !== 'ready') return this.failOpen(key, max, windowMs, undefined)
    try {
      const [allowed, remaining, reset, retry] = await this.client.gatehouseGcra(this.prefix + key, max, windowMs)
      if (this.degraded) {
        this.degraded = false
        this.log?.info('rate limit: Redis is back, counters are shared again')
      }
      return { allowed: allowed === 1, remaining, resetMs: Number(reset), retryAfterMs: Number(retry) }
    } catch (err) {
      return this.failOpen(key, max, windowMs, err as Error)
    }
  }

  private failOpen (key: string, max: number, windowMs: number, err: Error | undefined): RateLimitResult {
    storeFailures.inc()
    if (!this.degraded && this.connected) {
      this.degraded = true
      this.log?.error({ error: err?.message ?? `redis ${this.client.status}` }, 'rate limit: Redis unreachable, counting in this instance only until it is back')
    }
    return this.fallback.consumeSync(key, max, windowMs)
  }
}

/** Keys hold client-chosen values (header:NAME): long ones are hashed, so a key stays small. */
export function boundedKey (value: string): string {
  return value.length <= 96 ? value : 'sha256:' + createHash('sha256').update(value).digest('base64url')
}
