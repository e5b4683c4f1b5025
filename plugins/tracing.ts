import { randomFillSync } from 'node:crypto'
import fp from 'fastify-plugin'
import type { FastifyBaseLogger, FastifyPluginAsync } from 'fastify'

declare module 'fastify' {
  interface FastifyRequest {
    /** The W3C trace id (32 hex digits) this request belongs to: the caller's, or a new one. */
    traceId: string
    /** The gateway's own span id (16 hex digits), sent upstream as the parent. */
    spanId: string
  }
}

/**
 * Random ids come from a pool refilled 4 KiB at a time: one randomFillSync per ~170 requests
 * instead of one per id.
 */
const pool = Buffer.alloc(4096)
let poolOffset = pool.length

function randomHex (bytes: number): string {
  if (poolOffset + bytes > pool.length) {
    randomFillSync(pool)
    poolOffset = 0
  }
  const hex = pool.toString('hex', poolOffset, poolOffset + bytes)
  poolOffset += bytes
  return hex
}

const ZERO_TRACE = '00000000000000000000000000000000'
const ZERO_SPAN = '0000000000000000'
const HEX = /^[0-9a-f]+$/
const FLAGS = ['00', '01', '02', '03']

/** A new id of `bytes` random bytes, never all zeros (which W3C Trace Context calls invalid). */
function newId (bytes: number, zero: string): string {
  let id = randomHex(bytes)
  while (id === zero) id = randomHex(bytes)
  return id
}

export interface TraceParent {
  traceId: string
  parentId: string
  flags: string
}

/**
 * Parses a `traceparent` header (W3C Trace Context, level 1 §3.2): `00-<32 hex>-<16 hex>-<2 hex>`.
 * A later version may carry more fields after the fourth; version ff, upper-case hex, all-zero
 * ids, a comma (two headers joined) or any other form is invalid and answers undefined.
 */
export function parseTraceParent (value: string | string[] | undefined): TraceParent | undefined {
  if (typeof value !== 'string') return undefined
  const v = value.trim()
  if (v.length < 55) return undefined
  const version = v.slice(0, 2)
  if (!HEX.test(version) || version === 'ff') return undefined
  if (version === '00' ? v.length !== 55 : (v.length > 55 && v[55] !== '-')) return undefined
  if (v[2] !== '-' || v[35] !== '-' || v[52] !== '-') return undefined
  const traceId = v.slice(3, 35)
  const parentId = v.slice(36, 52)
  const flags = v.slice(53, 55)
  if (!HEX.test(traceId) || !HEX.test(parentId) || !HEX.test(flags)) return undefined
  if (traceId === ZERO_TRACE || parentId === ZERO_SPAN) return undefined
  return { traceId, parentId, flags }
}

/**
 * W3C Trace Context at the gateway: a valid `traceparent` keeps its trace id and flags (and its
 * `tracestate` goes on unchanged); otherwise a new trace starts, sampled, and any `tracestate` is
 * dropped, as the specification requires. Either way the gateway is a hop of its own: the
 * upstream gets the gateway's new span id as parent (upstream.ts forwards request.headers).
 * Every log line of the request carries the trace id.
 */
const tracing: FastifyPluginAsync = async function tracing (fastify) {
  fastify.decorateRequest('traceId', '')
  fastify.decorateRequest('spanId', '')
  fastify.addHook('onRequest', function traceContext (request, _reply, done) {
    const headers = request.headers
    const parent = parseTraceParent(headers.traceparent)
    const spanId = newId(8, ZERO_SPAN)
    let traceId: string
    let flags: string
    if (parent !== undefined) {
      traceId = parent.traceId
      // The sampled (01) and random-trace-id (02) bits go on; the others are reserved, so zeroed.
      flags = FLAGS[parseInt(parent.flags, 16) & 3]
    } else {
      traceId = newId(16, ZERO_TRACE)
      // Sampled, and the trace id is random (W3C Trace Context level 2).
      flags = '03'
      if (headers.tracestate !== undefined) delete headers.tracestate
    }
    headers.traceparent = `00-${traceId}-${spanId}-${flags}`
    request.traceId = traceId
    request.spanId = spanId
    // Added to the request logger's own bindings (src/logger.ts; pino's setBindings otherwise).
    const log = request.log as FastifyBaseLogger & { setBindings?: (bindings: Record<string, string>) => void }
    if (log.setBindings !== undefined) log.setBindings({ traceId })
    else request.log = log.child({ traceId })
    done()
  })
}

export default fp(tracing, { name: 'tracing', fastify: '5.x' })
