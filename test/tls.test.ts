import { test } from 'node:test'
import assert from 'node:assert/strict'
import tls from 'node:tls'
import http from 'node:http'
import http2 from 'node:http2'
import type { AddressInfo } from 'node:net'
import WebSocket, { WebSocketServer } from 'ws'
import { once } from 'node:events'
import { copyFileSync, mkdirSync, renameSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { Agent, Client, request } from 'undici'
import { startGateway, startUpstream, type TestGateway } from './helper.js'
import { createCa, type IssuedCert } from './certs.js'
import { ConfigError } from '../src/config.js'
import { GatewayServer } from '../src/server.js'
import pino from 'pino'

function route (url: string): Record<string, unknown> {
  return { match: { prefix: '/svc' }, upstream: { targets: [{ url }] } }
}

/** The certificate the gateway presents for a server name (undefined: no SNI). */
async function peerCert (port: number, servername?: string, ca?: string): Promise<tls.PeerCertificate> {
  const socket = tls.connect({ port, host: '127.0.0.1', ...(servername !== undefined ? { servername } : {}), ca, rejectUnauthorized: false, ALPNProtocols: ['http/1.1'] })
  await once(socket, 'secureConnect')
  const cert = socket.getPeerCertificate()
  socket.destroy()
  return cert
}

async function tlsGateway (t: Parameters<typeof startGateway>[0], leaf: IssuedCert, upstreamUrl: string, extra: Record<string, unknown> = {}): Promise<TestGateway> {
  return await startGateway(t, { routes: { svc: route(upstreamUrl) }, config: { tls: { cert: leaf.certFile, key: leaf.keyFile, ...extra } } })
}

test('HTTPS: a client trusting the private CA reaches the upstream; the upstream is told the request was https', async (t) => {
  const ca = createCa(t)
  const leaf = ca.issue('gateway.test')
  const up = await startUpstream(t)
  const gw = await tlsGateway(t, leaf, up.url)
  const agent = new Agent({ connect: { ca: ca.ca } })
  t.after(() => agent.close())
  const res = await request(`https://127.0.0.1:${gw.port}/svc/hello?x=1`, { dispatcher: agent })
  assert.equal(res.statusCode, 200)
  const body = await res.body.json() as { url: string, headers: Record<string, string> }
  assert.equal(body.url, '/hello?x=1')
  assert.equal(body.headers['x-forwarded-proto'], 'https')
  assert.ok(res.headers['x-request-id'])

  // A client that does not trust the CA is refused by its own verification.
  await assert.rejects(request(`https://127.0.0.1:${gw.port}/svc/hello`), (err: Error & { code?: string }) => {
    return /UNABLE_TO_VERIFY_LEAF_SIGNATURE|SELF_SIGNED|unable to verify/i.test(`${err.code ?? ''} ${err.message}`)
  })
})

test('TLS 1.0/1.1 and non-AEAD TLS 1.2 cipher suites are refused; TLS 1.2 with ECDHE-GCM and TLS 1.3 are accepted', async (t) => {
  const ca = createCa(t)
  const leaf = ca.issue('gateway.test')
  const up = await startUpstream(t)
  const gw = await tlsGateway(t, leaf, up.url)
  const handshake = async (opts: tls.ConnectionOptions): Promise<string> => {
    const socket = tls.connect({ port: gw.port, host: '127.0.0.1', ca: ca.ca, servername: 'gateway.test', ...opts })
    try {
      // once() rejects on 'error': a refused handshake.
      const ok = await once(socket, 'secureConnect').then(() => true, () => false)
      return ok ? String(socket.getProtocol()) : 'refused'
    } finally {
      socket.destroy()
    }
  }
  assert.equal(await handshake({ minVersion: 'TLSv1', maxVersion: 'TLSv1.1', ciphers: 'DEFAULT@SECLEVEL=0' }), 'refused')
  assert.equal(await handshake({ maxVersion: 'TLSv1.2', ciphers: 'ECDHE-ECDSA-AES128-SHA' }), 'refused')
  assert.equal(await handshake({ maxVersion: 'TLSv1.2', ciphers: 'ECDHE-ECDSA-AES128-GCM-SHA256' }), 'TLSv1.2')
  assert.equal(await handshake({}), 'TLSv1.3')
})

test('SNI: each configured host name gets its own certificate, a wildcard entry covers its subdomains, others get the default', async (t) => {
  const ca = createCa(t)
  const def = ca.issue('default.test')
  const a = ca.issue('a.test')
  const b = ca.issue('b.test')
  const wild = ca.issue('wild.test', ['*.wild.test'])
  const up = await startUpstream(t)
  const gw = await tlsGateway(t, def, up.url, {
    sni: {
      'a.test': { cert: a.certFile, key: a.keyFile },
      'B.test': { cert: b.certFile, key: b.keyFile },
      '*.wild.test': { cert: wild.certFile, key: wild.keyFile }
    }
  })
  assert.equal((await peerCert(gw.port, 'a.test')).fingerprint256, a.fingerprint256)
  assert.equal((await peerCert(gw.port, 'b.test')).fingerprint256, b.fingerprint256)
  assert.equal((await peerCert(gw.port, 'x.wild.test')).fingerprint256, wild.fingerprint256)
  assert.equal((await peerCert(gw.port, 'other.test')).fingerprint256, def.fingerprint256)
  assert.equal((await peerCert(gw.port)).fingerprint256, def.fingerprint256)

  // And a verifying client gets a full request through on the SNI certificate.
  const agent = new Agent({ connect: { ca: ca.ca, servername: 'b.test' } })
  t.after(() => agent.close())
  const res = await request(`https://127.0.0.1:${gw.port}/svc/x`, { dispatcher: agent, headers: { host: 'b.test' } })
  assert.equal(res.statusCode, 200)
  await res.body.dump()
})

test('renewed certificate files are used by new connections; an open connection keeps working', async (t) => {
  const ca = createCa(t)
  const first = ca.issue('gateway.test')
  const second = ca.issue('gateway.test')
  const up = await startUpstream(t)
  // The gateway reads fixed paths, as with certbot's live/ folder.
  const certFile = join(ca.dir, 'live.pem')
  const keyFile = join(ca.dir, 'live.key')
  copyFileSync(first.certFile, certFile)
  copyFileSync(first.keyFile, keyFile)
  // An SNI entry renewed in place (truncate and write) is picked up too.
  const apiFirst = ca.issue('api.test')
  const apiSecond = ca.issue('api.test')
  const apiCert = join(ca.dir, 'api-live.pem')
  const apiKey = join(ca.dir, 'api-live.key')
  copyFileSync(apiFirst.certFile, apiCert)
  copyFileSync(apiFirst.keyFile, apiKey)
  const gw = await startGateway(t, { routes: { svc: route(up.url) }, config: { tls: { cert: certFile, key: keyFile, sni: { 'api.test': { cert: apiCert, key: apiKey } } } } })
  const certs = gw.gateway.certificates
  assert.ok(certs)
  assert.equal((await peerCert(gw.port, 'api.test')).fingerprint256, apiFirst.fingerprint256)

  const old = new Client(`https://127.0.0.1:${gw.port}`, { connect: { ca: ca.ca }, pipelining: 1 })
  t.after(() => old.close())
  const before = await old.request({ path: '/svc/1', method: 'GET' })
  assert.equal(before.statusCode, 200)
  await before.body.dump()
  assert.equal((await peerCert(gw.port)).fingerprint256, first.fingerprint256)

  // Renewal: the key first, then the certificate, each replaced by a rename (atomic, as tools do).
  const reloaded = once(certs, 'reloaded')
  writeFileSync(keyFile + '.tmp', second.key)
  renameSync(keyFile + '.tmp', keyFile)
  writeFileSync(certFile + '.tmp', second.cert)
  renameSync(certFile + '.tmp', certFile)
  await reloaded

  assert.equal((await peerCert(gw.port)).fingerprint256, second.fingerprint256)
  assert.equal((await peerCert(gw.port, 'api.test')).fingerprint256, apiFirst.fingerprint256, 'an unchanged SNI pair stays')

  const sniReloaded = once(certs, 'reloaded')
  writeFileSync(apiKey, apiSecond.key)
  writeFileSync(apiCert, apiSecond.cert)
  assert.deepEqual((await sniReloaded)[0], ['api.test'])
  assert.equal((await peerCert(gw.port, 'api.test')).fingerprint256, apiSecond.fingerprint256)

  const after = await old.request({ path: '/svc/2', method: 'GET' })
  assert.equal(after.statusCode, 200)
  await after.body.dump()
  assert.equal(up.received.length, 2, 'both requests went through')
})

test('a renewal that leaves a mismatched pair keeps the previous certificate', async (t) => {
  const ca = createCa(t)
  const first = ca.issue('gateway.test')
  const other = ca.issue('other.test')
  const up = await startUpstream(t)
  const certFile = join(ca.dir, 'live.pem')
  const keyFile = join(ca.dir, 'live.key')
  copyFileSync(first.certFile, certFile)
  copyFileSync(first.keyFile, keyFile)
  const gw = await startGateway(t, { routes: { svc: route(up.url) }, config: { tls: { cert: certFile, key: keyFile } } })
  const certs = gw.gateway.certificates
  assert.ok(certs)
  const failed = once(certs, 'reloadFailed')
  writeFileSync(keyFile, other.key)
  const [err] = await failed as [ConfigError]
  assert.match(err.message, /does not match the certificate/)
  assert.ok(err.message.includes(keyFile), 'the message names the key file')
  assert.equal((await peerCert(gw.port)).fingerprint256, first.fingerprint256)
})

test('start-up: a key that does not match its certificate, or a file that is not PEM, is a ConfigError naming the file', async (t) => {
  const ca = createCa(t)
  const a = ca.issue('a.test')
  const b = ca.issue('b.test')
  const garbage = join(ca.dir, 'garbage.pem')
  writeFileSync(garbage, 'not a certificate\n')
  const cases: Array<[Record<string, unknown>, RegExp, string]> = [
    [{ cert: a.certFile, key: b.keyFile }, /\/tls\/key: file .* does not match the certificate/, b.keyFile],
    [{ cert: garbage, key: a.keyFile }, /\/tls\/cert: file .* is not a PEM certificate/, garbage],
    [{ cert: a.certFile, key: a.keyFile, sni: { 'b.test': { cert: b.certFile, key: a.keyFile } } }, /\/tls\/sni\/b\.test\/key: file .* does not match/, a.keyFile],
    [{ cert: join(ca.dir, 'missing.pem'), key: a.keyFile }, /\/tls\/cert: file .*missing\.pem does not exist/, 'missing.pem']
  ]
  const routes = join(ca.dir, 'routes')
  mkdirSync(routes)
  for (const [tlsConfig, pattern, file] of cases) {
    const config = join(ca.dir, 'gatehouse.yaml')
    writeFileSync(config, JSON.stringify({ listen: { host: '127.0.0.1', port: 0 }, admin: false, routes, tls: tlsConfig }))
    const gateway = new GatewayServer({ configFile: config, logger: pino({ level: 'silent' }) })
    await assert.rejects(gateway.start(), (err: Error) => {
      assert.ok(err instanceof ConfigError, String(err))
      assert.match(err.message, pattern)
      assert.ok(err.message.includes(file), `${err.message} names ${file}`)
      return true
    })
  }
})

test('redirectHttpPort: plain HTTP gets 308 to the same host, path and query on the HTTPS port', async (t) => {
  const ca = createCa(t)
  const leaf = ca.issue('gateway.test')
  const up = await startUpstream(t)
  const gw = await tlsGateway(t, leaf, up.url, { redirectHttpPort: 0 })
  const redirect = gw.gateway.redirectAddress()
  assert.ok(redirect)
  const get = async (path: string, host: string): Promise<http.IncomingMessage> => {
    const req = http.request({ host: '127.0.0.1', port: redirect.port, path, method: 'POST', headers: { host } })
    req.end('body')
    const [res] = await once(req, 'response') as [http.IncomingMessage]
    res.resume()
    return res
  }
  const res = await get('/svc/a/b?x=1&y=%20z', 'api.example.com:8080')
  assert.equal(res.statusCode, 308)
  assert.equal(res.headers.location, `https://api.example.com:${gw.port}/svc/a/b?x=1&y=%20z`)
  assert.equal(up.received.length, 0, 'nothing reaches the upstream over plain HTTP')

  const bad = await get('/x', 'evil.example/@x')
  assert.equal(bad.statusCode, 400)
  assert.equal(bad.headers['content-type'], 'application/problem+json')
})

test('shutdown over TLS: HTTP/2 sessions get GOAWAY and their streams in flight finish; WebSocket tunnels are closed; close() does not wait for the timeout', async (t) => {
  const ca = createCa(t)
  const leaf = ca.issue('gateway.test')
  let release!: () => void
  const released = new Promise<void>((resolve) => { release = resolve })
  let arrived!: () => void
  const slowArrived = new Promise<void>((resolve) => { arrived = resolve })
  const up = await startUpstream(t, (_req, res) => {
    arrived()
    void released.then(() => res.end('done'))
  })
  const wsUpstream = new WebSocketServer({ port: 0, host: '127.0.0.1' })
  t.after(() => wsUpstream.close())
  await once(wsUpstream, 'listening')
  const wsPort = (wsUpstream.address() as AddressInfo).port
  const gw = await startGateway(t, {
    config: { tls: { cert: leaf.certFile, key: leaf.keyFile }, limits: { shutdownTimeout: '20s' } },
    routes: {
      svc: route(up.url),
      ws: { match: { prefix: '/ws' }, websocket: true, upstream: { targets: [{ url: `http://127.0.0.1:${wsPort}` }] } }
    }
  })
  const ws = new WebSocket(`wss://127.0.0.1:${gw.port}/ws`, { ca: ca.ca })
  await once(ws, 'open')
  const wsClosed = once(ws, 'close')

  const session = http2.connect(`https://127.0.0.1:${gw.port}`, { ca: ca.ca })
  t.after(() => session.destroy())
  const goaway = once(session, 'goaway')
  const stream = session.request({ ':path': '/svc/slow' })
  const response = once(stream, 'response')
  await slowArrived

  const events: string[] = []
  const closed = gw.gateway.close().then(() => events.push('closed'))
  await goaway
  release()
  const [headers] = await response as [http2.IncomingHttpHeaders]
  let body = ''
  for await (const chunk of stream) body += (chunk as Buffer).toString()
  events.push('response')
  assert.equal(headers[':status'], 200)
  assert.equal(body, 'done')
  await closed
  await wsClosed
  assert.deepEqual(events, ['response', 'closed'])
})
