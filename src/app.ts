import { METHODS, type IncomingMessage } from 'node:http'
import { LogController } from 'fastify'
import type { FastifyBaseLogger, FastifyInstance, FastifyPluginAsync, FastifyServerOptions } from 'fastify'
import type { Logger } from 'pino'
import type { GatewayConfig, RouteDefinition } from './config.js'
import { upstreamPlugin } from './upstream.js'
import { staticPlugin } from './static.js'
import { compileTrust } from './trust.js'
import { ProcessState } from './state.js'
import { requestLoggerFactory } from './logger.js'
import type { Balancer } from './balancer/index.js'
import fp from 'fastify-plugin'
import problem, { frameworkErrors } from '../plugins/problem.js'
import requestGuard, { rewriteUrl } from '../plugins/request-guard.js'
import requestId, { genReqId } from '../plugins/request-id.js'
import tracing from '../plugins/tracing.js'
import limits from '../plugins/limits.js'
import ipFilter from '../plugins/ip-filter.js'
import auth from '../plugins/auth.js'
import rateLimit from '../plugins/rate-limit.js'
import cors from '../plugins/cors.js'
import securityHeaders from '../plugins/security-headers.js'
import cache from '../plugins/cache.js'
import compress from '../plugins/compress.js'
import metricsPlugin from '../plugins/metrics.js'
import accessLog from '../plugins/access-log.js'

export interface GatewayOptions {
  config: GatewayConfig
  routes: readonly RouteDefinition[]
  /** Process-wide state shared by every version; a fresh one when omitted (tests, explain). */
  state?: ProcessState
}

/** What the gateway plugin decorates the instance with, for the concern plugins and the admin API. */
export interface Gatehouse {
  config: GatewayConfig
  routes: readonly RouteDefinition[]
  state: ProcessState
  /** The balancer of each upstream route, by route name. */
  upstreams: Map<string, Balancer>
}

declare module 'fastify' {
  interface FastifyInstance {
    gatehouse: Gatehouse
  }
}

/** Host names are matched without port and case-insensitively; `*.example.com` matches one label. */
export const hostnameConstraint = {
  name: 'hostname',
  storage () {
    const hosts = new Map<string, unknown>()
    return {
      get: (host: string) => {
        const exact = hosts.get(host)
        if (exact !== undefined) return exact
        const dot = host.indexOf('.')
        return dot === -1 ? null : hosts.get('*' + host.slice(dot)) ?? null
      },
      set: (host: string, store: unknown) => { hosts.set(host, store) }
    }
  },
  deriveConstraint (req: IncomingMessage): string {
    const host = req.headers.host ?? (req.headers[':authority'] as string | undefined) ?? ''
    let end = host.length
    if (host.charCodeAt(0) === 0x5b) end = host.indexOf(']') + 1
    else {
      const colon = host.lastIndexOf(':')
      if (colon !== -1) end = colon
    }
    return host.slice(0, end).toLowerCase()
  },
  mustMatchWhenDerived: false,
  validate () {}
}

/** The Fastify options of one gateway instance; server.ts adds the serverFactory. */
export function fastifyOptions (config: GatewayConfig, logger: Logger): FastifyServerOptions & { loggerInstance: FastifyBaseLogger } {
  return {
    loggerInstance: logger as FastifyBaseLogger,
    // One access-log line per request (plugins/access-log.ts) replaces Fastify's two.
    logController: new LogController({ disableRequestLogging: true }),
    // Request loggers made only when something logs through them (src/logger.ts).
    childLoggerFactory: requestLoggerFactory,
    // Without trusted proxies, Fastify's plain request: request.ip is the socket's address, not
    // an X-Forwarded-For parse that trusts no hop (0.6 us of the access log's line, per request).
    trustProxy: config.trustProxy === false ? false : compileTrust(config.trustProxy),
    genReqId,
    rewriteUrl,
    frameworkErrors,
    bodyLimit: config.limits.bodyLimit,
    return503OnClosing: false,
    routerOptions: {
      ignoreTrailingSlash: false,
      ignoreDuplicateSlashes: false,
      caseSensitive: true,
      constraints: { hostname: hostnameConstraint }
    }
  } as FastifyServerOptions & { loggerInstance: FastifyBaseLogger }
}

/**
 * The whole gateway as one plugin: the cross-cutting concerns first (each an fp plugin whose
 * hooks reach every route), then one encapsulated plugin per route file.
 */
const gateway: FastifyPluginAsync<GatewayOptions> = async function gateway (fastify: FastifyInstance, opts) {
  const { config, routes } = opts
  const state = opts.state ?? new ProcessState()
  if (opts.state === undefined) fastify.addHook('onClose', async () => { await state.close() })
  fastify.decorate('gatehouse', { config, routes, state, upstreams: new Map() })
  // Declared fields start on every request from its constructor: one object shape for all of
  // them, where a field first set mid-request changed the shape and made its readers polymorphic.
  fastify.decorateRequest('upstream', undefined)
  const trusted = compileTrust(config.trustProxy)
  // A proxy forwards any method Node's parser accepts (PURGE, PROPFIND, REPORT ...), not only
  // Fastify's nine; CONNECT is a tunnel, not a request to forward.
  for (const method of METHODS) {
    if (method !== 'CONNECT' && !fastify.supportedMethods.includes(method)) fastify.addHttpMethod(method, { hasBody: true })
  }
  await fastify.register(problem)
  // First among the onRequest hooks: a refusal by any later one carries the headers too.
  await fastify.register(securityHeaders)
  await fastify.register(requestGuard)
  await fastify.register(requestId)
  await fastify.register(tracing)
  await fastify.register(limits)
  await fastify.register(ipFilter)
  await fastify.register(auth)
  await fastify.register(rateLimit)
  await fastify.register(cors)
  await fastify.register(cache)
  await fastify.register(compress)
  await fastify.register(metricsPlugin, { onMainListener: config.metrics.onMainListener })
  await fastify.register(accessLog, { enabled: config.logging.accessLog, apiKeyHeader: config.apiKeys?.header })

  for (const route of routes) {
    if (route.static !== undefined) await fastify.register(staticPlugin(route))
    else await fastify.register(upstreamPlugin(route, { gateway: config, trusted }))
  }
}

const exported = fp(gateway, { name: 'gatehouse', fastify: '5.x' })
export default exported

export interface BuildOptions {
  /** Receives Fastify's request handler; returns the server object Fastify keeps (never listened). */
  serverFactory?: (handler: (req: IncomingMessage, res: import('node:http').ServerResponse) => void) => import('node:http').Server
  /** Called for every route as it is added, before the gateway's routes (used by `explain`). */
  onRoute?: (options: import('fastify').RouteOptions) => void
}

/** Builds one ready gateway instance for a config and a route set. */
export async function buildGateway (config: GatewayConfig, routes: readonly RouteDefinition[], logger: Logger, build: BuildOptions = {}, state?: ProcessState): Promise<FastifyInstance> {
  const { default: Fastify } = await import('fastify')
  const app = Fastify({
    ...fastifyOptions(config, logger),
    ...(build.serverFactory !== undefined ? { serverFactory: build.serverFactory } : {})
  } as Parameters<typeof Fastify>[0]) as unknown as FastifyInstance
  if (build.onRoute !== undefined) app.addHook('onRoute', build.onRoute)
  await app.register(exported, { config, routes, state })
  await app.ready()
  return app
}
