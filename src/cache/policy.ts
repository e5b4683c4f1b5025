import type { IncomingHttpHeaders, OutgoingHttpHeaders } from 'node:http'

/*
 * RFC 9111 (HTTP caching) as a shared cache sees it: which responses may be stored, how long they
 * stay fresh, how old a stored one is, and which stored one a request may be served from. Pure
 * functions over headers; plugins/cache.ts applies them in the request lifecycle.
 */

export type Directives = Map<string, string | true>

/** Parses a Cache-Control-style field (RFC 9111 §5.2): lower-cased names, unquoted values. */
export function parseCacheControl (value: string | string[] | number | undefined): Directives {
  const out: Directives = new Map()
  if (value === undefined) return out
  const text = Array.isArray(value) ? value.join(',') : String(value)
  const re = /\s*([^=,\s]+)\s*(?:=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*)))?\s*(?:,|$)/g
  let m: RegExpExecArray | null
  while ((m = re.exec(text)) !== null && m[0] !== '') {
    const name = m[1].toLowerCase()
    if (out.has(name)) continue // the first occurrence wins (RFC 9111 §4.2.1)
    const v = m[2] !== undefined ? m[2].replace(/\\(.)/g, '$1') : m[3]
    out.set(name, v === undefined || v === '' ? true : v)
  }
  return out
}

/** A delta-seconds directive in ms, or undefined when absent or invalid. */
export function seconds (d: Directives, name: string): number | undefined {
  const v = d.get(name)
  if (v === undefined || v === true) return undefined
  if (!/^\d+$/.test(v)) return undefined
  return Number(v) * 1000
}

/**
 * The directives this cache obeys: a targeted field (RFC 9213) replaces Cache-Control for us.
 * `Gatehouse-Cache-Control` targets this gateway only, `CDN-Cache-Control` every CDN-like cache,
 * and `Surrogate-Control` is honoured as the older form of the same idea.
 */
export const TARGETED_FIELDS = ['gatehouse-cache-control', 'cdn-cache-control', 'surrogate-control'] as const
/** Targeted fields meant for us alone, removed before the response reaches a client. */
export const PRIVATE_TARGETED_FIELDS = ['gatehouse-cache-control', 'surrogate-control']

export function responseDirectives (headers: OutgoingHttpHeaders | IncomingHttpHeaders): { directives: Directives, targeted: boolean } {
  for (const name of TARGETED_FIELDS) {
    const v = headers[name]
    if (v !== undefined) {
      const d = parseCacheControl(v as string)
      if (d.size > 0) return { directives: d, targeted: true }
    }
  }
  return { directives: parseCacheControl(headers['cache-control'] as string | undefined), targeted: false }
}

/** Status codes that are cacheable by default (RFC 9110 §15.1), minus 206 (no range support). */
const HEURISTIC_STATUS = new Set([200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501])
/** Other final statuses we store when the response says how long they stay fresh. */
const EXPLICIT_STATUS = new Set([302, 303, 307, 400, 403, 500, 502, 503, 504])

function httpDate (v: unknown): number | undefined {
  if (typeof v !== 'string') return undefined
  const t = Date.parse(v)
  return Number.isNaN(t) ? undefined : t
}

export interface StoreDecision {
  storable: boolean
  /** Why not, in RFC 9211 `detail` words. */
  reason?: string
}

/** RFC 9111 §3 for a shared cache, plus the gateway's own rules (no Set-Cookie, no partial content). */
export function canStore (method: string, reqHeaders: IncomingHttpHeaders, status: number, resHeaders: OutgoingHttpHeaders, directives: Directives, defaultTtl: number | undefined): StoreDecision {
  if (method !== 'GET') return { storable: false, reason: 'method' }
  const reqCc = parseCacheControl(reqHeaders['cache-control'])
  if (reqCc.has('no-store')) return { storable: false, reason: 'request-no-store' }
  if (directives.has('no-store')) return { storable: false, reason: 'no-store' }
  // `private` with field names (`private="x"`) still forbids a shared cache from storing those
  // fields; we do not rewrite responses, so any `private` makes the response unstorable.
  if (directives.has('private')) return { storable: false, reason: 'private' }
  if (resHeaders['set-cookie'] !== undefined) return { storable: false, reason: 'set-cookie' }
  const vary = resHeaders.vary
  if (vary !== undefined && varyNames(vary).includes('*')) return { storable: false, reason: 'vary-star' }
  if (resHeaders['content-range'] !== undefined || status === 206) return { storable: false, reason: 'partial' }
  if (reqHeaders.authorization !== undefined &&
      !directives.has('public') && !directives.has('s-maxage') && !directives.has('must-revalidate')) {
    return { storable: false, reason: 'authorization' }
  }
  const explicit = directives.has('s-maxage') || directives.has('max-age') || resHeaders.expires !== undefined
  if (HEURISTIC_STATUS.has(status)) {
    // Storing with neither explicit nor heuristic freshness only helps revalidation; we store
    // when there is a lifetime, a validator to revalidate with, or `public` (RFC 9111 §3).
    const validator = resHeaders.etag !== undefined || resHeaders['last-modified'] !== undefined
    if (explicit || directives.has('public') || directives.has('no-cache') || validator || defaultTtl !== undefined) return { storable: true }
    return { storable: false, reason: 'no-freshness' }
  }
  if (EXPLICIT_STATUS.has(status) && (explicit || directives.has('public'))) return { storable: true }
  return { storable: false, reason: 'status' }
}

/**
 * Freshness lifetime in ms (RFC 9111 §4.2.1): s-maxage, max-age, Expires - Date, then the route's
 * defaultTtl, then the Last-Modified heuristic (10 % of its age, at most a day) — the last two
 * only where heuristics are allowed (no explicit expiry; a cacheable-by-default status or public).
 */
export function freshnessLifetime (status: number, headers: OutgoingHttpHeaders, directives: Directives, defaultTtl: number | undefined): number {
  const sMaxAge = seconds(directives, 's-maxage')
  if (sMaxAge !== undefined) return sMaxAge
  const maxAge = seconds(directives, 'max-age')
  if (maxAge !== undefined) return maxAge
  if (headers.expires !== undefined) {
    const expires = httpDate(headers.expires)
    if (expires === undefined) return 0 // an invalid Expires means "already expired"
    const date = httpDate(headers.date) ?? Date.now()
    return Math.max(0, expires - date)
  }
  if (!HEURISTIC_STATUS.has(status) && !directives.has('public')) return 0
  if (defaultTtl !== undefined) return defaultTtl
  const lastModified = httpDate(headers['last-modified'])
  if (lastModified !== undefined) {
    const date = httpDate(headers.date) ?? Date.now()
    return Math.min(Math.max(0, (date - lastModified) / 10), 86_400_000)
  }
  return 0
}

/**
 * Age the response already had when it arrived (RFC 9111 §4.2.3): the larger of its Age plus the
 * time it took to come, and the gap between its Date and our clock — Date has one-second
 * resolution, so that gap counts in whole seconds only.
 */
export function initialAge (headers: OutgoingHttpHeaders, requestTime: number, responseTime: number): number {
  const ageValue = Number(headers.age)
  const corrected = (Number.isFinite(ageValue) && ageValue >= 0 ? ageValue * 1000 : 0) + (responseTime - requestTime)
  const date = httpDate(headers.date)
  const apparent = date === undefined ? 0 : Math.max(0, Math.floor((responseTime - date) / 1000) * 1000)
  return Math.max(apparent, corrected)
}

export function varyNames (vary: unknown): string[] {
  if (vary === undefined) return []
  const text = Array.isArray(vary) ? vary.join(',') : String(vary)
  return text.split(',').map((s) => s.trim().toLowerCase()).filter((s) => s !== '')
}

/** A request header as one comparable string (RFC 9111 §4.1: combined and whitespace-normalised). */
export function normalizedHeader (headers: IncomingHttpHeaders, name: string): string {
  const v = headers[name]
  if (v === undefined) return ''
  const text = Array.isArray(v) ? v.join(', ') : v
  return text.split(',').map((s) => s.trim()).join(',')
}

/** The secondary cache key of a request for the given Vary names. */
export function variantKey (names: string[], headers: IncomingHttpHeaders): string {
  if (names.length === 0) return ''
  return names.map((n) => `${n}=${normalizedHeader(headers, n)}`).join('\n')
}

/** Whether the stored validators match a client's If-None-Match / If-Modified-Since (RFC 9110 §13). */
export function notModified (reqHeaders: IncomingHttpHeaders, resHeaders: OutgoingHttpHeaders): boolean {
  const inm = reqHeaders['if-none-match']
  const etag = resHeaders.etag
  if (inm !== undefined) {
    if (typeof etag !== 'string') return false
    if (inm.trim() === '*') return true
    const weak = (s: string): string => s.trim().replace(/^W\//, '')
    return inm.split(',').some((tag) => weak(tag) === weak(etag))
  }
  const ims = httpDate(reqHeaders['if-modified-since'])
  const lm = httpDate(resHeaders['last-modified'])
  if (ims !== undefined && lm !== undefined) return lm <= ims
  return false
}

/** Headers a 304 carries that refresh the stored ones (RFC 9111 §3.2: all but framing ones). */
const NOT_UPDATED = new Set(['content-length', 'content-encoding', 'transfer-encoding', 'content-range', 'x-cache', 'cache-status', 'x-request-id'])

export function mergeHeaders (stored: OutgoingHttpHeaders, fresh: OutgoingHttpHeaders): OutgoingHttpHeaders {
  const out: OutgoingHttpHeaders = { ...stored }
  for (const [k, v] of Object.entries(fresh)) {
    if (v === undefined || NOT_UPDATED.has(k)) continue
    out[k] = v
  }
  return out
}
