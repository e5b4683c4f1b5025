import fp from 'fastify-plugin'
import rateLimitPlugin, { normalizeIP } from '@fastify/rate-limit'
import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify'
import type { RouteDefinition } from '../src/config.js'
import { GATEHOUSE_RATE_LIMITED } from '../src/errors.js'
import { metrics, NO_ROUTE } from '../src/metrics.js'
import { sharedRedis } from '../src/redis.js'
import { MemoryRateLimitStore, RedisRateLimitStore, boundedKey, type RateLimitResult, type RateLimitStore } from '../src/stores/rate-limit.js'
import { routeConfig } from '../src/fastify-internals.js'

/** The ProcessState key of the counters: one store per process, so a reload keeps every count. */
export const RATE_LIMIT_STATE_KEY = 'rate-limit-store'

interface StoreResult { current: number, ttl: number }
type Callback = (err: Error | null, res?: StoreResult) => void

/**
 * Our store in @fastify/rate-limit's store shape: `incr` reports `current` (requests counted)
 * and `ttl` (ms until the quota is full again, or until the next admission when refused).
 * `child` gives each limit its own key space.
 */
function storeAdapter (store: RateLimitStore): new (params: { scope?: string }) => unknown {
  return class GatehouseStore {
    readonly scope: string
    constructor (params: { scope?: string }) {
      this.scope = params.scope ?? 'global'
    }

    incr (key: string, cb: Callback, timeWindow: number, max: number): void {
      const toResult = (r: RateLimitResult): StoreResult => r.allowed ? { current: max - r.remaining, ttl: r.resetMs } : { current: max + 1, ttl: r.retryAfterMs }
      store.consume(`${this.scope}:${key}`, max, timeWindow).then((r) => cb(null, toResult(r)), (err: Error) => cb(err))
    }

    child (params: { scope?: string }): GatehouseStore {
      return new GatehouseStore(params)
    }
  }
}

type Check = ReturnType<FastifyRequest['server']['createRateLimit']>

interface Limiter {
  /** @fastify/rate-limit's check (the Redis store); the memory store is asked directly. */
  check: Check
  /** The limit's parameters and its store key (`scope:key`), for the synchronous memory path. */
  max: number
  window: number
  storeKey: (request: FastifyRequest) => string
  /** Keyed by who the caller is (JWT claim, API key): checked after auth, in preHandler. */
  afterAuth: boolean
  policy: string
  name: string
}

/** What a limit counts by: its kind of key, and the request's value for it (undefined: the client IP instead). */
function keySpec (key: string): { kind: string, value: (request: FastifyRequest) => string | undefined } {
  if (key === 'apikey') return { kind: 'key:', value: (request) => request.consumer }
  if (key.startsWith('jwt:')) {
    const claim = key.slice(4)
    return {
      kind: 'jwt:',
      value: (request) => {
        const v = request.claims?.[claim]
        return typeof v === 'string' || typeof v === 'number' ? boundedKey(String(v)) : undefined
      }
    }
  }
  if (key.startsWith('header:')) {
    const name = key.slice(7).toLowerCase()
    return {
      kind: 'h:',
      value: (request) => {
        const v = request.headers[name]
        return typeof v === 'string' && v !== '' ? boundedKey(v) : undefined
      }
    }
  }
  return { kind: 'ip:', value: () => undefined }
}

const clientIp = (request: FastifyRequest): string => normalizeIP(request.ip)

/** The rate-limit key of a request; a consumer key the request lacks falls back to the client IP. */
export function keyFunction (key: string): (request: FastifyRequest) => string {
  const { kind, value } = keySpec(key)
  return (request) => {
    const v = value(request)
    return v !== undefined ? kind + v : 'ip:' + clientIp(request)
  }
}

/** Values whose store keys a limit remembers; past this, it starts over. */
const KEYS_REMEMBERED = 10_000

/**
 * The store key of a request (`scope:kind:value`), each one built once and then reused. A key
 * built per request is a new string the Map must flatten and hash on every lookup: a check cost
 * 0.5 us that way, 0.2 us with the key reused (micro-benchmark, one core). The values it is found by (a claim of a remembered token, a
 * connection's address) are the same string objects request after request, hashed once.
 */
export function storeKeyFunction (scope: string, key: string): (request: FastifyRequest) => string {
  const { kind, value } = keySpec(key)
  const own = new Map<string, string>()
  const byIp = new Map<string, string>()
  const stored = (made: Map<string, string>, prefix: string, v: string): string => {
    let k = made.get(v)
    if (k === undefined) {
      if (made.size >= KEYS_REMEMBERED) made.clear()
      k = `${scope}:${prefix}${v}`
      made.set(v, k)
    }
    return k
  }
  return (request) => {
    const v = value(request)
    return v !== undefined ? stored(own, kind, v) : stored(byIp, 'ip:', clientIp(request))
  }
}

/**
 * Rate limits with @fastify/rate-limit over our GCRA store (src/stores/rate-limit.ts): counters
 * in memory, or in Redis shared by every instance when `redis:` is configured. `rateLimit:` of
 * gatehouse.yaml is one default bucket per client shared by every route without its own limit,
 * the not-found handler included (probing for prefixes costs the prober); a route's `rateLimit:`
 * is its own bucket, and `rateLimit: false` turns limiting off for it. IP- and header-keyed
 * limits run in onRequest, before any crypto; JWT- and API-key-keyed ones in preHandler, once
 * auth has said who the caller is. Replies carry the IETF RateLimit and RateLimit-Policy fields;
 * a refusal is 429 problem+json with Retry-After.
 */
const rateLimit: FastifyPluginAsync = async function rateLimit (fastify) {
  const { config, state, routes } = fastify.gatehouse
  const redis = sharedRedis(config, state, fastify.log)
  const store = state.get<RateLimitStore>(RATE_LIMIT_STATE_KEY, () => redis !== undefined
    ? new RedisRateLimitStore(redis, { keyPrefix: config.redis?.keyPrefix ?? 'gatehouse:', log: fastify.log, connectTimeout: config.redis?.connectTimeout })
    : new MemoryRateLimitStore())

  await fastify.register(rateLimitPlugin, { global: false, store: storeAdapter(store) as never, skipOnError: true })

  const limiters = new Map<string, Limiter | undefined>()
  const build = (settings: { max: number, window: number, key?: string }, scope: string, name: string): Limiter => {
    const key = settings.key ?? 'ip'
    const keyGenerator = keyFunction(key)
    const check = fastify.createRateLimit({ max: settings.max, timeWindow: settings.window, keyGenerator, scope } as never)
    return {
      check,
      max: settings.max,
      window: settings.window,
      storeKey: storeKeyFunction(scope, key),
      afterAuth: key === 'apikey' || key.startsWith('jwt:'),
      policy: `"${name}";q=${settings.max};w=${Math.max(1, Math.round(settings.window / 1000))}`,
      name
    }
  }
  const global = config.rateLimit !== undefined ? build(config.rateLimit, 'global', 'default') : undefined
  for (const route of routes) {
    const own = route.rateLimit
    limiters.set(route.name, own === false ? undefined : own !== undefined ? build(own, `route:${route.name}`, route.name) : global)
  }
  const limiterOf = (route: RouteDefinition | undefined): Limiter | undefined => route === undefined ? global : limiters.get(route.name)

  /**
   * The verdict on the reply: the RateLimit fields always, and the 429 error when refused.
   * `remaining` is what is left after this request; `ms` until the quota is full again, or when
   * refused, until the next request would be admitted.
   */
  function verdict (limiter: Limiter, request: FastifyRequest, reply: FastifyReply, allowed: boolean, remaining: number, ms: number): Error | undefined {
    const seconds = Math.max(1, Math.ceil(ms / 1000))
    reply.header('ratelimit-policy', limiter.policy)
    reply.header('ratelimit', `"${limiter.name}";r=${remaining};t=${allowed ? Math.ceil(ms / 1000) : seconds}`)
    if (allowed) return undefined
    metrics.rateLimited.inc({ route: routeConfig(request).gatehouse?.name ?? NO_ROUTE })
    reply.header('retry-after', String(seconds))
    return new GATEHOUSE_RATE_LIMITED(String(seconds))
  }

  // The in-memory store answers at once: its verdict is given in the hook itself, with no
  // promise. @fastify/rate-limit's limiter (createRateLimit, async) runs the Redis store, whose
  // round trip dwarfs the promises.
  const memory = store instanceof MemoryRateLimitStore ? store : undefined

  function enforce (limiter: Limiter, request: FastifyRequest, reply: FastifyReply, done: (err?: Error) => void): void {
    if (memory !== undefined) {
      const r = memory.consumeSync(limiter.storeKey(request), limiter.max, limiter.window)
      done(verdict(limiter, request, reply, r.allowed, r.remaining, r.allowed ? r.resetMs : r.retryAfterMs))
      return
    }
    limiter.check(request).then((r) => {
      if (r.isAllowed) return done()
      done(verdict(limiter, request, reply, !r.isExceeded, r.remaining, r.ttl))
    }, done)
  }

  // Each hook only where some limit needs it: a request pays for no stage that has nothing to do.
  const all = [global, ...limiters.values()].filter((l) => l !== undefined)
  if (all.some((l) => !l.afterAuth)) {
    fastify.addHook('onRequest', function limitByAddress (request, reply, done) {
      const limiter = limiterOf(routeConfig(request).gatehouse)
      if (limiter === undefined || limiter.afterAuth) return done()
      enforce(limiter, request, reply, done)
    })
  }
  if (all.some((l) => l.afterAuth)) {
    fastify.addHook('preHandler', function limitByConsumer (request, reply, done) {
      const limiter = limiterOf(routeConfig(request).gatehouse)
      if (limiter === undefined || !limiter.afterAuth) return done()
      enforce(limiter, request, reply, done)
    })
  }
}

export default fp(rateLimit, { name: 'rate-limit', fastify: '5.x', dependencies: ['problem'] })
