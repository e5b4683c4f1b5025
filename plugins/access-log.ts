import fp from 'fastify-plugin'
import type { FastifyPluginAsync } from 'fastify'

export interface AccessLogOptions {
  enabled: boolean
}

/**
 * One structured line per request (Fastify's own two request lines are off): route, method,
 * status, upstream target, durations and bytes. Headers are not logged, so no Authorization,
 * cookie or API key value can leak through it.
 */
const accessLog: FastifyPluginAsync<AccessLogOptions> = async function accessLog (fastify, opts) {
  if (!opts.enabled) return
  fastify.addHook('onResponse', function logRequest (request, reply, done) {
    const up = request.upstream
    const q = request.url.indexOf('?')
    const bytesIn = request.headers['content-length']
    const bytesOut = reply.getHeader('content-length')
    request.log.info({
      msg: 'request',
      route: request.routeOptions.config.gatehouse?.name ?? null,
      method: request.method,
      path: q === -1 ? request.url : request.url.slice(0, q),
      status: reply.statusCode,
      ip: request.ip,
      target: up?.target?.origin ?? null,
      upstreamMs: up?.upstreamMs !== undefined ? Math.round(up.upstreamMs * 100) / 100 : null,
      durationMs: Math.round(reply.elapsedTime * 100) / 100,
      bytesIn: bytesIn !== undefined ? Number(bytesIn) : null,
      bytesOut: bytesOut !== undefined ? Number(bytesOut) : null,
      error: up?.error ?? null
    })
    done()
  })
}

export default fp(accessLog, { name: 'access-log', fastify: '5.x' })
