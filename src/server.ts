import http from 'node:http'
import type { Server, IncomingMessage, ServerResponse } from 'node:http'
import type { AddressInfo, Socket } from 'node:net'
import { once } from 'node:events'
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance } from 'fastify'
import pino, { type Logger } from 'pino'
import { loadGatewayConfig, loadRoutes, ConfigError, type CliOverrides, type GatewayConfig, type RouteDefinition } from './config.js'
import { buildGateway } from './app.js'
import { ProcessState } from './state.js'
import { recordConfigLoad, recordParserRefusal } from './metrics.js'
import admin from '../plugins/admin.js'
import { GATEHOUSE_HEADERS_TOO_LARGE, GATEHOUSE_BAD_REQUEST, errorMeta, problemType } from './errors.js'
import { Certificates, createRedirectServer, createSecureListener, http1Options, type SecureListener } from './tls.js'
import { WebSocketTunnels } from './websocket.js'
import { compileTrust } from './trust.js'
import { InFlight } from './inflight.js'
import { limitConnectionsPerIp } from '../plugins/limits.js'

type Handler = (req: IncomingMessage, res: ServerResponse) => void

/**
 * One version of the route table: a Fastify instance built from one set of route files. Fastify
 * cannot add routes after ready(), so a reload builds a new version, swaps it in behind the one
 * long-lived server, and closes the old one once its in-flight requests are done. Connections
 * belong to the server, so none is dropped by a swap.
 */
class Version {
  readonly app: FastifyInstance
  readonly routes: readonly RouteDefinition[]
  readonly id: number
  handler!: Handler
  inflight = 0
  /** Waiters of drained(): a retiring version can be awaited by its retirement and by close(). */
  private readonly idle = new Set<() => void>()
  readonly release = (): void => {
    if (--this.inflight === 0) for (const fn of [...this.idle]) fn()
  }

  constructor (id: number, app: FastifyInstance, routes: readonly RouteDefinition[]) {
    this.id = id
    this.app = app
    this.routes = routes
  }

  /** Resolves when no request is in flight, or after `timeout` ms. */
  async drained (timeout: number): Promise<boolean> {
    if (this.inflight === 0) return true
    let timer: NodeJS.Timeout | undefined
    let waiter: (() => void) | undefined
    const done = await Promise.race([
      new Promise<boolean>((resolve) => { waiter = () => resolve(true); this.idle.add(waiter) }),
      new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(false), timeout) })
    ])
    clearTimeout(timer)
    this.idle.delete(waiter as () => void)
    return done
  }
}

const kVersion = Symbol('gatehouse.version')
/** A response in flight, with the version of the route table that serves it. */
type TrackedResponse = ServerResponse & { [kVersion]: Version }

export interface GatewayServerOptions {
  /** gatehouse.yaml; undefined runs on the embedded defaults. */
  configFile?: string
  overrides?: CliOverrides
  /** A logger to use instead of the one built from the config (tests pass a silent one). */
  logger?: Logger
  env?: NodeJS.ProcessEnv
  /** false: no admin listener even if the config has one (cluster workers: the primary serves it). */
  admin?: boolean
}

export interface ReloadResult {
  ok: boolean
  version: number
  routes: number
  error?: string
}

function problemBody (code: string, detail: string): string {
  const meta = errorMeta(code)
  return JSON.stringify({ type: problemType(code), title: meta?.title, status: meta?.status, detail, code, requestId: null })
}

/**
 * The process-level gateway: the listeners, the current route-table version, reload and drain.
 */
export class GatewayServer {
  readonly options: GatewayServerOptions
  config!: GatewayConfig
  routesDir!: string
  logger!: Logger
  /** The main listener: HTTPS with HTTP/2 and HTTP/1.1 when `tls:` is set, else plain HTTP/1.1. */
  server!: Server | SecureListener
  /** The TLS certificates (watched and reloaded); undefined without `tls:`. */
  certificates: Certificates | undefined
  /** The HTTP listener of tls.redirectHttpPort, answering 308 to HTTPS. */
  redirectServer: Server | undefined
  /** Open WebSocket tunnels, closed at shutdown once in-flight requests are done. */
  readonly websockets = new WebSocketTunnels()
  adminApp: FastifyInstance | undefined
  /** Stores, clients and registries that outlive a route-table version. */
  readonly state = new ProcessState()
  private current!: Version
  private versions = 0
  private closing = false
  /** Versions swapped out by a reload whose in-flight requests are still finishing. */
  private readonly retiring = new Set<Version>()
  /** Responses in progress, so that a drain can tell their clients not to reuse the connection. */
  private readonly active = new InFlight<ServerResponse>()
  private reloading: Promise<ReloadResult> | undefined

  constructor (options: GatewayServerOptions = {}) {
    this.options = options
  }

  get version (): number { return this.current.id }
  get routes (): readonly RouteDefinition[] { return this.current.routes }
  get draining (): boolean { return this.closing }
  get app (): FastifyInstance { return this.current.app }

  /** Loads and validates everything, builds the first version and listens. Throws ConfigError. */
  async start (): Promise<void> {
    const { config, routesDir } = loadGatewayConfig(this.options.configFile, this.options.overrides, this.options.env)
    this.config = config
    this.routesDir = routesDir
    this.logger = this.options.logger ?? pino({
      level: config.logging.level,
      redact: { paths: ['req.headers.authorization', 'req.headers.cookie', 'req.headers["x-api-key"]', 'res.headers["set-cookie"]'], censor: '[redacted]' }
    }, this.logDestination())
    // Certificates are checked before anything is built, so a bad pair stops the start cleanly.
    if (config.tls !== undefined) this.certificates = new Certificates(config.tls, { configFile: this.options.configFile, logger: this.logger })
    const routes = await loadRoutes(routesDir, this.options.env)
    this.current = await this.build(routes)
    recordConfigLoad(true, this.current.id)
    this.server = this.createServer()
    this.server.listen(config.listen.port, config.listen.host)
    await once(this.server, 'listening')
    if (config.tls?.redirectHttpPort !== undefined) {
      this.redirectServer = createRedirectServer(() => this.address().port, config.limits)
      this.redirectServer.listen(config.tls.redirectHttpPort, config.listen.host)
      await once(this.redirectServer, 'listening')
    }
    if (config.admin !== false && this.options.admin !== false) {
      const adminApp = Fastify({ loggerInstance: this.logger as FastifyBaseLogger, logController: new LogController({ disableRequestLogging: true }) }) as unknown as FastifyInstance
      this.adminApp = adminApp
      await adminApp.register(admin, { gateway: this })
      await adminApp.listen({ port: config.admin.port, host: config.admin.host })
    }
    this.logger.info({ address: this.address(), version: this.current.id, routes: routes.length }, 'gatehouse listening')
  }

  address (): AddressInfo {
    return this.server.address() as AddressInfo
  }

  redirectAddress (): AddressInfo | undefined {
    return this.redirectServer?.address() as AddressInfo | undefined
  }

  adminAddress (): AddressInfo | undefined {
    return this.adminApp?.server.address() as AddressInfo | undefined
  }

  /**
   * stdout, written asynchronously: a line goes out with the next write(2), and lines that come
   * while one is in progress go out together with the next, instead of one write(2) per line on
   * the event loop. pino flushes what is left synchronously when the process exits, crash
   * included. (A minimum batch size, sonic-boom's minLength, made each line cost more: it
   * measures the whole pending buffer again for every line.)
   */
  private logDestination (): pino.DestinationStream {
    return pino.destination({ dest: 1, sync: false })
  }

  private async build (routes: readonly RouteDefinition[]): Promise<Version> {
    let handler: Handler | undefined
    const app = await buildGateway(this.config, routes, this.logger, {
      // The instance never listens: requests reach it through the long-lived server below.
      serverFactory: (h) => {
        handler = h
        return http.createServer()
      }
    }, this.state)
    const version = new Version(++this.versions, app, routes)
    version.handler = handler as Handler
    return version
  }

  private createServer (): Server | SecureListener {
    const limits = this.config.limits
    const active = this.active
    // One shared listener per response (its `this` is the response), not a closure per request.
    // A plain listener (once() wraps each in a new closure); released once however often 'close' comes.
    const onClose = function (this: TrackedResponse): void {
      if (active.delete(this)) this[kVersion].release()
    }
    const onRequest = (req: IncomingMessage, res: ServerResponse): void => {
      const v = this.current
      v.inflight++
      ;(res as TrackedResponse)[kVersion] = v
      active.add(res)
      res.on('close', onClose)
      if (this.closing) res.shouldKeepAlive = false
      v.handler(req, res)
    }
    // With TLS, HTTP/2 and HTTP/1.1 share the port (ALPN); Fastify handles both request kinds.
    const server = this.certificates !== undefined
      ? createSecureListener(this.certificates, limits, onRequest as unknown as Parameters<typeof createSecureListener>[2])
      : http.createServer(http1Options(limits), onRequest)
    limitConnectionsPerIp(server, limits.maxConnectionsPerIp, compileTrust(this.config.trustProxy))
    // WebSocket upgrades take the way of any request through the current version (src/websocket.ts).
    server.on('upgrade', (req: IncomingMessage, socket: Socket, head: Buffer) => {
      const v = this.current
      v.inflight++
      this.websockets.handle(req, socket, head, v.handler, v.release)
    })
    // Node's parser answers malformed requests itself: give them a problem document too.
    server.on('clientError', (err: NodeJS.ErrnoException, socket: Socket) => {
      if (!socket.writable || err.code === 'ECONNRESET') {
        socket.destroy()
        return
      }
      const tooLarge = err.code === 'HPE_HEADER_OVERFLOW'
      const status = tooLarge ? 431 : (err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : 400)
      recordParserRefusal(status)
      const body = tooLarge
        ? problemBody('GATEHOUSE_HEADERS_TOO_LARGE', new GATEHOUSE_HEADERS_TOO_LARGE().message)
        : problemBody('GATEHOUSE_BAD_REQUEST', new GATEHOUSE_BAD_REQUEST(status === 408 ? 'The request was not received in time' : 'The request is malformed').message)
      socket.end(`HTTP/1.1 ${status} ${http.STATUS_CODES[status]}\r\nContent-Type: application/problem+json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`)
    })
    return server
  }

  /**
   * Re-reads the route files and swaps the route table. An invalid file keeps the old table.
   * Concurrent calls share one reload.
   */
  async reload (): Promise<ReloadResult> {
    if (this.reloading !== undefined) return await this.reloading
    this.reloading = this.doReload().finally(() => { this.reloading = undefined })
    return await this.reloading
  }

  private async doReload (): Promise<ReloadResult> {
    const refused = (error: string): ReloadResult => ({ ok: false, version: this.current.id, routes: this.current.routes.length, error })
    if (this.closing) return refused('the gateway is shutting down')
    let next: Version
    try {
      const routes = await loadRoutes(this.routesDir, this.options.env)
      next = await this.build(routes)
    } catch (err) {
      const error = err instanceof ConfigError ? err.message : String((err as Error).message)
      this.logger.error({ error }, 'reload failed, keeping the current routes')
      recordConfigLoad(false, this.current.id)
      return refused(error)
    }
    // A shutdown that began while the new version was being built drains the old one only.
    if (this.closing) {
      await next.app.close()
      return refused('the gateway is shutting down')
    }
    const old = this.current
    this.current = next
    recordConfigLoad(true, next.id)
    this.logger.info({ version: next.id, routes: next.routes.length }, 'routes reloaded')
    void this.retire(old)
    return { ok: true, version: next.id, routes: next.routes.length }
  }

  private async retire (old: Version): Promise<void> {
    this.retiring.add(old)
    const drained = await old.drained(this.config.limits.shutdownTimeout)
    if (!drained) this.logger.warn({ version: old.id, inflight: old.inflight }, 'old routes closed with requests in flight')
    await old.app.close()
    this.retiring.delete(old)
  }

  /** Stops accepting, lets in-flight requests finish (bounded by limits.shutdownTimeout), closes. */
  async close (): Promise<void> {
    if (this.closing) return
    this.closing = true
    const serverClosed = new Promise<void>((resolve) => this.server.close(() => resolve()))
    this.server.closeIdleConnections()
    // Responses not yet started tell their clients to close; the others' connections are closed below.
    for (const res of this.active.values()) if (!res.headersSent) res.shouldKeepAlive = false
    // Versions retired by a recent reload may still be finishing requests too.
    const versions = [this.current, ...this.retiring]
    const drained = (await Promise.all(versions.map(async (v) => await v.drained(this.config.limits.shutdownTimeout)))).every(Boolean)
    if (!drained) this.logger.warn({ inflight: versions.reduce((n, v) => n + v.inflight, 0) }, 'shutdown timeout: closing connections with requests in flight')
    this.websockets.closeAll()
    this.server.closeAllConnections()
    this.redirectServer?.closeAllConnections()
    this.redirectServer?.close()
    this.certificates?.close()
    await serverClosed
    await this.current.app.close()
    await this.adminApp?.close()
    await this.state.close()
    this.logger.info('gatehouse stopped')
    this.logger.flush?.()
  }
}
