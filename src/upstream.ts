import { readFileSync } from 'node:fs'
import { Transform, type Readable, type TransformCallback } from 'node:stream'
import type { IncomingHttpHeaders, OutgoingHttpHeaders, ServerResponse } from 'node:http'
import type { FastifyInstance, FastifyReply, FastifyRequest, RouteOptions } from 'fastify'
import replyFrom, { type FastifyReplyFromHooks } from '@fastify/reply-from'
import fp from 'fastify-plugin'
import { Agent, type Dispatcher } from 'undici'
import type { GatewayConfig, RouteDefinition } from './config.js'
import { normalizePrefix } from './config.js'
import { upstreamPath } from './path.js'
import { HealthChecker, Target, UpstreamPool, type AttemptResult, type FailureKind } from './balancer/index.js'
import type { Admission } from './balancer/breaker.js'
import { metrics } from './metrics.js'
import * as errors from './errors.js'
import { isWebSocketUpgrade, proxyWebSocket } from './websocket.js'
import { replyHeaders, type HeaderValue } from './fastify-internals.js'
import { isStream } from './streams.js'

/**
 * Request headers that concern one connection only (RFC 9110 §7.6.1), never forwarded. Expect too:
 * the gateway's server answered `100 Continue` itself, and undici refuses the header (curl sends it
 * with every upload over 1 MiB, which got a 502).
 */
const HOP_BY_HOP_REQUEST = ['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'proxy-authorization', 'http2-settings', 'expect']
/** Headers naming the client or its connection, dropped when they come from an untrusted peer. */
const UNTRUSTED_FORWARDING = ['forwarded', 'x-real-ip', 'x-forwarded-port', 'x-client-ip', 'true-client-ip']
/**
 * Upstream response headers never passed on: those that concern one connection only, and those
 * that tell the software and version behind the gateway (whatever `securityHeaders` says).
 */
const DROPPED_RESPONSE = ['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'proxy-authenticate',
  'server', 'x-powered-by', 'x-aspnet-version', 'x-aspnetmvc-version']
const DROPPED = new Set(DROPPED_RESPONSE)

/** The value of a header in undici's raw [name, value, ...] list; undefined when absent. */
function rawHeader (raw: Buffer[], name: string): string | undefined {
  for (let i = 0; i < raw.length; i += 2) {
    if (raw[i].length === name.length && raw[i].toString('latin1').toLowerCase() === name) return raw[i + 1].toString('latin1')
  }
  return undefined
}

const ONLY_OPTION = /^\s*(?:keep-alive|close)\s*$/i

/** Removes from a flat header list the fields a Connection header names (RFC 9110 §7.6.1). */
function dropListed (out: HeaderValue[], names: string[], connection: string): void {
  const listed = connection.toLowerCase().split(',').map((t) => t.trim())
  for (let i = names.length - 1; i >= 0; i--) {
    if (listed.includes(names[i])) {
      out.splice(i * 2, 2)
      names.splice(i, 1)
    }
  }
}

/** Whether @fastify/compress would consider compressing this request's response. */
function wantsEncoding (accept: string | undefined): boolean {
  return accept !== undefined && accept !== '' && !/^\s*identity\s*$/i.test(accept)
}

/** What the gateway knows about the request it is forwarding, read by metrics and the access log. */
export interface UpstreamState {
  route: string
  target?: Target
  /** ms since the upstream request was sent, until its response headers came. */
  upstreamMs?: number
  attempts: number
  /** The exact request target sent upstream (path and query), bypassing reply-from's URL parsing. */
  path?: string
  /** The reason of a gateway-made error, for the access log. */
  error?: string
  /** A small request body kept for replay (POST with Idempotency-Key on a route that opts in). */
  body?: Buffer
  /** The client's response, whose early close aborts the upstream request. */
  res: ServerResponse
  /** Body bytes written to the client, counted where the gateway writes them itself. */
  bytesOut?: number
  /** A chunked request body as it is read: its bytes so far. */
  bodyIn?: { readonly bytes: number }
}

declare module 'fastify' {
  interface FastifyContextConfig {
    /** The route definition a request matched; undefined for the not-found handler and the admin API. */
    gatehouse?: RouteDefinition
  }
  interface FastifyRequest {
    upstream?: UpstreamState
  }
}

const kRequest = Symbol('gatehouse.request')
const kDirect = Symbol('gatehouse.direct')
type DirectResponse = ServerResponse & { [kDirect]?: { gone: boolean, current: { fail: (err: Error) => void } | undefined, resume: (() => void) | undefined } }

/** A direct exchange's response closed: before it was complete, the client went away. */
function directClosed (this: DirectResponse): void {
  const ex = this[kDirect]
  if (ex === undefined || this.writableFinished) return
  ex.gone = true
  ex.current?.fail(abortError('the client went away', 'UND_ERR_ABORTED'))
}

/** The client's socket took what was written: undici may read on. */
function directDrained (this: DirectResponse): void {
  this[kDirect]?.resume?.()
}

/** The target label of requests that reached no target (every circuit open). */
const NO_TARGET = '(none)'

type HeadersWithRequest = IncomingHttpHeaders & { [kRequest]?: FastifyRequest }

/** The request as sent upstream; `origin` changes with each attempt's target. */
interface ExchangeOptions {
  origin?: string
  path: string
  method: string
  /** An object on the reply-from way; on the direct way a flat [name, value, ...] list, host first when the gateway sets it. */
  headers: IncomingHttpHeaders | string[]
  body?: Dispatcher.DispatchOptions['body']
}

/** One forwarded request across its attempts. */
interface Exchange {
  request: FastifyRequest
  state: UpstreamState
  opts: ExchangeOptions
  /** Targets tried so far: a retry goes elsewhere. */
  tried: Set<Target>
  /** performance.now() after which no attempt starts. */
  deadline: number
  /** The client went away: nothing is retried, nothing counted against a target. */
  readonly gone: boolean
}

/**
 * Aborts the upstream request when the client goes away before its response is complete. One
 * serves every attempt of a request: undici may remove an old attempt's listener after the next
 * attempt added its own, so listeners are kept by identity.
 */
class ClientGone {
  aborted = false
  private readonly listeners = new Set<() => void>()

  constructor (res: ServerResponse) {
    res.once('close', () => {
      if (!res.writableFinished) {
        this.aborted = true
        for (const fn of [...this.listeners]) fn()
        this.listeners.clear()
      }
    })
  }

  on (_event: 'abort', fn: () => void): void { this.listeners.add(fn) }
  once (_event: 'abort', fn: () => void): void { this.listeners.add(fn) }
  removeListener (_event: 'abort', fn: () => void): void { this.listeners.delete(fn) }
}

/**
 * The abort signal of one attempt, in the EventEmitter shape undici also accepts (one listener:
 * undici adds exactly one). An AbortController with its EventTarget cost ~6-20 % of the plain
 * route's CPU per request (bench --compare, 2026-11-23).
 */
class AttemptSignal {
  aborted = false
  reason: unknown
  private listener: (() => void) | undefined

  abort (reason: unknown): void {
    if (this.aborted) return
    this.aborted = true
    this.reason = reason
    const fn = this.listener
    this.listener = undefined
    fn?.()
  }

  on (_event: 'abort', fn: () => void): void { this.listener = fn }
  once (_event: 'abort', fn: () => void): void { this.listener = fn }
  removeListener (_event: 'abort', _fn: () => void): void { this.listener = undefined }
}

/** Counts a streamed request body and fails it past the limit: a pass-through parser skips bodyLimit. */
class BodyLimit extends Transform {
  /** Bytes read so far (the access log's bytesIn of a chunked body). */
  bytes = 0
  private readonly limit: number

  constructor (limit: number) {
    super()
    this.limit = limit
  }

  override _transform (chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.bytes += chunk.length
    if (this.bytes > this.limit) cb(new errors.GATEHOUSE_PAYLOAD_TOO_LARGE(String(this.limit)))
    else cb(null, chunk)
  }
}

const connectCodes = new Set(['ECONNREFUSED', 'EHOSTUNREACH', 'ENETUNREACH', 'EADDRNOTAVAIL'])
const resetCodes = new Set(['ECONNRESET', 'EPIPE', 'UND_ERR_SOCKET', 'UND_ERR_CLOSED', 'ECONNABORTED'])
const dnsCodes = new Set(['ENOTFOUND', 'EAI_AGAIN'])

const timeoutCodes = new Set(['UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT', 'FST_REPLY_FROM_GATEWAY_TIMEOUT'])

function isTlsCode (code: string): boolean {
  return code.startsWith('ERR_TLS') || code.startsWith('ERR_SSL') || code.includes('CERT') || code.startsWith('UNABLE_TO_') || code === 'HOSTNAME_MISMATCH'
}

function isKnownCode (code: string): boolean {
  return code === 'GATEHOUSE_PAYLOAD_TOO_LARGE' || code === 'UND_ERR_ABORTED' || code === 'UND_ERR_CONNECT_TIMEOUT' || code === 'ETIMEDOUT' ||
    connectCodes.has(code) || dnsCodes.has(code) || resetCodes.has(code) || timeoutCodes.has(code) || isTlsCode(code) ||
    code.startsWith('HPE_') || code === 'UND_ERR_INFO' || code === 'FST_REPLY_FROM_BAD_GATEWAY'
}

/** The first error along a cause chain whose code says what happened (reply-from and undici wrap). */
function transportError (err: unknown): (Error & { code: string }) | undefined {
  let e: unknown = err
  for (let depth = 0; depth < 5 && e instanceof Error; depth++) {
    if (isKnownCode((e as NodeJS.ErrnoException).code ?? '')) return e as Error & { code: string }
    e = e.cause
  }
  return undefined
}

/** Maps a transport error to the gateway error a client gets; never passes the original text on. */
export function mapUpstreamError (err: unknown): Error {
  const known = transportError(err)
  const code = known?.code ?? ''
  if (code === 'GATEHOUSE_PAYLOAD_TOO_LARGE') return known as Error
  if (connectCodes.has(code)) return new errors.GATEHOUSE_UPSTREAM_UNREACHABLE()
  if (code === 'UND_ERR_CONNECT_TIMEOUT' || code === 'ETIMEDOUT') return new errors.GATEHOUSE_UPSTREAM_CONNECT_TIMEOUT()
  if (timeoutCodes.has(code)) return new errors.GATEHOUSE_UPSTREAM_TIMEOUT()
  if (dnsCodes.has(code)) return new errors.GATEHOUSE_UPSTREAM_DNS()
  if (isTlsCode(code)) return new errors.GATEHOUSE_UPSTREAM_TLS()
  if (resetCodes.has(code)) return new errors.GATEHOUSE_UPSTREAM_RESET()
  return new errors.GATEHOUSE_UPSTREAM_BAD_RESPONSE()
}

/** How an attempt failed, for passive health, the breaker and the retry decision; undefined when the client went away. */
export function failureKind (err: unknown): FailureKind | undefined {
  const code = transportError(err)?.code ?? ''
  if (code === 'UND_ERR_ABORTED' || code === 'GATEHOUSE_PAYLOAD_TOO_LARGE') return undefined
  if (connectCodes.has(code) || dnsCodes.has(code) || code === 'UND_ERR_CONNECT_TIMEOUT') return 'connect'
  if (timeoutCodes.has(code) || code === 'ETIMEDOUT') return 'timeout'
  if (resetCodes.has(code)) return 'reset'
  return 'other'
}

/** Retry-After (seconds or an HTTP date) in ms from now, capped at five minutes; undefined when absent or invalid. */
export function retryAfterMs (value: string | string[] | undefined, now = Date.now()): number | undefined {
  const v = Array.isArray(value) ? value[0] : value
  if (v === undefined || v === '') return undefined
  const ms = /^\d+$/.test(v) ? Number(v) * 1000 : Date.parse(v) - now
  return Number.isFinite(ms) ? Math.min(Math.max(ms, 0), 300_000) : undefined
}

/** Methods retried by default: those RFC 9110 calls idempotent, less TRACE. */
const IDEMPOTENT = ['GET', 'HEAD', 'OPTIONS', 'PUT', 'DELETE']
/** Upstream statuses that mean "this target cannot serve now": another one may. */
const RETRY_STATUS = new Set([502, 503, 504])
/** The largest body kept in memory for a replay (POST with Idempotency-Key on a route that opts in). */
const MAX_REPLAY_BODY = 64 * 1024

function readMaybe (path: string | undefined): Buffer | undefined {
  return path === undefined ? undefined : readFileSync(path)
}

export interface UpstreamContext {
  gateway: GatewayConfig
  /** Whether an address is one of the trusted proxies (trustProxy). */
  trusted: (address: string) => boolean
}

/**
 * Turns a route definition into an encapsulated upstream plugin: its own undici pool per target
 * (one Agent), reply-from with the gateway's header rules and error mapping, and a pass-through
 * body parser that counts bytes against the route's body limit.
 */
export function upstreamPlugin (route: RouteDefinition, ctx: UpstreamContext) {
  const up = route.upstream
  if (up === undefined) throw new Error(`route ${route.name} has no upstream`)
  const prefix = normalizePrefix(route.match.prefix)
  const rewrite = route.rewrite?.prefix ?? '/'
  const bodyLimit = route.bodyLimit ?? ctx.gateway.limits.bodyLimit
  const pool = new UpstreamPool(route.name, up, up.targets.map((t) => new Target(t.url, t.weight)))
  const retries = up.retries
  const retryMethods = new Set(retries.methods ?? IDEMPOTENT)
  const backoff = retries.backoff ?? 25
  // Each attempt may take timeouts.response; all of them together at most twice that, so one
  // hanging target costs a client one timeout and the retry still gets a full chance.
  const deadlineMs = up.timeouts.response * (retries.attempts > 0 ? 2 : 1)
  const requestSet = Object.entries(route.headers?.request?.set ?? {}).map(([k, v]) => [k.toLowerCase(), v] as const)
  const requestRemove = (route.headers?.request?.remove ?? []).map((h) => h.toLowerCase())
  const responseSet = Object.entries(route.headers?.response?.set ?? {}).map(([k, v]) => [k.toLowerCase(), v] as const)
  const responseRemove = (route.headers?.response?.remove ?? []).map((h) => h.toLowerCase())
  const tls = up.tls
  // Names the route sets or removes on responses: an upstream's own value of them is not passed on.
  const responseSetNames = new Set(responseSet.map(([k]) => k))
  const responseNames = responseRemove.length + responseSet.length > 0 ? new Set([...responseRemove, ...responseSetNames]) : undefined
  // Responses on a cached route go through Fastify's onSend (the cache tees them there), and so do
  // those of a route whose own plugin may add onSend hooks: reply-from.
  const direct = route.cache?.enabled !== true && route.plugin === undefined

  const connect = {
    timeout: up.timeouts.connect,
    rejectUnauthorized: tls?.rejectUnauthorized ?? true,
    ca: readMaybe(tls?.ca),
    cert: readMaybe(tls?.cert),
    key: readMaybe(tls?.key),
    ...(tls?.servername !== undefined ? { servername: tls.servername } : {})
  }
  // upstream.http2: h2 offered by ALPN on https targets (HTTP/1.1 if a target does not take it),
  // h2c with prior knowledge on http targets. (undici's Pool reads useH2c from the connect options.)
  const h2 = up.http2 ? { allowH2: true, connect: { ...connect, useH2c: true } } : { connect }
  const agent = new Agent({
    connections: up.connections,
    pipelining: 1,
    keepAliveTimeout: up.keepAliveTimeout,
    keepAliveMaxTimeout: up.keepAliveTimeout,
    headersTimeout: up.timeouts.response,
    bodyTimeout: up.timeouts.idle ?? up.timeouts.response,
    ...h2
  })
  // Probes get their own small pool: a target whose pool is full of slow requests is still probed.
  const probeAgent = up.healthCheck !== undefined ? new Agent({ connections: 1, pipelining: 1, ...h2 }) : undefined

  /** Whether a failed attempt may be sent again to another target; which one, or undefined. */
  function retryTarget (request: FastifyRequest, opts: ExchangeOptions, state: UpstreamState, kind: FailureKind | undefined, tried: ReadonlySet<Target>, remaining: number): Target | undefined {
    if (kind === undefined || state.attempts >= 1 + retries.attempts) return undefined
    // A streamed body is gone once sent; only an absent or a kept body can be sent again.
    const body = opts.body
    const replayable = body === undefined || body === null || body === '' || Buffer.isBuffer(body)
    if (!replayable) return undefined
    // A refused connection never reached the upstream: safe for any method. Anything else may
    // have, so only idempotent methods (or a kept POST with Idempotency-Key) go again.
    if (kind !== 'connect') {
      const keyed = state.body !== undefined && retries.idempotencyKey === true && request.headers['idempotency-key'] !== undefined
      if (!retryMethods.has(opts.method) && !keyed) return undefined
    }
    if (remaining < backoff * 2 ** state.attempts + Math.min(100, up!.timeouts.response)) return undefined
    const next = pool.pick(request, tried)
    // The budget guards a struggling service against retry storms; a request whose connection
    // was never made added no load anywhere, so failing it over does not spend the budget (a dead
    // target would otherwise exhaust it and surface errors until the health check catches up).
    if (next === undefined || (kind !== 'connect' && !pool.budget.tryRetry(Date.now()))) return undefined
    return next
  }

  /** The OK result, shared: every successful attempt reports the same thing. */
  const OK: AttemptResult = { ok: true }

  /**
   * Books one attempt's result (metrics, passive health, breaker, Retry-After) and decides what
   * follows: the target to try next, or undefined to pass this result on. `err` null means a
   * response with `status` came. Shared by both ways of forwarding below.
   */
  function judge (ex: Exchange, target: Target, admission: Admission, started: number, err: Error | null, status: number, retryAfter: string | string[] | undefined): Target | undefined {
    const state = ex.state
    const now = performance.now()
    state.upstreamMs = now - started
    let result: AttemptResult | null
    if (err === null) {
      pool.observe(target, state.upstreamMs)
      result = status >= 500 ? { ok: false, kind: 'status', status } : OK
    } else {
      const kind = failureKind(err)
      result = kind === undefined ? null : { ok: false, kind }
    }
    pool.finished(target, admission, result)
    if (result !== null && !result.ok && !ex.gone && (err !== null || RETRY_STATUS.has(status))) {
      if (err === null) {
        const wait = retryAfterMs(retryAfter)
        if (wait !== undefined) pool.backOff(target, Date.now() + wait)
      }
      const next = retryTarget(ex.request, ex.opts, state, result.kind, ex.tried, ex.deadline - now)
      if (next !== undefined) {
        pool.count(target, 'retried')
        state.attempts++
        return next
      }
    }
    // An attempt the client abandoned says nothing about the target: not counted.
    if (result !== null) pool.count(target, result.ok ? 'ok' : result.kind === 'timeout' ? 'timeout' : 'error')
    return undefined
  }

  /** The pause before the next attempt: exponential in the attempts made, jittered. */
  function backoffDelay (state: UpstreamState): number {
    const base = backoff * 2 ** (state.attempts - 2)
    return base / 2 + Math.random() * base
  }

  /** Points the request at `target`, carrying the Host header along when it named the previous one. */
  function aim (ex: Exchange, target: Target): void {
    const state = ex.state
    const previous = state.target
    state.target = target
    ex.tried.add(target)
    ex.opts.origin = target.origin
    if (previous === undefined || previous === target) return
    const headers = ex.opts.headers
    if (Array.isArray(headers)) {
      if (headers[0] === 'host' && headers[1] === previous.host) headers[1] = target.host
    } else if (headers.host === previous.host) headers.host = target.host
  }

  // The reply-from way (routes whose responses go through Fastify's onSend: cache, compression).
  // reply-from calls `request` synchronously from reply.from(); the Fastify request travels to it
  // on a symbol-keyed header (reply-from copies headers with Object.assign, symbols included).
  // Retries happen here, below reply-from: every attempt and its result pass through this one
  // place, and a failed attempt's status and headers never reach the client's reply.
  const dispatcher = {
    request (opts: Dispatcher.RequestOptions & { headers: HeadersWithRequest }, cb: (err: Error | null, res?: Dispatcher.ResponseData) => void): void {
      const request = opts.headers[kRequest] as FastifyRequest
      delete opts.headers[kRequest]
      const state = request.upstream as UpstreamState
      const gone = new ClientGone(state.res)
      if (state.path !== undefined) opts.path = state.path
      if (state.body !== undefined) opts.body = state.body
      const ex: Exchange = { request, state, opts: opts as ExchangeOptions, tried: new Set(), deadline: performance.now() + deadlineMs, get gone () { return gone.aborted } }

      const attempt = (target: Target): void => {
        aim(ex, target)
        const started = performance.now()
        // undici's headersTimeout ticks in half seconds (300 ms fires after ~1 s): each attempt
        // gets its own timer, and its own signal, which the client going away aborts too.
        const attemptAbort = new AttemptSignal()
        const onGone = (): void => { attemptAbort.abort(abortError('the client went away', 'UND_ERR_ABORTED')) }
        gone.on('abort', onGone)
        const timer = setTimeout(() => { attemptAbort.abort(abortError('the upstream did not answer in time', 'UND_ERR_HEADERS_TIMEOUT')) }, Math.max(1, Math.min(up!.timeouts.response, ex.deadline - started)))
        opts.signal = attemptAbort as unknown as AbortSignal
        const admission = pool.started(target)
        agent.request(opts, (err, settled) => {
          clearTimeout(timer)
          // undici answers a failure with (err, { opaque }): only a null error carries a response.
          const res = err === null ? settled : undefined
          if (res === undefined) gone.removeListener('abort', onGone)
          const next = judge(ex, target, admission, started, res === undefined ? err : null, res?.statusCode ?? 0, res?.headers['retry-after'])
          if (next !== undefined) {
            // The failed response's body is read away (or the connection dropped past 64 KiB).
            if (res !== undefined) {
              gone.removeListener('abort', onGone)
              res.body.dump({ limit: 65536 }).catch(() => {})
            }
            setTimeout(() => {
              if (gone.aborted) cb(abortError('the client went away', 'UND_ERR_ABORTED'))
              else attempt(next)
            }, backoffDelay(state)).unref()
            return
          }
          cb(err, res)
        })
      }
      attempt(state.target as Target)
    }
  }

  /**
   * One attempt of the direct way: undici's dispatch handler for one target. A 5xx that is
   * retried has its body read away here (the connection is dropped past 64 KiB).
   */
  class Attempt implements Dispatcher.DispatchHandler {
    private readonly ex: Direct
    private readonly target: Target
    private readonly admission: Admission
    private readonly started: number
    private readonly timer: NodeJS.Timeout
    private abort: ((err?: Error) => void) | undefined
    /** An error that came before undici gave the abort function. */
    private reason: Error | undefined
    private judged = false
    private discarded = -1

    constructor (ex: Direct, target: Target) {
      this.ex = ex
      this.target = target
      this.started = performance.now()
      // undici's headersTimeout ticks in half seconds (300 ms fires after ~1 s): each attempt has its own timer.
      this.timer = setTimeout(timeoutAttempt, Math.max(1, Math.min(up!.timeouts.response, ex.deadline - this.started)), this)
      this.admission = pool.started(target)
    }

    /** Ends the attempt with `err` (its onError follows). */
    fail (err: Error): void {
      if (this.abort !== undefined) this.abort(err)
      else this.reason = err
    }

    onConnect (abort: (err?: Error) => void): void {
      if (this.reason !== undefined) abort(this.reason)
      else this.abort = abort
    }

    onHeaders (status: number, raw: Buffer[], resume: () => void): boolean {
      clearTimeout(this.timer)
      this.judged = true
      const next = judge(this.ex, this.target, this.admission, this.started, null, status, RETRY_STATUS.has(status) ? rawHeader(raw, 'retry-after') : undefined)
      if (next !== undefined) {
        this.discarded = 0
        this.ex.retry(next)
        return true
      }
      return this.ex.respond(status, raw, resume, this)
    }

    onData (chunk: Buffer): boolean {
      if (this.discarded === -1) return this.ex.write(chunk)
      this.discarded += chunk.length
      if (this.discarded > 65536) this.fail(abortError('retried response body too large to drain', 'UND_ERR_ABORTED'))
      return true
    }

    onComplete (): void {
      if (this.discarded === -1) this.ex.res.end()
    }

    onError (err: Error): void {
      clearTimeout(this.timer)
      if (this.discarded !== -1) return
      if (this.judged) {
        this.ex.broken(err)
        return
      }
      this.judged = true
      const next = judge(this.ex, this.target, this.admission, this.started, err, 0, undefined)
      if (next !== undefined) this.ex.retry(next)
      else this.ex.fail(err)
    }
  }

  function timeoutAttempt (attempt: Attempt): void {
    attempt.fail(abortError('the upstream did not answer in time', 'UND_ERR_HEADERS_TIMEOUT'))
  }

  /**
   * The direct way, for responses nothing needs to see in onSend (no cache on the route, no
   * compression for this client): dispatched with undici's handler API, the response written to
   * the client's response as it comes. No Readable, no reply.send, no pipe between the two
   * sockets: about half of a reply-from proxy's CPU per request (bench, README).
   */
  class Direct implements Exchange {
    readonly request: FastifyRequest
    readonly reply: FastifyReply
    readonly res: ServerResponse
    readonly state: UpstreamState
    readonly opts: ExchangeOptions
    readonly tried = new Set<Target>()
    readonly deadline: number
    gone = false
    current: Attempt | undefined
    resume: (() => void) | undefined

    constructor (request: FastifyRequest, reply: FastifyReply, state: UpstreamState, opts: ExchangeOptions) {
      this.request = request
      this.reply = reply
      this.res = reply.raw
      this.state = state
      this.opts = opts
      this.deadline = performance.now() + deadlineMs
      ;(this.res as DirectResponse)[kDirect] = this
      // 'close' comes once; on() adds the shared listener, once() would wrap it in a closure.
      this.res.on('close', directClosed)
    }

    attempt (target: Target): void {
      aim(this, target)
      const attempt = new Attempt(this, target)
      this.current = attempt
      agent.dispatch(this.opts as Dispatcher.DispatchOptions, attempt)
    }

    retry (next: Target): void {
      setTimeout(() => { if (!this.gone) this.attempt(next) }, backoffDelay(this.state)).unref()
    }

    /** Writes the status and headers: the upstream's (less hop-by-hop ones), the hooks', the route's. */
    respond (status: number, raw: Buffer[], resume: () => void, attempt: Attempt): boolean {
      if (this.gone) return false
      const preset = replyHeaders(this.reply)
      const out: HeaderValue[] = []
      const names: string[] = []
      let connection: string | undefined
      for (let i = 0; i < raw.length; i += 2) {
        const name = raw[i].toString('latin1')
        const lower = name.toLowerCase()
        if (lower === 'connection') connection = raw[i + 1].toString('latin1')
        if (DROPPED.has(lower) || (responseNames !== undefined && responseNames.has(lower))) continue
        names.push(lower)
        out.push(name, raw[i + 1].toString('latin1'))
      }
      // `Connection: keep-alive` (or close) names no other field: nothing more to drop.
      if (connection !== undefined && !ONLY_OPTION.test(connection)) dropListed(out, names, connection)
      for (const name in preset) {
        const value = preset[name]
        if (value !== undefined && (name === 'set-cookie' || !names.includes(name)) && !responseSetNames.has(name)) {
          out.push(name, value)
          names.push(name)
        }
      }
      for (let i = 0; i < responseSet.length; i++) out.push(responseSet[i][0], responseSet[i][1])
      const req = this.request.raw
      // The client is still sending its body: the connection cannot be reused (reply-from does the same).
      if (req.httpVersionMajor === 1 && !req.complete) out.push('connection', 'close')
      try {
        this.res.writeHead(status, out as unknown as OutgoingHttpHeaders)
      } catch {
        this.res.statusCode = 200
        attempt.fail(abortError('the upstream response cannot be passed on', 'UND_ERR_INFO'))
        this.state.error = 'GATEHOUSE_UPSTREAM_BAD_RESPONSE'
        this.reply.send(new errors.GATEHOUSE_UPSTREAM_BAD_RESPONSE())
        return false
      }
      this.resume = resume
      this.state.bytesOut = 0
      return true
    }

    write (chunk: Buffer): boolean {
      this.state.bytesOut = (this.state.bytesOut as number) + chunk.length
      if (this.res.write(chunk)) return true
      this.res.once('drain', directDrained)
      return false
    }

    /** The upstream failed before a response: another target was not possible. */
    fail (err: Error): void {
      if (this.gone) return
      onError(this.reply, { error: err })
    }

    /** The upstream failed mid-response: the client's response cannot be completed. */
    broken (err: Error): void {
      if (this.gone) return
      this.state.error = (mapUpstreamError(err) as { code?: string }).code
      this.res.destroy()
    }
  }

  // The request headers as they go upstream, built in one pass over the client's: names never
  // copied (hop by hop, set by the gateway, removed by the route) are looked up in one set per route.
  const setNames = new Set(requestSet.map(([k]) => k))
  const removed = new Set(requestRemove)
  const own = (name: string): boolean => !setNames.has(name) && !removed.has(name)
  const NOT_COPIED = new Set([...HOP_BY_HOP_REQUEST, ...requestRemove, ...setNames, 'host', 'x-forwarded-for', 'x-forwarded-proto', 'x-forwarded-host', 'x-request-id'])
  const UNTRUSTED = new Set(UNTRUSTED_FORWARDING)
  const sets = { host: own('host'), xff: own('x-forwarded-for'), proto: own('x-forwarded-proto'), fwdHost: own('x-forwarded-host'), id: own('x-request-id') }
  const flatSet = requestSet.flatMap(([k, v]) => [k, v])

  /**
   * The request headers as they go to `target`, as a flat [name, value, ...] list, Host first when
   * the gateway sets it: the client's (`src`: its headers, or reply-from's copy of them) less
   * pseudo-headers, hop-by-hop ones and those Connection names; X-Forwarded-For extended when the
   * peer is a trusted proxy and replaced otherwise, the other client-address headers believed
   * from a trusted proxy only; X-Forwarded-Proto/Host and X-Request-Id; then the route's edits.
   * The one rule for both ways and WebSocket upgrades.
   */
  function forwardedHeaders (request: FastifyRequest, src: IncomingHttpHeaders, target: Target): string[] {
    const peer = request.raw.socket.remoteAddress ?? ''
    const trustedPeer = ctx.trusted(peer)
    const connection = src.connection
    const listed = typeof connection === 'string' && !ONLY_OPTION.test(connection) ? connection.toLowerCase().split(',').map((t) => t.trim()) : undefined
    const out: string[] = []
    if (sets.host) {
      // An HTTP/2 client sends :authority instead of Host.
      const host = route.preserveHost ? request.headers.host ?? (request.headers[':authority'] as string | undefined) : target.host
      if (host !== undefined) out.push('host', host)
    }
    for (const name in src) {
      if (NOT_COPIED.has(name) || name.charCodeAt(0) === 58 || (!trustedPeer && UNTRUSTED.has(name)) || (listed !== undefined && listed.includes(name))) continue
      const value = src[name]
      if (typeof value === 'string') out.push(name, value)
      else if (typeof value === 'number') out.push(name, String(value))
      else if (value !== undefined) for (const v of value) out.push(name, v)
    }
    if (sets.xff) {
      const xff = src['x-forwarded-for']
      out.push('x-forwarded-for', xff !== undefined && trustedPeer ? `${String(xff)}, ${peer}` : peer)
    }
    if (sets.proto) out.push('x-forwarded-proto', request.protocol)
    if (sets.fwdHost) out.push('x-forwarded-host', request.host)
    if (sets.id) out.push('x-request-id', request.id)
    for (let i = 0; i < flatSet.length; i++) out.push(flatSet[i])
    return out
  }

  /** forwardedHeaders as an object, for reply-from and the WebSocket client. */
  function forwardedHeadersObject (request: FastifyRequest, src: IncomingHttpHeaders, target: Target): IncomingHttpHeaders {
    const list = forwardedHeaders(request, src, target)
    const h: IncomingHttpHeaders = {}
    for (let i = 0; i < list.length; i += 2) {
      const name = list[i]
      const had = h[name]
      h[name] = had === undefined ? list[i + 1] : [...(Array.isArray(had) ? had : [had]), list[i + 1]]
    }
    return h
  }

  // reply-from's copy already has the Host of the target it was given and a Content-Length that
  // matches the body it sends.
  function rewriteRequestHeaders (request: FastifyRequest, headers: IncomingHttpHeaders): IncomingHttpHeaders {
    const h = forwardedHeadersObject(request, headers, (request.upstream as UpstreamState).target as Target) as HeadersWithRequest
    h[kRequest] = request
    return h
  }

  function rewriteHeaders (headers: IncomingHttpHeaders): IncomingHttpHeaders {
    const connection = headers.connection
    if (typeof connection === 'string') {
      for (const name of connection.split(',')) delete headers[name.trim().toLowerCase()]
    }
    for (const name of DROPPED_RESPONSE) if (headers[name] !== undefined) delete headers[name]
    for (const name of responseRemove) delete headers[name]
    for (const [k, v] of responseSet) headers[k] = v
    return headers
  }

  function onError (reply: FastifyReply, { error }: { error: Error }): void {
    const mapped = mapUpstreamError(error)
    const state = reply.request.upstream
    if (state !== undefined) state.error = (mapped as { code?: string }).code
    reply.send(mapped)
  }

  /** Bodies kept for replay, by request, from the body parser to the handler. */
  const kept = new WeakMap<FastifyRequest, Buffer>()
  function keepForReplay (request: FastifyRequest): boolean {
    if (retries.idempotencyKey !== true || retries.attempts === 0 || request.method !== 'POST' || request.headers['idempotency-key'] === undefined) return false
    const length = Number(request.headers['content-length'])
    return Number.isInteger(length) && length <= Math.min(MAX_REPLAY_BODY, bodyLimit)
  }

  const fromOptions = {
    getUpstream: (request: FastifyRequest) => (request.upstream as UpstreamState).target?.origin ?? '',
    rewriteRequestHeaders,
    rewriteHeaders,
    onError
  } as unknown as FastifyReplyFromHooks

  return async function upstream (fastify: FastifyInstance): Promise<void> {
    await fastify.register(replyFrom, {
      undici: dispatcher as unknown as Dispatcher,
      disableRequestLogging: true,
      // reply-from's own retries (and its GET-on-503 loop) are wrong for a gateway: off.
      retryMethods: [],
      contentTypesToEncode: []
    })
    fastify.removeAllContentTypeParsers()
    fastify.addContentTypeParser('*', function passThrough (request, payload, done) {
      if (keepForReplay(request)) {
        readAll(payload as Readable).then((body) => { kept.set(request, body); done(null, undefined) }, (err: Error) => done(err, undefined))
        return
      }
      // A declared length over the limit was refused in onRequest; a chunked body is counted.
      if (request.headers['content-length'] !== undefined) done(null, payload)
      else done(null, (payload as Readable).pipe(new BodyLimit(bodyLimit)))
    })
    const health = probeAgent !== undefined && up.healthCheck !== undefined
      ? new HealthChecker(pool, up.healthCheck, probeAgent, fastify.log)
      : undefined
    if (health !== undefined) pool.inherit(fastify.gatehouse.state.get('upstream-targets', () => new Map<string, Target>()))
    // Probes run while this version of the route table runs: from ready until its close.
    fastify.addHook('onReady', async () => { health?.start() })
    fastify.addHook('onClose', async () => {
      health?.stop()
      pool.close()
      await Promise.all([agent.close(), probeAgent?.close()])
    })
    fastify.gatehouse.upstreams.set(route.name, pool)

    // Registered without its own context (fastify-plugin) so that its hooks reach this route's
    // handlers, which a child context would not; this context is still the route's alone.
    if (route.plugin !== undefined) await fastify.register(fp(route.plugin, { name: `route:${route.name}` }))

    const handler = function forward (this: FastifyInstance, request: FastifyRequest, reply: FastifyReply): void {
      const state: UpstreamState = { route: route.name, attempts: 1, res: reply.raw, body: kept.get(request) }
      if (request.body instanceof BodyLimit) state.bodyIn = request.body
      request.upstream = state
      const now = Date.now()
      pool.budget.request(now)
      state.target = pool.pick(request)
      if (state.target === undefined) {
        const why = pool.unavailable(now)
        state.error = why.circuit ? 'GATEHOUSE_CIRCUIT_OPEN' : 'GATEHOUSE_NO_HEALTHY_UPSTREAM'
        if (why.circuit) metrics.upstreamRequests.inc({ route: route.name, target: NO_TARGET, outcome: 'circuit_open' })
        reply.header('retry-after', String(why.retryAfter))
        reply.send(why.circuit ? new errors.GATEHOUSE_CIRCUIT_OPEN() : new errors.GATEHOUSE_NO_HEALTHY_UPSTREAM())
        return
      }
      // reply-from re-encodes the path with WHATWG URL rules ({ } " ` < > become escapes) and
      // refuses segments such as `...`: the dispatcher sends this exact, already normalized target.
      const q = request.url.indexOf('?')
      state.path = upstreamPath(request.url, prefix, rewrite) + (q === -1 ? '' : request.url.slice(q))
      if (route.websocket && isWebSocketUpgrade(request.raw)) {
        const headers = forwardedHeadersObject(request, request.headers, state.target)
        proxyWebSocket(request, reply, { route, target: state.target, path: state.path, headers, tls: connect, onError: (error) => onError(reply, { error }) })
        return
      }
      if (direct && !(route.compress && wantsEncoding(request.headers['accept-encoding']))) {
        const body = state.body ?? (isStream(request.body) ? request.body : null)
        const opts: ExchangeOptions = { path: state.path, method: request.method, headers: forwardedHeaders(request, request.headers, state.target), body }
        new Direct(request, reply, state, opts).attempt(state.target)
        return
      }
      reply.from('/', fromOptions)
    }

    const onRequest = function checkLength (request: FastifyRequest, _reply: FastifyReply, done: (err?: Error) => void): void {
      const length = request.headers['content-length']
      if (length !== undefined && Number(length) > bodyLimit) done(new errors.GATEHOUSE_PAYLOAD_TOO_LARGE(String(bodyLimit)))
      else done()
    }

    const hosts = route.match.hosts?.map((h) => h.toLowerCase()) ?? [undefined]
    for (const host of hosts) {
      for (const url of routeUrls(prefix)) {
        const options: RouteOptions = {
          method: route.match.methods !== undefined ? [...route.match.methods] : allMethods(fastify),
          url,
          handler,
          onRequest,
          bodyLimit,
          config: { gatehouse: route },
          ...(host !== undefined ? { constraints: { hostname: host } } : {})
        }
        fastify.route(options)
      }
    }
  }
}

function abortError (message: string, code: string): Error {
  return Object.assign(new Error(message), { code })
}

async function readAll (stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = []
  for await (const chunk of stream) chunks.push(chunk as Buffer)
  return Buffer.concat(chunks)
}

/** `/orders` serves `/orders` and `/orders/...`, never `/ordersx`. */
export function routeUrls (prefix: string): string[] {
  return prefix === '/' ? ['/', '/*'] : [prefix, prefix + '/*']
}

export function allMethods (fastify: FastifyInstance): string[] {
  return fastify.supportedMethods.filter((m) => m !== 'CONNECT')
}
