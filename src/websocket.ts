import http from 'node:http'
import https from 'node:https'
import type { IncomingHttpHeaders, IncomingMessage } from 'node:http'
import type { Socket } from 'node:net'
import type { Duplex } from 'node:stream'
import type { FastifyReply, FastifyRequest } from 'fastify'
import type { RouteDefinition } from './config.js'
import type { Target } from './balancer/index.js'
import * as errors from './errors.js'
import { metrics } from './metrics.js'

/*
 * WebSocket proxying. An upgrade request takes the same way as any request: the server's
 * 'upgrade' event hands it to the current version's Fastify instance on a ServerResponse bound to
 * the socket (as @fastify/websocket does), so route match, IP filter, auth, rate limit, metrics and
 * the access log apply unchanged, and a refusal is an ordinary problem+json answer. The route's
 * upstream handler then opens the upstream connection, relays the upstream's 101 and pipes the two
 * sockets together.
 *
 * A raw pipe rather than terminating WebSocket on both sides with `ws` (what @fastify/http-proxy
 * does): no frame or message is parsed or buffered, extensions (permessage-deflate), subprotocols,
 * pings and close codes are the client's and the upstream's own, and a close on either side is a
 * TCP close on the other. The cost: the gateway cannot inspect messages, which it does not need.
 */

const kUpgrade = Symbol('gatehouse.upgrade')

interface PendingUpgrade {
  socket: Duplex
  head: Buffer
  tunnels: WebSocketTunnels
  /** Set once the upstream's 101 was relayed: the connection belongs to the tunnel from then on. */
  tunnelled: boolean
}

type UpgradeRequest = IncomingMessage & { [kUpgrade]?: PendingUpgrade }

/** Whether a request reached Fastify through the 'upgrade' event and asks for WebSocket (RFC 6455: a GET). */
export function isWebSocketUpgrade (req: IncomingMessage): boolean {
  return (req as UpgradeRequest)[kUpgrade] !== undefined && req.method === 'GET' && /(^|,)\s*websocket\s*($|,)/i.test(req.headers.upgrade ?? '')
}

/** The open tunnels of the process: counted in metrics, destroyed at shutdown. */
export class WebSocketTunnels {
  private readonly open = new Set<Duplex>()

  get size (): number { return this.open.size }

  /**
   * The server's 'upgrade' listener: runs the request through `handler` (the version's Fastify
   * handler) on a response bound to the socket. `release` is called once the request is done for
   * the version: at the 101, or when a refusal was sent or the socket closed.
   */
  handle (req: IncomingMessage, socket: Duplex, head: Buffer, handler: (req: IncomingMessage, res: http.ServerResponse) => void, release: () => void): void {
    // The HTTP server removed its own listeners from an upgraded socket.
    socket.on('error', () => socket.destroy())
    const pending: PendingUpgrade = { socket, head, tunnels: this, tunnelled: false }
    ;(req as UpgradeRequest)[kUpgrade] = pending
    const res = new http.ServerResponse(req)
    res.assignSocket(socket as Socket)
    res.shouldKeepAlive = false
    let released = false
    const done = (): void => {
      if (released) return
      released = true
      release()
    }
    res.once('finish', () => {
      done()
      // A refusal ends the connection: the HTTP parser left the socket at the upgrade.
      if (!pending.tunnelled) socket.end()
    })
    res.once('close', done)
    try {
      handler(req, res)
    } catch {
      socket.destroy()
      done()
    }
  }

  /** Destroys every tunnel (shutdown, after in-flight requests drained). */
  closeAll (): void {
    for (const s of this.open) s.destroy()
  }

  /** Pipes two sockets both ways; either side's end or close ends or closes the other. */
  pipe (route: string, target: Target, client: Duplex, upstream: Socket): void {
    this.open.add(client)
    target.inflight++
    metrics.websocketConnections.inc({ route })
    for (const s of [client, upstream]) {
      if ('setNoDelay' in s) (s as Socket).setNoDelay(true)
      if ('setKeepAlive' in s) (s as Socket).setKeepAlive(true, 30_000)
      if ('setTimeout' in s) (s as Socket).setTimeout(0)
    }
    let closed = false
    const close = (): void => {
      if (closed) return
      closed = true
      this.open.delete(client)
      target.inflight--
      metrics.websocketConnections.dec({ route })
      client.destroy()
      upstream.destroy()
    }
    client.once('close', close)
    upstream.once('close', close)
    upstream.on('error', close)
    client.on('error', close)
    upstream.pipe(client)
    client.pipe(upstream)
  }
}

export interface UpstreamTls {
  rejectUnauthorized: boolean
  ca?: Buffer
  cert?: Buffer
  key?: Buffer
  servername?: string
}

export interface ProxyWebSocketOptions {
  route: RouteDefinition
  target: Target
  /** The upstream request target: the path (prefix rewritten) and the query. */
  path: string
  /** The forwarded request headers (X-Forwarded-*, route header rules), hop-by-hop ones removed. */
  headers: IncomingHttpHeaders
  tls: UpstreamTls
  /** Maps a transport error to the gateway error sent to the client. */
  onError: (err: Error) => void
}

/** Response headers of a refused upgrade that concern the upstream connection only. */
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'proxy-authenticate'])

/**
 * Forwards the upgrade request to the target. A 101 is relayed and the sockets are piped; any
 * other answer goes back as an ordinary response; a transport error or timeout is a problem+json.
 */
export function proxyWebSocket (request: FastifyRequest, reply: FastifyReply, opts: ProxyWebSocketOptions): void {
  const pending = (request.raw as UpgradeRequest)[kUpgrade] as PendingUpgrade
  const client = pending.socket
  const up = opts.route.upstream as NonNullable<RouteDefinition['upstream']>
  const url = new URL(opts.target.origin)
  const secure = url.protocol === 'https:'
  const headers: IncomingHttpHeaders = {
    ...opts.headers,
    host: opts.route.preserveHost ? (opts.headers.host ?? request.host) : opts.target.host,
    connection: 'Upgrade',
    upgrade: request.headers.upgrade
  }
  const state = request.upstream
  const started = performance.now()
  const options: https.RequestOptions = {
    host: url.hostname.replace(/^\[|\]$/g, ''),
    port: url.port !== '' ? Number(url.port) : (secure ? 443 : 80),
    method: 'GET',
    path: opts.path,
    headers,
    // An upgraded connection is never reused: no pool.
    agent: false,
    ...(secure
      ? {
          rejectUnauthorized: opts.tls.rejectUnauthorized,
          ca: opts.tls.ca,
          cert: opts.tls.cert,
          key: opts.tls.key,
          servername: opts.tls.servername ?? (/^[\d.]+$|:/.test(url.hostname) ? undefined : url.hostname)
        }
      : {})
  }
  const req = (secure ? https : http).request(options)
  let answered = false
  const fail = (err: Error): void => {
    if (answered) return
    answered = true
    opts.onError(err)
  }
  // Until the upstream answers, the route's connect and response timeouts apply.
  const connectTimer = setTimeout(() => {
    fail(new errors.GATEHOUSE_UPSTREAM_CONNECT_TIMEOUT())
    req.destroy()
  }, up.timeouts.connect)
  req.once('socket', (socket: Socket) => {
    socket.once(secure ? 'secureConnect' : 'connect', () => clearTimeout(connectTimer))
  })
  req.setTimeout(up.timeouts.response, () => {
    fail(new errors.GATEHOUSE_UPSTREAM_TIMEOUT())
    req.destroy()
  })
  const clientGone = (): void => { req.destroy() }
  client.once('close', clientGone)
  req.on('error', (err) => {
    clearTimeout(connectTimer)
    fail(err)
  })

  req.on('upgrade', (res: IncomingMessage, upstream: Socket, upHead: Buffer) => {
    clearTimeout(connectTimer)
    client.removeListener('close', clientGone)
    if (answered || client.destroyed) {
      upstream.destroy()
      return
    }
    answered = true
    if (state !== undefined) state.upstreamMs = performance.now() - started
    reply.hijack()
    pending.tunnelled = true
    const raw = reply.raw
    try {
      raw.writeHead(101, res.rawHeaders)
      raw.end()
    } catch {
      // The upstream's 101 carried a header Node refuses to send on.
      upstream.destroy()
      client.destroy()
      return
    }
    raw.detachSocket(client as Socket)
    if (upHead.length > 0) client.write(upHead)
    if (pending.head.length > 0) upstream.write(pending.head)
    pending.tunnels.pipe(opts.route.name, opts.target, client, upstream)
  })

  req.on('response', (res: IncomingMessage) => {
    clearTimeout(connectTimer)
    client.removeListener('close', clientGone)
    if (answered) {
      res.destroy()
      return
    }
    answered = true
    if (state !== undefined) state.upstreamMs = performance.now() - started
    // The upstream refused the upgrade: its answer goes back as a normal response.
    reply.code(res.statusCode ?? 502)
    for (const [name, value] of Object.entries(res.headers)) {
      if (value !== undefined && !HOP_BY_HOP.has(name)) reply.header(name, value)
    }
    reply.send(res)
  })
  req.end()
}
