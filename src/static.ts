import type { FastifyInstance } from 'fastify'
import fastifyStatic from '@fastify/static'
import fastifyCaching from '@fastify/caching'
import fp from 'fastify-plugin'
import type { RouteDefinition } from './config.js'
import { normalizePrefix } from './config.js'

/**
 * A route that serves a directory. @fastify/static (send) answers ETag/Last-Modified and the
 * conditional 304s, scoped to the file; @fastify/caching only sets Cache-Control here (its own
 * ETag store is not scoped to a URL, see PITFALLS.md, so reply.etag() is never used).
 */
export function staticPlugin (route: RouteDefinition) {
  const spec = route.static
  if (spec === undefined) throw new Error(`route ${route.name} has no static root`)
  const prefix = normalizePrefix(route.match.prefix)
  return async function staticRoute (fastify: FastifyInstance): Promise<void> {
    // @fastify/static takes no route config: tag its routes so the root plugins see the route.
    fastify.addHook('onRoute', (options) => {
      options.config = { ...options.config, gatehouse: route }
    })
    // The route file's plugin shares this route's context, before the routes, so its hooks reach them.
    if (route.plugin !== undefined) await fastify.register(fp(route.plugin, { name: `route:${route.name}` }))
    await fastify.register(fastifyCaching, {
      privacy: spec.maxAge > 0 ? 'public' : 'no-cache',
      expiresIn: Math.floor(spec.maxAge / 1000)
    })
    // One registration per host: @fastify/static takes a single constraint per instance.
    for (const host of route.match.hosts?.map((h) => h.toLowerCase()) ?? [undefined]) {
      await fastify.register(async (scope) => {
        await scope.register(fastifyStatic, {
          root: spec.root,
          prefix: prefix === '/' ? '/' : prefix + '/',
          decorateReply: false,
          etag: true,
          lastModified: true,
          cacheControl: false,
          dotfiles: 'deny',
          index: spec.index === false ? false : [...spec.index],
          redirect: true,
          wildcard: true,
          constraints: host !== undefined ? { hostname: host } : undefined
        })
      })
    }
  }
}
