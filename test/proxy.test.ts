import { test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { stringify } from 'yaml'
import { startGateway, startUpstream } from './helper.js'
import { call, rawCall, route } from './core-helper.js'
import { loadRoutes, ConfigError } from '../src/config.js'

interface Echo { method: string, url: string, headers: Record<string, string> }

test('prefix matching: a prefix matches on a segment boundary and is stripped by default', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { orders: route('/orders', up.url) } })

  const exact = await call(`${gw.url}/orders`)
  assert.equal(exact.status, 200)
  assert.equal(exact.json<Echo>().url, '/')

  const below = await call(`${gw.url}/orders/42/items`)
  assert.equal(below.json<Echo>().url, '/42/items')

  const slash = await call(`${gw.url}/orders/`)
  assert.equal(slash.json<Echo>().url, '/')

  const other = await call(`${gw.url}/ordersx`)
  assert.equal(other.status, 404)
  assert.match(String(other.headers['content-type']), /^application\/problem\+json/)
  const problem = other.json<{ code: string, status: number, type: string, requestId: string }>()
  assert.equal(problem.code, 'GATEHOUSE_ROUTE_NOT_FOUND')
  assert.equal(problem.status, 404)
  assert.equal(problem.type, 'urn:gatehouse:error:route-not-found')
  assert.equal(problem.requestId, other.headers['x-request-id'])
  assert.equal(up.received.length, 3, '/ordersx never reached the upstream')
})

test('rewrite.prefix replaces the matched prefix', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    routes: {
      v1: route('/api/v1', up.url, { rewrite: { prefix: '/internal' } }),
      keep: route('/orders', up.url, { rewrite: { prefix: '/orders' } }),
      slash: route('/s', up.url, { rewrite: { prefix: '/svc/' } })
    }
  })
  assert.equal((await call(`${gw.url}/api/v1/users/7?x=1`)).json<Echo>().url, '/internal/users/7?x=1')
  assert.equal((await call(`${gw.url}/api/v1`)).json<Echo>().url, '/internal')
  assert.equal((await call(`${gw.url}/orders/1`)).json<Echo>().url, '/orders/1')
  assert.equal((await call(`${gw.url}/orders`)).json<Echo>().url, '/orders')
  assert.equal((await call(`${gw.url}/s/a`)).json<Echo>().url, '/svc/a')
  assert.equal((await call(`${gw.url}/s`)).json<Echo>().url, '/svc/')
})

test('hosts: matched without port, case-insensitively, *.domain matches one label', async (t) => {
  const api = await startUpstream(t)
  const wild = await startUpstream(t)
  const fallback = await startUpstream(t)
  const gw = await startGateway(t, {
    routes: {
      api: route('/h', api.url, { match: { hosts: ['api.example.com'] } }),
      wild: route('/h', wild.url, { name: 'wild', match: { hosts: ['*.tenants.test'] } }),
      only: route('/only', api.url, { name: 'only', match: { hosts: ['only.example.com'] } }),
      fallback: route('/h', fallback.url, { name: 'fallback' })
    }
  })
  const host = async (path: string, h: string): Promise<number> => (await call(`${gw.url}${path}`, { headers: { host: h } })).status

  assert.equal(await host('/h/1', 'API.Example.COM:8443'), 200)
  assert.equal(await host('/h/2', 'acme.tenants.test'), 200)
  assert.equal(await host('/h/3', 'a.b.tenants.test'), 200) // two labels: the wildcard does not match
  assert.equal(await host('/h/4', 'tenants.test'), 200)
  assert.equal(await host('/h/5', 'elsewhere.test'), 200)
  assert.deepEqual(api.received.map((r) => r.url), ['/1'])
  assert.deepEqual(wild.received.map((r) => r.url), ['/2'])
  assert.deepEqual(fallback.received.map((r) => r.url), ['/3', '/4', '/5'])

  assert.equal(await host('/only/x', 'only.example.com'), 200)
  const miss = await call(`${gw.url}/only/x`, { headers: { host: 'other.example.com' } })
  assert.equal(miss.status, 404)
  assert.equal(miss.json().code, 'GATEHOUSE_ROUTE_NOT_FOUND')
})

test('methods: a route restricted to some methods does not serve others', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { ro: route('/ro', up.url, { match: { methods: ['GET', 'HEAD'] } }) } })
  assert.equal((await call(`${gw.url}/ro/a`)).status, 200)
  assert.equal((await call(`${gw.url}/ro/a`, { method: 'HEAD' })).status, 200)
  const post = await call(`${gw.url}/ro/a`, { method: 'POST', body: 'x' })
  assert.equal(post.status, 404)
  assert.equal(post.json().code, 'GATEHOUSE_ROUTE_NOT_FOUND')
  const del = await call(`${gw.url}/ro/a`, { method: 'DELETE' })
  assert.equal(del.status, 404)
  assert.deepEqual(up.received.map((r) => r.method), ['GET', 'HEAD'])
})

test('overlapping route files: the longest prefix wins, on segment boundaries', async (t) => {
  const api = await startUpstream(t)
  const admin = await startUpstream(t)
  const root = await startUpstream(t)
  const gw = await startGateway(t, {
    routes: {
      api: route('/api', api.url),
      admin: route('/api/admin', admin.url),
      root: route('/', root.url)
    }
  })
  assert.equal((await call(`${gw.url}/api/admin/users`)).json<Echo>().url, '/users')
  assert.equal((await call(`${gw.url}/api/admin`)).json<Echo>().url, '/')
  assert.equal((await call(`${gw.url}/api/adminx`)).json<Echo>().url, '/adminx')
  assert.equal((await call(`${gw.url}/api/x`)).json<Echo>().url, '/x')
  assert.equal((await call(`${gw.url}/apix`)).json<Echo>().url, '/apix')
  assert.equal((await call(`${gw.url}/`)).json<Echo>().url, '/')
  assert.deepEqual(admin.received.map((r) => r.url), ['/users', '/'])
  assert.deepEqual(api.received.map((r) => r.url), ['/adminx', '/x'])
  assert.deepEqual(root.received.map((r) => r.url), ['/apix', '/'])
})

test('the same prefix in two route files is a config error naming both files', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-dup-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  writeFileSync(join(dir, 'a.yaml'), stringify(route('/orders', 'http://127.0.0.1:1')))
  writeFileSync(join(dir, 'b.yaml'), stringify(route('/orders/', 'http://127.0.0.1:2')))
  await assert.rejects(loadRoutes(dir), (err: unknown) => {
    assert.ok(err instanceof ConfigError)
    assert.equal(err.problems.length, 1)
    assert.equal(err.problems[0].file, join(dir, 'b.yaml'))
    assert.equal(err.problems[0].path, '/match/prefix')
    assert.match(err.message, /a\.yaml/)
    assert.match(err.message, /\(.+\)$/, 'with a hint')
    return true
  })
  // The same prefix for different hosts is allowed.
  writeFileSync(join(dir, 'b.yaml'), stringify(route('/orders', 'http://127.0.0.1:2', { match: { hosts: ['b.example.com'] } })))
  assert.equal((await loadRoutes(dir)).length, 2)
})

test('query strings and percent-encoding reach the upstream byte for byte', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url) } })
  const cases: Array<[string, string]> = [
    ['/svc/a%20b/%C3%A9?q=%2F&x=1&x=2', '/a%20b/%C3%A9?q=%2F&x=1&x=2'],
    ['/svc/x?a=%zz&b=../c&c=%2e%2e&d=\'q\'&e=a+b&&f', '/x?a=%zz&b=../c&c=%2e%2e&d=\'q\'&e=a+b&&f'],
    ['/svc/%E2%82%AC;v=1/a,b/~u/!$&\'()*+=@:', '/%E2%82%AC;v=1/a,b/~u/!$&\'()*+=@:'],
    ['/svc/a%3Fb%23c', '/a%3Fb%23c'],
    // Characters WHATWG URL would re-encode, and segments that only look like dot segments.
    ['/svc/a{b}|c^d`e"f<g>', '/a{b}|c^d`e"f<g>'],
    ['/svc/.../..x/x..', '/.../..x/x..'],
    ['/svc/100%25', '/100%25'],
    ['/svc/?', '/?'],
    ['/svc?only=query', '/?only=query']
  ]
  for (const [sent, expected] of cases) {
    const res = await rawCall(gw.port, [`GET ${sent} HTTP/1.1`, 'Host: gw.test'])
    assert.equal(res.status, 200, sent)
    assert.equal(JSON.parse(res.body).url, expected, sent)
  }
})

test('path normalization: dot segments, encoded dots and empty segments are resolved before routing', async (t) => {
  const svc = await startUpstream(t)
  const other = await startUpstream(t)
  const gw = await startGateway(t, { routes: { svc: route('/svc', svc.url), other: route('/other', other.url) } })
  const get = async (path: string) => await rawCall(gw.port, [`GET ${path} HTTP/1.1`, 'Host: gw.test'])

  for (const path of ['/svc/../other/x', '/svc/%2e%2e/other/x', '/svc/%2E%2E/other/x', '/svc/.%2e/other/x', '/./other/./x']) {
    const res = await get(path)
    assert.equal(res.status, 200, path)
    assert.equal(JSON.parse(res.body).url, '/x', path)
  }
  assert.equal(other.received.length, 5)
  assert.equal(svc.received.length, 0, 'no traversal reached /svc')

  const dbl = await get('//svc//a')
  assert.equal(dbl.status, 200)
  assert.equal(JSON.parse(dbl.body).url, '/a')
  // An encoded unreserved character is the character itself: /%73vc is /svc.
  assert.equal(JSON.parse((await get('/%73vc/%7Eu')).body).url, '/~u')
  // Traversal above the root stays at the root.
  assert.equal((await get('/../../svc/z')).status, 200)
})

test('an encoded slash or backslash, a raw backslash or a bad escape is a 400 GATEHOUSE_BAD_PATH', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url) } })
  const paths = ['/svc/a%2fb', '/svc/a%2Fb', '/svc/..%2f..%2fetc/passwd', '/svc/a%5cb', '/svc/a\\b', '/svc/%zz', '/svc/%0', '/svc/a%00b',
    '/svc/%FF%FE', '/svc/a#frag', '/svc/a?x=1#frag']
  for (const path of paths) {
    const res = await rawCall(gw.port, [`GET ${path} HTTP/1.1`, 'Host: gw.test'])
    assert.equal(res.status, 400, path)
    assert.match(res.header('content-type') ?? '', /^application\/problem\+json/)
    assert.equal(JSON.parse(res.body).code, 'GATEHOUSE_BAD_PATH', path)
  }
  assert.equal(up.received.length, 0)
})

test('forwarded headers: X-Forwarded-For replaced for an untrusted peer, X-Forwarded-Proto/Host set', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url) } })
  const res = await call(`${gw.url}/svc/a`, {
    headers: {
      host: 'shop.example.com:8080',
      'x-forwarded-for': '6.6.6.6',
      'x-forwarded-proto': 'https',
      'x-forwarded-host': 'evil.test',
      forwarded: 'for=6.6.6.6;proto=https',
      'x-real-ip': '6.6.6.6',
      'x-forwarded-port': '443'
    }
  })
  const h = res.json<Echo>().headers
  assert.equal(h['x-forwarded-for'], '127.0.0.1')
  assert.equal(h.forwarded, undefined, 'a client cannot claim an address in Forwarded')
  assert.equal(h['x-real-ip'], undefined)
  assert.equal(h['x-forwarded-port'], undefined)
  assert.equal(h['x-forwarded-proto'], 'http')
  assert.equal(h['x-forwarded-host'], 'shop.example.com:8080')
})

test('forwarded headers: X-Forwarded-For appended when the peer is a trusted proxy', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { config: { trustProxy: ['127.0.0.1'] }, routes: { svc: route('/svc', up.url) } })
  const res = await call(`${gw.url}/svc/a`, { headers: { 'x-forwarded-for': '203.0.113.9, 10.0.0.1', 'x-forwarded-proto': 'https', 'x-real-ip': '203.0.113.9' } })
  const h = res.json<Echo>().headers
  assert.equal(h['x-forwarded-for'], '203.0.113.9, 10.0.0.1, 127.0.0.1')
  assert.equal(h['x-real-ip'], '203.0.113.9', 'a trusted proxy\'s X-Real-IP is kept')
  assert.equal(h['x-forwarded-proto'], 'https', 'a trusted proxy tells the original scheme')
  const none = await call(`${gw.url}/svc/a`)
  assert.equal(none.json<Echo>().headers['x-forwarded-for'], '127.0.0.1')
})

test('X-Request-Id: generated, or passed through when safe, and returned to the client', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url) } })
  const generated = await call(`${gw.url}/svc/a`)
  const id = generated.headers['x-request-id'] as string
  assert.match(id, /^[0-9a-f-]{36}$/)
  assert.equal(generated.json<Echo>().headers['x-request-id'], id)

  const given = await call(`${gw.url}/svc/a`, { headers: { 'x-request-id': 'lb-1234.abcd' } })
  assert.equal(given.headers['x-request-id'], 'lb-1234.abcd')
  assert.equal(given.json<Echo>().headers['x-request-id'], 'lb-1234.abcd')

  const unsafe = await call(`${gw.url}/svc/a`, { headers: { 'x-request-id': 'a b <script>' } })
  assert.match(unsafe.headers['x-request-id'] as string, /^[0-9a-f-]{36}$/)
  assert.equal(unsafe.json<Echo>().headers['x-request-id'], unsafe.headers['x-request-id'])

  const notFound = await call(`${gw.url}/nothing`, { headers: { 'x-request-id': 'nf-1' } })
  assert.equal(notFound.headers['x-request-id'], 'nf-1')
  assert.equal(notFound.json().requestId, 'nf-1')
})

test('hop-by-hop request headers, and headers named in Connection, are not forwarded', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url) } })
  const res = await rawCall(gw.port, [
    'GET /svc/a HTTP/1.1',
    'Host: gw.test',
    'Connection: X-Private, keep-alive',
    'X-Private: secret',
    'Keep-Alive: timeout=5',
    'TE: trailers, deflate',
    'Trailer: X-Sum',
    'Upgrade: h2c',
    'Proxy-Authorization: Basic c2VjcmV0',
    'Proxy-Connection: keep-alive',
    'X-Kept: yes'
  ])
  assert.equal(res.status, 200)
  const seen = up.received[0].headers
  for (const name of ['connection', 'x-private', 'keep-alive', 'te', 'trailer', 'upgrade', 'proxy-authorization', 'proxy-connection']) {
    if (name === 'connection') assert.notEqual(seen.connection?.toLowerCase().includes('x-private'), true)
    else assert.equal(seen[name], undefined, `${name} was forwarded`)
  }
  assert.equal(seen['x-kept'], 'yes')
})

test('route request header edits: set wins over the client and the gateway, remove drops both', async (t) => {
  const up = await startUpstream(t)
  const headers = { request: { set: { 'X-Env': 'prod', 'x-forwarded-host': 'api.example' }, remove: ['x-debug', 'x-request-id'] } }
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url, { headers }) } })
  const res = await call(`${gw.url}/svc/a`, { headers: { 'x-env': 'dev', 'x-debug': '1', 'x-kept': 'yes' } })
  assert.equal(res.status, 200)
  const seen = up.received[0]
  assert.equal(seen.headers['x-env'], 'prod')
  assert.equal(seen.headers['x-forwarded-host'], 'api.example')
  assert.equal(seen.headers['x-debug'], undefined)
  assert.equal(seen.headers['x-request-id'], undefined, 'a removed gateway header is not sent either')
  assert.equal(seen.headers['x-kept'], 'yes')
  assert.equal(seen.headers['x-forwarded-for'], '127.0.0.1')
  // Each name once: a set name is not also copied from the client.
  assert.equal(seen.rawHeaders.filter((h, i) => i % 2 === 0 && h.toLowerCase() === 'x-env').length, 1)
})

test('both forwarding ways send the same request headers (direct, and reply-from for a client that takes gzip)', async (t) => {
  const up = await startUpstream(t)
  const headers = { request: { set: { 'x-env': 'prod' }, remove: ['x-debug'] } }
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url, { headers }) } })
  const lines = ['GET /svc/a HTTP/1.1', 'Host: gw.test', 'Connection: X-Private, keep-alive', 'X-Private: secret', 'X-Forwarded-For: 6.6.6.6',
    'X-Real-IP: 6.6.6.6', 'X-Debug: 1', 'X-Env: dev', 'X-Request-Id: trace-me-1', 'X-Kept: yes']
  assert.equal((await rawCall(gw.port, lines)).status, 200)
  assert.equal((await rawCall(gw.port, [...lines, 'Accept-Encoding: gzip'])).status, 200)
  assert.equal(up.received.length, 2)
  const [direct, viaReplyFrom] = up.received.map((r) => {
    const { 'accept-encoding': _, traceparent: __, ...rest } = r.headers
    return rest
  })
  assert.deepEqual(viaReplyFrom, direct)
  assert.equal(direct['x-forwarded-for'], '127.0.0.1')
  assert.equal(direct['x-real-ip'], undefined)
  assert.equal(direct['x-private'], undefined)
  assert.equal(direct['x-debug'], undefined)
  assert.equal(direct['x-env'], 'prod')
  assert.equal(direct['x-request-id'], 'trace-me-1')
  assert.equal(direct['x-kept'], 'yes')
  assert.equal(direct.host, `127.0.0.1:${up.port}`)
})

test('failover to another target carries the Host header along with it', async (t) => {
  const dead = await startUpstream(t)
  const deadUrl = dead.url
  await dead.close()
  const live = await startUpstream(t)
  const gw = await startGateway(t, { routes: { svc: route('/svc', deadUrl, { upstream: { targets: [{ url: deadUrl }, { url: live.url }], balancer: 'round-robin', retries: { attempts: 1 } } }) } })
  // Round robin starts on either target: ask until one request met the closed one first.
  for (let i = 0; i < 4; i++) assert.equal((await call(`${gw.url}/svc/a`)).status, 200)
  assert.equal(live.received.length, 4)
  for (const r of live.received) assert.equal(r.headers.host, `127.0.0.1:${live.port}`)
})

test('hop-by-hop response headers, and headers named in Connection, are not returned', async (t) => {
  const up = await startUpstream(t, (_req, res) => {
    res.setHeader('connection', 'x-upstream-private')
    res.setHeader('x-upstream-private', 'internal')
    res.setHeader('keep-alive', 'timeout=99')
    res.setHeader('proxy-authenticate', 'Basic realm=internal')
    res.setHeader('upgrade', 'h2c')
    res.setHeader('x-kept', 'yes')
    res.end('ok')
  })
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url) } })
  const res = await rawCall(gw.port, ['GET /svc/a HTTP/1.1', 'Host: gw.test'])
  assert.equal(res.status, 200)
  assert.equal(res.body, 'ok')
  assert.equal(res.header('x-upstream-private'), undefined)
  assert.equal(res.header('proxy-authenticate'), undefined)
  assert.equal(res.header('upgrade'), undefined)
  assert.notEqual(res.header('keep-alive'), 'timeout=99')
  assert.equal(res.header('x-kept'), 'yes')
})

test('exactly one Host reaches the upstream: the target\'s, or the client\'s with preserveHost', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, {
    routes: { svc: route('/svc', up.url), keep: route('/keep', up.url, { preserveHost: true }) }
  })
  await rawCall(gw.port, ['GET /svc/a HTTP/1.1', 'Host: shop.example.com'])
  await rawCall(gw.port, ['GET /keep/a HTTP/1.1', 'Host: shop.example.com'])
  const hosts = up.received.map((r) => r.rawHeaders.filter((_v, i) => i % 2 === 0 && r.rawHeaders[i].toLowerCase() === 'host').length)
  assert.deepEqual(hosts, [1, 1])
  assert.equal(up.received[0].headers.host, `127.0.0.1:${up.port}`)
  assert.equal(up.received[1].headers.host, 'shop.example.com')
})

test('repeated request headers and repeated Set-Cookie response headers are kept', async (t) => {
  const up = await startUpstream(t, (req, res) => {
    res.setHeader('set-cookie', ['a=1; Path=/', 'b=2; Path=/; HttpOnly', 'c=3'])
    res.setHeader('content-type', 'application/json')
    res.end(JSON.stringify({ multi: req.headers['x-multi'], cookie: req.headers.cookie, accept: req.headers.accept }))
  })
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url) } })
  const res = await rawCall(gw.port, [
    'GET /svc/a HTTP/1.1', 'Host: gw.test',
    'X-Multi: one', 'X-Multi: two',
    'Accept: text/html', 'Accept: application/json',
    'Cookie: s=1', 'Cookie: t=2'
  ])
  assert.equal(res.status, 200)
  assert.deepEqual(res.headers.filter(([k]) => k === 'set-cookie').map(([, v]) => v), ['a=1; Path=/', 'b=2; Path=/; HttpOnly', 'c=3'])
  const body = JSON.parse(res.body)
  assert.equal(body.multi, 'one, two')
  assert.equal(body.accept, 'text/html, application/json')
  assert.equal(body.cookie, 's=1; t=2')
})

test('extension methods such as PURGE and PROPFIND are forwarded', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url) } })
  for (const method of ['PURGE', 'PROPFIND', 'MKCOL', 'REPORT', 'OPTIONS', 'PATCH']) {
    const res = await rawCall(gw.port, [`${method} /svc/res HTTP/1.1`, 'Host: gw.test', 'Content-Length: 0'])
    assert.equal(res.status, 200, method)
    assert.equal(JSON.parse(res.body).method, method)
  }
})

test('two Host headers, or none on HTTP/1.1, is a 400; HTTP/1.0 without Host is served', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url) } })
  const two = await rawCall(gw.port, ['GET /svc/a HTTP/1.1', 'Host: a.test', 'Host: b.test'])
  assert.equal(two.status, 400)
  assert.equal(JSON.parse(two.body).code, 'GATEHOUSE_BAD_HOST')
  const none = await rawCall(gw.port, ['GET /svc/a HTTP/1.1'])
  assert.equal(none.status, 400)
  assert.equal(JSON.parse(none.body).code, 'GATEHOUSE_BAD_HOST')
  const old = await rawCall(gw.port, ['GET /svc/a HTTP/1.0'])
  assert.equal(old.status, 200)
  assert.equal(up.received.length, 1)
})

test('a route file\'s plugin hooks apply to its own service, and only to it', async (t) => {
  const up = await startUpstream(t)
  const gw = await startGateway(t, { routes: { other: route('/other', up.url) } })
  writeFileSync(join(gw.routesDir, 'tagged.js'), `module.exports = {
    match: { prefix: '/tagged' },
    upstream: { targets: [{ url: '${up.url}' }] },
    plugin: async (fastify) => {
      fastify.addHook('onRequest', async (request) => { request.headers['x-from-plugin'] = 'yes' })
      fastify.addHook('onSend', async (_request, reply) => { reply.header('x-tagged', 'on') })
    }
  }\n`)
  assert.equal((await gw.gateway.reload()).ok, true)
  const tagged = await call(`${gw.url}/tagged/x`)
  assert.equal(tagged.headers['x-tagged'], 'on')
  assert.equal(tagged.json<Echo>().headers['x-from-plugin'], 'yes')
  const other = await call(`${gw.url}/other/x`)
  assert.equal(other.headers['x-tagged'], undefined)
  assert.equal(other.json<Echo>().headers['x-from-plugin'], undefined)
  const none = await call(`${gw.url}/nothing`)
  assert.equal(none.headers['x-tagged'], undefined)
})

test('bodies are never parsed: invalid JSON is forwarded byte for byte, and an unknown route answers 404 without reading it', async (t) => {
  const up = await startUpstream(t, (req, res) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => chunks.push(c))
    req.on('end', () => res.end(Buffer.concat(chunks)))
  })
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url) } })
  const body = '{"a": 1,, bad json \u00e9'
  const fwd = await call(`${gw.url}/svc/x`, { method: 'POST', body, headers: { 'content-type': 'application/json' } })
  assert.equal(fwd.status, 200)
  assert.equal(fwd.text, body)
  const lost = await rawCall(gw.port, ['POST /nothing HTTP/1.1', 'Host: gw.test', 'Content-Type: application/json', 'Content-Length: 5'], '{bad ')
  assert.equal(lost.status, 404)
  assert.equal(JSON.parse(lost.body).code, 'GATEHOUSE_ROUTE_NOT_FOUND')
})
