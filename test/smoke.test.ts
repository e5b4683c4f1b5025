import { test } from 'node:test'
import assert from 'node:assert/strict'
import { request } from 'undici'
import { startGateway, startUpstream } from './helper.js'

test('a route forwards to its upstream with the prefix stripped', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } } } })
  const res = await request(`${gw.url}/svc/a/b?x=1&y=%20z`)
  assert.equal(res.statusCode, 200)
  const body = await res.body.json() as { url: string, headers: Record<string, string> }
  assert.equal(body.url, '/a/b?x=1&y=%20z')
  assert.equal(body.headers['x-forwarded-for'], '127.0.0.1')
  assert.ok(res.headers['x-request-id'])
})
