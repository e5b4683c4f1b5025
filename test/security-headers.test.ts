import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Agent, request } from 'undici'
import { startGateway, startUpstream } from './helper.js'
import { createCa } from './certs.js'

test('security headers on proxied and gateway-made responses; Server and X-Powered-By of upstreams removed; no HSTS over plain HTTP', async (t) => {
  const up = await startUpstream(t, (req, res) => {
    if (req.url === '/framed') res.setHeader('x-frame-options', 'SAMEORIGIN')
    res.setHeader('server', 'Apache/2.4.1 (Unix)')
    res.setHeader('x-powered-by', 'PHP/5.6')
    res.end('hello')
  })
  const gw = await startGateway(t, { routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } } } })
  const res = await request(`${gw.url}/svc/page`)
  await res.body.dump()
  assert.equal(res.statusCode, 200)
  assert.equal(res.headers.server, undefined)
  assert.equal(res.headers['x-powered-by'], undefined)
  assert.equal(res.headers['x-content-type-options'], 'nosniff')
  assert.equal(res.headers['x-frame-options'], 'DENY')
  assert.equal(res.headers['referrer-policy'], 'no-referrer')
  assert.equal(res.headers['strict-transport-security'], undefined)
  // A client cannot ask for HSTS by claiming https: X-Forwarded-Proto counts only from trusted proxies.
  const claimed = await request(`${gw.url}/svc/page`, { headers: { 'x-forwarded-proto': 'https' } })
  await claimed.body.dump()
  assert.equal(claimed.headers['strict-transport-security'], undefined)
  // An upstream's own frame policy is kept.
  const framed = await request(`${gw.url}/svc/framed`)
  await framed.body.dump()
  assert.equal(framed.headers['x-frame-options'], 'SAMEORIGIN')
  // The same on the reply-from way (taken for a client that accepts a compressed encoding).
  for (const path of ['/svc/page', '/svc/framed']) {
    const viaReply = await request(`${gw.url}${path}`, { headers: { 'accept-encoding': 'gzip' } })
    await viaReply.body.dump()
    assert.equal(viaReply.headers.server, undefined)
    assert.equal(viaReply.headers['x-powered-by'], undefined)
    assert.equal(viaReply.headers['x-content-type-options'], 'nosniff')
    assert.equal(viaReply.headers['x-frame-options'], path === '/svc/framed' ? 'SAMEORIGIN' : 'DENY')
  }
  // Problem documents the gateway makes carry them too.
  const missing = await request(`${gw.url}/nope`)
  await missing.body.dump()
  assert.equal(missing.statusCode, 404)
  assert.equal(missing.headers['x-content-type-options'], 'nosniff')
  // So do refusals by the first hooks (an encoded slash) and by the router itself (a path that does not decode).
  for (const [path, status] of [['/svc/a%2fb', 400], ['/%FF', 400]] as const) {
    const refused = await request(`${gw.url}${path}`)
    await refused.body.dump()
    assert.equal(refused.statusCode, status, path)
    assert.equal(refused.headers['x-frame-options'], 'DENY', path)
  }
})

test('securityHeaders: false adds none, but upstream Server headers are still removed', async (t) => {
  const up = await startUpstream(t, (_req, res) => { res.setHeader('server', 'nginx/1.2'); res.end('x') })
  const gw = await startGateway(t, { config: { securityHeaders: false }, routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } } } })
  const res = await request(`${gw.url}/svc`)
  await res.body.dump()
  assert.equal(res.headers['x-frame-options'], undefined)
  assert.equal(res.headers.server, undefined)
})

test('HSTS only over TLS', async (t) => {
  const up = await startUpstream(t)
  const ca = createCa(t)
  const leaf = ca.issue('gateway.test')
  const gw = await startGateway(t, {
    config: { tls: { cert: leaf.certFile, key: leaf.keyFile } },
    routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } } }
  })
  const agent = new Agent({ connect: { ca: ca.ca } })
  t.after(async () => { await agent.close() })
  const res = await request(`https://127.0.0.1:${gw.port}/svc`, { dispatcher: agent })
  await res.body.dump()
  assert.equal(res.statusCode, 200)
  assert.match(String(res.headers['strict-transport-security']), /^max-age=\d{7,}/)
})

test('CORS per route: preflight answered at the gateway and never forwarded; other OPTIONS and non-CORS routes untouched', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { jwt: { secret: 'a-test-secret-that-is-at-least-32-characters' } },
    routes: {
      api: { match: { prefix: '/api' }, upstream: { targets: [{ url: up.url }] }, auth: { jwt: true }, cors: { origin: ['https://app.example'], credentials: true, methods: ['GET', 'PUT'], maxAge: 600 } },
      plain: { match: { prefix: '/plain' }, upstream: { targets: [{ url: up.url }] } },
      root: { match: { prefix: '/' }, upstream: { targets: [{ url: up.url }] } }
    }
  })
  // The preflight needs no token: browsers send none with it.
  const pre = await request(`${gw.url}/api/items`, { method: 'OPTIONS', headers: { origin: 'https://app.example', 'access-control-request-method': 'PUT' } })
  await pre.body.dump()
  assert.equal(pre.statusCode, 204)
  assert.equal(pre.headers['access-control-allow-origin'], 'https://app.example')
  assert.equal(pre.headers['access-control-allow-credentials'], 'true')
  assert.match(String(pre.headers['access-control-allow-methods']), /PUT/)
  assert.equal(pre.headers['access-control-max-age'], '600')
  assert.equal(up.received.length, 0)
  // A foreign origin gets no grant.
  const foreign = await request(`${gw.url}/api/items`, { method: 'OPTIONS', headers: { origin: 'https://evil.example', 'access-control-request-method': 'PUT' } })
  await foreign.body.dump()
  assert.equal(foreign.headers['access-control-allow-origin'], undefined)
  // The actual request still needs its token; the refusal is readable by the allowed origin.
  const denied = await request(`${gw.url}/api/items`, { headers: { origin: 'https://app.example' } })
  await denied.body.dump()
  assert.equal(denied.statusCode, 401)
  assert.equal(denied.headers['access-control-allow-origin'], 'https://app.example')
  // A route without CORS forwards OPTIONS to its upstream and adds no CORS headers.
  const plain = await request(`${gw.url}/plain/x`, { method: 'OPTIONS', headers: { origin: 'https://app.example', 'access-control-request-method': 'GET' } })
  await plain.body.dump()
  assert.equal(plain.statusCode, 200)
  assert.equal(plain.headers['access-control-allow-origin'], undefined)
  assert.equal(up.received.length, 1)
  assert.equal(up.received[0].method, 'OPTIONS')
})

test('IP filter: global deny and per-route allow lists with CIDRs; X-Forwarded-For from an untrusted peer changes nothing', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { ipFilter: { deny: ['192.0.2.0/24'] } },
    routes: {
      internal: { match: { prefix: '/internal' }, upstream: { targets: [{ url: up.url }] }, ipFilter: { allow: ['10.0.0.0/8'] } },
      loop: { match: { prefix: '/loop' }, upstream: { targets: [{ url: up.url }] }, ipFilter: { allow: ['127.0.0.0/8', '::1'] } },
      blocked: { match: { prefix: '/blocked' }, upstream: { targets: [{ url: up.url }] }, ipFilter: { deny: ['loopback'] } }
    }
  })
  const status = async (path: string, headers: Record<string, string> = {}) => {
    const res = await request(`${gw.url}${path}`, { headers })
    const body = await res.body.json() as { code?: string }
    return { status: res.statusCode, code: body.code }
  }
  assert.deepEqual(await status('/internal/x'), { status: 403, code: 'GATEHOUSE_IP_DENIED' })
  assert.deepEqual(await status('/internal/x', { 'x-forwarded-for': '10.1.2.3' }), { status: 403, code: 'GATEHOUSE_IP_DENIED' })
  assert.equal((await status('/loop/x')).status, 200)
  assert.deepEqual(await status('/blocked/x'), { status: 403, code: 'GATEHOUSE_IP_DENIED' })
  assert.equal(up.received.length, 1)
})

test('IP filter behind a trusted proxy: the client address from X-Forwarded-For is the one filtered', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    config: { trustProxy: ['127.0.0.1'], ipFilter: { deny: ['192.0.2.0/24', '2001:db8::/32'] } },
    routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } } }
  })
  const code = async (xff: string): Promise<number> => {
    const res = await request(`${gw.url}/svc`, { headers: { 'x-forwarded-for': xff } })
    await res.body.dump()
    return res.statusCode
  }
  assert.equal(await code('192.0.2.9'), 403)
  assert.equal(await code('2001:db8::1'), 403)
  assert.equal(await code('198.51.100.1'), 200)
  // The deny list cannot be dodged by prepending an address: the right-most untrusted one counts.
  assert.equal(await code('198.51.100.1, 192.0.2.9'), 403)
})

test('HSTS behind a trusted TLS-offloading proxy', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { config: { trustProxy: ['127.0.0.1'] }, routes: { svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } } } })
  const viaTls = await request(`${gw.url}/svc`, { headers: { 'x-forwarded-proto': 'https' } })
  await viaTls.body.dump()
  assert.match(String(viaTls.headers['strict-transport-security']), /^max-age=/)
  const plain = await request(`${gw.url}/svc`, { headers: { 'x-forwarded-proto': 'http' } })
  await plain.body.dump()
  assert.equal(plain.headers['strict-transport-security'], undefined)
})
