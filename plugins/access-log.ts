import type { ServerResponse } from 'node:http'
import fp from 'fastify-plugin'
import type { FastifyBaseLogger, FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify'
import pino from 'pino'
import { routeConfig } from '../src/fastify-internals.js'
import { isStream } from '../src/streams.js'
import { JsonLines } from '../src/json-lines.js'

export interface AccessLogOptions {
  enabled: boolean
  /** The API-key header name (apiKeys.header): a query parameter of that name is redacted too. */
  apiKeyHeader?: string
}

export const REDACTED = '[redacted]'
/** Longer paths are cut: a log line must stay a line, whatever a client sends. */
export const MAX_PATH = 2048

/** Query parameter names whose values look like credentials. */
const SECRET_NAME = /pass|pwd|secret|token|key|sig|auth|session|cred|jwt|bearer|cookie|otp|^code$|^state$|^ticket$/i

function decodeName (name: string): string {
  if (!name.includes('%') && !name.includes('+')) return name
  try {
    return decodeURIComponent(name.replace(/\+/g, ' '))
  } catch {
    return name
  }
}

/**
 * The path and query as logged: every value of a parameter whose name looks secret (token,
 * api_key, password, X-Amz-Signature, ...) is replaced by `[redacted]`, names and order kept.
 */
export function redactPath (url: string, extra?: RegExp): string {
  const q = url.indexOf('?')
  let out: string
  if (q === -1) out = url
  else {
    const params = url.slice(q + 1).split('&')
    for (let i = 0; i < params.length; i++) {
      const p = params[i]
      const eq = p.indexOf('=')
      const name = decodeName(eq === -1 ? p : p.slice(0, eq))
      if (eq !== -1 && (SECRET_NAME.test(name) || extra?.test(name) === true)) params[i] = p.slice(0, eq + 1) + REDACTED
    }
    out = url.slice(0, q + 1) + params.join('&')
  }
  return out.length > MAX_PATH ? out.slice(0, MAX_PATH) + '...' : out
}

const kBytesOut = Symbol('gatehouse.accessLog.bytesOut')
const kIp = Symbol('gatehouse.accessLog.ip')

const kLogged = Symbol('gatehouse.accessLog.logged')
const kReplyOf = Symbol('gatehouse.accessLog.reply')

/** Status of a request whose client went away before the response was complete (nginx's 499). */
export const CLIENT_CLOSED = 499

interface Count { n: number }
type LoggedResponse = ServerResponse & { [kReplyOf]?: FastifyReply }
type CountedReply = FastifyReply & { [kBytesOut]?: Count, [kIp]?: string, [kLogged]?: boolean }

function chunkLength (chunk: unknown, encoding: unknown): number {
  if (typeof chunk === 'string') return Buffer.byteLength(chunk, typeof encoding === 'string' ? encoding as BufferEncoding : 'utf8')
  if (chunk instanceof Uint8Array) return chunk.length
  return 0
}

/** Counts the body bytes a streamed response (no Content-Length) writes. */
function countWrites (res: ServerResponse, count: Count): void {
  const write = res.write
  const end = res.end
  res.write = function countedWrite (this: ServerResponse, chunk: unknown, ...rest: unknown[]) {
    count.n += chunkLength(chunk, rest[0])
    return (write as (...args: unknown[]) => boolean).call(this, chunk, ...rest)
  } as ServerResponse['write']
  res.end = function countedEnd (this: ServerResponse, chunk?: unknown, ...rest: unknown[]) {
    if (typeof chunk !== 'function') count.n += chunkLength(chunk, rest[0])
    return (end as (...args: unknown[]) => ServerResponse).call(this, chunk, ...rest)
  } as ServerResponse['end']
}

/** request.ip reads the socket, which may be gone (a client that left, a body undici sent). */
function clientIp (request: FastifyRequest): string | null {
  if (request.raw.socket == null) return null
  try {
    return request.ip ?? null
  } catch {
    return null
  }
}

function round (ms: number): number {
  return Math.round(ms * 100) / 100
}

export interface AccessLine {
  msg: 'request'
  ip: string | null
  route: string | null
  method: string
  path: string
  status: number
  target: string | null
  /** Unrounded: the line writes hundredths. */
  upstreamMs: number | null
  durationMs: number
  bytesIn: number
  bytesOut: number | null
  cache: string | null
  error: string | null
}

/**
 * Writes access lines straight to the logger's pino destination, in pino's own line format
 * (level, time, the logger's bindings, reqId, traceId, then the fields), and batched like nginx's
 * `access_log ... buffer=64k flush=100ms` (64 KiB is nginx's buffer when none is given): a write
 * when the next line would not fit, or 100 ms after a line found the batch empty. Each write hands
 * the batch to the destination's thread; with the gateway on one core, that costs as much as
 * formatting dozens of lines, so batches are as large as nginx's. pino's generic serialiser and one
 * write per line were, together, most of the access log's cost. Undefined when the logger is not
 * a pino logger with a destination: request.log.info() then. Lines pending at exit are written and
 * flushed synchronously.
 */
export const BATCH_BYTES = 64 * 1024
export const BATCH_MS = 100

export type LineWriter = (request: FastifyRequest, f: AccessLine) => void
/** One writer (one pending batch, one exit hook) per destination and bindings, whatever the reloads. */
const writers = new WeakMap<object, Map<string, LineWriter>>()

export function lineWriter (logger: FastifyBaseLogger): LineWriter | undefined {
  const root = logger as unknown as Record<symbol, unknown> & { isLevelEnabled?: (level: string) => boolean, levels?: { values: Record<string, number> } }
  const stream = root[pino.symbols.streamSym] as { write?: (line: string) => unknown, flushSync?: () => void } | undefined
  const chindings = root[pino.symbols.chindingsSym]
  const info = root.levels?.values.info
  if (typeof stream?.write !== 'function' || typeof chindings !== 'string' || typeof root.isLevelEnabled !== 'function' || info === undefined) return undefined
  const known = writers.get(stream)?.get(chindings)
  if (known !== undefined) return known
  const isLevelEnabled = root.isLevelEnabled.bind(root)
  const out = stream as { write: (line: string) => unknown, flushSync?: () => void }
  const lines = new JsonLines(BATCH_BYTES)
  const piece = (text: string): Buffer => Buffer.from(text)
  const head = piece(`{"level":${info},"time":`)
  const reqId = piece(`${chindings},"reqId":`)
  const traceId = piece(',"traceId":')
  const ip = piece(',"msg":"request","ip":')
  const route = piece(',"route":')
  const method = piece(',"method":')
  const path = piece(',"path":')
  const status = piece(',"status":')
  const target = piece(',"target":')
  const upstreamMs = piece(',"upstreamMs":')
  const durationMs = piece(',"durationMs":')
  const bytesIn = piece(',"bytesIn":')
  const bytesOut = piece(',"bytesOut":')
  const cache = piece(',"cache":')
  const error = piece(',"error":')
  const tail = piece('}\n')
  const put = (into: JsonLines, request: FastifyRequest, f: AccessLine): boolean => {
    into.begin()
    into.raw(head)
    into.number(Date.now())
    into.raw(reqId)
    into.string(request.id)
    into.raw(traceId)
    into.string(request.traceId === '' ? null : request.traceId)
    into.raw(ip)
    into.string(f.ip)
    into.raw(route)
    into.string(f.route)
    into.raw(method)
    into.string(f.method)
    into.raw(path)
    into.string(f.path)
    into.raw(status)
    into.number(f.status)
    into.raw(target)
    into.string(f.target)
    into.raw(upstreamMs)
    into.ms(f.upstreamMs)
    into.raw(durationMs)
    into.ms(f.durationMs)
    into.raw(bytesIn)
    into.number(f.bytesIn)
    into.raw(bytesOut)
    into.number(f.bytesOut)
    into.raw(cache)
    into.string(f.cache)
    into.raw(error)
    into.string(f.error)
    into.raw(tail)
    return into.end()
  }
  let timer: NodeJS.Timeout | undefined
  const flush = (): void => {
    if (lines.length > 0) out.write(lines.take())
  }
  // One timer at a time: a batch written because it was full leaves the timer running, to write
  // what comes after it within the same 100 ms.
  const onTimer = (): void => {
    timer = undefined
    flush()
  }
  process.once('exit', () => {
    flush()
    try { out.flushSync?.() } catch {}
  })
  const writer: LineWriter = (request, f) => {
    if (!isLevelEnabled('info')) return
    if (!put(lines, request, f)) {
      flush()
      if (!put(lines, request, f)) {
        // Longer than a whole batch: on its own, in a buffer that holds it (a character takes
        // 6 bytes at most, escaped).
        let chars = request.id.length + request.traceId.length
        for (const v of [f.ip, f.route, f.method, f.path, f.target, f.cache, f.error]) chars += v?.length ?? 0
        const alone = new JsonLines(1024 + 3 * chindings.length + 6 * chars)
        put(alone, request, f)
        out.write(alone.take())
        return
      }
    }
    timer ??= setTimeout(onTimer, BATCH_MS).unref()
  }
  const byBindings = writers.get(stream) ?? new Map<string, LineWriter>()
  byBindings.set(chindings, writer)
  writers.set(stream, byBindings)
  return writer
}

/**
 * One JSON line per request (Fastify's own two request lines are off). Its bindings carry reqId
 * and traceId (plugins/tracing.ts); the line adds client IP as trustProxy decides, route, method,
 * path with secret-looking query values redacted, status, upstream target, upstream and total
 * duration, body bytes in and out, cache result and the code of any error the gateway made.
 * No header is logged, so no Authorization, cookie or API key value can leak through it.
 */
const accessLog: FastifyPluginAsync<AccessLogOptions> = async function accessLog (fastify, opts) {
  if (!opts.enabled) return
  // The reply's own fields, there from its constructor (one shape for every reply).
  fastify.decorateReply(kIp, undefined)
  fastify.decorateReply(kBytesOut, undefined)
  fastify.decorateReply(kLogged, false)
  const extra = opts.apiKeyHeader !== undefined ? new RegExp(`^${opts.apiKeyHeader.replace(/[^A-Za-z0-9]/g, '.')}$`, 'i') : undefined

  /** The response's 'close': an HTTP/1 client that left mid-response gets no onResponse. */
  function onClose (this: LoggedResponse): void {
    const reply = this[kReplyOf]
    if (reply !== undefined && !this.writableEnded) logRequest(reply.request, reply)
  }

  // An onRequest hook (not preParsing, which a plain route then does not need at all). A declared
  // body length is exact (Node enforces it); a chunked body is counted by the route's body limit.
  fastify.addHook('onRequest', function watchResponse (request, reply, done) {
    const res = reply.raw as LoggedResponse
    res[kReplyOf] = reply
    res.on('close', onClose)
    // undici sets `socket = null` on an IncomingMessage it was given as a body once it is sent
    // (undici util.destroy), and request.ip reads the socket: take the address while it is there.
    const headers = request.headers
    if (headers['content-length'] !== undefined || headers['transfer-encoding'] !== undefined) (reply as CountedReply)[kIp] = request.ip
    done()
  })

  // A streamed body is counted as it is written, Content-Length or not: compression (a route
  // hook, after this one) may still change what is sent.
  fastify.addHook('onSend', function countBodyOut (_request, reply, payload, done) {
    if (isStream(payload)) {
      const count: Count = { n: 0 }
      ;(reply as CountedReply)[kBytesOut] = count
      countWrites(reply.raw, count)
    }
    done(null, payload)
  })

  function logRequest (request: FastifyRequest, reply: FastifyReply): void {
    const counted = reply as CountedReply
    if (counted[kLogged] === true) return
    counted[kLogged] = true
    const up = request.upstream
    const lengthIn = request.headers['content-length']
    // A response never ended lost its client (an HTTP/2 reset still emits 'finish'): nginx's 499.
    const ended = reply.raw.writableEnded
    const status = ended ? reply.statusCode : CLIENT_CLOSED
    let bytesOut: number | null
    if (request.method === 'HEAD' || status === 204 || status === 304) bytesOut = 0
    else {
      const length = reply.getHeader('content-length')
      bytesOut = counted[kBytesOut]?.n ?? (length !== undefined && ended ? Number(length) : up?.bytesOut ?? (ended ? 0 : null))
    }
    const cache = reply.getHeader('x-cache')
    const fields: AccessLine = {
      msg: 'request',
      ip: counted[kIp] ?? clientIp(request),
      route: up?.route ?? routeConfig(request).gatehouse?.name ?? null,
      method: request.method,
      path: redactPath(request.url, extra),
      status,
      target: up?.target?.origin ?? null,
      upstreamMs: up?.upstreamMs ?? null,
      durationMs: reply.elapsedTime,
      bytesIn: lengthIn !== undefined ? Number(lengthIn) : up?.bodyIn?.bytes ?? 0,
      bytesOut,
      cache: typeof cache === 'string' ? cache : null,
      error: up?.error ?? request.problemCode ?? null
    }
    if (write !== undefined) write(request, fields)
    else request.log.info({ ...fields, upstreamMs: fields.upstreamMs === null ? null : round(fields.upstreamMs), durationMs: round(fields.durationMs) })
  }

  const write = lineWriter(fastify.log)

  fastify.addHook('onResponse', function logResponse (request, reply, done) {
    logRequest(request, reply)
    done()
  })
}

export default fp(accessLog, { name: 'access-log', fastify: '5.x' })
