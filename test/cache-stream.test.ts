import { test } from 'node:test'
import assert from 'node:assert/strict'
import http from 'node:http'
import { once } from 'node:events'
import { setTimeout as sleep } from 'node:timers/promises'
import { request } from 'undici'
import { startGateway, startUpstream } from './helper.js'
import { registry } from '../src/metrics.js'
import { cacheStore } from '../plugins/cache.js'

function cachedRoute (url: string, cache: Record<string, unknown> = {}): Record<string, unknown> {
  return { match: { prefix: '/svc' }, upstream: { targets: [{ url }] }, cache: { enabled: true, ...cache } }
}

async function cacheCount (route: string, result: string): Promise<number> {
  const metric = await registry.getSingleMetric('gatehouse_cache_total')?.get()
  return metric?.values.find((v) => v.labels.route === route && v.labels.result === result)?.value ?? 0
}

test('the first client of a cacheable response gets it as it streams; a chunked body over maxEntryBytes is not stored', async (t) => {
  let finish!: () => void
  let n = 0
  const up = await startUpstream(t, (req, res) => {
    n++
    res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': 'max-age=60' })
    if (req.url === '/big') { res.write('x'.repeat(3000)); res.end('y'.repeat(3000)); return }
    res.write('first part;')
    finish = () => res.end('second part')
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up.url, { maxEntryBytes: '4KiB' }) } })
  const res = await request(`${gw.url}/svc/slow`)
  assert.equal(res.headers['x-cache'], 'MISS')
  let text = ''
  for await (const chunk of res.body) {
    // The upstream ends only once the client has the first part: storing must not hold it back.
    if (text === '') finish()
    text += String(chunk)
  }
  assert.equal(text, 'first part;second part')
  const hit = await request(`${gw.url}/svc/slow`)
  assert.equal(hit.headers['x-cache'], 'HIT')
  assert.equal(await hit.body.text(), 'first part;second part')

  for (let i = 0; i < 2; i++) {
    const big = await request(`${gw.url}/svc/big`)
    assert.equal((await big.body.text()).length, 6000)
    assert.equal(big.headers['x-cache'], 'MISS')
  }
  assert.equal(n, 3)
})

test('a client that goes away mid-response leaves no partial entry, and waiting requests are released', async (t) => {
  let n = 0
  let firstClosed!: Promise<unknown>
  const up = await startUpstream(t, (_req, res) => {
    n++
    if (n === 1) firstClosed = once(res, 'close')
    res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': 'max-age=60' })
    res.write('partial;')
    if (n > 1) res.end('complete')
    // The first response never ends: its client gives up.
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up.url) } })
  const ac = new AbortController()
  const first = await request(`${gw.url}/svc/p`, { signal: ac.signal })
  first.body.once('data', () => ac.abort())
  await assert.rejects(first.body.text())
  await firstClosed // the gateway let go of the upstream response too
  const second = await request(`${gw.url}/svc/p`)
  assert.equal(await second.body.text(), 'partial;complete')
  assert.equal(second.headers['x-cache'], 'MISS')
  const third = await request(`${gw.url}/svc/p`)
  assert.equal(await third.body.text(), 'partial;complete')
  assert.equal(third.headers['x-cache'], 'HIT')
})

test('HEAD is answered from a stored GET; gatehouse_cache_total counts hit, miss, stale and bypass', async (t) => {
  const up = await startUpstream(t, (req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': req.url === '/swr' ? 'max-age=1, stale-while-revalidate=60' : 'max-age=60', 'content-length': 5 })
    res.end(req.method === 'HEAD' ? undefined : 'hello')
  })
  const gw = await startGateway(t, { routes: { metered: { ...cachedRoute(up.url), match: { prefix: '/svc' } } } })
  const before = { hit: await cacheCount('metered', 'hit'), miss: await cacheCount('metered', 'miss'), stale: await cacheCount('metered', 'stale'), bypass: await cacheCount('metered', 'bypass') }
  await (await request(`${gw.url}/svc/h`)).body.dump()
  const head = await request(`${gw.url}/svc/h`, { method: 'HEAD' })
  assert.equal(head.headers['x-cache'], 'HIT')
  assert.equal(head.headers['content-length'], '5')
  assert.equal(await head.body.text(), '')
  await (await request(`${gw.url}/svc/h`, { method: 'POST', body: 'x' })).body.dump()
  await (await request(`${gw.url}/svc/swr`)).body.dump()
  await sleep(1100)
  const stale = await request(`${gw.url}/svc/swr`)
  assert.equal(stale.headers['x-cache'], 'STALE')
  await stale.body.dump()
  assert.equal(await cacheCount('metered', 'hit') - before.hit, 1)
  assert.equal(await cacheCount('metered', 'miss') - before.miss, 2)
  assert.equal(await cacheCount('metered', 'stale') - before.stale, 1)
  assert.equal(await cacheCount('metered', 'bypass') - before.bypass, 1)
  assert.equal(up.received.filter((r) => r.method === 'HEAD').length, 0)
})

test('the cache survives a reload (process-level store)', async (t) => {
  const up = await startUpstream(t, (_req, res) => {
    res.writeHead(200, { 'cache-control': 'max-age=60' })
    res.end('kept')
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up.url) } })
  await (await request(`${gw.url}/svc/r`)).body.dump()
  gw.writeRoute('other', { match: { prefix: '/other' }, upstream: { targets: [{ url: up.url }] } })
  const reloaded = await gw.gateway.reload()
  assert.equal(reloaded.ok, true)
  const res = await request(`${gw.url}/svc/r`)
  assert.equal(res.headers['x-cache'], 'HIT')
  assert.equal(await res.body.text(), 'kept')
  assert.equal(up.received.length, 1)
})

test('an ETag cached for one URL never answers a conditional request for another (@fastify/caching pitfall)', async (t) => {
  const up = await startUpstream(t, (req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain', etag: '"same"', 'cache-control': 'max-age=60' })
    res.end(`body of ${String(req.url)}`)
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up.url) } })
  await (await request(`${gw.url}/svc/a`)).body.dump()
  const b = await request(`${gw.url}/svc/b`, { headers: { 'if-none-match': '"same"' } })
  assert.equal(b.headers['x-cache'], 'MISS')
  assert.equal(b.statusCode, 200, "the upstream's answer, not a 304 made from /a's ETag")
  assert.equal(await b.body.text(), 'body of /b')
  const post = await request(`${gw.url}/svc/a`, { method: 'POST', body: 'x', headers: { 'if-none-match': '"same"' } })
  assert.equal(post.statusCode, 200)
  await post.body.dump()
})

test('must-revalidate forbids serving stale when the upstream fails', async (t) => {
  const up = await startUpstream(t, (_req, res) => {
    res.writeHead(200, { 'cache-control': 'max-age=1, must-revalidate, stale-if-error=60' })
    res.end('v')
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up.url) } })
  await (await request(`${gw.url}/svc/m`)).body.dump()
  await up.close()
  await sleep(1100)
  const res = await request(`${gw.url}/svc/m`)
  assert.equal(res.statusCode, 502)
  assert.match(String(res.headers['content-type']), /^application\/problem\+json/)
  await res.body.dump()
})

test('concurrent misses wait for the leader at most the route response timeout, then go upstream', async (t) => {
  let n = 0
  const stalled: http.ServerResponse[] = []
  const up = await startUpstream(t, (_req, res) => {
    n++
    if (n === 1) { stalled.push(res); return } // the leader's upstream never answers in time
    res.writeHead(200, { 'cache-control': 'max-age=60' })
    res.end('late')
  })
  t.after(() => { for (const r of stalled) r.destroy() })
  const gw = await startGateway(t, { routes: { svc: { ...cachedRoute(up.url), upstream: { targets: [{ url: up.url }], timeouts: { response: '1s' } } } } })
  const leader = request(`${gw.url}/svc/w`)
  await once(up.server, 'request')
  const waiter = await request(`${gw.url}/svc/w`)
  assert.equal(waiter.statusCode, 200)
  assert.equal(await waiter.body.text(), 'late')
  const l = await leader
  assert.equal(l.statusCode, 504)
  await l.body.dump()
  assert.ok((await cacheStore(gw.gateway.config, gw.gateway.state).get('/svc/w')).length === 1)
})
