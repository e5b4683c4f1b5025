import type { OutgoingHttpHeaders } from 'node:http'

/** One stored response: one variant of one URL. */
export interface CachedEntry {
  status: number
  /** Response headers as the upstream sent them (hop-by-hop removed), with the stored Age excluded. */
  headers: OutgoingHttpHeaders
  body: Buffer
  /** Route name, for purge by route. */
  route: string
  /** Vary names of the response and the request's values for them. */
  vary: string[]
  variant: string
  /** Our clock when the response (or its last 304) arrived, ms. */
  responseTime: number
  /** Age it already had on arrival, ms (RFC 9111 §4.2.3 corrected_initial_age). */
  initialAge: number
  /** Freshness lifetime, ms. */
  lifetime: number
  /** How long after going stale it may still be served (stale-while-revalidate / stale-if-error), ms. */
  staleWhileRevalidate: number
  staleIfError: number
  /** The body precompressed for the common encodings, added after the entry is first stored. */
  encoded?: Partial<Record<'br' | 'gzip', Buffer>>
}

/**
 * Where cached responses live: one primary key (the URL) holds the variants (Vary) of a response.
 * Memory (LRU bounded by bytes) or Redis (shared by every instance, entries expire by TTL).
 */
export interface CacheStore {
  /** Every stored variant under a primary key, newest first. */
  get: (key: string) => Promise<CachedEntry[]>
  /** Stores one variant; `ttl` is how long it is kept at all (fresh + stale windows), ms. */
  set: (key: string, entry: CachedEntry, ttl: number) => Promise<void>
  /** Removes every variant of a primary key; resolves with how many primary keys went. */
  delete: (key: string) => Promise<number>
  /** Removes everything a route stored; resolves with how many primary keys went. */
  purgeRoute: (route: string) => Promise<number>
  close: () => Promise<void>
}

export function entrySize (key: string, entry: CachedEntry): number {
  let size = key.length + entry.body.length + entry.variant.length + 200 +
    (entry.encoded?.br?.length ?? 0) + (entry.encoded?.gzip?.length ?? 0)
  for (const [k, v] of Object.entries(entry.headers)) size += k.length + String(v).length + 4
  return size
}

/** Binary form for Redis: 4-byte meta length, meta JSON, body, then the precompressed bodies. */
export function encodeEntry (entry: CachedEntry): Buffer {
  const { body, encoded, ...meta } = entry
  const parts = { br: encoded?.br?.length ?? 0, gzip: encoded?.gzip?.length ?? 0 }
  const json = Buffer.from(JSON.stringify({ ...meta, parts }))
  const head = Buffer.allocUnsafe(4)
  head.writeUInt32BE(json.length, 0)
  return Buffer.concat([head, json, body, encoded?.br ?? Buffer.alloc(0), encoded?.gzip ?? Buffer.alloc(0)])
}

export function decodeEntry (buf: Buffer): CachedEntry | undefined {
  if (buf.length < 4) return undefined
  const len = buf.readUInt32BE(0)
  if (buf.length < 4 + len) return undefined
  try {
    const { parts, ...meta } = JSON.parse(buf.subarray(4, 4 + len).toString()) as Omit<CachedEntry, 'body'> & { parts?: { br: number, gzip: number } }
    const br = parts?.br ?? 0
    const gzip = parts?.gzip ?? 0
    const end = buf.length - br - gzip
    const entry: CachedEntry = { ...meta, body: buf.subarray(4 + len, end) }
    if (br + gzip > 0) entry.encoded = { ...(br > 0 ? { br: buf.subarray(end, end + br) } : {}), ...(gzip > 0 ? { gzip: buf.subarray(end + br) } : {}) }
    return entry
  } catch {
    return undefined
  }
}
