import { test } from 'node:test'
import assert from 'node:assert/strict'
import type http from 'node:http'
import { setTimeout as sleep } from 'node:timers/promises'
import { request } from 'undici'
import { startGateway, startUpstream, type Upstream } from './helper.js'

type Handler = (req: http.IncomingMessage, res: http.ServerResponse, n: number) => void

/** An upstream whose handler gets the 1-based number of the request. */
async function upstream (t: Parameters<typeof startUpstream>[0], handler: Handler): Promise<Upstream> {
  let n = 0
  return await startUpstream(t, (req, res) => handler(req, res, ++n))
}

function cachedRoute (up: Upstream, cache: Record<string, unknown> = {}): Record<string, unknown> {
  return { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] }, cache: { enabled: true, ...cache } }
}

async function get (url: string, headers: Record<string, string> = {}): Promise<{ status: number, headers: http.IncomingHttpHeaders, body: string }> {
  const res = await request(url, { headers })
  return { status: res.statusCode, headers: res.headers, body: await res.body.text() }
}

function counted (body: string): (req: http.IncomingMessage, res: http.ServerResponse, n: number) => void {
  return (_req, res, n) => { res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': body }); res.end(`v${n}`) }
}

test('max-age: a fresh response is a HIT with Age; it expires after max-age', async (t) => {
  const up = await upstream(t, (_req, res, n) => {
    res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': n === 1 ? 'max-age=7' : 'max-age=60', age: n === 1 ? '6' : '0' })
    res.end(`v${n}`)
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up) } })
  const a = await get(`${gw.url}/svc/x`)
  assert.equal(a.headers['x-cache'], 'MISS')
  assert.match(String(a.headers['cache-status']), /^gatehouse; fwd=uri-miss/)
  const b = await get(`${gw.url}/svc/x`)
  assert.equal(b.headers['x-cache'], 'HIT')
  assert.equal(b.body, 'v1')
  assert.ok(Number(b.headers.age) >= 6, `Age ${String(b.headers.age)} counts the upstream's Age`)
  assert.match(String(b.headers['cache-status']), /^gatehouse; hit; ttl=\d/)
  assert.equal(up.received.length, 1)
  // 6 s old on arrival with max-age=7: stale about a second later.
  await sleep(1200)
  const c = await get(`${gw.url}/svc/x`)
  assert.equal(c.headers['x-cache'], 'MISS')
  assert.equal(c.body, 'v2')
  assert.equal(up.received.length, 2)
})

test('s-maxage wins over max-age for the shared cache', async (t) => {
  const up = await upstream(t, counted('max-age=0, s-maxage=60'))
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up) } })
  await get(`${gw.url}/svc/s`)
  const b = await get(`${gw.url}/svc/s`)
  assert.equal(b.headers['x-cache'], 'HIT')
  assert.equal(b.body, 'v1')
  assert.equal(b.headers['cache-control'], 'max-age=0, s-maxage=60', 'the client sees the upstream Cache-Control')
})

test('private and no-store responses are never cached', async (t) => {
  const up = await upstream(t, (req, res, n) => {
    res.writeHead(200, { 'cache-control': req.url === '/private' ? 'private, max-age=60' : 'no-store, max-age=60' })
    res.end(`v${n}`)
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up) } })
  for (const path of ['/private', '/nostore']) {
    await get(`${gw.url}/svc${path}`)
    const b = await get(`${gw.url}/svc${path}`)
    assert.equal(b.headers['x-cache'], 'MISS')
    assert.match(String(b.headers['cache-status']), /detail=(private|no-store)/)
  }
  assert.equal(up.received.length, 4)
})

test('Authorization: cached only when the response says public (RFC 9111 §3.5)', async (t) => {
  const up = await upstream(t, (req, res, n) => {
    res.writeHead(200, { 'cache-control': req.url === '/public' ? 'public, max-age=60' : 'max-age=60' })
    res.end(`v${n}`)
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up) } })
  await get(`${gw.url}/svc/plain`, { authorization: 'Bearer alice' })
  const plain = await get(`${gw.url}/svc/plain`, { authorization: 'Bearer bob' })
  assert.equal(plain.headers['x-cache'], 'MISS')
  assert.equal(plain.body, 'v2', "bob never gets alice's response")
  await get(`${gw.url}/svc/public`, { authorization: 'Bearer alice' })
  const pub = await get(`${gw.url}/svc/public`, { authorization: 'Bearer bob' })
  assert.equal(pub.headers['x-cache'], 'HIT')
  assert.equal(pub.body, 'v3')
})

test("Set-Cookie: one client's cookie is never served to another", async (t) => {
  const up = await upstream(t, (_req, res, n) => {
    res.writeHead(200, { 'cache-control': 'public, max-age=60', 'set-cookie': `session=secret-${n}` })
    res.end(`v${n}`)
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up) } })
  const a = await get(`${gw.url}/svc/me`)
  assert.deepEqual(a.headers['set-cookie'], 'session=secret-1')
  const b = await get(`${gw.url}/svc/me`)
  assert.equal(b.headers['x-cache'], 'MISS')
  assert.equal(b.headers['set-cookie'], 'session=secret-2')
  assert.equal(up.received.length, 2)
})

test('Vary: one entry per variant; Vary: * is not cached', async (t) => {
  const up = await upstream(t, (req, res, n) => {
    if (req.url === '/star') res.writeHead(200, { 'cache-control': 'max-age=60', vary: '*' })
    else res.writeHead(200, { 'cache-control': 'max-age=60', vary: 'Accept-Language' })
    res.end(`${String(req.headers['accept-language'])}-${n}`)
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up) } })
  assert.equal((await get(`${gw.url}/svc/v`, { 'accept-language': 'en' })).body, 'en-1')
  const fr = await get(`${gw.url}/svc/v`, { 'accept-language': 'fr' })
  assert.equal(fr.body, 'fr-2')
  assert.equal(fr.headers['x-cache'], 'MISS')
  assert.match(String(fr.headers['cache-status']), /fwd=vary-miss/)
  const en = await get(`${gw.url}/svc/v`, { 'accept-language': 'en' })
  assert.deepEqual([en.headers['x-cache'], en.body], ['HIT', 'en-1'])
  const fr2 = await get(`${gw.url}/svc/v`, { 'accept-language': 'fr' })
  assert.deepEqual([fr2.headers['x-cache'], fr2.body], ['HIT', 'fr-2'])
  await get(`${gw.url}/svc/star`)
  assert.equal((await get(`${gw.url}/svc/star`)).headers['x-cache'], 'MISS')
})

test('a stale entry is revalidated with its ETag; a 304 refreshes it; clients get 304 for their own If-None-Match', async (t) => {
  const up = await upstream(t, (req, res, n) => {
    if (req.headers['if-none-match'] === '"e1"') {
      res.writeHead(304, { etag: '"e1"', 'cache-control': 'max-age=0', 'x-refreshed': String(n) })
      res.end()
      return
    }
    res.writeHead(200, { 'content-type': 'text/plain', etag: '"e1"', 'cache-control': 'max-age=0' })
    res.end('body-1')
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up) } })
  assert.equal((await get(`${gw.url}/svc/e`)).body, 'body-1')
  const b = await get(`${gw.url}/svc/e`)
  assert.equal(b.status, 200)
  assert.equal(b.body, 'body-1')
  assert.equal(up.received[1].headers['if-none-match'], '"e1"', 'the gateway revalidated with the stored ETag')
  assert.equal(b.headers['x-refreshed'], '2', 'headers of the 304 refresh the stored ones')
  assert.match(String(b.headers['cache-status']), /fwd=stale; fwd-status=304/)
  // The client's own validator: answered 304 (after the gateway's revalidation).
  const c = await request(`${gw.url}/svc/e`, { headers: { 'if-none-match': '"e1"' } })
  assert.equal(c.statusCode, 304)
  assert.equal(c.headers.etag, '"e1"')
  await c.body.dump()
})

test("a fresh entry answers a client's If-None-Match with 304 without asking the upstream", async (t) => {
  const up = await upstream(t, (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain', etag: '"abc"', 'cache-control': 'max-age=60' })
    res.end('hello')
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up) } })
  await get(`${gw.url}/svc/f`)
  const res = await request(`${gw.url}/svc/f`, { headers: { 'if-none-match': 'W/"zzz", "abc"' } })
  assert.equal(res.statusCode, 304)
  assert.equal(res.headers['x-cache'], 'HIT')
  assert.equal(await res.body.text(), '')
  assert.equal(up.received.length, 1)
  const other = await request(`${gw.url}/svc/f`, { headers: { 'if-none-match': '"other"' } })
  assert.equal(other.statusCode, 200)
  assert.equal(await other.body.text(), 'hello')
})

test('stale-while-revalidate: the stale response is served at once, then the refreshed one', async (t) => {
  let refreshed!: () => void
  const refreshedP = new Promise<void>((resolve) => { refreshed = resolve })
  const up = await upstream(t, (_req, res, n) => {
    res.writeHead(200, { 'cache-control': 'max-age=1, stale-while-revalidate=30' })
    res.end(`v${n}`)
    if (n === 2) refreshed()
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up) } })
  assert.equal((await get(`${gw.url}/svc/swr`)).body, 'v1')
  await sleep(1100)
  const stale = await get(`${gw.url}/svc/swr`)
  assert.deepEqual([stale.headers['x-cache'], stale.body], ['STALE', 'v1'])
  await refreshedP
  let fresh = await get(`${gw.url}/svc/swr`)
  for (let i = 0; i < 100 && fresh.body !== 'v2'; i++) {
    // The refresh is stored right after the upstream answered it.
    await sleep(20)
    fresh = await get(`${gw.url}/svc/swr`)
  }
  assert.deepEqual([fresh.headers['x-cache'], fresh.body], ['HIT', 'v2'])
  assert.equal(up.received.length, 2, 'one background refresh')
})

test('stale-if-error: a stale response is served when the upstream is gone', async (t) => {
  const up = await upstream(t, (req, res, n) => {
    res.writeHead(200, { 'cache-control': req.url === '/sie' ? 'max-age=1, stale-if-error=60' : 'max-age=1' })
    res.end(`v${n}`)
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up) } })
  await get(`${gw.url}/svc/sie`)
  await get(`${gw.url}/svc/plain`)
  await up.close()
  await sleep(1100)
  const res = await get(`${gw.url}/svc/sie`)
  assert.equal(res.status, 200)
  assert.equal(res.body, 'v1')
  assert.equal(res.headers['x-cache'], 'STALE')
  assert.match(String(res.headers['cache-status']), /fwd-status=502; detail=stale-if-error/)
  assert.equal(res.headers['content-type'], undefined, 'no problem+json header left over')
  const plain = await get(`${gw.url}/svc/plain`)
  assert.equal(plain.status, 502, 'without stale-if-error the error goes through')
})

test('100 concurrent misses for one URL make one upstream request', async (t) => {
  const up = await upstream(t, (_req, res, n) => {
    setTimeout(() => { res.writeHead(200, { 'cache-control': 'max-age=60' }); res.end(`v${n}`) }, 300)
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up) } })
  const results = await Promise.all(Array.from({ length: 100 }, async () => await get(`${gw.url}/svc/hot`)))
  assert.equal(up.received.length, 1)
  assert.ok(results.every((r) => r.status === 200 && r.body === 'v1'))
  assert.equal(results.filter((r) => r.headers['x-cache'] === 'MISS').length, 1)
  assert.ok(results.filter((r) => /collapsed/.test(String(r.headers['cache-status']))).length >= 90)
})

test('a thundering herd on an expired hot key costs the upstream one request', async (t) => {
  const up = await upstream(t, (_req, res, n) => {
    setTimeout(() => { res.writeHead(200, { 'cache-control': 'max-age=1' }); res.end(`v${n}`) }, n === 1 ? 0 : 300)
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up) } })
  await get(`${gw.url}/svc/hot`)
  await sleep(1100)
  const results = await Promise.all(Array.from({ length: 50 }, async () => await get(`${gw.url}/svc/hot`)))
  assert.equal(up.received.length, 2)
  assert.ok(results.every((r) => r.status === 200 && r.body === 'v2'))
})

test('POST, PUT, PATCH and DELETE invalidate the URL and a same-origin Location', async (t) => {
  const up = await upstream(t, (req, res, n) => {
    if (req.method === 'GET') res.writeHead(200, { 'cache-control': 'max-age=60' })
    else res.writeHead(201, { location: '/svc/other' })
    res.end(`v${n}`)
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up) } })
  for (const method of ['POST', 'PUT', 'PATCH', 'DELETE'] as const) {
    await get(`${gw.url}/svc/item`)
    await get(`${gw.url}/svc/other`)
    assert.equal((await get(`${gw.url}/svc/item`)).headers['x-cache'], 'HIT')
    const w = await request(`${gw.url}/svc/item`, { method, body: 'x' })
    assert.equal(w.headers['x-cache'], 'BYPASS')
    await w.body.dump()
    assert.equal((await get(`${gw.url}/svc/item`)).headers['x-cache'], 'MISS', method)
    assert.equal((await get(`${gw.url}/svc/other`)).headers['x-cache'], 'MISS', `${method} Location`)
  }
})

test('admin POST /cache/purge drops one URL or a whole route', async (t) => {
  const up = await upstream(t, counted('max-age=60'))
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up) } })
  await get(`${gw.url}/svc/a?q=1`)
  await get(`${gw.url}/svc/b`)
  const purge = async (body: unknown): Promise<unknown> => {
    const res = await request(`${gw.adminUrl}/cache/purge`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) })
    return await res.body.json()
  }
  assert.deepEqual(await purge({ url: `${gw.url}/svc/a?q=1` }), { purged: 1 })
  assert.equal((await get(`${gw.url}/svc/a?q=1`)).headers['x-cache'], 'MISS')
  assert.equal((await get(`${gw.url}/svc/b`)).headers['x-cache'], 'HIT')
  assert.deepEqual(await purge({ route: 'svc' }), { purged: 2 })
  assert.equal((await get(`${gw.url}/svc/b`)).headers['x-cache'], 'MISS')
  const bad = await request(`${gw.adminUrl}/cache/purge`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{}' })
  assert.equal(bad.statusCode, 400)
  await bad.body.dump()
})

test('the memory store evicts the least recently used entry at cache.maxBytes', async (t) => {
  const up = await upstream(t, (req, res) => {
    res.writeHead(200, { 'cache-control': 'max-age=60' })
    res.end(String(req.url).padEnd(4000, '.'))
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up) }, config: { cache: { maxBytes: 14000 } } })
  for (const p of ['a', 'b', 'c']) await get(`${gw.url}/svc/${p}`)
  assert.equal((await get(`${gw.url}/svc/a`)).headers['x-cache'], 'HIT')
  await get(`${gw.url}/svc/d`)
  const cache = Object.fromEntries(await Promise.all(['a', 'c', 'd', 'b'].map(async (p) => [p, (await get(`${gw.url}/svc/${p}`)).headers['x-cache']])))
  assert.deepEqual(cache, { a: 'HIT', c: 'HIT', d: 'HIT', b: 'MISS' })
})

test('bodies over maxEntryBytes stream through uncached; request no-cache and only-if-cached are honoured', async (t) => {
  const up = await upstream(t, (req, res, n) => {
    const body = req.url === '/big' ? 'x'.repeat(5000) : `v${n}`
    res.writeHead(200, { 'cache-control': 'max-age=60', 'content-length': body.length })
    res.end(body)
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up, { maxEntryBytes: '1KiB' }) } })
  await get(`${gw.url}/svc/big`)
  const big = await get(`${gw.url}/svc/big`)
  assert.equal(big.body.length, 5000)
  assert.equal(big.headers['x-cache'], 'MISS')
  assert.match(String(big.headers['cache-status']), /detail=too-large/)

  const missing = await get(`${gw.url}/svc/small`, { 'cache-control': 'only-if-cached' })
  assert.equal(missing.status, 504)
  assert.equal(JSON.parse(missing.body).code, 'GATEHOUSE_NOT_CACHED')
  await get(`${gw.url}/svc/small`)
  const before = up.received.length
  const forced = await get(`${gw.url}/svc/small`, { 'cache-control': 'no-cache' })
  assert.equal(forced.headers['x-cache'], 'MISS')
  assert.equal(up.received.length, before + 1)
  const cached = await get(`${gw.url}/svc/small`, { 'cache-control': 'only-if-cached' })
  assert.equal(cached.headers['x-cache'], 'HIT')
})

test('CDN-Cache-Control targets the gateway over Cache-Control (RFC 9213); Gatehouse-Cache-Control is not passed on', async (t) => {
  const up = await upstream(t, (req, res, n) => {
    if (req.url === '/cdn') res.writeHead(200, { 'cache-control': 'no-store', 'cdn-cache-control': 'max-age=60' })
    else res.writeHead(200, { 'cache-control': 'max-age=60', 'gatehouse-cache-control': 'no-store' })
    res.end(`v${n}`)
  })
  const gw = await startGateway(t, { routes: { svc: cachedRoute(up) } })
  await get(`${gw.url}/svc/cdn`)
  const cdn = await get(`${gw.url}/svc/cdn`)
  assert.deepEqual([cdn.headers['x-cache'], cdn.headers['cache-control']], ['HIT', 'no-store'])
  await get(`${gw.url}/svc/own`)
  const own = await get(`${gw.url}/svc/own`)
  assert.equal(own.headers['x-cache'], 'MISS')
  assert.equal(own.headers['gatehouse-cache-control'], undefined)
})

test('a route without cache gets no X-Cache header and no caching', async (t) => {
  const up = await upstream(t, counted('max-age=60'))
  const gw = await startGateway(t, { routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } } } })
  await get(`${gw.url}/svc/n`)
  const b = await get(`${gw.url}/svc/n`)
  assert.equal(b.headers['x-cache'], undefined)
  assert.equal(b.body, 'v2')
})
