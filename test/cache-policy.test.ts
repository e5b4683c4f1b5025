import { test } from 'node:test'
import assert from 'node:assert/strict'
import { request } from 'undici'
import { startGateway, startUpstream } from './helper.js'
import { canStore, freshnessLifetime, initialAge, notModified, parseCacheControl, responseDirectives } from '../src/cache/policy.js'

test('Cache-Control parsing: case, quoted values, first occurrence wins', () => {
  const d = parseCacheControl('Public, MAX-AGE=60, no-cache="Set-Cookie, X-Foo", max-age=5, s-maxage="30"')
  assert.equal(d.get('public'), true)
  assert.equal(d.get('max-age'), '60')
  assert.equal(d.get('no-cache'), 'Set-Cookie, X-Foo')
  assert.equal(d.get('s-maxage'), '30')
})

test('freshness: s-maxage, max-age, Expires minus Date, defaultTtl, Last-Modified heuristic', () => {
  const date = 'Sun, 22 Nov 2026 10:00:00 GMT'
  const f = (h: Record<string, string>, ttl?: number, status = 200): number => freshnessLifetime(status, h, responseDirectives(h).directives, ttl)
  assert.equal(f({ 'cache-control': 'max-age=10, s-maxage=20' }), 20_000)
  assert.equal(f({ 'cache-control': 'max-age=10', expires: 'Sun, 22 Nov 2026 11:00:00 GMT', date }), 10_000)
  assert.equal(f({ expires: 'Sun, 22 Nov 2026 10:05:00 GMT', date }), 300_000)
  assert.equal(f({ expires: '0', date }), 0, 'an invalid Expires is already expired')
  assert.equal(f({}, 5000), 5000)
  assert.equal(f({ 'last-modified': 'Sun, 22 Nov 2026 00:00:00 GMT', date }), 3_600_000, '10 % of 10 h')
  assert.equal(f({ 'last-modified': 'Sun, 22 Nov 2026 00:00:00 GMT', date }, undefined, 302), 0, 'no heuristics for a 302')
})

test('Age: upstream Age plus the response delay; Date drift counts in whole seconds', () => {
  const now = Date.parse('Sun, 22 Nov 2026 10:00:05 GMT')
  assert.equal(initialAge({ age: '3' }, now - 200, now), 3200)
  assert.equal(initialAge({ date: 'Sun, 22 Nov 2026 10:00:00 GMT' }, now, now), 5000)
})

test('storability for a shared cache', () => {
  const ok = (req: Record<string, string>, status: number, res: Record<string, string>): string | undefined => {
    const d = canStore('GET', req, status, res, responseDirectives(res).directives, undefined)
    return d.storable ? 'yes' : d.reason
  }
  assert.equal(ok({}, 200, { 'cache-control': 'max-age=60' }), 'yes')
  assert.equal(ok({ 'cache-control': 'no-store' }, 200, { 'cache-control': 'max-age=60' }), 'request-no-store')
  assert.equal(ok({ authorization: 'x' }, 200, { 'cache-control': 'max-age=60' }), 'authorization')
  assert.equal(ok({ authorization: 'x' }, 200, { 'cache-control': 's-maxage=60' }), 'yes')
  assert.equal(ok({ authorization: 'x' }, 200, { 'cache-control': 'max-age=60, must-revalidate' }), 'yes')
  assert.equal(ok({}, 200, { 'cache-control': 'private="x", max-age=60' }), 'private')
  assert.equal(ok({}, 206, { 'cache-control': 'max-age=60', 'content-range': 'bytes 0-1/2' }), 'partial')
  assert.equal(ok({}, 200, {}), 'no-freshness')
  assert.equal(ok({}, 302, { 'cache-control': 'max-age=60' }), 'yes')
  assert.equal(ok({}, 302, { 'last-modified': 'Sun, 22 Nov 2026 00:00:00 GMT' }), 'status')
  assert.equal(ok({}, 200, { 'cache-control': 'no-store', 'cdn-cache-control': 'max-age=5' }), 'yes')
})

test('conditionals: weak comparison for If-None-Match, dates for If-Modified-Since', () => {
  assert.equal(notModified({ 'if-none-match': 'W/"a", "b"' }, { etag: '"a"' }), true)
  assert.equal(notModified({ 'if-none-match': '"c"' }, { etag: '"a"' }), false)
  assert.equal(notModified({ 'if-none-match': '*' }, { etag: '"a"' }), true)
  assert.equal(notModified({ 'if-modified-since': 'Sun, 22 Nov 2026 10:00:00 GMT' }, { 'last-modified': 'Sun, 22 Nov 2026 09:00:00 GMT' }), true)
  assert.equal(notModified({ 'if-modified-since': 'Sun, 22 Nov 2026 08:00:00 GMT' }, { 'last-modified': 'Sun, 22 Nov 2026 09:00:00 GMT' }), false)
})

test('Expires with Date from a real upstream: fresh until Expires, no-cache revalidates every time', async (t) => {
  let n = 0
  const up = await startUpstream(t, (req, res) => {
    n++
    const now = Date.now()
    if (req.url === '/expires') res.writeHead(200, { date: new Date(now).toUTCString(), expires: new Date(now + 60_000).toUTCString() })
    else if (req.headers['if-none-match'] === '"nc"') { res.writeHead(304, { etag: '"nc"' }); res.end(); return } else res.writeHead(200, { etag: '"nc"', 'cache-control': 'no-cache' })
    res.end(`v${n}`)
  })
  const gw = await startGateway(t, { routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] }, cache: { enabled: true } } } })
  await (await request(`${gw.url}/svc/expires`)).body.dump()
  const hit = await request(`${gw.url}/svc/expires`)
  assert.equal(hit.headers['x-cache'], 'HIT')
  assert.equal(await hit.body.text(), 'v1')
  await (await request(`${gw.url}/svc/nocache`)).body.dump()
  for (let i = 0; i < 2; i++) {
    const res = await request(`${gw.url}/svc/nocache`)
    assert.equal(await res.body.text(), 'v2', 'the stored body after a 304')
    assert.match(String(res.headers['cache-status']), /fwd=stale; fwd-status=304/)
  }
  assert.equal(n, 4)
})
