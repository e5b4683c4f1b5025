import { test } from 'node:test'
import assert from 'node:assert/strict'
import zlib from 'node:zlib'
import http from 'node:http'
import { createHash } from 'node:crypto'
import { once } from 'node:events'
import { request } from 'undici'
import { setTimeout as sleep } from 'node:timers/promises'
import { startGateway, startUpstream } from './helper.js'
import { cacheStore } from '../plugins/cache.js'

const JSON_BODY = JSON.stringify(Array.from({ length: 300 }, (_, i) => ({ id: i, name: `item number ${i}`, tags: ['a', 'b', 'c'] })))

function route (url: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { match: { prefix: '/svc' }, upstream: { targets: [{ url }] }, ...extra }
}

async function fetchRaw (url: string, headers: Record<string, string>): Promise<{ status: number, headers: http.IncomingHttpHeaders, body: Buffer }> {
  const res = await request(url, { headers })
  return { status: res.statusCode, headers: res.headers, body: Buffer.from(await res.body.arrayBuffer()) }
}

test('br, gzip or deflate chosen by Accept-Encoding q-values; Vary: Accept-Encoding; strong ETag made weak', async (t) => {
  const up = await startUpstream(t, (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(JSON_BODY), etag: '"v1"' })
    res.end(JSON_BODY)
  })
  const gw = await startGateway(t, { routes: { svc: route(up.url) } })
  const br = await fetchRaw(`${gw.url}/svc/list`, { 'accept-encoding': 'gzip;q=0.5, br;q=0.9, deflate;q=0.1' })
  assert.equal(br.headers['content-encoding'], 'br')
  assert.equal(zlib.brotliDecompressSync(br.body).toString(), JSON_BODY)
  assert.ok(br.body.length < JSON_BODY.length / 3)
  assert.match(String(br.headers.vary), /accept-encoding/i)
  assert.equal(br.headers.etag, 'W/"v1"')

  const gzip = await fetchRaw(`${gw.url}/svc/list`, { 'accept-encoding': 'br;q=0.1, gzip' })
  assert.equal(gzip.headers['content-encoding'], 'gzip')
  assert.equal(zlib.gunzipSync(gzip.body).toString(), JSON_BODY)

  const deflate = await fetchRaw(`${gw.url}/svc/list`, { 'accept-encoding': 'deflate' })
  assert.equal(deflate.headers['content-encoding'], 'deflate')
  assert.equal(zlib.inflateSync(deflate.body).toString(), JSON_BODY)

  const none = await fetchRaw(`${gw.url}/svc/list`, {})
  assert.equal(none.headers['content-encoding'], undefined)
  assert.equal(none.headers.etag, '"v1"', 'the identity body keeps its strong ETag')
  assert.equal(none.body.toString(), JSON_BODY)
})

test('small bodies, images, already-encoded, range and no-transform responses are left alone; route compress: false turns it off', async (t) => {
  const png = Buffer.alloc(8000, 7)
  const gz = zlib.gzipSync(JSON_BODY)
  const up = await startUpstream(t, (req, res) => {
    switch (req.url) {
      case '/small': res.writeHead(200, { 'content-type': 'application/json', 'content-length': 20 }); res.end('{"small":"response"}'); break
      case '/image': res.writeHead(200, { 'content-type': 'image/png', 'content-length': png.length }); res.end(png); break
      case '/encoded': res.writeHead(200, { 'content-type': 'application/json', 'content-encoding': 'gzip', 'content-length': gz.length }); res.end(gz); break
      case '/range': res.writeHead(206, { 'content-type': 'text/plain', 'content-range': 'bytes 0-4999/10000', 'content-length': 5000 }); res.end('r'.repeat(5000)); break
      case '/notransform': res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': 'no-transform', 'content-length': 5000 }); res.end('n'.repeat(5000)); break
      default: res.writeHead(200, { 'content-type': 'text/plain', 'content-length': 5000 }); res.end('p'.repeat(5000))
    }
  })
  const gw = await startGateway(t, { routes: { svc: route(up.url), off: { match: { prefix: '/off' }, upstream: { targets: [{ url: up.url }] }, compress: false } } })
  const ae = { 'accept-encoding': 'br, gzip' }
  const small = await fetchRaw(`${gw.url}/svc/small`, ae)
  assert.equal(small.headers['content-encoding'], undefined)
  assert.equal(small.body.toString(), '{"small":"response"}')
  const image = await fetchRaw(`${gw.url}/svc/image`, ae)
  assert.equal(image.headers['content-encoding'], undefined)
  assert.deepEqual(image.body, png)
  const encoded = await fetchRaw(`${gw.url}/svc/encoded`, ae)
  assert.equal(encoded.headers['content-encoding'], 'gzip')
  assert.deepEqual(encoded.body, gz, 'an upstream-encoded body passes unchanged, never encoded twice')
  const range = await fetchRaw(`${gw.url}/svc/range`, ae)
  assert.equal(range.status, 206)
  assert.equal(range.headers['content-encoding'], undefined)
  assert.equal(range.body.length, 5000)
  const noTransform = await fetchRaw(`${gw.url}/svc/notransform`, ae)
  assert.equal(noTransform.headers['content-encoding'], undefined)
  const plain = await fetchRaw(`${gw.url}/svc/plain`, ae)
  assert.equal(plain.headers['content-encoding'], 'br')
  const off = await fetchRaw(`${gw.url}/off/plain`, ae)
  assert.equal(off.headers['content-encoding'], undefined)
  assert.equal(off.body.toString(), 'p'.repeat(5000))
})

test('SSE through a compressed route: each event arrives as the upstream writes it', async (t) => {
  let next!: () => void
  const up = await startUpstream(t, (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' })
    let i = 0
    next = () => {
      i++
      if (i <= 3) res.write(`id: ${i}\ndata: ${'x'.repeat(2000)} event ${i}\n\n`)
      else res.end()
    }
    next()
  })
  const gw = await startGateway(t, { routes: { svc: route(up.url) } })
  const res = await request(`${gw.url}/svc/events`, { headers: { 'accept-encoding': 'gzip, br', accept: 'text/event-stream' } })
  assert.equal(res.headers['content-encoding'], undefined)
  let text = ''
  const seen: number[] = []
  for await (const chunk of res.body) {
    text += String(chunk)
    // The upstream writes event n+1 only once the client has event n: a held-back event hangs here.
    const count = text.split('\n\n').length - 1
    while (seen.length < count) { seen.push(Date.now()); next() }
  }
  assert.equal(seen.length, 3)
  assert.match(text, /event 3\n\n$/)
})

test('streamed JSON is flushed chunk by chunk when compressed, not held back', async (t) => {
  let finish!: () => void
  const up = await startUpstream(t, (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    res.write('[' + JSON.stringify({ first: 'x'.repeat(3000) }))
    finish = () => res.end(']')
  })
  const gw = await startGateway(t, { routes: { svc: route(up.url) } })
  const res = await request(`${gw.url}/svc/stream`, { headers: { 'accept-encoding': 'gzip' } })
  assert.equal(res.headers['content-encoding'], 'gzip')
  const gunzip = zlib.createGunzip()
  res.body.pipe(gunzip)
  let out = ''
  gunzip.on('data', (c: Buffer) => {
    // The upstream has not ended: this data came through the gzip stream by a flush.
    if (out === '') setImmediate(finish)
    out += c.toString()
  })
  await once(gunzip, 'end')
  assert.equal(JSON.parse(out)[0].first.length, 3000)
})

test('a 10 MiB JSON download is compressed as a stream with flat memory', async (t) => {
  const row = JSON.stringify({ id: 1, name: 'a fairly repetitive json row', values: [1, 2, 3, 4, 5, 6, 7, 8] }) + ','
  const rowsPerChunk = Math.floor(65536 / row.length)
  const chunk = row.repeat(rowsPerChunk)
  const total = 10 * 1024 * 1024
  let resume!: () => void
  const resumed = new Promise<void>((resolve) => { resume = resolve })
  const up = await startUpstream(t, (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    let sent = 0
    res.write('[')
    const pump = async (): Promise<void> => {
      while (sent < total) {
        // Halfway, wait until the client has decompressed most of the first half: a gateway that
        // buffered the response would never let it through, and this test would time out.
        if (sent >= total / 2) await resumed
        sent += chunk.length
        if (!res.write(chunk)) await once(res, 'drain')
      }
      res.end('{}]')
    }
    void pump()
  })
  const gw = await startGateway(t, { routes: { svc: route(up.url) } })
  const before = process.memoryUsage()
  let peak = 0
  const sampler = setInterval(() => {
    const m = process.memoryUsage()
    peak = Math.max(peak, m.heapUsed + m.arrayBuffers - before.heapUsed - before.arrayBuffers)
  }, 20)
  t.after(() => clearInterval(sampler))
  const res = await request(`${gw.url}/svc/big`, { headers: { 'accept-encoding': 'gzip' } })
  assert.equal(res.headers['content-encoding'], 'gzip')
  assert.equal(res.headers['content-length'], undefined)
  let compressed = 0
  let plain = 0
  const hash = createHash('sha256')
  const gunzip = zlib.createGunzip()
  res.body.on('data', (c: Buffer) => { compressed += c.length })
  res.body.pipe(gunzip)
  gunzip.on('data', (c: Buffer) => {
    plain += c.length
    hash.update(c)
    if (plain > total * 0.4) resume()
  })
  await once(gunzip, 'end')
  clearInterval(sampler)
  assert.ok(plain > total, `got ${plain} bytes`)
  assert.ok(compressed < plain / 5, `compressed ${compressed} of ${plain}`)
  assert.ok(peak < 40 * 1024 * 1024, `memory grew by ${Math.round(peak / 1048576)} MiB`)
})

test('a gzip-encoded upload is forwarded byte for byte (no request decompression)', async (t) => {
  const body = zlib.gzipSync(JSON_BODY)
  const got: { headers?: http.IncomingHttpHeaders, sha?: string } = {}
  const up = await startUpstream(t, (req, res) => {
    const h = createHash('sha256')
    req.on('data', (c: Buffer) => h.update(c))
    req.on('end', () => {
      got.headers = req.headers
      got.sha = h.digest('hex')
      res.writeHead(201, { 'content-type': 'text/plain' })
      res.end('stored')
    })
  })
  const gw = await startGateway(t, { routes: { svc: route(up.url) } })
  const res = await request(`${gw.url}/svc/upload`, { method: 'POST', body, headers: { 'content-type': 'application/json', 'content-encoding': 'gzip' } })
  assert.equal(res.statusCode, 201)
  assert.equal(await res.body.text(), 'stored')
  assert.equal(got.headers?.['content-encoding'], 'gzip')
  assert.equal(got.sha, createHash('sha256').update(body).digest('hex'))
})

test('a cached route stores the identity body and br/gzip copies made once; hits send the stored bytes', async (t) => {
  const up = await startUpstream(t, (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'max-age=60' })
    res.end(JSON_BODY)
  })
  const gw = await startGateway(t, { routes: { svc: route(up.url, { cache: { enabled: true } }) } })
  const miss = await fetchRaw(`${gw.url}/svc/c`, { 'accept-encoding': 'gzip' })
  assert.equal(miss.headers['x-cache'], 'MISS')
  assert.equal(zlib.gunzipSync(miss.body).toString(), JSON_BODY)
  // br and gzip copies are made once, off the response path, and stored with the entry.
  const store = cacheStore(gw.gateway.config, gw.gateway.state)
  for (let i = 0; i < 100 && (await store.get('/svc/c'))[0]?.encoded === undefined; i++) await sleep(20)
  const encoded = (await store.get('/svc/c'))[0].encoded
  assert.equal(zlib.gunzipSync(encoded?.gzip as Buffer).toString(), JSON_BODY)
  const br = await fetchRaw(`${gw.url}/svc/c`, { 'accept-encoding': 'br' })
  assert.deepEqual(br.body, encoded?.br, 'the stored br copy is sent')
  assert.equal(br.headers['x-cache'], 'HIT')
  assert.equal(br.headers['content-encoding'], 'br')
  assert.equal(zlib.brotliDecompressSync(br.body).toString(), JSON_BODY)
  const identity = await fetchRaw(`${gw.url}/svc/c`, {})
  assert.equal(identity.headers['x-cache'], 'HIT')
  assert.equal(identity.body.toString(), JSON_BODY)
  assert.equal(up.received.length, 1)
})

test('Accept-Encoding negotiation of stored copies follows q-values, * and x-gzip', async () => {
  const { negotiate } = await import('../src/cache/encoding.js')
  const offered = ['br', 'gzip', 'deflate']
  assert.equal(negotiate('gzip;q=0.5, br;q=0.9', offered), 'br')
  assert.equal(negotiate('br;q=0.1, gzip', offered), 'gzip')
  assert.equal(negotiate('gzip, br', offered), 'br', 'a tie goes to the first offered coding')
  assert.equal(negotiate('x-gzip', offered), 'gzip')
  assert.equal(negotiate('*;q=0.5, br;q=0', offered), 'gzip')
  assert.equal(negotiate('identity', offered), undefined)
  assert.equal(negotiate(undefined, offered), undefined)
})
