import { test } from 'node:test'
import assert from 'node:assert/strict'
import { writeFileSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Client, request } from 'undici'
import { rawRequest, startGateway, startUpstream } from './helper.js'
import { hsToken, noneToken, now, rsToken, rsaPair } from './auth-tokens.js'
import { registry } from '../src/metrics.js'
import { VerifiedTokens } from '../plugins/auth.js'

const SECRET = 'a-test-secret-that-is-at-least-32-characters'

interface Problem { code: string, status: number, detail: string }

async function authFailures (route: string, reason: string): Promise<number> {
  const m = await registry.getSingleMetric('gatehouse_auth_failures_total')?.get()
  return m?.values.find((v) => v.labels.route === route && v.labels.reason === reason)?.value ?? 0
}

test('HS256 JWT: valid tokens pass, every kind of bad token is refused with 401 and never forwarded', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { jwt: { secret: SECRET, issuer: 'https://idp.test', audience: 'orders' } },
    routes: {
      orders: { match: { prefix: '/orders' }, upstream: { targets: [{ url: up.url }] }, auth: { jwt: { claimsToHeaders: { sub: 'x-user-id', tenant: 'x-tenant' } } } },
      open: { match: { prefix: '/open' }, upstream: { targets: [{ url: up.url }] } }
    }
  })
  const good = { sub: 'alice', iss: 'https://idp.test', aud: 'orders', exp: now() + 600, tenant: 't1' }
  const get = async (token: string | undefined, extra: Record<string, string> = {}) => {
    const res = await request(`${gw.url}/orders/list`, { headers: { ...(token !== undefined ? { authorization: `Bearer ${token}` } : {}), ...extra } })
    const body = await res.body.json() as Problem & { headers: Record<string, string> }
    return { status: res.statusCode, headers: res.headers, body }
  }

  const ok = await get(hsToken(SECRET, good), { 'x-user-id': 'mallory', 'X-Tenant': 'evil' })
  assert.equal(ok.status, 200)
  // claimsToHeaders: the client's forged headers were replaced by the claims.
  assert.equal(ok.body.headers['x-user-id'], 'alice')
  assert.equal(ok.body.headers['x-tenant'], 't1')
  assert.equal(up.received.length, 1)

  const cases: Array<[string, string | undefined, string]> = [
    ['missing token', undefined, 'missing'],
    ['alg none', noneToken(good), 'algorithm'],
    ['alg none with a forged signature part', noneToken(good) + 'abc', 'algorithm'],
    ['wrong secret', hsToken('another-secret-that-is-also-32-chars-long!', good), 'invalid'],
    ['expired', hsToken(SECRET, { ...good, exp: now() - 3600 }), 'expired'],
    ['nbf in the future', hsToken(SECRET, { ...good, nbf: now() + 3600 }), 'not_yet_valid'],
    ['wrong audience', hsToken(SECRET, { ...good, aud: 'billing' }), 'invalid'],
    ['no audience at all', hsToken(SECRET, { sub: 'alice', iss: 'https://idp.test', exp: now() + 600 }), 'invalid'],
    ['wrong issuer', hsToken(SECRET, { ...good, iss: 'https://evil.test' }), 'invalid'],
    ['HS512 is fine but tampered payload', hsToken(SECRET, good).replace(/\.[^.]+\./, `.${Buffer.from(JSON.stringify({ ...good, sub: 'root' })).toString('base64url')}.`), 'invalid'],
    ['garbage', 'not-a-jwt', 'invalid']
  ]
  for (const [name, token, reason] of cases) {
    const before = await authFailures('orders', reason)
    const r = await get(token, { 'x-user-id': 'mallory' })
    assert.equal(r.status, 401, name)
    assert.equal(r.body.code, 'GATEHOUSE_UNAUTHORIZED', name)
    assert.match(String(r.headers['content-type']), /application\/problem\+json/, name)
    assert.match(String(r.headers['www-authenticate']), /^Bearer realm="gatehouse"/, name)
    assert.equal(await authFailures('orders', reason), before + 1, `${name}: counted as ${reason}`)
    assert.doesNotMatch(JSON.stringify(r.body), /secret|mallory/i, name)
  }
  assert.equal(up.received.length, 1, 'no refused request reached the upstream')

  // A token in the query string or another scheme is not a bearer token.
  const basic = await request(`${gw.url}/orders/list`, { headers: { authorization: `Basic ${hsToken(SECRET, good)}` } })
  assert.equal(basic.statusCode, 401)
  await basic.body.dump()
  // Within the clock skew (30 s by default) an exp just passed is still accepted.
  const skewed = await get(hsToken(SECRET, { ...good, exp: now() - 5 }))
  assert.equal(skewed.status, 200)

  // The unprotected route strips nothing the client sends and asks for nothing.
  const open = await request(`${gw.url}/open/x`, { headers: { 'x-user-id': 'whoever' } })
  assert.equal(open.statusCode, 200)
  assert.equal((await open.body.json() as { headers: Record<string, string> }).headers['x-user-id'], 'whoever')
})

test('requireClaims: a valid token without the claim gets 403 insufficient_scope; the cookie route reads its cookie only', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { jwt: { secret: SECRET } },
    routes: {
      admin: { match: { prefix: '/admin' }, upstream: { targets: [{ url: up.url }] }, auth: { jwt: { requireClaims: { scope: 'admin:write', email_verified: true } } } },
      web: { match: { prefix: '/web' }, upstream: { targets: [{ url: up.url }] }, auth: { jwt: { cookie: 'session' } } },
      api: { match: { prefix: '/api' }, upstream: { targets: [{ url: up.url }] }, auth: { jwt: true } }
    }
  })
  const base = { sub: 'bob', exp: now() + 600 }
  const call = async (path: string, headers: Record<string, string>) => {
    const res = await request(`${gw.url}${path}`, { headers })
    const body = await res.body.json() as Problem
    return { status: res.statusCode, body, headers: res.headers }
  }
  const weak = await call('/admin/x', { authorization: `Bearer ${hsToken(SECRET, { ...base, scope: 'admin:read', email_verified: true })}` })
  assert.equal(weak.status, 403)
  assert.equal(weak.body.code, 'GATEHOUSE_FORBIDDEN')
  assert.match(String(weak.headers['www-authenticate']), /error="insufficient_scope"/)
  const unverified = await call('/admin/x', { authorization: `Bearer ${hsToken(SECRET, { ...base, scope: 'admin:write' })}` })
  assert.equal(unverified.status, 403)
  const strong = await call('/admin/x', { authorization: `Bearer ${hsToken(SECRET, { ...base, scope: 'admin:read admin:write', email_verified: true })}` })
  assert.equal(strong.status, 200)

  const token = hsToken(SECRET, base)
  assert.equal((await call('/web/x', { cookie: `theme=dark; session=${token}` })).status, 200)
  assert.equal((await call('/web/x', { cookie: 'session=' })).status, 401)
  // A route that names no cookie never takes a token from one.
  assert.equal((await call('/api/x', { cookie: `session=${token}` })).status, 401)
  assert.equal(up.received.length, 2)
})

test('RS256 with a public key file: HS256 signed with the public key (algorithm confusion) is refused', async (t) => {
  const up = await startUpstream(t)
  const { privateKey, publicPem } = rsaPair()
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-key-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  writeFileSync(join(dir, 'jwt.pem'), publicPem)
  const gw = await startGateway(t, {
    config: { jwt: { publicKey: join(dir, 'jwt.pem'), algorithms: ['RS256'] } },
    routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] }, auth: { jwt: true } } }
  })
  const payload = { sub: 'carol', exp: now() + 600 }
  const ok = await request(`${gw.url}/svc`, { headers: { authorization: `Bearer ${rsToken(privateKey, payload)}` } })
  assert.equal(ok.statusCode, 200)
  await ok.body.dump()
  for (const token of [hsToken(publicPem, payload), hsToken(publicPem.trim(), payload), noneToken(payload)]) {
    const res = await request(`${gw.url}/svc`, { headers: { authorization: `Bearer ${token}` } })
    assert.equal(res.statusCode, 401)
    await res.body.dump()
  }
  assert.equal(up.received.length, 1)
})

test('API keys: the consumer name is forwarded instead of the key, a forged consumer header is dropped', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { apiKeys: { header: 'x-api-key', keys: { 'mobile-app': '$' + '{MOBILE_KEY}', partner: 'partner-key-0123456789' } } },
    env: { MOBILE_KEY: 'mobile-key-abcdefghij' },
    routes: {
      svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] }, auth: { apiKey: true } },
      open: { match: { prefix: '/open' }, upstream: { targets: [{ url: up.url }] } }
    }
  })
  const res = await request(`${gw.url}/svc/a`, { headers: { 'x-api-key': 'mobile-key-abcdefghij', 'x-gatehouse-consumer': 'partner' } })
  assert.equal(res.statusCode, 200)
  const seen = (await res.body.json() as { headers: Record<string, string> }).headers
  assert.equal(seen['x-gatehouse-consumer'], 'mobile-app')
  assert.equal(seen['x-api-key'], undefined, 'the key itself stays at the gateway')

  for (const headers of [{}, { 'x-api-key': 'mobile-key-abcdefghiJ' }, { 'x-api-key': 'mobile' }, { 'x-api-key': '' }]) {
    const r = await request(`${gw.url}/svc/a`, { headers })
    assert.equal(r.statusCode, 401)
    const body = await r.body.json() as Problem
    assert.equal(body.code, 'GATEHOUSE_UNAUTHORIZED')
    assert.match(String(r.headers['www-authenticate']), /ApiKey/)
  }
  assert.equal(up.received.length, 1)
  // On a route without auth a client cannot pretend to be a consumer either.
  const open = await request(`${gw.url}/open`, { headers: { 'x-gatehouse-consumer': 'partner' } })
  assert.equal((await open.body.json() as { headers: Record<string, string> }).headers['x-gatehouse-consumer'], undefined)
})

test('auth config mistakes stop the start with a clear message', async (t) => {
  const up = await startUpstream(t)
  const route = { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } }
  await assert.rejects(startGateway(t, { routes: { svc: { ...route, auth: { jwt: true } } } }), /auth\.jwt needs jwt in gatehouse\.yaml/)
  await assert.rejects(startGateway(t, { routes: { svc: { ...route, auth: { apiKey: true } } } }), /auth\.apiKey needs apiKeys/)
  await assert.rejects(startGateway(t, { config: { jwt: { secret: SECRET, algorithms: ['RS256'] } }, routes: { svc: route } }), /\/jwt\/algorithms: lists algorithms a secret cannot verify/)
  await assert.rejects(startGateway(t, { config: { jwt: { secret: SECRET, algorithms: ['none'] } }, routes: { svc: route } }), /algorithms/)
  const { publicPem } = rsaPair()
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-key-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  writeFileSync(join(dir, 'jwt.pem'), publicPem)
  await assert.rejects(startGateway(t, { config: { jwt: { publicKey: join(dir, 'jwt.pem'), algorithms: ['HS256'] } }, routes: { svc: route } }), /\/jwt\/algorithms: HS256 cannot be used with a public key or JWKS/)
})

test('optional JWT: no token passes without identity (forged identity headers still dropped); a bad token is still 401', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { jwt: { secret: SECRET } },
    routes: { feed: { match: { prefix: '/feed' }, upstream: { targets: [{ url: up.url }] }, auth: { jwt: { optional: true, claimsToHeaders: { sub: 'x-user-id' } } } } }
  })
  const anonymous = await request(`${gw.url}/feed`, { headers: { 'x-user-id': 'admin' } })
  assert.equal(anonymous.statusCode, 200)
  assert.equal((await anonymous.body.json() as { headers: Record<string, string> }).headers['x-user-id'], undefined)
  const known = await request(`${gw.url}/feed`, { headers: { authorization: `Bearer ${hsToken(SECRET, { sub: 'erin', exp: now() + 60 })}` } })
  assert.equal((await known.body.json() as { headers: Record<string, string> }).headers['x-user-id'], 'erin')
  const bad = await request(`${gw.url}/feed`, { headers: { authorization: `Bearer ${hsToken(SECRET, { sub: 'erin', exp: now() - 3600 })}` } })
  assert.equal(bad.statusCode, 401)
  await bad.body.dump()
  assert.equal(up.received.length, 2)
})

test('a WebSocket upgrade on a protected route needs the token too: refused with 401, the upstream never sees it', async (t) => {
  const up = await startUpstream(t)
  let upgrades = 0
  up.server.on('upgrade', (_req, socket) => { upgrades++; socket.destroy() })
  const gw = await startGateway(t, {
    config: { jwt: { secret: SECRET } },
    routes: { ws: { match: { prefix: '/ws' }, websocket: true, upstream: { targets: [{ url: up.url }] }, auth: { jwt: true } } }
  })
  const answer = await rawRequest(gw.port, 'GET /ws/chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n')
  assert.match(answer, /^HTTP\/1\.1 401 /)
  assert.match(answer, /GATEHOUSE_UNAUTHORIZED/)
  assert.equal(upgrades, 0)
  assert.equal(up.received.length, 0)
})

test('verified tokens are remembered only until they expire: a token accepted once is refused past its exp', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { jwt: { secret: SECRET, clockSkew: '0s' } },
    routes: { orders: { match: { prefix: '/orders' }, upstream: { targets: [{ url: up.url }] }, auth: { jwt: true } } }
  })
  const exp = now() + 2
  const token = hsToken(SECRET, { sub: 'alice', exp })
  const get = async (tok: string): Promise<number> => {
    const res = await request(`${gw.url}/orders/x`, { headers: { authorization: `Bearer ${tok}` } })
    await res.body.dump()
    return res.statusCode
  }
  assert.equal(await get(token), 200)
  assert.equal(await get(token), 200)
  // The remembered token is the exact text: a changed signature or payload is verified anew.
  assert.equal(await get(token.slice(0, -2) + (token.endsWith('AA') ? 'BB' : 'AA')), 401)
  assert.equal(await get(token.replace(/\.[^.]+\./, `.${Buffer.from(JSON.stringify({ sub: 'root', exp })).toString('base64url')}.`)), 401)
  await new Promise((resolve) => setTimeout(resolve, (exp + 1) * 1000 - Date.now()))
  assert.equal(await get(token), 401)
  assert.equal(up.received.length, 2)
})

test('checks run cheapest first: IP filter, IP rate limit, then auth (before any body is read), then consumer limits', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { jwt: { secret: SECRET } },
    routes: {
      walled: { match: { prefix: '/walled' }, upstream: { targets: [{ url: up.url }] }, auth: { jwt: true }, ipFilter: { allow: ['10.0.0.0/8'] } },
      byip: { match: { prefix: '/byip' }, upstream: { targets: [{ url: up.url }] }, auth: { jwt: true }, rateLimit: { max: 1, window: '1m', key: 'ip' } },
      bysub: { match: { prefix: '/bysub' }, upstream: { targets: [{ url: up.url }] }, auth: { jwt: true }, rateLimit: { max: 1, window: '1m', key: 'jwt:sub' } }
    }
  })
  const token = hsToken(SECRET, { sub: 'alice', exp: now() + 600 })
  const send = async (path: string, opts: { token?: string, body?: string } = {}): Promise<{ status: number, code: string }> => {
    const res = await request(`${gw.url}${path}`, {
      method: opts.body !== undefined ? 'POST' : 'GET',
      body: opts.body,
      headers: opts.token !== undefined ? { authorization: `Bearer ${opts.token}` } : {}
    })
    const text = await res.body.text()
    return { status: res.statusCode, code: text === '' ? '' : (JSON.parse(text) as { code: string }).code }
  }
  // The IP filter answers before auth: no token, yet 403, not 401.
  assert.deepEqual(await send('/walled/x'), { status: 403, code: 'GATEHOUSE_IP_DENIED' })
  // The IP limit counts before auth: a refused token still spends the address's quota...
  assert.deepEqual(await send('/byip/x', { token: 'not-a-token' }), { status: 401, code: 'GATEHOUSE_UNAUTHORIZED' })
  // ...so a good token then meets the limit, and auth is not asked.
  assert.deepEqual(await send('/byip/x', { token }), { status: 429, code: 'GATEHOUSE_RATE_LIMITED' })
  // Consumer limits come after auth: without a token it is 401 every time, never 429...
  for (let i = 0; i < 3; i++) assert.deepEqual(await send('/bysub/x', { body: 'x'.repeat(64 * 1024) }), { status: 401, code: 'GATEHOUSE_UNAUTHORIZED' })
  // ...and the authenticated caller has its own quota.
  assert.equal((await send('/bysub/x', { token })).status, 200)
  assert.deepEqual(await send('/bysub/x', { token }), { status: 429, code: 'GATEHOUSE_RATE_LIMITED' })
  // Nothing refused reached the upstream, bodies included.
  assert.deepEqual(up.received.map((r) => r.method), ['GET'])
})

test('one keep-alive connection: each request is checked against its own route, and a changed header is verified anew', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { jwt: { secret: SECRET, issuer: 'https://idp.test' } },
    routes: {
      orders: { match: { prefix: '/orders' }, upstream: { targets: [{ url: up.url }] }, auth: { jwt: { audience: 'orders' } } },
      admin: { match: { prefix: '/admin' }, upstream: { targets: [{ url: up.url }] }, auth: { jwt: { audience: 'orders', requireClaims: { scope: 'admin' } } } },
      billing: { match: { prefix: '/billing' }, upstream: { targets: [{ url: up.url }] }, auth: { jwt: { audience: 'billing' } } }
    }
  })
  const client = new Client(gw.url, { pipelining: 1 })
  t.after(async () => await client.close())
  let connections = 0
  client.on('connect', () => { connections++ })
  const token = hsToken(SECRET, { sub: 'alice', iss: 'https://idp.test', aud: 'orders', exp: now() + 600 })
  const get = async (path: string, authorization: string): Promise<number> => {
    const res = await client.request({ method: 'GET', path, headers: { authorization } })
    await res.body.dump()
    return res.statusCode
  }
  assert.equal(await get('/orders/1', `Bearer ${token}`), 200)
  assert.equal(await get('/orders/2', `Bearer ${token}`), 200)
  // Same connection, same header: another route's audience and required claims still apply.
  assert.equal(await get('/billing/1', `Bearer ${token}`), 401)
  assert.equal(await get('/admin/1', `Bearer ${token}`), 403)
  assert.equal(await get('/orders/3', `Bearer ${token}`), 200)
  // A tampered token right after an admitted one, on the same connection.
  assert.equal(await get('/orders/4', `Bearer ${token.slice(0, -2)}${token.endsWith('AA') ? 'BB' : 'AA'}`), 401)
  assert.equal(await get('/orders/5', 'Bearer'), 401)
  assert.equal(connections, 1)
  assert.deepEqual(up.received.map((r) => r.url), ['/1', '/2', '/3'])
})

test('the verified-token memory is bounded and honours exp plus the clock skew', () => {
  const tokens = new VerifiedTokens(5_000, 3, 60_000)
  const t0 = 1_700_000_000_000
  tokens.set('a', { exp: t0 / 1000 + 10 }, t0)
  assert.deepEqual(tokens.get('a', t0 + 14_000)?.claims, { exp: t0 / 1000 + 10 })
  assert.equal(tokens.get('a', t0 + 15_001), undefined)
  tokens.set('gone', { exp: t0 / 1000 - 10 }, t0)
  assert.equal(tokens.get('gone', t0), undefined)
  tokens.set('b', {}, t0)
  assert.equal(tokens.get('b', t0 + 59_000) !== undefined, true)
  assert.equal(tokens.get('b', t0 + 60_001), undefined)
  for (const k of ['c', 'd', 'e', 'f']) tokens.set(k, {}, t0)
  assert.equal(tokens.size, 3)
  assert.equal(tokens.get('c', t0), undefined)
  assert.notEqual(tokens.get('f', t0), undefined)
})
