import { test } from 'node:test'
import assert from 'node:assert/strict'
import { request } from 'undici'
import { Redis } from 'ioredis'
import { startGateway, startRedis, startUpstream } from './helper.js'

test('two gateway instances sharing Redis: a response cached by one is a HIT on the other', async (t) => {
  const redis = await startRedis(t)
  let n = 0
  const up = await startUpstream(t, (req, res) => {
    n++
    res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'max-age=60', vary: 'accept-language' })
    res.end(JSON.stringify({ n, lang: req.headers['accept-language'] }))
  })
  const fixture = {
    routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] }, cache: { enabled: true } } },
    config: { redis: { url: redis.url, keyPrefix: 'gh-test:' }, cache: { store: 'redis' } }
  }
  const a = await startGateway(t, fixture)
  const b = await startGateway(t, fixture)

  const first = await request(`${a.url}/svc/shared?x=1`, { headers: { 'accept-language': 'en' } })
  assert.equal(first.headers['x-cache'], 'MISS')
  assert.deepEqual(await first.body.json(), { n: 1, lang: 'en' })

  const second = await request(`${b.url}/svc/shared?x=1`, { headers: { 'accept-language': 'en' } })
  assert.equal(second.headers['x-cache'], 'HIT')
  assert.deepEqual(await second.body.json(), { n: 1, lang: 'en' })
  assert.equal(second.headers['content-type'], 'application/json')

  const other = await request(`${b.url}/svc/shared?x=1`, { headers: { 'accept-language': 'fr' } })
  assert.equal(other.headers['x-cache'], 'MISS', 'another variant is not served')
  await other.body.dump()
  assert.equal(up.received.length, 2)

  // Entries live under the configured prefix with a TTL; purge through one instance clears both.
  const client = new Redis(redis.url)
  t.after(() => client.disconnect())
  const keys = await client.keys('gh-test:cache:u:*')
  assert.deepEqual(keys, ['gh-test:cache:u:/svc/shared?x=1'])
  const ttl = await client.pttl(keys[0])
  assert.ok(ttl > 0 && ttl <= 120_000, `TTL ${ttl}`)
  const purged = await request(`${a.adminUrl}/cache/purge`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ route: 'svc' }) })
  assert.deepEqual(await purged.body.json(), { purged: 1 })
  const after = await request(`${b.url}/svc/shared?x=1`, { headers: { 'accept-language': 'en' } })
  assert.equal(after.headers['x-cache'], 'MISS')
  await after.body.dump()
})

test('Redis down: the cached route still answers (a miss), never fails', async (t) => {
  const redis = await startRedis(t)
  const up = await startUpstream(t, (_req, res) => {
    res.writeHead(200, { 'cache-control': 'max-age=60' })
    res.end('ok')
  })
  const gw = await startGateway(t, {
    routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] }, cache: { enabled: true } } },
    config: { redis: { url: redis.url, connectTimeout: '500ms' }, cache: { store: 'redis' } }
  })
  await redis.stop()
  for (let i = 0; i < 2; i++) {
    const res = await request(`${gw.url}/svc/x`)
    assert.equal(res.statusCode, 200)
    assert.equal(await res.body.text(), 'ok')
    assert.equal(res.headers['x-cache'], 'MISS')
  }
})
