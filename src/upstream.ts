import { readFileSync } from 'node:fs'
import { Transform, type Readable, type TransformCallback } from 'node:stream'
import type { IncomingHttpHeaders, ServerResponse } from 'node:http'
import type { FastifyInstance, FastifyReply, FastifyRequest, RouteOptions } from 'fastify'
import replyFrom, { type FastifyReplyFromHooks } from '@fastify/reply-from'
import { Agent, type Dispatcher } from 'undici'
import type { GatewayConfig, RouteDefinition } from './config.js'
import { normalizePrefix } from './config.js'
import { upstreamPath } from './path.js'
import { RoundRobin, Target, type Balancer } from './balancer/index.js'
import * as errors from './errors.js'

/** Request headers that concern one connection only (RFC 9110 §7.6.1), never forwarded. */
const HOP_BY_HOP_REQUEST = ['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'proxy-authorization', 'http2-settings']
/** Response headers that concern one connection only. */
const HOP_BY_HOP_RESPONSE = ['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'proxy-authenticate']

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
  /** The client's response, whose early close aborts the upstream request. */
  res: ServerResponse
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

type HeadersWithRequest = IncomingHttpHeaders & { [kRequest]?: FastifyRequest }

/** Aborts the upstream request when the client goes away before its response is complete. */
class ClientGone {
  aborted = false
  private listener: (() => void) | undefined

  constructor (res: ServerResponse) {
    res.once('close', () => {
      if (!res.writableFinished) {
        this.aborted = true
        this.listener?.()
      }
    })
  }

  on (_event: 'abort', fn: () => void): void { this.listener = fn }
  once (_event: 'abort', fn: () => void): void { this.listener = fn }
  removeListener (_event: 'abort', _fn: () => void): void { this.listener = undefined }
}

/** Counts a streamed request body and fails it past the limit: a pass-through parser skips bodyLimit. */
class BodyLimit extends Transform {
  private seen = 0
  private readonly limit: number

  constructor (limit: number) {
    super()
    this.limit = limit
  }

  override _transform (chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.seen += chunk.length
    if (this.seen > this.limit) cb(new errors.GATEHOUSE_PAYLOAD_TOO_LARGE(String(this.limit)))
    else cb(null, chunk)
  }
}

const connectCodes = new Set(['ECONNREFUSED', 'EHOSTUNREACH', 'ENETUNREACH', 'EADDRNOTAVAIL'])
const resetCodes = new Set(['ECONNRESET', 'EPIPE', 'UND_ERR_SOCKET', 'UND_ERR_CLOSED', 'ECONNABORTED'])
const dnsCodes = new Set(['ENOTFOUND', 'EAI_AGAIN'])

/** Maps a transport error to the gateway error a client gets; never passes the original text on. */
export function mapUpstreamError (err: unknown): Error {
  let e: unknown = err
  for (let depth = 0; depth < 5 && e instanceof Error; depth++) {
    const code = (e as NodeJS.ErrnoException).code ?? ''
    if (code === 'GATEHOUSE_PAYLOAD_TOO_LARGE') return e
    if (connectCodes.has(code)) return new errors.GATEHOUSE_UPSTREAM_UNREACHABLE()
    if (code === 'UND_ERR_CONNECT_TIMEOUT' || code === 'ETIMEDOUT') return new errors.GATEHOUSE_UPSTREAM_CONNECT_TIMEOUT()
    if (code === 'UND_ERR_HEADERS_TIMEOUT' || code === 'UND_ERR_BODY_TIMEOUT' || code === 'FST_REPLY_FROM_GATEWAY_TIMEOUT') return new errors.GATEHOUSE_UPSTREAM_TIMEOUT()
    if (dnsCodes.has(code)) return new errors.GATEHOUSE_UPSTREAM_DNS()
    if (code.startsWith('ERR_TLS') || code.startsWith('ERR_SSL') || code.includes('CERT') || code === 'DEPTH_ZERO_SELF_SIGNED_CERT') return new errors.GATEHOUSE_UPSTREAM_TLS()
    if (resetCodes.has(code)) return new errors.GATEHOUSE_UPSTREAM_RESET()
    if (code.startsWith('HPE_') || code === 'UND_ERR_INFO' || code === 'FST_REPLY_FROM_BAD_GATEWAY') return new errors.GATEHOUSE_UPSTREAM_BAD_RESPONSE()
    e = e.cause
  }
  return new errors.GATEHOUSE_UPSTREAM_BAD_RESPONSE()
}

function readMaybe (path: string | undefined): Buffer | undefined {
  return path === undefined ? undefined : readFileSync(path)
}

export interface UpstreamContext {
  gateway: GatewayConfig
  /** Whether an address is one of the trusted proxies (trustProxy). */
  trusted: (address: string) => boolean
  /** The balancer factory; the default round-robin keeps the core free of the balancing module. */
  createBalancer?: (route: RouteDefinition, targets: Target[]) => Balancer
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
  const targets = up.targets.map((t) => new Target(t.url, t.weight))
  const balancer = ctx.createBalancer?.(route, targets) ?? new RoundRobin(targets)
  const requestSet = Object.entries(route.headers?.request?.set ?? {}).map(([k, v]) => [k.toLowerCase(), v] as const)
  const requestRemove = (route.headers?.request?.remove ?? []).map((h) => h.toLowerCase())
  const responseSet = Object.entries(route.headers?.response?.set ?? {}).map(([k, v]) => [k.toLowerCase(), v] as const)
  const responseRemove = (route.headers?.response?.remove ?? []).map((h) => h.toLowerCase())
  const tls = up.tls

  const agent = new Agent({
    connections: up.connections,
    pipelining: 1,
    keepAliveTimeout: up.keepAliveTimeout,
    keepAliveMaxTimeout: up.keepAliveTimeout,
    headersTimeout: up.timeouts.response,
    bodyTimeout: up.timeouts.idle ?? up.timeouts.response,
    connect: {
      timeout: up.timeouts.connect,
      rejectUnauthorized: tls?.rejectUnauthorized ?? true,
      ca: readMaybe(tls?.ca),
      cert: readMaybe(tls?.cert),
      key: readMaybe(tls?.key),
      ...(tls?.servername !== undefined ? { servername: tls.servername } : {})
    }
  })

  // reply-from calls `request` synchronously from reply.from(); the Fastify request travels to it
  // on a symbol-keyed header (reply-from copies headers with Object.assign, symbols included).
  const dispatcher = {
    request (opts: Dispatcher.RequestOptions & { headers: HeadersWithRequest }, cb: (err: Error | null, res?: Dispatcher.ResponseData) => void): void {
      const request = opts.headers[kRequest] as FastifyRequest
      delete opts.headers[kRequest]
      const state = request.upstream as UpstreamState
      const target = state.target as Target
      const started = performance.now()
      target.inflight++
      opts.signal = new ClientGone(state.res) as unknown as AbortSignal
      if (state.path !== undefined) opts.path = state.path
      agent.request(opts, (err, res) => {
        target.inflight--
        state.upstreamMs = performance.now() - started
        cb(err, res)
      })
    }
  }

  function rewriteRequestHeaders (request: FastifyRequest, headers: IncomingHttpHeaders): IncomingHttpHeaders {
    const h = headers as HeadersWithRequest
    for (const name of HOP_BY_HOP_REQUEST) if (h[name] !== undefined) delete h[name]
    // X-Forwarded-For from a trusted proxy is extended; anyone else's is replaced, so an upstream
    // that reads its left-most entry cannot be fooled by a client.
    const peer = request.raw.socket.remoteAddress ?? ''
    const xff = h['x-forwarded-for']
    h['x-forwarded-for'] = xff !== undefined && ctx.trusted(peer) ? `${xff}, ${peer}` : peer
    h['x-forwarded-proto'] = request.protocol
    h['x-forwarded-host'] = request.host
    h['x-request-id'] = request.id
    if (route.preserveHost) h.host = request.headers.host
    for (const name of requestRemove) delete h[name]
    for (const [k, v] of requestSet) h[k] = v
    h[kRequest] = request
    return h
  }

  function rewriteHeaders (headers: IncomingHttpHeaders): IncomingHttpHeaders {
    const connection = headers.connection
    if (typeof connection === 'string') {
      for (const name of connection.split(',')) delete headers[name.trim().toLowerCase()]
    }
    for (const name of HOP_BY_HOP_RESPONSE) if (headers[name] !== undefined) delete headers[name]
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
      // A declared length over the limit was refused in onRequest; a chunked body is counted.
      if (request.headers['content-length'] !== undefined) done(null, payload)
      else done(null, (payload as Readable).pipe(new BodyLimit(bodyLimit)))
    })
    fastify.addHook('onClose', async () => { await agent.close() })
    fastify.gatehouse.upstreams.set(route.name, balancer)

    if (route.plugin !== undefined) await fastify.register(route.plugin)

    const handler = function forward (this: FastifyInstance, request: FastifyRequest, reply: FastifyReply): void {
      const state: UpstreamState = { route: route.name, attempts: 1, res: reply.raw }
      request.upstream = state
      state.target = balancer.pick(request)
      if (state.target === undefined) {
        state.error = 'GATEHOUSE_NO_HEALTHY_UPSTREAM'
        reply.header('retry-after', '5')
        reply.send(new errors.GATEHOUSE_NO_HEALTHY_UPSTREAM())
        return
      }
      // reply-from re-encodes the path with WHATWG URL rules ({ } " ` < > become escapes) and
      // refuses segments such as `...`: the dispatcher sends this exact, already normalized target.
      const q = request.url.indexOf('?')
      state.path = upstreamPath(request.url, prefix, rewrite) + (q === -1 ? '' : request.url.slice(q))
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

/** `/orders` serves `/orders` and `/orders/...`, never `/ordersx`. */
export function routeUrls (prefix: string): string[] {
  return prefix === '/' ? ['/', '/*'] : [prefix, prefix + '/*']
}

export function allMethods (fastify: FastifyInstance): string[] {
  return fastify.supportedMethods.filter((m) => m !== 'CONNECT')
}
