import { randomUUID } from 'node:crypto'
import type { IncomingMessage } from 'node:http'
import fp from 'fastify-plugin'
import type { FastifyPluginAsync } from 'fastify'

const SAFE_ID = /^[A-Za-z0-9._:@/+=-]{1,128}$/

/**
 * The request id: the client's or the load balancer's X-Request-Id when it is a short, safe token
 * (so one id follows a request across hops), otherwise a new UUID. Used as Fastify's genReqId.
 */
export function genReqId (req: IncomingMessage): string {
  const given = req.headers['x-request-id']
  if (typeof given === 'string' && SAFE_ID.test(given)) return given
  return randomUUID()
}

/** Returns the request id to the client on every response, errors and 404s included. */
const requestId: FastifyPluginAsync = async function requestId (fastify) {
  fastify.addHook('onRequest', function returnRequestId (request, reply, done) {
    reply.header('x-request-id', request.id)
    done()
  })
}

export default fp(requestId, { name: 'request-id', fastify: '5.x' })
