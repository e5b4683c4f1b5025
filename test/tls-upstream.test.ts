import { test } from 'node:test'
import assert from 'node:assert/strict'
import https from 'node:https'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import type { TLSSocket } from 'node:tls'
import { request } from 'undici'
import { startGateway } from './helper.js'
import { createCa } from './certs.js'
import { basename } from 'node:path'
import { ConfigError } from '../src/config.js'

/** An HTTPS upstream answering with the client certificate's CN it saw (or "none"). */
async function startHttpsUpstream (t: { after: (fn: () => unknown) => void }, options: https.ServerOptions): Promise<string> {
  const server = https.createServer(options, (req, res) => {
    const peer = (req.socket as TLSSocket).getPeerCertificate()
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify({ url: req.url, clientCn: peer?.subject?.CN ?? 'none' }))
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.after(async () => {
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  })
  return `https://127.0.0.1:${(server.address() as AddressInfo).port}`
}

async function get (url: string): Promise<{ status: number, body: Record<string, string>, headers: Record<string, unknown> }> {
  const res = await request(url)
  return { status: res.statusCode, body: await res.body.json() as Record<string, string>, headers: res.headers }
}

test('https upstream signed by a private CA: verified with tls.ca, refused (502, no details) without it', async (t) => {
  const ca = createCa(t, 'Internal CA')
  const leaf = ca.issue('api.internal')
  const target = await startHttpsUpstream(t, { cert: leaf.cert, key: leaf.key })
  const gw = await startGateway(t, {
    routes: {
      trusted: { match: { prefix: '/trusted' }, upstream: { targets: [{ url: target }], tls: { ca: ca.caFile } } },
      untrusted: { match: { prefix: '/untrusted' }, upstream: { targets: [{ url: target }] } }
    }
  })
  const ok = await get(`${gw.url}/trusted/x?y=1`)
  assert.equal(ok.status, 200)
  assert.equal(ok.body.url, '/x?y=1')

  const refused = await get(`${gw.url}/untrusted/x`)
  assert.equal(refused.status, 502)
  assert.equal(refused.body.code, 'GATEHOUSE_UPSTREAM_TLS')
  assert.equal(refused.headers['proxy-status'], 'gatehouse; error=tls_protocol_error')
  assert.ok(!JSON.stringify(refused.body).includes('127.0.0.1'), 'no internal address in the answer')
})

test('the upstream certificate must name the target: a mismatch is refused unless tls.servername names it', async (t) => {
  const ca = createCa(t)
  // No IP address in this certificate: it only names other.internal.
  const leaf = ca.issue('other.internal', ['other.internal'], 'server', false)
  const target = await startHttpsUpstream(t, { cert: leaf.cert, key: leaf.key })
  const gw = await startGateway(t, {
    routes: {
      strict: { match: { prefix: '/strict' }, upstream: { targets: [{ url: target }], tls: { ca: ca.caFile } } },
      named: { match: { prefix: '/named' }, upstream: { targets: [{ url: target }], tls: { ca: ca.caFile, servername: 'other.internal' } } }
    }
  })
  const strict = await get(`${gw.url}/strict/x`)
  assert.equal(strict.status, 502)
  assert.equal(strict.body.code, 'GATEHOUSE_UPSTREAM_TLS')
  const named = await get(`${gw.url}/named/x`)
  assert.equal(named.status, 200)
})

test('mTLS to the upstream: the route presents its client certificate; without one the upstream refuses', async (t) => {
  const ca = createCa(t)
  const server = ca.issue('api.internal')
  const client = ca.issue('gatehouse', ['gatehouse'], 'client')
  const target = await startHttpsUpstream(t, { cert: server.cert, key: server.key, ca: ca.ca, requestCert: true, rejectUnauthorized: true })
  const gw = await startGateway(t, {
    routes: {
      mtls: { match: { prefix: '/mtls' }, upstream: { targets: [{ url: target }], tls: { ca: ca.caFile, cert: client.certFile, key: client.keyFile } } },
      anonymous: { match: { prefix: '/anonymous' }, upstream: { targets: [{ url: target }], tls: { ca: ca.caFile } } }
    }
  })
  const ok = await get(`${gw.url}/mtls/x`)
  assert.equal(ok.status, 200)
  assert.equal(ok.body.clientCn, 'gatehouse')
  const refused = await get(`${gw.url}/anonymous/x`)
  assert.equal(refused.status, 502)
})

test('route tls files are relative to the route file; a missing one stops the start with the route file and field named', async (t) => {
  const ca = createCa(t)
  const leaf = ca.issue('api.internal')
  const target = await startHttpsUpstream(t, { cert: leaf.cert, key: leaf.key })
  // startGateway writes route files to <tmp>/gatehouse-test-*/routes; the CA sits in <tmp>/gatehouse-certs-*.
  const relative = `../../${basename(ca.dir)}/ca.pem`
  const gw = await startGateway(t, { routes: { rel: { match: { prefix: '/rel' }, upstream: { targets: [{ url: target }], tls: { ca: relative } } } } })
  assert.equal((await get(`${gw.url}/rel/x`)).status, 200)

  await assert.rejects(startGateway(t, { routes: { broken: { match: { prefix: '/b' }, upstream: { targets: [{ url: target }], tls: { ca: 'missing.pem' } } } } }), (err: Error) => {
    assert.ok(err instanceof ConfigError)
    assert.match(err.message, /broken\.yaml: \/upstream\/tls\/ca: file missing\.pem does not exist/)
    return true
  })
})
