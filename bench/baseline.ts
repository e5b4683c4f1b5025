import Fastify from 'fastify'
import replyFrom from '@fastify/reply-from'
import type { AddressInfo } from 'node:net'

/*
 * The peer Gatehouse must beat: the smallest useful @fastify/reply-from proxy (a `base`, the
 * logger off, every method forwarded), run as its own process like the gateway.
 */
async function main (): Promise<void> {
  const base = process.argv[2]
  const app = Fastify({ logger: false })
  await app.register(replyFrom, { base })
  app.all('/*', (request, reply) => { reply.from(request.url) })
  await app.listen({ port: 0, host: '127.0.0.1' })
  process.send?.({ type: 'ready', port: (app.server.address() as AddressInfo).port })
  process.on('disconnect', () => { void app.close().then(() => process.exit(0)) })
}

void main()
