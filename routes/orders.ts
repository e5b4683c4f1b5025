import { defineRoute } from 'gatehouse'

// A route file in TypeScript: the same description, typed, plus a plugin for this service only.
export default defineRoute({
  match: { prefix: '/orders', methods: ['GET', 'POST'] },
  rewrite: { prefix: '/orders' },
  upstream: {
    targets: [{ url: process.env.ORDERS_URL ?? 'http://127.0.0.1:3002' }],
    timeouts: { connect: '2s', response: '10s' }
  },
  headers: { response: { set: { 'x-service': 'orders' } } },
  async plugin (fastify) {
    fastify.addHook('onSend', async (_request, reply) => {
      reply.header('x-orders-plugin', 'on')
    })
  }
})
