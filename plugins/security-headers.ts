import fp from 'fastify-plugin'
import type { FastifyPluginAsync } from 'fastify'

export const SECURITY_DEFAULTS: ReadonlyArray<readonly [string, string]> = [
  ['x-content-type-options', 'nosniff'],
  ['x-frame-options', 'DENY'],
  ['referrer-policy', 'no-referrer']
]
export const HSTS = 'max-age=31536000; includeSubDomains'

/**
 * Security headers on every response (onSend, so they reach problem documents, cached and
 * proxied responses alike). An upstream's own value of one of them is kept: it knows its pages
 * (a SAMEORIGIN frame policy, say). Strict-Transport-Security only over TLS, where it means
 * something (also behind a trusted TLS-offloading proxy). Upstreams' Server and X-Powered-By are
 * dropped where their headers are copied (src/upstream.ts), whatever the setting.
 */
const securityHeaders: FastifyPluginAsync = async function securityHeaders (fastify) {
  if (!fastify.gatehouse.config.securityHeaders) return
  fastify.addHook('onSend', function addSecurityHeaders (request, reply, payload, done) {
    for (const [name, value] of SECURITY_DEFAULTS) if (!reply.hasHeader(name)) reply.header(name, value)
    // request.protocol is the socket's, or X-Forwarded-Proto from a trusted proxy (TLS offload).
    if (request.protocol === 'https' && !reply.hasHeader('strict-transport-security')) {
      reply.header('strict-transport-security', HSTS)
    }
    done(null, payload)
  })
}

export default fp(securityHeaders, { name: 'security-headers', fastify: '5.x' })
