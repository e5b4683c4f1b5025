import zlib from 'node:zlib'
import fp from 'fastify-plugin'
import fastifyCompress from '@fastify/compress'
import type { FastifyPluginAsync, FastifyReply, FastifyRequest, onSendHookHandler } from 'fastify'

/*
 * Response compression with @fastify/compress, around its sharp edges (PITFALLS.md):
 * - request decompression is off (`globalDecompression: false`): a proxied gzip upload must reach
 *   the upstream byte for byte;
 * - it compresses streams whatever their size: a gate before it skips bodies whose Content-Length
 *   is under `compress.threshold`, `Cache-Control: no-transform` responses and SSE;
 * - it holds streamed output back until zlib's buffer fills: every chunk is flushed (sync flush),
 *   so streamed JSON and long polls reach the client as the upstream writes them;
 * - it keeps a strong ETag on the compressed body: the ETag becomes weak (the bytes differ, the
 *   representation does not), which keeps conditional requests working.
 * Its own rules stay: br/gzip/deflate negotiated by Accept-Encoding q-values (ties broken by
 * `compress.encodings` order), compressible types only, never an already-encoded body or a range
 * response, `Vary: Accept-Encoding`. It runs after the cache (route-level onSend hooks follow the
 * global ones), so the cache stores the identity body once and compression happens on the way out.
 */

const kEncodingBefore = Symbol('gatehouse.compress.encodingBefore')

declare module 'fastify' {
  interface FastifyRequest {
    [kEncodingBefore]?: unknown
  }
}

function skip (request: FastifyRequest): void {
  // @fastify/compress's documented per-request opt-out; the upstream has already been sent its copy.
  request.raw.headers['x-no-compression'] = '1'
}

const compress: FastifyPluginAsync = async function compress (fastify) {
  const settings = fastify.gatehouse.config.compress
  const threshold = settings.threshold

  fastify.addHook('onRoute', (options) => {
    const route = options.config?.gatehouse
    if (route !== undefined && (route.compress === false || route.websocket === true)) options.compress = false
  })

  fastify.addHook('onSend', function compressGate (request, reply, payload, done) {
    request[kEncodingBefore] = reply.getHeader('content-encoding')
    if (payload === null || payload === undefined) return done(null, payload)
    const type = String(reply.getHeader('content-type') ?? '')
    const length = reply.getHeader('content-length')
    if (/^text\/event-stream/i.test(type)) skip(request)
    else if (/(?:^|,)\s*no-transform\s*(?:,|$)/i.test(String(reply.getHeader('cache-control') ?? ''))) skip(request)
    else if (length !== undefined && Number(length) < threshold) skip(request)
    done(null, payload)
  })

  await fastify.register(fastifyCompress, {
    global: true,
    globalDecompression: false,
    threshold,
    encodings: settings.encodings,
    // Flush every chunk: never hold a streamed response back waiting for more input.
    zlibOptions: { flush: zlib.constants.Z_SYNC_FLUSH },
    brotliOptions: { flush: zlib.constants.BROTLI_OPERATION_FLUSH, params: { [zlib.constants.BROTLI_PARAM_QUALITY]: 4 } }
  })

  const weakenEtag: onSendHookHandler = function weakenEtag (request, reply: FastifyReply, payload, done) {
    const etag = reply.getHeader('etag')
    if (typeof etag === 'string' && !etag.startsWith('W/') &&
        request[kEncodingBefore] === undefined && reply.getHeader('content-encoding') !== undefined) {
      reply.header('etag', 'W/' + etag)
    }
    done(null, payload)
  }

  // Registered after @fastify/compress, so this route-level onSend runs after its one.
  fastify.addHook('onRoute', (options) => {
    if (options.compress === false) return
    const hooks = options.onSend
    options.onSend = hooks === undefined ? [weakenEtag] : Array.isArray(hooks) ? [...hooks, weakenEtag] : [hooks, weakenEtag]
  })
}

export default fp(compress, { name: 'compress', fastify: '5.x', dependencies: ['request-id'] })
