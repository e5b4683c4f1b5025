import { randomBytes } from 'node:crypto'
import { Transform, type Readable, type TransformCallback } from 'node:stream'
import type { OutgoingHttpHeaders } from 'node:http'
import fp from 'fastify-plugin'
import type { FastifyInstance, FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify'
import type { GatewayConfig, RouteDefinition } from '../src/config.js'
import type { ProcessState } from '../src/state.js'
import { sharedRedis } from '../src/redis.js'
import { metrics } from '../src/metrics.js'
import * as errors from '../src/errors.js'
import type { CacheStore, CachedEntry } from '../src/cache/store.js'
import { Collapser } from '../src/cache/collapse.js'
import { negotiate, precompress, precompressible } from '../src/cache/encoding.js'
import { MemoryCacheStore } from '../src/stores/cache-memory.js'
import { RedisCacheStore } from '../src/stores/cache-redis.js'
import { routeConfig } from '../src/fastify-internals.js'
import {
  PRIVATE_TARGETED_FIELDS, canStore, freshnessLifetime, initialAge, mergeHeaders, notModified,
  parseCacheControl, responseDirectives, seconds, variantKey, varyNames, type Directives
} from '../src/cache/policy.js'
import { isStream } from '../src/streams.js'

/*
 * The gateway's shared HTTP cache (RFC 9111) for routes with `cache.enabled`. A lookup in
 * preHandler (after ip filter, auth and rate limits, before the upstream handler) answers hits
 * without touching the upstream; in onSend the upstream's uncompressed response is teed into the
 * store as it streams to the client (compression's route-level onSend runs after this one).
 */

type Result = 'hit' | 'miss' | 'stale' | 'bypass'

interface CacheContext {
  route: RouteDefinition
  key: string
  requestTime: number
  result: Result
  /** Served from the store in preHandler: onSend leaves the response alone. */
  served: boolean
  /** The stored variant being revalidated, or kept for stale-if-error. */
  entry?: CachedEntry
  /** We replaced the client's conditionals with the entry's validators. */
  revalidating: boolean
  /** The client's own If-None-Match / If-Modified-Since, judged against the refreshed entry. */
  clientConditional: { 'if-none-match'?: string, 'if-modified-since'?: string }
  /** RFC 9211 `fwd` reason when going upstream. */
  fwd?: string
  collapsed: boolean
  /** Ends our leadership of the key: waiters look the cache up again. */
  release?: () => void
  /** Headers other gateway plugins set before the upstream answered: never stored. */
  preset: OutgoingHttpHeaders
  /** The internal background refresh of stale-while-revalidate. */
  background: boolean
}

declare module 'fastify' {
  interface FastifyRequest {
    cache?: CacheContext
  }
}

/** Never stored: per-request or per-connection headers, and ones the cache computes. */
const UNSTORED = new Set(['x-request-id', 'x-cache', 'cache-status', 'content-length', 'transfer-encoding', 'connection', 'keep-alive'])
const UNSAFE = new Set(['POST', 'PUT', 'PATCH', 'DELETE'])
/** Upstream statuses that let stale-if-error serve a stale response (RFC 5861 §4). */
const ERROR_STATUS = new Set([500, 502, 503, 504])
/** How long a response with validators is kept past its freshness, for revalidation. */
const VALIDATOR_KEEP = 60_000

/** The process's response store: it outlives reloads (ProcessState). */
export function cacheStore (config: GatewayConfig, state: ProcessState): CacheStore {
  return state.get<CacheStore>('cache-store', () => {
    const redis = config.cache.store === 'redis' ? sharedRedis(config, state) : undefined
    if (config.cache.store === 'redis' && redis === undefined) throw new Error('cache.store: redis needs `redis:` in gatehouse.yaml')
    return redis !== undefined ? new RedisCacheStore(redis, config.redis?.keyPrefix ?? 'gatehouse:', config.redis?.connectTimeout) : new MemoryCacheStore(config.cache.maxBytes)
  }, async (store) => { await store.close() })
}

/** The primary key of a request: its path and query, plus the host where the route tells hosts apart. */
export function primaryKey (route: RouteDefinition, host: string, url: string): string {
  return route.preserveHost || route.match.hosts !== undefined ? host.toLowerCase() + url : url
}

/**
 * Purge for the admin API: an exact URL (path or absolute URL: both the host-qualified and the
 * plain key go) or every entry of a route. Resolves with the number of URLs removed.
 */
export async function purge (config: GatewayConfig, state: ProcessState, what: { url?: string, route?: string }): Promise<number> {
  const store = cacheStore(config, state)
  let removed = 0
  if (what.route !== undefined) removed += await store.purgeRoute(what.route)
  if (what.url !== undefined) {
    for (const key of urlKeys(what.url)) removed += await store.delete(key)
  }
  return removed
}

function urlKeys (target: string): string[] {
  if (target.startsWith('/')) return [target]
  try {
    const u = new URL(target)
    const path = u.pathname + u.search
    return [path, u.host.toLowerCase() + path, u.hostname.toLowerCase() + path]
  } catch {
    return []
  }
}

/** The stored headers as a client gets them: with the current Age, without our targeted fields. */
function clientHeaders (entry: CachedEntry, now: number): OutgoingHttpHeaders {
  const headers: OutgoingHttpHeaders = { ...entry.headers, age: String(Math.floor(ageOf(entry, now) / 1000)) }
  for (const name of PRIVATE_TARGETED_FIELDS) delete headers[name]
  return headers
}

function ageOf (entry: CachedEntry, now: number): number {
  return entry.initialAge + Math.max(0, now - entry.responseTime)
}

function hasValidator (headers: OutgoingHttpHeaders): boolean {
  return headers.etag !== undefined || headers['last-modified'] !== undefined
}

function first (v: string | string[] | undefined): string | undefined {
  return Array.isArray(v) ? v[0] : v
}

/** The request's Cache-Control, with HTTP/1.0 `Pragma: no-cache` where Cache-Control is absent. */
function requestDirectives (request: FastifyRequest): Directives {
  const cc = parseCacheControl(request.headers['cache-control'])
  if (request.headers['cache-control'] === undefined && /no-cache/i.test(String(request.headers.pragma ?? ''))) cc.set('no-cache', true)
  return cc
}

/** Whether a stale entry may be served without validation at all (RFC 9111 §4.2.4). */
function mayServeStale (d: Directives): boolean {
  return !d.has('must-revalidate') && !d.has('proxy-revalidate') && !d.has('s-maxage') && !d.has('no-cache')
}

/** Tees a streamed body into the store: chunks pass on at once; storing is abandoned past `max`. */
class Tee extends Transform {
  private chunks: Buffer[] | undefined = []
  private bytes = 0
  private readonly max: number
  private readonly done: (body: Buffer | undefined) => Promise<void> | undefined

  constructor (max: number, done: (body: Buffer | undefined) => Promise<void> | undefined) {
    super()
    this.max = max
    this.done = done
    this.once('close', () => { if (this.chunks !== undefined) { this.chunks = undefined; done(undefined) } })
  }

  override _transform (chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    if (this.chunks !== undefined) {
      this.bytes += chunk.length
      if (this.bytes > this.max) { this.chunks = undefined; this.done(undefined) } else this.chunks.push(chunk)
    }
    cb(null, chunk)
  }

  override _flush (cb: TransformCallback): void {
    const chunks = this.chunks
    this.chunks = undefined
    // The response ends once the entry is stored (one store round trip), so a client that has
    // the whole response finds it cached on every instance.
    const saved = chunks !== undefined ? this.done(Buffer.concat(chunks)) : undefined
    if (saved === undefined) cb()
    else saved.then(() => cb(), () => cb())
  }
}

const cache: FastifyPluginAsync = async function cache (fastify: FastifyInstance) {
  const { config, state } = fastify.gatehouse
  const routes = fastify.gatehouse.routes
  if (!routes.some((r) => r.cache?.enabled === true)) return
  const store = cacheStore(config, state)
  const collapser = state.get('cache-collapser', () => new Collapser())
  const refreshing = state.get('cache-refreshing', () => new Set<string>())
  // Marks the internal stale-while-revalidate refresh; random per process, so no client can forge it.
  const refreshToken = state.get('cache-refresh-token', () => randomBytes(16).toString('hex'))
  const REFRESH = 'x-gatehouse-refresh'

  function count (ctx: CacheContext, result: Result): void {
    ctx.result = result
    if (!ctx.background) metrics.cache.inc({ route: ctx.route.name, result })
  }

  function statusHeaders (reply: FastifyReply, ctx: CacheContext, cacheStatus: string): void {
    reply.header('x-cache', ctx.result.toUpperCase())
    reply.header('cache-status', 'gatehouse; ' + cacheStatus)
  }

  /** Answers from a stored entry (a 304 when the client's own validators match). */
  function serve (request: FastifyRequest, reply: FastifyReply, ctx: CacheContext, entry: CachedEntry, cacheStatus: string): FastifyReply {
    ctx.served = true
    const now = Date.now()
    reply.headers(clientHeaders(entry, now))
    statusHeaders(reply, ctx, cacheStatus)
    if (entry.status === 200 && notModified(request.headers, entry.headers)) {
      reply.removeHeader('content-type')
      return reply.code(304).send()
    }
    // A stored compressed copy for the client's preferred coding: no compression per hit.
    const coding = entry.encoded !== undefined && ctx.route.compress !== false && request.headers['x-no-compression'] === undefined
      ? negotiate(request.headers['accept-encoding'], config.compress.encodings)
      : undefined
    const encoded = coding === 'br' || coding === 'gzip' ? entry.encoded?.[coding] : undefined
    if (coding !== undefined && encoded !== undefined) {
      reply.header('content-encoding', coding)
      const vary = reply.getHeader('vary')
      if (vary === undefined) reply.header('vary', 'accept-encoding')
      else if (!/accept-encoding/i.test(String(vary))) reply.header('vary', `${String(vary)}, accept-encoding`)
      const etag = reply.getHeader('etag')
      if (typeof etag === 'string' && !etag.startsWith('W/')) reply.header('etag', 'W/' + etag)
      return reply.code(entry.status).send(encoded)
    }
    return reply.code(entry.status).send(entry.body)
  }

  function ttlOf (entry: CachedEntry): string {
    return String(Math.floor((entry.lifetime - ageOf(entry, Date.now())) / 1000))
  }

  /** Refreshes a stale entry in the background (stale-while-revalidate), once per key at a time. */
  function refresh (request: FastifyRequest, key: string): void {
    if (refreshing.has(key)) return
    refreshing.add(key)
    const headers = { ...request.headers, [REFRESH]: refreshToken }
    delete headers.connection
    delete headers['content-length']
    fastify.inject({ method: 'GET', url: request.url, headers: headers as unknown as Record<string, string> })
      .catch((err: unknown) => { request.log.debug({ err }, 'cache refresh failed') })
      .finally(() => { refreshing.delete(key) })
  }

  /** Serves a stored entry when RFC 9111 allows it for this request: fresh, or stale where permitted. */
  function answerFromStore (request: FastifyRequest, reply: FastifyReply, ctx: CacheContext, entry: CachedEntry, reqCc: Directives): boolean {
    const age = ageOf(entry, Date.now())
    const { directives } = responseDirectives(entry.headers)
    const maxAge = seconds(reqCc, 'max-age')
    const minFresh = seconds(reqCc, 'min-fresh') ?? 0
    const maxStale = reqCc.get('max-stale')
    const mustValidate = directives.has('no-cache') || reqCc.has('no-cache') || (maxAge !== undefined && age > maxAge)
    if (mustValidate) return false
    const collapsed = ctx.collapsed ? '; collapsed' : ''
    if (age + minFresh < entry.lifetime) {
      count(ctx, 'hit')
      serve(request, reply, ctx, entry, `hit; ttl=${ttlOf(entry)}${collapsed}`)
      return true
    }
    if (!mayServeStale(directives)) return false
    const staleBy = age - entry.lifetime
    const allowed = maxStale === true ? Infinity : maxStale !== undefined ? (seconds(reqCc, 'max-stale') ?? 0) : 0
    if (staleBy < allowed) {
      count(ctx, 'stale')
      serve(request, reply, ctx, entry, `hit; ttl=${ttlOf(entry)}${collapsed}`)
      return true
    }
    if (staleBy < entry.staleWhileRevalidate) {
      count(ctx, 'stale')
      refresh(request, ctx.key)
      serve(request, reply, ctx, entry, `hit; ttl=${ttlOf(entry)}${collapsed}; detail=stale-while-revalidate`)
      return true
    }
    return false
  }

  async function lookup (request: FastifyRequest, ctx: CacheContext): Promise<CachedEntry | undefined> {
    let entries: CachedEntry[]
    try {
      entries = await store.get(ctx.key)
    } catch {
      return undefined
    }
    for (const e of entries) if (variantKey(e.vary, request.headers) === e.variant) return e
    if (entries.length > 0) ctx.fwd = 'vary-miss'
    return undefined
  }

  fastify.addHook('preHandler', async function cacheLookup (request, reply) {
    const route = routeConfig(request).gatehouse
    if (route?.cache?.enabled !== true || route.upstream === undefined) return
    const background = request.headers[REFRESH] === refreshToken
    if (request.headers[REFRESH] !== undefined) delete request.raw.headers[REFRESH]
    const ctx: CacheContext = {
      route,
      key: primaryKey(route, request.host, request.url),
      requestTime: Date.now(),
      result: 'miss',
      served: false,
      revalidating: false,
      clientConditional: {},
      collapsed: false,
      preset: { ...reply.getHeaders() } as OutgoingHttpHeaders,
      background
    }
    request.cache = ctx
    const method = request.method
    if (method !== 'GET' && method !== 'HEAD') {
      count(ctx, 'bypass')
      return
    }
    const reqCc = requestDirectives(request)

    // Misses and revalidations of one key collapse into one upstream request: the first becomes
    // the leader, the others wait for it (at most the route's response timeout) and look again.
    let entry: CachedEntry | undefined
    for (let attempt = 0; ; attempt++) {
      entry = await lookup(request, ctx)
      if (entry !== undefined && !background && answerFromStore(request, reply, ctx, entry, reqCc)) return reply
      if (reqCc.has('only-if-cached')) {
        count(ctx, 'miss')
        statusHeaders(reply, ctx, 'fwd=miss; detail=only-if-cached')
        ctx.served = true
        throw new errors.GATEHOUSE_NOT_CACHED()
      }
      if (method !== 'GET') break
      ctx.release = collapser.lead(ctx.key)
      if (ctx.release !== undefined || attempt > 0 || background) break
      await collapser.wait(ctx.key, Math.min(route.upstream.timeouts.response, 30_000))
      ctx.collapsed = true
    }

    // Going upstream.
    ctx.fwd = entry !== undefined ? 'stale' : reqCc.has('no-cache') ? 'request' : ctx.fwd ?? 'uri-miss'
    if (method === 'GET') {
      if (entry !== undefined) {
        ctx.entry = entry
        if (hasValidator(entry.headers)) {
          const raw = request.raw.headers
          const inm = first(raw['if-none-match'])
          const ims = first(raw['if-modified-since'])
          if (inm !== undefined) ctx.clientConditional['if-none-match'] = inm
          if (ims !== undefined) ctx.clientConditional['if-modified-since'] = ims
          delete raw['if-none-match']
          delete raw['if-modified-since']
          if (typeof entry.headers.etag === 'string') raw['if-none-match'] = entry.headers.etag
          if (typeof entry.headers['last-modified'] === 'string') raw['if-modified-since'] = entry.headers['last-modified']
          ctx.revalidating = true
        }
      }
    }
    count(ctx, 'miss')
  })

  fastify.addHook('onSend', async function cacheStoreResponse (request, reply, payload) {
    const ctx = request.cache
    if (ctx === undefined || ctx.served) return payload
    // Read before they go: targeted fields for this cache only are never passed on.
    const upstreamHeaders = storedHeaders(reply, ctx)
    for (const name of PRIVATE_TARGETED_FIELDS) reply.removeHeader(name)

    const status = reply.statusCode
    if (UNSAFE.has(request.method)) {
      statusHeaders(reply, ctx, 'fwd=method')
      if (status < 400) await invalidate(request, reply, ctx)
      return payload
    }
    if (ctx.result === 'bypass') {
      statusHeaders(reply, ctx, 'fwd=method')
      return payload
    }

    const responseTime = Date.now()
    const entry = ctx.entry
    // The upstream confirmed our stored response: refresh its headers and answer from it.
    if (ctx.revalidating && entry !== undefined && status === 304) {
      const headers = mergeHeaders(entry.headers, upstreamHeaders)
      const refreshed = describe(ctx, entry.status, headers, entry.body, responseTime, request)
      if (entry.encoded !== undefined) refreshed.encoded = entry.encoded
      drain(payload)
      await save(ctx, refreshed)
      ctx.release?.()
      for (const name of Object.keys(reply.getHeaders())) if (ctx.preset[name] === undefined) reply.removeHeader(name)
      ctx.result = 'hit'
      const client = { ...request.headers }
      delete client['if-none-match']
      delete client['if-modified-since']
      Object.assign(client, ctx.clientConditional)
      reply.headers(clientHeaders(refreshed, Date.now()))
      statusHeaders(reply, ctx, 'fwd=stale; fwd-status=304')
      if (refreshed.status === 200 && notModified(client, refreshed.headers)) {
        reply.removeHeader('content-type')
        reply.code(304)
        return null
      }
      reply.code(refreshed.status)
      return refreshed.body
    }

    // stale-if-error: the upstream failed; a stale response beats an error (RFC 5861 §4).
    if (entry !== undefined && ERROR_STATUS.has(status)) {
      const { directives } = responseDirectives(entry.headers)
      const reqCc = requestDirectives(request)
      const window = Math.max(entry.staleIfError, seconds(reqCc, 'stale-if-error') ?? 0)
      if (mayServeStale(directives) && ageOf(entry, responseTime) - entry.lifetime < window) {
        ctx.release?.()
        drain(payload)
        for (const name of Object.keys(reply.getHeaders())) if (ctx.preset[name] === undefined) reply.removeHeader(name)
        count(ctx, 'stale')
        reply.headers(clientHeaders(entry, responseTime))
        statusHeaders(reply, ctx, `fwd=stale; fwd-status=${status}; detail=stale-if-error`)
        reply.code(entry.status)
        return entry.body
      }
    }

    const headers = upstreamHeaders
    const { directives } = responseDirectives(headers)
    const decision = request.method === 'GET'
      ? canStore('GET', request.headers, status, headers, directives, ctx.route.cache?.defaultTtl)
      : { storable: false, reason: 'method' }
    const maxEntry = ctx.route.cache?.maxEntryBytes ?? config.cache.maxEntryBytes
    const length = Number(reply.getHeader('content-length'))
    let detail = decision.reason
    if (decision.storable && Number.isFinite(length) && length > maxEntry) detail = 'too-large'
    const fwd = `fwd=${ctx.fwd ?? 'miss'}${ctx.revalidating ? `; fwd-status=${status}` : ''}${ctx.collapsed ? '; collapsed' : ''}`
    if (detail !== undefined || payload === null || payload === undefined) {
      statusHeaders(reply, ctx, `${fwd}${detail !== undefined ? `; detail=${detail}` : ''}`)
      ctx.release?.()
      return payload
    }
    // A streamed body of unknown length may still outgrow maxEntryBytes: `stored` only when sure.
    statusHeaders(reply, ctx, Number.isFinite(length) || typeof payload === 'string' || Buffer.isBuffer(payload) ? `${fwd}; stored` : fwd)
    if (typeof payload === 'string' || Buffer.isBuffer(payload)) {
      const body = Buffer.from(payload)
      if (body.length <= maxEntry) await save(ctx, describe(ctx, status, headers, body, responseTime, request))
      ctx.release?.()
      return payload
    }
    if (!isStream(payload)) {
      ctx.release?.()
      return payload
    }
    // Streamed: the client gets each chunk as it comes; the store gets the whole body at the end.
    const tee = new Tee(maxEntry, (body) => {
      if (body === undefined) { ctx.release?.(); return undefined }
      return save(ctx, describe(ctx, status, headers, body, responseTime, request)).finally(() => ctx.release?.())
    })
    const source = payload as Readable
    source.once('error', (err) => tee.destroy(err))
    // pipe() does not pass a destroy upstream: a client gone mid-body must free the upstream body.
    tee.once('close', () => { if (!source.readableEnded) source.destroy() })
    return source.pipe(tee)
  })

  // Whatever happened (client gone, error), waiters must not wait for a response that never comes.
  fastify.addHook('onResponse', async function cacheRelease (request) {
    const ctx = request.cache
    if (ctx?.release !== undefined) setImmediate(ctx.release)
  })

  function storedHeaders (reply: FastifyReply, ctx: CacheContext): OutgoingHttpHeaders {
    const out: OutgoingHttpHeaders = {}
    for (const [name, value] of Object.entries(reply.getHeaders())) {
      if (value === undefined || UNSTORED.has(name)) continue
      // Set by a gateway plugin before the upstream answered (rate-limit, CORS...): per request.
      if (ctx.preset[name] !== undefined && String(ctx.preset[name]) === String(value)) continue
      out[name] = value
    }
    return out
  }

  function describe (ctx: CacheContext, status: number, headers: OutgoingHttpHeaders, body: Buffer, responseTime: number, request: FastifyRequest): CachedEntry {
    const { directives } = responseDirectives(headers)
    const vary = varyNames(headers.vary)
    const stored = { ...headers }
    delete stored.age
    return {
      status,
      headers: stored,
      body,
      route: ctx.route.name,
      vary,
      variant: variantKey(vary, request.headers),
      responseTime,
      initialAge: initialAge(headers, ctx.requestTime, responseTime),
      lifetime: freshnessLifetime(status, headers, directives, ctx.route.cache?.defaultTtl),
      staleWhileRevalidate: seconds(directives, 'stale-while-revalidate') ?? 0,
      staleIfError: seconds(directives, 'stale-if-error') ?? 0
    }
  }

  async function save (ctx: CacheContext, entry: CachedEntry): Promise<void> {
    const remaining = Math.max(0, entry.lifetime - entry.initialAge)
    const keep = remaining + Math.max(entry.staleWhileRevalidate, entry.staleIfError) +
      (hasValidator(entry.headers) ? Math.max(entry.lifetime, VALIDATOR_KEEP) : 0)
    if (keep <= 0) return
    try {
      await store.set(ctx.key, entry, keep)
    } catch {
      // A failed store costs a later miss, never this response.
      return
    }
    if (ctx.route.compress !== false && entry.encoded === undefined &&
        precompressible(entry.status, entry.headers, entry.body.length, config.compress.threshold)) {
      // Off the response path: the first client already has its bytes.
      void addEncodings(ctx.key, entry, keep)
    }
  }

  async function addEncodings (key: string, entry: CachedEntry, keep: number): Promise<void> {
    try {
      const encoded = await precompress(entry.body)
      // Only if the entry is still the one we stored (not purged, invalidated or replaced).
      const current = (await store.get(key)).find((e) => e.variant === entry.variant)
      if (current?.responseTime !== entry.responseTime) return
      await store.set(key, { ...current, encoded }, keep - (Date.now() - entry.responseTime))
    } catch {
      // Hits keep compressing on the way out.
    }
  }

  /** Unsafe methods invalidate the target URI and same-origin Location / Content-Location (RFC 9111 §4.4). */
  async function invalidate (request: FastifyRequest, reply: FastifyReply, ctx: CacheContext): Promise<void> {
    const keys = new Set([ctx.key])
    for (const name of ['location', 'content-location']) {
      const value = reply.getHeader(name)
      if (typeof value !== 'string') continue
      try {
        const base = `${request.protocol}://${request.host}`
        const u = new URL(value, base + request.url)
        if (u.origin !== new URL(base).origin) continue
        keys.add(primaryKey(ctx.route, request.host, u.pathname + u.search))
      } catch {
        // An unparsable Location invalidates nothing.
      }
    }
    for (const key of keys) await store.delete(key).catch(() => 0)
  }
}

/** Discards an upstream body we do not pass on. */
function drain (payload: unknown): void {
  const stream = payload as Readable | null
  if (stream !== null && typeof stream === 'object' && typeof stream.resume === 'function') {
    stream.on('error', () => {})
    stream.resume()
  }
}

export default fp(cache, { name: 'cache', fastify: '5.x', dependencies: ['request-id'] })
