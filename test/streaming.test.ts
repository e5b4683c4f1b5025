import { test } from 'node:test'
import assert from 'node:assert/strict'
import http from 'node:http'
import http2 from 'node:http2'
import { once } from 'node:events'
import { request } from 'undici'
import { createGunzip } from 'node:zlib'
import { startGateway, startUpstream } from './helper.js'
import { createCa } from './certs.js'

/** A promise with its resolve function, for lockstep between an upstream and a client. */
function signal<T = void> (): { promise: Promise<T>, resolve: (v: T) => void } {
  let done!: (v: T) => void
  const promise = new Promise<T>((resolve) => { done = resolve })
  return { promise, resolve: done }
}

function median (values: number[]): number {
  const s = [...values].sort((a, b) => a - b)
  return s[Math.floor(s.length / 2)]
}

const EVENTS = 5

test('SSE: each event reaches the client while the upstream is still open, right after the upstream wrote it', async (t) => {
  // Lockstep: the upstream writes event i, then waits until the client has seen it. If anything on
  // the way buffered (compression, a body collector), the client would never see event 0.
  const seen = Array.from({ length: EVENTS }, () => signal())
  const writtenAt: number[] = []
  const upstreamClosed = signal()
  const up = await startUpstream(t, (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' })
    res.on('close', () => upstreamClosed.resolve())
    void (async () => {
      for (let i = 0; i < EVENTS; i++) {
        writtenAt[i] = performance.now()
        res.write(`id: ${i}\ndata: event ${i} ${'x'.repeat(2048)}\n\n`)
        await seen[i].promise
      }
      res.end()
    })()
  })
  const gw = await startGateway(t, { routes: { events: { match: { prefix: '/events' }, compress: true, upstream: { targets: [{ url: up.url }] } } } })
  // A browser's EventSource sends Accept-Encoding too: compression must not hold events back.
  const res = await request(`${gw.url}/events/stream`, { headers: { accept: 'text/event-stream', 'accept-encoding': 'gzip, deflate, br' } })
  assert.equal(res.statusCode, 200)
  assert.equal(res.headers['content-type'], 'text/event-stream')
  assert.equal(res.headers['content-encoding'], undefined)
  const latencies: number[] = []
  let buffer = ''
  let next = 0
  for await (const chunk of res.body) {
    buffer += (chunk as Buffer).toString()
    while (next < EVENTS && buffer.includes(`data: event ${next} `)) {
      latencies.push(performance.now() - writtenAt[next])
      seen[next].resolve()
      next++
    }
  }
  assert.equal(next, EVENTS, 'every event arrived')
  await upstreamClosed.promise
  t.diagnostic(`SSE write-to-client latency: median ${median(latencies).toFixed(1)} ms, max ${Math.max(...latencies).toFixed(1)} ms`)
  // The lockstep above already proves no buffering; the time bound is 3x the 100 ms target.
  assert.ok(median(latencies) < 300, `median latency ${median(latencies)} ms`)
})

test('SSE over HTTP/2: the first event arrives while the upstream is still open', async (t) => {
  const ca = createCa(t)
  const leaf = ca.issue('gateway.test')
  const seen = signal()
  const up = await startUpstream(t, (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write('data: first\n\n')
    void seen.promise.then(() => res.end('data: last\n\n'))
  })
  const gw = await startGateway(t, { config: { tls: { cert: leaf.certFile, key: leaf.keyFile } }, routes: { events: { match: { prefix: '/events' }, upstream: { targets: [{ url: up.url }] } } } })
  const session = http2.connect(`https://127.0.0.1:${gw.port}`, { ca: ca.ca })
  t.after(() => session.destroy())
  const stream = session.request({ ':path': '/events', 'accept-encoding': 'gzip' })
  const [headers] = await once(stream, 'response') as [http2.IncomingHttpHeaders]
  assert.equal(headers[':status'], 200)
  let text = ''
  for await (const chunk of stream) {
    text += (chunk as Buffer).toString()
    if (text.includes('data: first')) seen.resolve()
  }
  assert.equal(text, 'data: first\n\ndata: last\n\n')
})

for (const type of ['application/octet-stream', 'application/x-ndjson', 'application/json']) {
  test(`chunked ${type} responses are relayed chunk by chunk, compression on`, async (t) => {
    const acked = Array.from({ length: EVENTS }, () => signal())
    const up = await startUpstream(t, (_req, res) => {
      res.writeHead(200, { 'content-type': type })
      void (async () => {
        for (let i = 0; i < EVENTS; i++) {
          // (@fastify/compress peeks at the first 10 bytes to spot an already-compressed body: a
          // first chunk shorter than that waits for the next one.)
          res.write(`chunk-${i}; ${'-'.repeat(16)}`)
          await acked[i].promise
        }
        res.end()
      })()
    })
    const gw = await startGateway(t, { routes: { dl: { match: { prefix: '/dl' }, upstream: { targets: [{ url: up.url }] } } } })
    const res = await request(`${gw.url}/dl/file`, { headers: { 'accept-encoding': 'gzip' } })
    assert.equal(res.statusCode, 200)
    const gz = res.headers['content-encoding'] === 'gzip'
    const body = gz ? res.body.pipe(createGunzip()) : res.body
    let text = ''
    let next = 0
    for await (const chunk of body) {
      text += (chunk as Buffer).toString()
      while (next < EVENTS && text.includes(`chunk-${next};`)) acked[next++].resolve()
    }
    assert.equal(next, EVENTS)
  })
}

test('a long stream outlives timeouts.response (it only bounds the wait for headers); silence longer than timeouts.idle ends it', { timeout: 20_000 }, async (t) => {
  const CHUNKS = 12
  const INTERVAL = 100
  const silentClosed = signal()
  const up = await startUpstream(t, (req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    if (req.url === '/silent') {
      res.write('data: hello\n\n')
      res.on('close', () => silentClosed.resolve())
      return // and then nothing, for ever
    }
    let i = 0
    const timer = setInterval(() => {
      res.write(`data: ${i}\n\n`)
      if (++i === CHUNKS) {
        clearInterval(timer)
        res.end()
      }
    }, INTERVAL)
    res.on('close', () => clearInterval(timer))
  })
  const gw = await startGateway(t, {
    routes: { live: { match: { prefix: '/live' }, upstream: { targets: [{ url: up.url }], timeouts: { response: '300ms', idle: '400ms' } } } }
  })
  // 12 chunks 100 ms apart: about 1.2 s, four times the response timeout.
  const started = performance.now()
  const res = await request(`${gw.url}/live/long`)
  assert.equal(res.statusCode, 200)
  const text = await res.body.text()
  const elapsed = performance.now() - started
  assert.equal(text.match(/^data: /gm)?.length, CHUNKS, 'every chunk arrived')
  assert.ok(elapsed > 3 * 300, `the stream lasted ${elapsed} ms, past the response timeout`)

  // A stream that goes silent is cut by the idle timeout rather than hanging.
  const silent = await request(`${gw.url}/live/silent`)
  assert.equal(silent.statusCode, 200)
  await assert.rejects(silent.body.text())
  await silentClosed.promise
})

test('uploads stream to the upstream: it gets each chunk before the client sent the next', async (t) => {
  const CHUNKS = 5
  const received = Array.from({ length: CHUNKS }, () => signal())
  const up = await startUpstream(t, (req, res) => {
    let text = ''
    let next = 0
    req.on('data', (c: Buffer) => {
      text += c.toString()
      while (next < CHUNKS && text.includes(`part-${next};`)) received[next++].resolve()
    })
    req.on('end', () => {
      res.writeHead(200, { 'content-type': 'text/plain' })
      res.end(`got ${text.length} bytes`)
    })
  })
  const gw = await startGateway(t, { routes: { up: { match: { prefix: '/up' }, upstream: { targets: [{ url: up.url }] } } } })
  const req = http.request(`${gw.url}/up/data`, { method: 'POST', headers: { 'content-type': 'application/octet-stream', 'transfer-encoding': 'chunked' } })
  const response = once(req, 'response') as Promise<[http.IncomingMessage]>
  for (let i = 0; i < CHUNKS; i++) {
    req.write(`part-${i};`)
    await received[i].promise
  }
  req.end()
  const [res] = await response
  res.setEncoding('utf8')
  let body = ''
  for await (const c of res) body += c as string
  assert.equal(res.statusCode, 200)
  assert.equal(body, `got ${'part-0;'.length * CHUNKS} bytes`)
})

test('a client that leaves an event stream closes the upstream request', async (t) => {
  const upstreamClosed = signal()
  const up = await startUpstream(t, (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write('data: hello\n\n')
    res.on('close', () => upstreamClosed.resolve())
  })
  const gw = await startGateway(t, { routes: { events: { match: { prefix: '/events' }, upstream: { targets: [{ url: up.url }] } } } })
  const req = http.get(`${gw.url}/events`)
  const [res] = await once(req, 'response') as [http.IncomingMessage]
  await once(res, 'data')
  req.destroy()
  await upstreamClosed.promise
})
