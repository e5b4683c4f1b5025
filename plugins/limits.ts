import fp from 'fastify-plugin'
import underPressure from '@fastify/under-pressure'
import type { Server } from 'node:net'
import type { FastifyPluginAsync } from 'fastify'
import { GATEHOUSE_BAD_REQUEST, GATEHOUSE_OVERLOADED } from '../src/errors.js'

/** Seconds a client is told to wait when the gateway sheds load. */
export const OVERLOAD_RETRY_AFTER = 5

/**
 * Caps the open connections of one client address (`limits.maxConnectionsPerIp`): one more is
 * closed at once, before a byte is parsed. Trusted proxies are exempt, since every client behind
 * them shares their address. Returns the live counts (tests read them).
 */
export function limitConnectionsPerIp (server: Server, max: number | undefined, trusted: (address: string) => boolean): Map<string, number> {
  const open = new Map<string, number>()
  if (max === undefined) return open
  server.on('connection', (socket) => {
    const ip = socket.remoteAddress
    if (ip === undefined || trusted(ip)) return
    const n = (open.get(ip) ?? 0) + 1
    if (n > max) {
      socket.destroy()
      return
    }
    open.set(ip, n)
    socket.once('close', () => {
      const left = (open.get(ip) ?? 1) - 1
      if (left === 0) open.delete(ip)
      else open.set(ip, left)
    })
  })
  return open
}

/**
 * Back-pressure: at most `limits.maxConcurrent` requests in flight in this process, and, with
 * `limits.maxEventLoopDelay`, @fastify/under-pressure refusing requests while the event loop lags.
 * Either answers 503 GATEHOUSE_OVERLOADED with Retry-After at once, in the first onRequest hook,
 * rather than queueing work the gateway cannot finish.
 */
const limits: FastifyPluginAsync = async function limits (fastify) {
  const { maxConcurrent, maxEventLoopDelay } = fastify.gatehouse.config.limits
  // Node's parser hands over a chunked request as soon as its head is parsed, and rejects a
  // malformed chunk later in the same read. Waiting one turn of the event loop lets it finish
  // what has arrived: a request whose framing already failed (the server answered 400 and
  // closed) is then never sent upstream. A body that breaks later is cut off mid-stream, so an
  // upstream never receives it complete.
  // (An onRequest hook: nothing reads the body before preParsing, and a plain route then has no
  // preParsing stage at all.)
  fastify.addHook('onRequest', function holdChunked (request, _reply, done) {
    if (request.headers['transfer-encoding'] === undefined) return done()
    setImmediate(() => {
      const socket = request.raw.socket
      if (socket.destroyed || socket.writableEnded || request.raw.errored !== null) done(new GATEHOUSE_BAD_REQUEST('The request body is malformed'))
      else done()
    })
  })
  if (maxEventLoopDelay !== undefined) {
    await fastify.register(underPressure, {
      maxEventLoopDelay,
      retryAfter: OVERLOAD_RETRY_AFTER,
      customError: GATEHOUSE_OVERLOADED as never,
      exposeStatusRoute: false
    })
  }
  if (maxConcurrent === undefined) return
  let inflight = 0
  const release = (): void => { inflight-- }
  fastify.addHook('onRequest', function limitConcurrency (request, reply, done) {
    // A WebSocket tunnel lives on after its request: it is bounded by maxConnectionsPerIp instead.
    if (request.headers.upgrade !== undefined) return done()
    if (inflight >= maxConcurrent) {
      reply.header('retry-after', String(OVERLOAD_RETRY_AFTER))
      done(new GATEHOUSE_OVERLOADED())
      return
    }
    inflight++
    reply.raw.once('close', release)
    done()
  })
}

export default fp(limits, { name: 'limits', fastify: '5.x', dependencies: ['problem'] })
