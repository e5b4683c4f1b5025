import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Client, request } from 'undici'
import { rawRequest, startGateway, startUpstream } from './helper.js'
import { hsToken, now } from './auth-tokens.js'
import { MemoryRateLimitStore } from '../src/stores/rate-limit.js'
import { keyFunction, storeKeyFunction } from '../plugins/rate-limit.js'
import type { FastifyRequest } from 'fastify'
import { registry } from '../src/metrics.js'

const SECRET = 'a-test-secret-that-is-at-least-32-characters'

async function rateLimited (route: string): Promise<number> {
  const m = await registry.getSingleMetric('gatehouse_rate_limited_total')?.get()
  return m?.values.find((v) => v.labels.route === route)?.value ?? 0
}

async function get (url: string, headers: Record<string, string> = {}) {
  const res = await request(url, { headers })
  const text = await res.body.text()
  return { status: res.statusCode, headers: res.headers, body: text }
}

test('GCRA store: a burst of max, then one per window/max; no second burst across a window edge', () => {
  let clock = 1_000_000
  const store = new MemoryRateLimitStore({ now: () => clock })
  const take = (n: number): number => {
    let ok = 0
    for (let i = 0; i < n; i++) if (store.consumeSync('k', 10, 1000).allowed) ok++
    return ok
  }
  clock += 999
  assert.equal(take(10), 10)
  const refused = store.consumeSync('k', 10, 1000)
  assert.equal(refused.allowed, false)
  assert.ok(Math.abs(refused.retryAfterMs - 100) < 0.5, `retry after ${refused.retryAfterMs}`)
  // A fixed window would start over at the edge and admit ten more: GCRA admits none.
  clock += 1
  assert.equal(take(10), 0)
  clock += 100
  assert.equal(take(10), 1)
  clock += 1000
  const fresh = store.consumeSync('k', 10, 1000)
  assert.equal(fresh.allowed, true)
  assert.equal(fresh.remaining, 9)
  // Keys are independent.
  assert.equal(store.consumeSync('other', 10, 1000).remaining, 9)
})

test('GCRA store: a very large limit still counts each request (the clock keeps sub-microsecond precision)', () => {
  const store = new MemoryRateLimitStore()
  // 1e9 a minute: one request is worth 60 ns of the window.
  const r = store.consumeSync('k', 1_000_000_000, 60_000)
  assert.equal(r.remaining, 999_999_999)
  assert.ok(Math.abs(r.resetMs - 60_000 / 1_000_000_000) < 1e-9, `resetMs ${r.resetMs}`)
})

test('GCRA store: memory stays bounded under many keys', () => {
  let clock = 0
  const store = new MemoryRateLimitStore({ maxKeys: 100, now: () => clock })
  for (let i = 0; i < 1000; i++) store.consumeSync(`k${i}`, 5, 60_000)
  assert.ok(store.size <= 100)
  clock += 61_000
  store.consumeSync('late', 5, 60_000)
  assert.ok(store.size <= 100)
})

test('GCRA store: past maxKeys, expired keys go first, then the first inserted, however recently counted', () => {
  let clock = 0
  const store = new MemoryRateLimitStore({ maxKeys: 3, now: () => clock })
  // Two requests a minute per key.
  const spend = (key: string): boolean => store.consumeSync(key, 2, 60_000).allowed
  assert.equal(spend('old'), true)
  assert.equal(spend('busy'), true)
  assert.equal(store.consumeSync('brief', 1, 1000).allowed, true)
  clock += 2000
  assert.equal(spend('old'), true, "old's second request: counted in place, not moved behind busy")
  assert.equal(spend('new'), true)
  assert.equal(store.size, 3, 'the expired key made room')
  // Every key live: the first inserted ('old', though counted after 'busy') makes room.
  assert.equal(spend('newer'), true)
  assert.equal(spend('busy'), true, 'busy kept its state: this is its second request')
  assert.equal(spend('busy'), false)
  assert.equal(spend('old'), true, 'old lost its state: a fresh quota')
})

test('the memory store is asked for scope:key, the same key whether made anew or remembered', () => {
  const requests = [
    { ip: '203.0.113.9', headers: {}, claims: { sub: 'alice', n: 42 }, consumer: 'mobile' },
    { ip: '2001:db8::1', headers: { 'x-tenant': 'acme' } },
    { ip: '198.51.100.2', headers: { 'x-tenant': '' }, claims: { sub: { nested: true } } }
  ] as unknown as FastifyRequest[]
  for (const key of ['ip', 'jwt:sub', 'jwt:n', 'apikey', 'header:X-Tenant']) {
    const fresh = keyFunction(key)
    const stored = storeKeyFunction('route:svc', key)
    for (let round = 0; round < 2; round++) {
      for (const request of requests) assert.equal(stored(request), `route:svc:${fresh(request)}`, `${key} ${round}`)
    }
  }
  // Remembered keys are bounded: past the limit it starts over, and still answers right.
  const stored = storeKeyFunction('global', 'header:x-id')
  for (let i = 0; i < 25_000; i++) assert.equal(stored({ ip: '192.0.2.1', headers: { 'x-id': `c${i}` } } as unknown as FastifyRequest), `global:h:c${i}`)
})

test('rate limit by IP: 429 problem+json with Retry-After and RateLimit headers; a spoofed X-Forwarded-For does not change the key', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] }, rateLimit: { max: 3, window: '1m', key: 'ip' } } }
  })
  const before = await rateLimited('svc')
  const first = await get(`${gw.url}/svc/a`)
  assert.equal(first.status, 200)
  assert.equal(first.headers['ratelimit-policy'], '"svc";q=3;w=60')
  assert.match(String(first.headers.ratelimit), /^"svc";r=2;t=\d+$/)
  for (let i = 0; i < 2; i++) assert.equal((await get(`${gw.url}/svc/a`, { 'x-forwarded-for': `203.0.113.${i}` })).status, 200)
  const limited = await get(`${gw.url}/svc/a`, { 'x-forwarded-for': '198.51.100.7', 'x-real-ip': '198.51.100.8' })
  assert.equal(limited.status, 429)
  assert.match(String(limited.headers['content-type']), /application\/problem\+json/)
  const body = JSON.parse(limited.body) as { code: string, status: number }
  assert.equal(body.code, 'GATEHOUSE_RATE_LIMITED')
  assert.equal(body.status, 429)
  const retry = Number(limited.headers['retry-after'])
  assert.ok(retry >= 1 && retry <= 20, `Retry-After ${String(limited.headers['retry-after'])}`)
  assert.match(String(limited.headers.ratelimit), /^"svc";r=0;t=\d+$/)
  assert.equal(up.received.length, 3)
  assert.equal(await rateLimited('svc'), before + 1)
})

test('a client refused by a rate limit keeps its connection; a malformed request still closes it', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] }, rateLimit: { max: 2, window: '1m', key: 'ip' } } }
  })
  const client = new Client(gw.url, { pipelining: 1 })
  t.after(async () => await client.close())
  let connections = 0
  client.on('connect', () => { connections++ })
  const statuses: number[] = []
  for (let i = 0; i < 6; i++) {
    const res = await client.request({ method: 'GET', path: '/svc/a' })
    await res.body.dump()
    statuses.push(res.statusCode)
    if (res.statusCode === 429) assert.notEqual(res.headers.connection, 'close')
  }
  assert.deepEqual(statuses, [200, 200, 429, 429, 429, 429])
  // Refusing a flood costs no new handshake per request.
  assert.equal(connections, 1)
  // Two Host headers: nginx's rule, a bad request does not keep its connection.
  const bad = await rawRequest(gw.port, 'GET /svc/a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n')
  assert.match(bad, /^HTTP\/1\.1 400 /)
  assert.match(bad, /\r\nconnection: close\r\n/i)
})

test('rate limit behind a trusted proxy: X-Forwarded-For from the proxy picks the client key', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { trustProxy: ['127.0.0.1/32'] },
    routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] }, rateLimit: { max: 1, window: '1m' } } }
  })
  assert.equal((await get(`${gw.url}/svc`, { 'x-forwarded-for': '203.0.113.1' })).status, 200)
  assert.equal((await get(`${gw.url}/svc`, { 'x-forwarded-for': '203.0.113.1' })).status, 429)
  assert.equal((await get(`${gw.url}/svc`, { 'x-forwarded-for': '203.0.113.2' })).status, 200)
  // Only the right-most untrusted entry counts: a client cannot prepend its way to a new key.
  assert.equal((await get(`${gw.url}/svc`, { 'x-forwarded-for': '10.9.9.9, 203.0.113.2' })).status, 429)
})

test('the global limit covers the not-found handler and routes without their own; rateLimit: false opts out', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { rateLimit: { max: 2, window: '1m' } },
    routes: {
      a: { match: { prefix: '/a' }, upstream: { targets: [{ url: up.url }] } },
      health: { match: { prefix: '/health' }, upstream: { targets: [{ url: up.url }] }, rateLimit: false }
    }
  })
  const before = await rateLimited('(none)')
  assert.equal((await get(`${gw.url}/probe-1`)).status, 404)
  assert.equal((await get(`${gw.url}/a`)).status, 200)
  const probe = await get(`${gw.url}/probe-2`)
  assert.equal(probe.status, 429, 'prefix probing shares the bucket and is refused')
  assert.equal(JSON.parse(probe.body).code, 'GATEHOUSE_RATE_LIMITED')
  assert.equal(await rateLimited('(none)'), before + 1)
  assert.equal((await get(`${gw.url}/a`)).status, 429)
  for (let i = 0; i < 5; i++) assert.equal((await get(`${gw.url}/health`)).status, 200)
})

test('consumer keys: jwt:sub, apikey and header:NAME give each consumer its own bucket', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { jwt: { secret: SECRET }, apiKeys: { keys: { alpha: 'alpha-key-0123456789', beta: 'beta-key-0123456789' } } },
    routes: {
      users: { match: { prefix: '/users' }, upstream: { targets: [{ url: up.url }] }, auth: { jwt: true }, rateLimit: { max: 2, window: '1m', key: 'jwt:sub' } },
      keys: { match: { prefix: '/keys' }, upstream: { targets: [{ url: up.url }] }, auth: { apiKey: true }, rateLimit: { max: 2, window: '1m', key: 'apikey' } },
      tenants: { match: { prefix: '/tenants' }, upstream: { targets: [{ url: up.url }] }, rateLimit: { max: 2, window: '1m', key: 'header:x-tenant' } }
    }
  })
  const alice = { authorization: `Bearer ${hsToken(SECRET, { sub: 'alice', exp: now() + 600 })}` }
  const bob = { authorization: `Bearer ${hsToken(SECRET, { sub: 'bob', exp: now() + 600 })}` }
  const statuses = async (path: string, headers: Record<string, string>, n: number) => {
    const out: number[] = []
    for (let i = 0; i < n; i++) out.push((await get(`${gw.url}${path}`, headers)).status)
    return out
  }
  assert.deepEqual(await statuses('/users', alice, 3), [200, 200, 429])
  assert.deepEqual(await statuses('/users', bob, 2), [200, 200])
  // A refused token is 401 before it could count against anyone.
  assert.equal((await get(`${gw.url}/users`, { authorization: 'Bearer nope' })).status, 401)
  assert.deepEqual(await statuses('/keys', { 'x-api-key': 'alpha-key-0123456789' }, 3), [200, 200, 429])
  assert.deepEqual(await statuses('/keys', { 'x-api-key': 'beta-key-0123456789' }, 1), [200])
  assert.deepEqual(await statuses('/tenants', { 'x-tenant': 'one' }, 3), [200, 200, 429])
  assert.deepEqual(await statuses('/tenants', { 'x-tenant': 'two' }, 1), [200])
})
