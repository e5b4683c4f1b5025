import createError, { type FastifyErrorConstructor } from '@fastify/error'

/*
 * Every error the gateway itself produces. Each export name equals its code (a test checks it, and
 * that README's error table lists every code). The message is what a client sees as `detail`: it
 * must never carry an internal address, a socket error text or a stack.
 *
 * `proxyStatus` is the RFC 9209 error type sent in `Proxy-Status` for errors about the upstream,
 * so a client can tell a gateway-made 502 from one the upstream sent.
 */
export interface ErrorMeta {
  code: string
  status: number
  title: string
  proxyStatus?: string
}

const meta = new Map<string, ErrorMeta>()

function define (code: string, status: number, title: string, message: string, proxyStatus?: string): FastifyErrorConstructor<{ code: string }, [string?]> {
  meta.set(code, { code, status, title, proxyStatus })
  return createError<[string?]>(code, message, status)
}

export const GATEHOUSE_BAD_REQUEST = define('GATEHOUSE_BAD_REQUEST', 400, 'Bad Request', '%s')
export const GATEHOUSE_BAD_PATH = define('GATEHOUSE_BAD_PATH', 400, 'Bad Request', 'The request path is not acceptable: %s')
export const GATEHOUSE_BAD_HOST = define('GATEHOUSE_BAD_HOST', 400, 'Bad Request', 'The request must carry exactly one Host header')
export const GATEHOUSE_UNAUTHORIZED = define('GATEHOUSE_UNAUTHORIZED', 401, 'Unauthorized', '%s')
export const GATEHOUSE_FORBIDDEN = define('GATEHOUSE_FORBIDDEN', 403, 'Forbidden', '%s')
export const GATEHOUSE_IP_DENIED = define('GATEHOUSE_IP_DENIED', 403, 'Forbidden', 'Requests from this address are not allowed')
export const GATEHOUSE_ROUTE_NOT_FOUND = define('GATEHOUSE_ROUTE_NOT_FOUND', 404, 'Not Found', 'No route matches %s')
export const GATEHOUSE_PAYLOAD_TOO_LARGE = define('GATEHOUSE_PAYLOAD_TOO_LARGE', 413, 'Content Too Large', 'The request body exceeds the limit of %s bytes')
export const GATEHOUSE_HEADERS_TOO_LARGE = define('GATEHOUSE_HEADERS_TOO_LARGE', 431, 'Request Header Fields Too Large', 'The request header block is too large')
export const GATEHOUSE_RATE_LIMITED = define('GATEHOUSE_RATE_LIMITED', 429, 'Too Many Requests', 'Rate limit exceeded, retry in %s seconds')
export const GATEHOUSE_INTERNAL = define('GATEHOUSE_INTERNAL', 500, 'Internal Server Error', 'The gateway failed to handle the request')
export const GATEHOUSE_UPSTREAM_UNREACHABLE = define('GATEHOUSE_UPSTREAM_UNREACHABLE', 502, 'Bad Gateway', 'The upstream service refused the connection', 'connection_refused')
export const GATEHOUSE_UPSTREAM_RESET = define('GATEHOUSE_UPSTREAM_RESET', 502, 'Bad Gateway', 'The upstream service closed the connection before responding', 'connection_terminated')
export const GATEHOUSE_UPSTREAM_BAD_RESPONSE = define('GATEHOUSE_UPSTREAM_BAD_RESPONSE', 502, 'Bad Gateway', 'The upstream service sent an invalid response', 'http_protocol_error')
export const GATEHOUSE_UPSTREAM_DNS = define('GATEHOUSE_UPSTREAM_DNS', 502, 'Bad Gateway', 'The upstream service name could not be resolved', 'dns_error')
export const GATEHOUSE_UPSTREAM_TLS = define('GATEHOUSE_UPSTREAM_TLS', 502, 'Bad Gateway', 'The TLS handshake with the upstream service failed', 'tls_protocol_error')
export const GATEHOUSE_NO_HEALTHY_UPSTREAM = define('GATEHOUSE_NO_HEALTHY_UPSTREAM', 503, 'Service Unavailable', 'No healthy upstream target is available', 'destination_unavailable')
export const GATEHOUSE_CIRCUIT_OPEN = define('GATEHOUSE_CIRCUIT_OPEN', 503, 'Service Unavailable', 'The upstream service is failing and its circuit is open', 'destination_unavailable')
export const GATEHOUSE_OVERLOADED = define('GATEHOUSE_OVERLOADED', 503, 'Service Unavailable', 'The gateway is overloaded, retry later')
export const GATEHOUSE_SHUTTING_DOWN = define('GATEHOUSE_SHUTTING_DOWN', 503, 'Service Unavailable', 'The gateway is shutting down')
export const GATEHOUSE_UPSTREAM_TIMEOUT = define('GATEHOUSE_UPSTREAM_TIMEOUT', 504, 'Gateway Timeout', 'The upstream service did not respond in time', 'http_response_timeout')
export const GATEHOUSE_UPSTREAM_CONNECT_TIMEOUT = define('GATEHOUSE_UPSTREAM_CONNECT_TIMEOUT', 504, 'Gateway Timeout', 'The connection to the upstream service timed out', 'connection_timeout')
export const GATEHOUSE_NOT_CACHED = define('GATEHOUSE_NOT_CACHED', 504, 'Gateway Timeout', 'The response is not in the cache (the request said only-if-cached)')

export function errorMeta (code: string): ErrorMeta | undefined {
  return meta.get(code)
}

export function allErrorCodes (): string[] {
  return [...meta.keys()]
}

/** The slug of the problem `type` URI: GATEHOUSE_UPSTREAM_TIMEOUT -> upstream-timeout. */
export function problemType (code: string): string {
  return 'urn:gatehouse:error:' + code.slice('GATEHOUSE_'.length).toLowerCase().replaceAll('_', '-')
}
