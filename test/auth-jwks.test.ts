import { test } from 'node:test'
import assert from 'node:assert/strict'
import http from 'node:http'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import { request } from 'undici'
import { startGateway, startUpstream } from './helper.js'
import { hsToken, now, rsToken, rsaPair } from './auth-tokens.js'
import { JWKS_STATE_KEY } from '../plugins/auth.js'
import type { Jwks } from '../src/jwks.js'

/** A key server whose key set the test rotates, counting the requests it gets. */
async function startJwksServer (t: { after: (fn: () => Promise<void>) => void }) {
  const state = { keys: [] as object[], requests: 0 }
  const server = http.createServer((_req, res) => {
    state.requests++
    const body = JSON.stringify({ keys: state.keys })
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) })
    res.end(body)
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.after(async () => {
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  })
  return { state, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/.well-known/jwks.json` }
}

test('JWKS: RS256 tokens verified with the served keys, key rotation picked up, unknown kids cannot hammer the key server', async (t) => {
  const up = await startUpstream(t)
  const jwks = await startJwksServer(t)
  const k1 = rsaPair()
  const k2 = rsaPair()
  const jwk = (k: ReturnType<typeof rsaPair>, kid: string) => ({ ...k.publicKey.export({ format: 'jwk' }), kid, alg: 'RS256', use: 'sig' })
  jwks.state.keys = [jwk(k1, 'k1')]
  const cooldown = 1000
  const gw = await startGateway(t, {
    config: { jwt: { jwksUrl: jwks.url, issuer: ['https://idp.test'], audience: 'api', jwksRefreshCooldown: cooldown } },
    routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] }, auth: { jwt: { claimsToHeaders: { sub: 'x-user-id' } } } } }
  })
  const claims = { sub: 'dave', iss: 'https://idp.test', aud: 'api', exp: now() + 600 }
  const call = async (token: string): Promise<number> => {
    const res = await request(`${gw.url}/svc/me`, { headers: { authorization: `Bearer ${token}` } })
    await res.body.dump()
    return res.statusCode
  }

  assert.equal(await call(rsToken(k1.privateKey, claims, { kid: 'k1' })), 200)
  assert.equal(jwks.state.requests, 1)
  // Cached: more tokens cost no key-server request.
  assert.equal(await call(rsToken(k1.privateKey, { ...claims, jti: 'x' }, { kid: 'k1' })), 200)
  assert.equal(jwks.state.requests, 1)

  // An issuer outside the allow-list is refused even though the key is good.
  assert.equal(await call(rsToken(k1.privateKey, { ...claims, iss: 'https://evil.test' }, { kid: 'k1' })), 401)
  // A token signed by a key the server never published, under a published kid.
  assert.equal(await call(rsToken(k2.privateKey, claims, { kid: 'k1' })), 401)
  // HS256 with the JWK's modulus or the PEM as secret: HS is not an allowed algorithm for a JWKS.
  assert.equal(await call(hsToken(k1.publicPem, claims, { kid: 'k1' })), 401)

  // A flood of made-up kids: at most one refresh per cooldown, whatever the flood size.
  const before = jwks.state.requests
  const started = performance.now()
  const flood = await Promise.all(Array.from({ length: 50 }, (_, i) => call(rsToken(k2.privateKey, claims, { kid: `bogus-${i}` }))))
  const bound = 1 + Math.floor((performance.now() - started) / cooldown)
  assert.ok(flood.every((s) => s === 401))
  assert.ok(jwks.state.requests - before <= bound, `50 bogus kids caused ${jwks.state.requests - before} key-server requests (bound ${bound})`)
  const set = gw.gateway.state.get<Jwks>(JWKS_STATE_KEY, () => { throw new Error('no JWKS cache') })
  assert.equal(set.fetches, jwks.state.requests)

  // Rotation: the identity provider now signs with k2 and publishes it; once the cooldown has
  // passed, the first k2 token triggers one refresh and is accepted; k1 tokens keep working
  // while k1 is still published.
  jwks.state.keys = [jwk(k1, 'k1'), jwk(k2, 'k2')]
  await new Promise((resolve) => setTimeout(resolve, cooldown * 1.5))
  const beforeRotation = jwks.state.requests
  assert.equal(await call(rsToken(k2.privateKey, claims, { kid: 'k2' })), 200)
  assert.equal(jwks.state.requests, beforeRotation + 1)
  assert.equal(await call(rsToken(k1.privateKey, claims, { kid: 'k1' })), 200)
  assert.equal(up.received.length, 4)
  assert.equal(up.received.at(-2)?.headers['x-user-id'], 'dave')
})

test('JWKS config: an issuer allow-list is mandatory', async (t) => {
  await assert.rejects(startGateway(t, {
    config: { jwt: { jwksUrl: 'http://127.0.0.1:1/jwks.json' } },
    routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: 'http://127.0.0.1:1' }] }, auth: { jwt: true } } }
  }), /jwt\/issuer: is required with jwksUrl/)
})
