import { test } from 'node:test'
import assert from 'node:assert/strict'
import http2 from 'node:http2'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import { request } from 'undici'
import { startGateway } from './helper.js'
import { createCa } from './certs.js'

type H2Handler = (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => void

/** An HTTP/2 upstream (h2c, or h2 over TLS) answering with the protocol, url, headers and body size it got. */
async function startH2Upstream (t: { after: (fn: () => unknown) => void }, tls?: http2.SecureServerOptions): Promise<string> {
  return await listenH2(t, (req, res) => {
    let bytes = 0
    req.on('data', (c: Buffer) => { bytes += c.length })
    req.on('end', () => {
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end(JSON.stringify({ httpVersion: req.httpVersion, url: req.url, headers: req.headers, bytes }))
    })
  }, tls)
}

/** An h2c (or, with `tls`, h2) server on a free port, its sessions destroyed after the test; returns its URL. */
async function listenH2 (t: { after: (fn: () => unknown) => void }, handler: H2Handler, tls?: http2.SecureServerOptions): Promise<string> {
  const server = tls !== undefined ? http2.createSecureServer(tls, handler) : http2.createServer(handler)
  const sessions = new Set<http2.ServerHttp2Session>()
  server.on('session', (s: http2.ServerHttp2Session) => { sessions.add(s) })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.after(async () => {
    for (const s of sessions) s.destroy()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  })
  return `${tls !== undefined ? 'https' : 'http'}://127.0.0.1:${(server.address() as AddressInfo).port}`
}

interface Seen { httpVersion: string, url: string, headers: Record<string, string>, bytes: number }

test('upstream.http2 on an http target speaks h2c: requests, forwarded headers and streamed bodies arrive over HTTP/2', async (t) => {
  const target = await startH2Upstream(t)
  const gw = await startGateway(t, { routes: { h2c: { match: { prefix: '/h2c' }, upstream: { targets: [{ url: target }], http2: true } } } })
  const res = await request(`${gw.url}/h2c/a?b=1`, { headers: { 'x-custom': 'kept' } })
  assert.equal(res.statusCode, 200)
  assert.equal(res.headers.connection, 'keep-alive', 'the client side stays HTTP/1.1 keep-alive')
  const seen = await res.body.json() as Seen
  assert.equal(seen.httpVersion, '2.0')
  assert.equal(seen.url, '/a?b=1')
  assert.equal(seen.headers['x-custom'], 'kept')
  assert.equal(seen.headers['x-forwarded-for'], '127.0.0.1')
  assert.ok(seen.headers['x-request-id'])

  const body = Buffer.alloc(512 * 1024, 7)
  const posted = await request(`${gw.url}/h2c/upload`, { method: 'POST', body, headers: { 'content-type': 'application/octet-stream' } })
  assert.equal(posted.statusCode, 200)
  assert.equal((await posted.body.json() as Seen).bytes, body.length)
})

test('upstream.http2 on an https target negotiates h2 by ALPN (with the route CA); without it the gateway speaks HTTP/1.1', async (t) => {
  const ca = createCa(t)
  const leaf = ca.issue('api.internal')
  const target = await startH2Upstream(t, { cert: leaf.cert, key: leaf.key, allowHTTP1: true })
  const gw = await startGateway(t, {
    routes: {
      h2: { match: { prefix: '/h2' }, upstream: { targets: [{ url: target }], http2: true, tls: { ca: ca.caFile } } },
      h1: { match: { prefix: '/h1' }, upstream: { targets: [{ url: target }], tls: { ca: ca.caFile } } }
    }
  })
  const viaH2 = await request(`${gw.url}/h2/x`)
  assert.equal(viaH2.statusCode, 200)
  assert.equal((await viaH2.body.json() as Seen).httpVersion, '2.0')
  const viaH1 = await request(`${gw.url}/h1/x`)
  assert.equal(viaH1.statusCode, 200)
  assert.equal((await viaH1.body.json() as Seen).httpVersion, '1.1')
})

test('streams from an h2c upstream: a long one outlives timeouts.response, a silent one is cut by timeouts.idle', async (t) => {
  const target = await listenH2(t, (req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write('data: first\n\n')
    if (req.url !== '/long') return // silent from here on
    let i = 0
    const timer = setInterval(() => {
      res.write('data: more\n\n')
      if (++i === 10) {
        clearInterval(timer)
        res.end()
      }
    }, 100)
    res.on('close', () => clearInterval(timer))
  })
  const gw = await startGateway(t, { routes: { s: { match: { prefix: '/s' }, upstream: { targets: [{ url: target }], http2: true, timeouts: { response: '300ms', idle: '400ms' } } } } })
  const long = await request(`${gw.url}/s/long`)
  assert.equal((await long.body.text()).match(/^data: /gm)?.length, 11)
  const silent = await request(`${gw.url}/s/silent`)
  assert.equal(silent.statusCode, 200)
  await assert.rejects(silent.body.text())
})
