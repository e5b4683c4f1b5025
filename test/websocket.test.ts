import { test } from 'node:test'
import assert from 'node:assert/strict'
import http from 'node:http'
import https from 'node:https'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import WebSocket, { WebSocketServer } from 'ws'
import { rawRequest, startGateway, startUpstream } from './helper.js'
import { createCa } from './certs.js'
import { metrics } from '../src/metrics.js'

const API_KEY = 'ws-test-key-0123456789'

interface EchoUpstream {
  url: string
  wss: WebSocketServer
  /** The upgrade requests the upstream got (url and headers). */
  upgrades: Array<{ url: string, headers: http.IncomingHttpHeaders }>
  /** Server-side sockets, in connection order. */
  sockets: WebSocket[]
}

/** A WebSocket echo server (`ws`), on plain HTTP or on HTTPS with a given certificate. */
async function startEcho (t: { after: (fn: () => unknown) => void }, tlsOptions?: https.ServerOptions): Promise<EchoUpstream> {
  const server = tlsOptions !== undefined ? https.createServer(tlsOptions) : http.createServer((_req, res) => { res.end('plain http') })
  const wss = new WebSocketServer({ server, handleProtocols: (protocols) => protocols.has('chat.v2') ? 'chat.v2' : false })
  const upgrades: EchoUpstream['upgrades'] = []
  const sockets: WebSocket[] = []
  wss.on('headers', (_headers, req) => { upgrades.push({ url: req.url ?? '', headers: req.headers }) })
  wss.on('connection', (ws) => {
    sockets.push(ws)
    ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }))
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.after(async () => {
    for (const ws of wss.clients) ws.terminate()
    wss.close()
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  })
  const port = (server.address() as AddressInfo).port
  return { url: `${tlsOptions !== undefined ? 'https' : 'http'}://127.0.0.1:${port}`, wss, upgrades, sockets }
}

/** Opens a client WebSocket; resolves when open, or with the status of a refused upgrade. */
async function connect (url: string, options: WebSocket.ClientOptions = {}, protocols?: string[]): Promise<{ ws?: WebSocket, status?: number, body?: string, headers?: http.IncomingHttpHeaders }> {
  const ws = new WebSocket(url, protocols, options)
  return await new Promise((resolve, reject) => {
    ws.once('open', () => resolve({ ws }))
    ws.once('unexpected-response', (_req, res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c: string) => { body += c })
      res.on('end', () => resolve({ status: res.statusCode, body, headers: res.headers }))
    })
    ws.once('error', reject)
  })
}

async function nextMessage (ws: WebSocket): Promise<string> {
  const [data] = await once(ws, 'message') as [Buffer]
  return data.toString()
}

async function gauge (route: string): Promise<number> {
  const { values } = await metrics.websocketConnections.get()
  return values.find((v) => v.labels.route === route)?.value ?? 0
}

test('WebSocket echo through the gateway: upgrade needs the API key; frames flow both ways; path, query, subprotocol and forwarded headers reach the upstream', async (t) => {
  const echo = await startEcho(t)
  const gw = await startGateway(t, {
    config: { apiKeys: { keys: { client: API_KEY } } },
    routes: { chat: { match: { prefix: '/chat' }, rewrite: { prefix: '/ws' }, websocket: true, auth: { apiKey: true }, upstream: { targets: [{ url: echo.url }] } } }
  })
  const url = `ws://127.0.0.1:${gw.port}/chat/room/1?user=ann`

  const refused = await connect(url)
  assert.equal(refused.status, 401)
  assert.match(refused.headers?.['content-type'] ?? '', /application\/problem\+json/)
  assert.equal(JSON.parse(refused.body ?? '{}').code, 'GATEHOUSE_UNAUTHORIZED')
  assert.equal(echo.upgrades.length, 0, 'an unauthenticated upgrade never reaches the upstream')

  const { ws } = await connect(url, { headers: { 'x-api-key': API_KEY } }, ['chat.v1', 'chat.v2'])
  assert.ok(ws)
  t.after(() => ws.terminate())
  assert.equal(ws.protocol, 'chat.v2', 'the upstream chose the subprotocol')
  ws.send('hello')
  assert.equal(await nextMessage(ws), 'hello')
  const big = 'x'.repeat(1024 * 1024)
  ws.send(big)
  assert.equal(await nextMessage(ws), big)
  const [upgrade] = echo.upgrades
  assert.equal(upgrade.url, '/ws/room/1?user=ann')
  assert.equal(upgrade.headers['x-forwarded-for'], '127.0.0.1')
  assert.equal(upgrade.headers['x-forwarded-proto'], 'http')
  assert.equal(upgrade.headers.host, new URL(echo.url).host)
  assert.equal(upgrade.headers['x-api-key'], undefined, 'the credential is not passed on')

  // The upstream can talk first, too.
  echo.sockets[0].send('server push')
  assert.equal(await nextMessage(ws), 'server push')
})

test('close propagates both ways, with its code; the open-connection gauge follows', async (t) => {
  const echo = await startEcho(t)
  const gw = await startGateway(t, { routes: { live: { match: { prefix: '/live' }, websocket: true, upstream: { targets: [{ url: echo.url }] } } } })
  const url = `ws://127.0.0.1:${gw.port}/live`

  // Client closes: the upstream sees the client's code.
  const a = await connect(url)
  assert.ok(a.ws)
  assert.equal(await gauge('live'), 1)
  const upstreamClosed = once(echo.sockets[0], 'close')
  a.ws.close(4000, 'bye')
  const [code, reason] = await upstreamClosed as [number, Buffer]
  assert.equal(code, 4000)
  assert.equal(reason.toString(), 'bye')
  await once(a.ws, 'close')

  // Upstream closes: the client sees the upstream's code.
  const b = await connect(url)
  assert.ok(b.ws)
  const clientClosed = once(b.ws, 'close')
  echo.sockets[1].close(4001, 'server done')
  const [code2] = await clientClosed as [number]
  assert.equal(code2, 4001)

  // Upstream vanishes without a close frame: the client's connection is closed too (1006).
  const c = await connect(url)
  assert.ok(c.ws)
  const abrupt = once(c.ws, 'close')
  echo.sockets[2].terminate()
  const [code3] = await abrupt as [number]
  assert.equal(code3, 1006)

  // Client vanishes: the upstream's side is closed.
  const d = await connect(url)
  assert.ok(d.ws)
  const upstreamGone = once(echo.sockets[3], 'close')
  d.ws.terminate()
  await upstreamGone
  // Both tunnels' sockets are closed: the gauge is back to 0 (it is decremented on close).
  while (await gauge('live') !== 0) await new Promise((resolve) => setImmediate(resolve))
  assert.equal(await gauge('live'), 0)
  // Each upgrade counted as a request answered 101.
  const { values } = await metrics.requests.get()
  assert.equal(values.find((v) => v.labels.route === 'live' && v.labels.status === '101')?.value, 4)
})

test('upgrades go through IP filter, rate limit and route match first; a route without websocket: true serves it as plain HTTP', async (t) => {
  const echo = await startEcho(t)
  const gw = await startGateway(t, {
    routes: {
      denied: { match: { prefix: '/denied' }, websocket: true, ipFilter: { deny: ['127.0.0.1'] }, upstream: { targets: [{ url: echo.url }] } },
      limited: { match: { prefix: '/limited' }, websocket: true, rateLimit: { max: 1, window: '1m' }, upstream: { targets: [{ url: echo.url }] } },
      plain: { match: { prefix: '/plain' }, upstream: { targets: [{ url: echo.url }] } },
      open: { match: { prefix: '/open' }, websocket: true, upstream: { targets: [{ url: echo.url }] } }
    }
  })
  const base = `ws://127.0.0.1:${gw.port}`
  const denied = await connect(`${base}/denied`)
  assert.equal(denied.status, 403)
  assert.equal(JSON.parse(denied.body ?? '{}').code, 'GATEHOUSE_IP_DENIED')

  const first = await connect(`${base}/limited`)
  assert.ok(first.ws)
  first.ws.close()
  const second = await connect(`${base}/limited`)
  assert.equal(second.status, 429)
  assert.equal(JSON.parse(second.body ?? '{}').code, 'GATEHOUSE_RATE_LIMITED')

  const missing = await connect(`${base}/nowhere`)
  assert.equal(missing.status, 404)
  assert.equal(JSON.parse(missing.body ?? '{}').code, 'GATEHOUSE_ROUTE_NOT_FOUND')

  const plain = await connect(`${base}/plain`)
  assert.equal(plain.status, 200)
  assert.equal(plain.body, 'plain http')
  // A WebSocket handshake is a GET: a POST asking for an upgrade is forwarded as a plain POST.
  const post = await rawRequest(gw.port, 'POST /open HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n')
  assert.match(post, /^HTTP\/1\.1 200 /)
  assert.match(post, /plain http$/)
  assert.equal(echo.upgrades.length, 1, 'only the allowed upgrade reached the upstream')
})

test('an upstream that refuses the upgrade is relayed; an unreachable one is a 502 problem', async (t) => {
  const refusing = await startUpstream(t, (_req, res) => {
    res.writeHead(403, { 'content-type': 'text/plain' })
    res.end('not you')
  })
  // startUpstream's server has no 'upgrade' listener, so Node answers upgrades itself: add one that refuses.
  refusing.server.on('upgrade', (_req, socket) => {
    socket.end('HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 7\r\n\r\nnot you')
  })
  const closed = await startUpstream(t)
  await closed.close()
  const gw = await startGateway(t, {
    routes: {
      refuse: { match: { prefix: '/refuse' }, websocket: true, upstream: { targets: [{ url: refusing.url }] } },
      down: { match: { prefix: '/down' }, websocket: true, upstream: { targets: [{ url: closed.url }] } }
    }
  })
  const refused = await connect(`ws://127.0.0.1:${gw.port}/refuse`)
  assert.equal(refused.status, 403)
  assert.equal(refused.body, 'not you')
  const down = await connect(`ws://127.0.0.1:${gw.port}/down`)
  assert.equal(down.status, 502)
  const problem = JSON.parse(down.body ?? '{}') as { code: string, detail: string }
  assert.equal(problem.code, 'GATEHOUSE_UPSTREAM_UNREACHABLE')
  assert.ok(!problem.detail.includes('127.0.0.1'), 'no internal address in the answer')
})

test('wss: WebSocket over the TLS listener to a wss upstream signed by a private CA', async (t) => {
  const ca = createCa(t)
  const upstreamCert = ca.issue('echo.internal')
  const gatewayCert = ca.issue('gateway.test')
  const echo = await startEcho(t, { cert: upstreamCert.cert, key: upstreamCert.key })
  const gw = await startGateway(t, {
    config: { tls: { cert: gatewayCert.certFile, key: gatewayCert.keyFile } },
    routes: { secure: { match: { prefix: '/secure' }, websocket: true, upstream: { targets: [{ url: echo.url }], tls: { ca: ca.caFile } } } }
  })
  const { ws } = await connect(`wss://127.0.0.1:${gw.port}/secure`, { ca: ca.ca })
  assert.ok(ws)
  t.after(() => ws.terminate())
  ws.send('over tls')
  assert.equal(await nextMessage(ws), 'over tls')
  assert.equal(echo.upgrades[0].headers['x-forwarded-proto'], 'https')
})

test('a route reload keeps open WebSockets; new upgrades use the new route table', async (t) => {
  const echo = await startEcho(t)
  const gw = await startGateway(t, { routes: { live: { match: { prefix: '/live' }, websocket: true, upstream: { targets: [{ url: echo.url }] } } } })
  const { ws } = await connect(`ws://127.0.0.1:${gw.port}/live`)
  assert.ok(ws)
  t.after(() => ws.terminate())
  gw.writeRoute('live', { match: { prefix: '/live2' }, websocket: true, upstream: { targets: [{ url: echo.url }] } })
  const result = await gw.gateway.reload()
  assert.equal(result.ok, true)
  ws.send('still here')
  assert.equal(await nextMessage(ws), 'still here')
  assert.equal((await connect(`ws://127.0.0.1:${gw.port}/live`)).status, 404)
  const moved = await connect(`ws://127.0.0.1:${gw.port}/live2`)
  assert.ok(moved.ws)
  moved.ws.close()
})

test('shutdown closes open WebSockets once in-flight requests are done, without waiting for shutdownTimeout', async (t) => {
  const echo = await startEcho(t)
  const gw = await startGateway(t, {
    config: { limits: { shutdownTimeout: '30s' } },
    routes: { live: { match: { prefix: '/live' }, websocket: true, upstream: { targets: [{ url: echo.url }] } } }
  })
  const { ws } = await connect(`ws://127.0.0.1:${gw.port}/live`)
  assert.ok(ws)
  const upstreamSide = once(echo.sockets[0], 'close')
  const clientSide = once(ws, 'close')
  await gw.close()
  await clientSide
  await upstreamSide
  assert.equal(await gauge('live'), 0)
})
