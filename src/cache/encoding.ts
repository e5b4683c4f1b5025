import zlib from 'node:zlib'
import { promisify } from 'node:util'
import type { OutgoingHttpHeaders } from 'node:http'

/*
 * Cached bodies are kept precompressed for br and gzip next to the identity body. Measured on this
 * project's 2-core machine (see README): compressing a 20 KiB JSON body costs ~1.8-2 ms of CPU per
 * hit (br q4 or gzip 6), many times a whole cache hit, while the two compressed copies add only
 * ~16-23 % to the entry's size. So a hit sends stored bytes, and compression runs once per entry.
 */

const brotli = promisify(zlib.brotliCompress)
const gzip = promisify(zlib.gzip)

export type StoredEncoding = 'br' | 'gzip'

const COMPRESSIBLE = /^text\/(?!event-stream)|[+/]json\b|[+/]xml\b|javascript|[+/]text\b/i

/** Whether a stored response is worth precompressing (the rules of plugins/compress.ts). */
export function precompressible (status: number, headers: OutgoingHttpHeaders, size: number, threshold: number): boolean {
  if (status !== 200 || size < threshold) return false
  if (headers['content-encoding'] !== undefined || headers['content-range'] !== undefined) return false
  if (/(?:^|,)\s*no-transform\s*(?:,|$)/i.test(String(headers['cache-control'] ?? ''))) return false
  return COMPRESSIBLE.test(String(headers['content-type'] ?? ''))
}

export async function precompress (body: Buffer): Promise<Record<StoredEncoding, Buffer>> {
  const [b, g] = await Promise.all([
    brotli(body, { params: { [zlib.constants.BROTLI_PARAM_QUALITY]: 4, [zlib.constants.BROTLI_PARAM_SIZE_HINT]: body.length } }),
    gzip(body)
  ])
  return { br: b, gzip: g }
}

/**
 * The content coding a client prefers among `offered` (RFC 9110 §12.5.3): highest q wins, ties go
 * to the earlier offered coding; `*` covers codings not named; `x-gzip` is gzip. Undefined when
 * the identity body is what it gets.
 */
export function negotiate (header: string | undefined, offered: readonly string[]): string | undefined {
  if (header === undefined || header.trim() === '') return undefined
  const q = new Map<string, number>()
  for (const part of header.toLowerCase().split(',')) {
    const [rawName, ...params] = part.split(';')
    let name = rawName.trim()
    if (name === 'x-gzip') name = 'gzip'
    if (name === '') continue
    let value = 1
    for (const p of params) {
      const m = /^\s*q\s*=\s*([0-9.]+)\s*$/.exec(p)
      if (m !== null) value = Number(m[1])
    }
    if (!q.has(name)) q.set(name, value)
  }
  const star = q.get('*')
  let best: string | undefined
  let bestQ = 0
  for (const coding of offered) {
    const v = q.get(coding) ?? star ?? 0
    if (v > bestQ) { best = coding; bestQ = v }
  }
  return best
}
