import { test } from 'node:test'
import assert from 'node:assert/strict'
import Fastify from 'fastify'
import { replyHeaders, routeConfig } from '../src/fastify-internals.js'

/* The two Fastify internals the hot path reads must agree with the public getters they replace. */
test('routeConfig and replyHeaders read what request.routeOptions.config and reply.getHeaders() give', async (t) => {
  const app = Fastify()
  t.after(async () => { await app.close() })
  app.addHook('onRequest', async (_request, reply) => { reply.header('x-from-hook', 'yes') })
  app.get('/r', { config: { marker: 'route-r' } as never }, async (request, reply) => {
    const ours = routeConfig(request)
    assert.equal(ours, request.routeOptions.config)
    assert.equal((ours as { marker?: string }).marker, 'route-r')
    const headers = replyHeaders(reply)
    assert.equal(headers['x-from-hook'], 'yes')
    assert.deepEqual({ ...headers }, reply.getHeaders())
    return 'ok'
  })
  const res = await app.inject('/r')
  assert.equal(res.statusCode, 200)
  assert.equal(res.body, 'ok')
})
