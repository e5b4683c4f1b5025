import type { FastifyPluginAsync } from 'fastify'
import type { GatewayServer } from '../src/server.js'
import { purge } from './cache.js'
import { metricsRoute } from './metrics.js'

export interface AdminOptions {
  gateway: GatewayServer
}

/**
 * The admin API, on its own listener (127.0.0.1:9901 by default), never on the public one:
 * liveness, readiness and reload. Other concerns add their endpoints here.
 */
const admin: FastifyPluginAsync<AdminOptions> = async function admin (fastify, { gateway }) {
  fastify.get('/healthz', async () => ({ status: 'ok' }))

  fastify.route(metricsRoute)

  fastify.get('/readyz', async (_request, reply) => {
    if (gateway.draining) return await reply.code(503).send({ status: 'draining' })
    return { status: 'ready', version: gateway.version, routes: gateway.routes.length }
  })

  // Drops cached responses: `{ "url": "/orders/1" }` (a path or an absolute URL) or `{ "route": "orders" }`.
  fastify.post('/cache/purge', async (request, reply) => {
    const body = (request.body ?? {}) as { url?: unknown, route?: unknown }
    const url = typeof body.url === 'string' ? body.url : undefined
    const route = typeof body.route === 'string' ? body.route : undefined
    if (url === undefined && route === undefined) return await reply.code(400).send({ error: 'give "url" or "route"' })
    return { purged: await purge(gateway.config, gateway.state, { url, route }) }
  })

  // Per route and target of the version in service: health, circuit, load, recent failures.
  fastify.get('/upstreams', async () => {
    const now = Date.now()
    const routes = [...gateway.app.gatehouse.upstreams.values()].flatMap((b) => b.status !== undefined ? [b.status(now)] : [])
    return { version: gateway.version, routes }
  })

  fastify.post('/reload', async (_request, reply) => {
    const result = await gateway.reload()
    return await reply.code(result.ok ? 200 : 422).send(result)
  })
}

export default admin
