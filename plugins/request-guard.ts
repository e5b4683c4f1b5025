import fp from 'fastify-plugin'
import type { FastifyPluginAsync } from 'fastify'
import type { IncomingMessage } from 'node:http'
import { GATEHOUSE_BAD_HOST, GATEHOUSE_BAD_PATH, GATEHOUSE_BAD_REQUEST } from '../src/errors.js'
import { BadPathError, normalizeUrl } from '../src/path.js'

const kBadPath = Symbol('gatehouse.badPath')
type GuardedMessage = IncomingMessage & { [kBadPath]?: string }

/**
 * Fastify's rewriteUrl: routes are matched on the normalized path (src/path.ts). A path that
 * cannot be normalized is marked and refused by the guard hook, since rewriteUrl cannot answer.
 */
export function rewriteUrl (req: IncomingMessage): string {
  const url = req.url ?? '/'
  try {
    return normalizeUrl(url)
  } catch (err) {
    if (!(err instanceof BadPathError)) throw err
    ;(req as GuardedMessage)[kBadPath] = err.message
    return '/'
  }
}

/**
 * Refuses what must never be routed: a path that could not be normalized, and a request with two
 * Host headers (the server joins duplicates, so a comma tells: an upstream could pick either one)
 * or none on HTTP/1.1.
 */
const requestGuard: FastifyPluginAsync = async function requestGuard (fastify) {
  fastify.addHook('onRequest', function guard (request, _reply, done) {
    const bad = (request.raw as GuardedMessage)[kBadPath]
    if (bad !== undefined) return done(new GATEHOUSE_BAD_PATH(bad))
    const host = request.headers.host
    if (host === undefined ? request.raw.httpVersion === '1.1' : host.includes(',')) return done(new GATEHOUSE_BAD_HOST())
    // Node accepts codings before `chunked` (and an unterminated list) that it cannot undo; an
    // upstream could frame such a body differently, so only plain chunked is forwarded.
    const te = request.headers['transfer-encoding']
    if (te !== undefined && te.toLowerCase() !== 'chunked') return done(new GATEHOUSE_BAD_REQUEST('Transfer-Encoding other than chunked is not accepted'))
    done()
  })
}

export default fp(requestGuard, { name: 'request-guard', fastify: '5.x', dependencies: ['problem'] })
