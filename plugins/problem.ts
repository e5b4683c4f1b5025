import fp from 'fastify-plugin'
import type { FastifyError, FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify'
import * as errors from '../src/errors.js'
import { setSecurityHeaders } from './security-headers.js'

declare module 'fastify' {
  interface FastifyRequest {
    /** The code of the problem document the gateway answered with, for the access log. */
    problemCode?: string
  }
}

export interface Problem {
  type: string
  title: string
  status: number
  detail: string
  code: string
  requestId: string
}

/** Turns any error into the gateway's own, so no foreign message, address or stack reaches a client. */
export function toGatewayError (err: FastifyError | Error): { code: string, detail: string, meta: errors.ErrorMeta } {
  const code = (err as FastifyError).code
  const own = code !== undefined ? errors.errorMeta(code) : undefined
  if (own !== undefined) return { code, detail: err.message, meta: own }
  const status = (err as FastifyError).statusCode ?? 500
  if (code === 'FST_ERR_CTP_BODY_TOO_LARGE') {
    return { code: 'GATEHOUSE_PAYLOAD_TOO_LARGE', detail: 'The request body is too large', meta: errors.errorMeta('GATEHOUSE_PAYLOAD_TOO_LARGE') as errors.ErrorMeta }
  }
  if (err instanceof URIError || code === 'FST_ERR_BAD_URL' || (status === 400 && err.message === 'source/request contain invalid characters')) {
    return { code: 'GATEHOUSE_BAD_PATH', detail: 'The request path is not acceptable', meta: errors.errorMeta('GATEHOUSE_BAD_PATH') as errors.ErrorMeta }
  }
  if (status >= 400 && status < 500) {
    // Fastify's own 4xx messages describe the client's request (a bad content type, a bad body).
    return { code: 'GATEHOUSE_BAD_REQUEST', detail: err.message, meta: { ...(errors.errorMeta('GATEHOUSE_BAD_REQUEST') as errors.ErrorMeta), status } }
  }
  return { code: 'GATEHOUSE_INTERNAL', detail: 'The gateway failed to handle the request', meta: errors.errorMeta('GATEHOUSE_INTERNAL') as errors.ErrorMeta }
}

/** Statuses after which nginx does not keep a connection alive (ngx_http_special_response_handler). */
const CLOSE_AFTER = new Set([400, 413, 414, 431, 500, 501])

/** Whether the request declared a body that has not been read to its end. */
function bodyPending (request: FastifyRequest): boolean {
  if (request.raw.complete) return false
  const headers = request.headers
  const length = headers['content-length']
  return headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0')
}

export function sendProblem (request: FastifyRequest, reply: FastifyReply, err: FastifyError | Error): void {
  const { code, detail, meta } = toGatewayError(err)
  if (request.upstream !== undefined && request.upstream.error === undefined) request.upstream.error = code
  request.problemCode = code
  reply.code(meta.status)
  reply.header('content-type', 'application/problem+json; charset=utf-8')
  if (meta.proxyStatus !== undefined) reply.header('proxy-status', `gatehouse; error=${meta.proxyStatus}`)
  // A gateway error replaces whatever an upstream had started to say.
  reply.removeHeader('content-length')
  reply.removeHeader('content-encoding')
  // Close the connection after a refusal before a body was read (413, or any error mid-upload),
  // or Node would read and discard the rest of an unbounded body; and, as nginx does, after a
  // malformed or oversized request or a failure of the gateway's own. Any other refusal (401, 403,
  // 404, 429, 502...) keeps it: a client refused by a rate limit that had to reconnect for each
  // request would cost the gateway a handshake per refusal. (HTTP/1 only: HTTP/2 forbids the
  // header, and resets the stream instead.)
  if (request.raw.httpVersionMajor === 1 && (CLOSE_AFTER.has(meta.status) || bodyPending(request))) reply.header('connection', 'close')
  const body: Problem = { type: errors.problemType(code), title: meta.title, status: meta.status, detail, code, requestId: request.id }
  reply.send(JSON.stringify(body))
}

/**
 * Fastify's `frameworkErrors`: errors the router raises before any hook runs (a path that does not
 * decode, such as `/%FF`), which would otherwise get Fastify's own JSON body.
 */
export function frameworkErrors (err: FastifyError, request: FastifyRequest, reply: FastifyReply): void {
  reply.header('x-request-id', request.id)
  setSecurityHeaders(request, reply)
  sendProblem(request, reply, err)
}

/** Every error the gateway answers is an RFC 9457 problem document with a stable code. */
const problem: FastifyPluginAsync = async function problem (fastify) {
  fastify.decorateRequest('problemCode', undefined)
  fastify.setErrorHandler(function gatewayErrorHandler (err, request, reply) {
    const error = err instanceof Error ? err : new Error(String(err))
    const { meta } = toGatewayError(error)
    if (meta.code === 'GATEHOUSE_INTERNAL') request.log.error({ err: error }, 'unhandled error')
    sendProblem(request, reply, error)
  })
  // Nothing outside a route reads a request body: without this, the not-found handler would
  // buffer and parse a JSON body (up to bodyLimit) only to answer 404, or 400 if it is not JSON.
  // Upstream routes install their own pass-through parser.
  fastify.removeAllContentTypeParsers()
  fastify.addContentTypeParser('*', function ignoreBody (_request, _payload, done) { done(null) })
  fastify.setNotFoundHandler(function routeNotFound (request, reply) {
    const path = request.url.split('?')[0]
    sendProblem(request, reply, new errors.GATEHOUSE_ROUTE_NOT_FOUND(`${request.method} ${path.length > 200 ? path.slice(0, 200) + '...' : path}`))
  })
}

export default fp(problem, { name: 'problem', fastify: '5.x' })
