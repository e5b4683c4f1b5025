import fp from 'fastify-plugin'
import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify'

const DEFAULTS: ReadonlyArray<readonly [string, string]> = [
  ['x-content-type-options', 'nosniff'],
  ['x-frame-options', 'DENY'],
  ['referrer-policy', 'no-referrer']
]
const HSTS = 'max-age=31536000; includeSubDomains'

/**
 * Sets the security headers on a reply before anything else answers it: whatever answers next
 * (a proxied response, a cached one, a problem document) starts from them. An upstream's own value
 * of one of them replaces the gateway's where its headers are copied (src/upstream.ts, either
 * way), as it knows its pages (a SAMEORIGIN frame policy, say); a route's `headers.response.set`
 * does too. Strict-Transport-Security only over TLS, where it means something (also behind a
 * trusted TLS-offloading proxy: request.protocol is X-Forwarded-Proto from one).
 */
export function setSecurityHeaders (request: FastifyRequest, reply: FastifyReply): void {
  if (!request.server.gatehouse.config.securityHeaders) return
  for (const [name, value] of DEFAULTS) reply.header(name, value)
  if (request.protocol === 'https') reply.header('strict-transport-security', HSTS)
}

/**
 * Security headers on every response, set in the first onRequest hook so that refusals by later
 * hooks (400, 403, 429, 503) carry them too; errors the router raises before any hook get them in
 * problem.ts's frameworkErrors. Upstreams' Server and X-Powered-By are dropped where their headers
 * are copied (src/upstream.ts), whatever the setting.
 */
const securityHeaders: FastifyPluginAsync = async function securityHeaders (fastify) {
  if (!fastify.gatehouse.config.securityHeaders) return
  fastify.addHook('onRequest', function addSecurityHeaders (request, reply, done) {
    setSecurityHeaders(request, reply)
    done()
  })
}

export default fp(securityHeaders, { name: 'security-headers', fastify: '5.x' })
