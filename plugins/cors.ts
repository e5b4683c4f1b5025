import fp from 'fastify-plugin'
import cors, { type FastifyCorsOptions } from '@fastify/cors'
import type { FastifyPluginAsync, FastifyRequest } from 'fastify'
import type { GatewayConfig } from '../src/config.js'
import { routeConfig } from '../src/fastify-internals.js'

type CorsSetting = GatewayConfig['cors']

/** `true` allows any origin without credentials; an object is passed on to @fastify/cors. */
function toOptions (setting: CorsSetting): FastifyCorsOptions {
  if (setting === false) return { origin: false }
  if (setting === true) return { origin: '*' }
  return {
    origin: typeof setting.origin === 'string' || typeof setting.origin === 'boolean' ? setting.origin : [...setting.origin],
    ...(setting.credentials !== undefined ? { credentials: setting.credentials } : {}),
    ...(setting.methods !== undefined ? { methods: [...setting.methods] } : {}),
    ...(setting.maxAge !== undefined ? { maxAge: setting.maxAge } : {})
  }
}

function isPreflight (request: FastifyRequest): boolean {
  return request.method === 'OPTIONS' && request.headers.origin !== undefined && request.headers['access-control-request-method'] !== undefined
}

/**
 * CORS with @fastify/cors, per route (route `cors:`, else the gateway's `cors:`). A preflight on
 * a CORS route is answered here, in onRequest, before auth (browsers send no credentials with
 * it) and never forwarded; any other OPTIONS request goes to the upstream as usual.
 */
const corsPlugin: FastifyPluginAsync = async function corsPlugin (fastify) {
  const { config, routes } = fastify.gatehouse
  const global = toOptions(config.cors)
  const perRoute = new Map<string, FastifyCorsOptions>()
  for (const route of routes) if (route.cors !== undefined) perRoute.set(route.name, toOptions(route.cors))
  if (global.origin === false && [...perRoute.values()].every((o) => o.origin === false)) return

  // @fastify/cors adds an `OPTIONS *` route so that preflights to unknown paths reach its hook;
  // it would collide with a route on prefix `/`, and here every path already reaches the hook
  // (routes accept OPTIONS, the not-found handler runs onRequest hooks too). It is moved to a
  // path no request can have: a raw backslash is refused by the path guard (src/path.ts).
  fastify.addHook('onRoute', (options) => {
    if (options.url === '*' && options.method === 'OPTIONS') {
      options.url = '/\\gatehouse-cors-unused'
      options.path = options.url
    }
  })
  await fastify.register(cors, {
    hideOptionsRoute: true,
    delegator: (request: FastifyRequest, cb: (err: Error | null, options: FastifyCorsOptions) => void) => {
      const route = routeConfig(request).gatehouse
      const options = (route !== undefined ? perRoute.get(route.name) : undefined) ?? global
      cb(null, options.origin === false ? options : { ...options, preflight: isPreflight(request), strictPreflight: false })
    }
  } as FastifyCorsOptions)
}

export default fp(corsPlugin, { name: 'cors', fastify: '5.x' })
