import type { ServerResponse } from 'node:http'
import fp from 'fastify-plugin'
import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify'
import { metrics, NO_ROUTE, scrape } from '../src/metrics.js'
import { routeConfig } from '../src/fastify-internals.js'

declare module 'fastify' {
  interface FastifyContextConfig {
    /** The main listener's /metrics route: a scrape is not a request the gateway serves. */
    metricsEndpoint?: boolean
  }
}

export interface MetricsOptions {
  /** Also serve /metrics on the public listener (`metrics.onMainListener`). */
  onMainListener: boolean
}

/** Status label of a request whose client went away before the response was complete (nginx's 499). */
export const CLIENT_CLOSED = 499

interface Counter { inc: () => void }
interface Observer { observe: (value: number) => void }
interface MethodSeries { duration: Observer, byStatus: Map<number, Counter> }

/**
 * The label children, built once per (route, method, status): prom-client's own `inc({...})`
 * builds and validates a label object on every call. Bounded like the labels themselves.
 */
const series = new Map<string, Map<string, MethodSeries>>()

function methodSeries (route: string, method: string): MethodSeries {
  let byMethod = series.get(route)
  if (byMethod === undefined) {
    byMethod = new Map()
    series.set(route, byMethod)
  }
  let s = byMethod.get(method)
  if (s === undefined) {
    s = { duration: metrics.requestDuration.labels(route, method), byStatus: new Map() }
    byMethod.set(method, s)
  }
  return s
}

function record (route: string, method: string, status: number, seconds: number): void {
  const s = methodSeries(route, method)
  let counter = s.byStatus.get(status)
  if (counter === undefined) {
    counter = metrics.requests.labels(route, method, String(status))
    s.byStatus.set(status, counter)
  }
  counter.inc()
  s.duration.observe(seconds)
}

/**
 * The route label: a configured route name, or NO_ROUTE. Never the path. Upstream routes carry
 * their name on request.upstream, which spares building routeOptions on the hot path.
 */
export function routeLabel (request: FastifyRequest): string {
  return request.upstream?.route ?? routeConfig(request).gatehouse?.name ?? NO_ROUTE
}

const kReply = Symbol('gatehouse.metrics.reply')
/** The reply while its request is in flight; null once recorded. */
type TrackedResponse = ServerResponse & { [kReply]?: FastifyReply | null }

/** The response's 'close': the request has left the gateway, answered or abandoned. */
function onClose (this: TrackedResponse): void {
  metrics.inflight.dec()
  const reply = this[kReply]
  // A response the gateway ended is recorded by onResponse (which may run after this, behind an
  // async onResponse hook); one never ended lost its client on the way.
  if (reply != null && !this.writableEnded) {
    this[kReply] = null
    record(routeLabel(reply.request), reply.request.method, CLIENT_CLOSED, reply.elapsedTime / 1000)
  }
}

async function serveMetrics (_request: FastifyRequest, reply: FastifyReply): Promise<string> {
  const { contentType, body } = await scrape()
  reply.header('content-type', contentType)
  reply.header('cache-control', 'no-store')
  return body
}

/** The admin listener's GET /metrics (registered by plugins/admin.ts). */
export const metricsRoute = { method: 'GET' as const, url: '/metrics', handler: serveMetrics }

/**
 * Request count and duration per route, method and status, recorded when the response is done
 * (onResponse), plus requests in flight. Client aborts count with status 499.
 */
const metricsPlugin: FastifyPluginAsync<MetricsOptions> = async function metricsPlugin (fastify, opts) {
  fastify.addHook('onRequest', function trackInflight (_request, reply, done) {
    metrics.inflight.inc()
    const res = reply.raw as TrackedResponse
    res[kReply] = reply
    res.on('close', onClose)
    done()
  })

  fastify.addHook('onResponse', function recordRequest (request, reply, done) {
    const res = reply.raw as TrackedResponse
    // null: already recorded as an abort. undefined: an earlier onRequest hook answered first.
    if (res[kReply] === null) return done()
    res[kReply] = null
    if (request.upstream === undefined && routeConfig(request).metricsEndpoint === true) return done()
    // An HTTP/2 stream the client reset still emits 'finish' (so onResponse runs), never ended.
    record(routeLabel(request), request.method, res.writableEnded ? reply.statusCode : CLIENT_CLOSED, reply.elapsedTime / 1000)
    done()
  })

  if (opts.onMainListener) {
    fastify.route({ ...metricsRoute, config: { metricsEndpoint: true } })
  }
}

export default fp(metricsPlugin, { name: 'metrics', fastify: '5.x' })
