import { test } from 'node:test'
import assert from 'node:assert/strict'
import net from 'node:net'
import v8 from 'node:v8'
import vm from 'node:vm'
import { once } from 'node:events'
import { createHash, randomBytes } from 'node:crypto'
import { Readable } from 'node:stream'
import type { IncomingMessage, ServerResponse } from 'node:http'
import { request } from 'undici'
import { startGateway, startUpstream } from './helper.js'
import { route } from './core-helper.js'

const MiB = 1024 * 1024
const SIZE = 20 * MiB
const CHUNK = 64 * 1024

v8.setFlagsFromString('--expose-gc')
const gc = vm.runInNewContext('gc') as () => void

/** Bytes seen so far by one side of a transfer, with promises for thresholds. */
class Progress {
  bytes = 0
  private waiters: Array<{ at: number, resolve: () => void }> = []
  add (n: number): void {
    this.bytes += n
    this.waiters = this.waiters.filter((w) => {
      if (this.bytes < w.at) return true
      w.resolve()
      return false
    })
  }

  async reach (at: number): Promise<void> {
    if (this.bytes >= at) return
    await new Promise<void>((resolve) => this.waiters.push({ at, resolve }))
  }
}

/**
 * Live (post-GC) external memory growth, where Buffers live. Gateway, upstream and client share
 * the process, so the figure is an upper bound for the gateway; a body held whole would add 20 MiB.
 */
async function settledExternal (): Promise<number> {
  // V8 frees array buffers concurrently after a GC: collect twice across a macrotask.
  gc()
  await new Promise((resolve) => setImmediate(resolve))
  gc()
  return process.memoryUsage().arrayBuffers
}

async function makeProbe (): Promise<{ sample: () => Promise<void>, peak: () => number }> {
  const base = await settledExternal()
  let peak = 0
  return {
    sample: async () => { peak = Math.max(peak, await settledExternal() - base) },
    peak: () => peak
  }
}

/**
 * A body of random chunks. Halfway it waits for `gate` (the other side's progress), so a gateway
 * that buffered the whole body before forwarding it would never complete; `onChunk` sees the
 * running total. `digest()` is the sha256 of what was produced.
 */
async function deadline<T> (p: Promise<T>, ms: number, message: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([p, new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(new Error(message)), ms) })])
  } finally {
    clearTimeout(timer)
  }
}

function randomBody (size: number, gate?: () => Promise<void>): { stream: Readable, digest: () => string } {
  const hash = createHash('sha256')
  async function * chunks (): AsyncGenerator<Buffer> {
    let produced = 0
    while (produced < size) {
      if (gate !== undefined && produced === size / 2) await deadline(gate(), 15_000, 'the other side got nothing of the first half: is the body buffered whole?')
      const chunk = randomBytes(Math.min(CHUNK, size - produced))
      produced += chunk.length
      hash.update(chunk)
      yield chunk
    }
  }
  return { stream: Readable.from(chunks(), { objectMode: false }), digest: () => hash.digest('hex') }
}

/** One small transfer first, so one-time allocations (pools, parsers) are not counted. */
async function warmUp (url: string): Promise<void> {
  const res = await request(url, { method: 'PUT', body: randomBytes(256 * 1024) })
  await res.body.dump()
}

for (const framing of ['content-length', 'chunked'] as const) {
  test(`a 20 MiB upload (${framing}) streams through intact without the gateway holding it`, async (t) => {
    const received = new Progress()
    let upstreamResult: { bytes: number, sha256: string, te: string | null, length: string | null } | undefined
    const up = await startUpstream(t, (req, res) => {
      if (req.url === '/warm') {
        req.resume()
        req.on('end', () => res.end())
        return
      }
      const hash = createHash('sha256')
      let slowed = 0
      req.on('data', (c: Buffer) => {
        hash.update(c)
        received.add(c.length)
        // A slow reader now and then: the gateway must pause the client, not buffer for us.
        if (received.bytes >= ++slowed * 4 * MiB) {
          req.pause()
          setTimeout(() => req.resume(), 20)
        }
      })
      req.on('end', () => {
        upstreamResult = { bytes: received.bytes, sha256: hash.digest('hex'), te: req.headers['transfer-encoding'] ?? null, length: req.headers['content-length'] ?? null }
        res.end('stored')
      })
    })
    const gw = await startGateway(t, { routes: { up: route('/up', up.url, { bodyLimit: '50MiB' }) } })
    await warmUp(`${gw.url}/up/warm`)
    const probe = await makeProbe()
    // The client sends the second half only once the upstream has received a quarter.
    const body = randomBody(SIZE, async () => { await received.reach(SIZE / 4) })
    const checkpoints = Promise.all([SIZE / 4, SIZE / 2, (3 * SIZE) / 4].map(async (at) => { await received.reach(at); await probe.sample() }))
    const res = await request(`${gw.url}/up/file`, {
      method: 'PUT',
      body: body.stream,
      headers: { 'content-type': 'application/octet-stream', ...(framing === 'content-length' ? { 'content-length': String(SIZE) } : {}) }
    })
    assert.equal(res.statusCode, 200)
    assert.equal(await res.body.text(), 'stored')
    await checkpoints
    assert.equal(upstreamResult?.bytes, SIZE)
    assert.equal(upstreamResult?.sha256, body.digest())
    if (framing === 'content-length') assert.equal(upstreamResult?.length, String(SIZE))
    else assert.equal(upstreamResult?.te, 'chunked')
    t.diagnostic(`peak live external memory growth mid-transfer: ${(probe.peak() / MiB).toFixed(2)} MiB`)
    assert.ok(probe.peak() < 8 * MiB, `live external memory grew by ${(probe.peak() / MiB).toFixed(1)} MiB`)
  })
}

test('a 20 MiB download streams through intact, with backpressure, without the gateway holding it', async (t) => {
  const got = new Progress()
  let sent: (() => string) | undefined
  const up = await startUpstream(t, (req, res) => {
    if (req.url === '/warm') {
      req.resume()
      req.on('end', () => res.end())
      return
    }
    // The upstream sends the second half only once the client has received a quarter.
    const body = randomBody(SIZE, async () => { await got.reach(SIZE / 4) })
    sent = body.digest
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(SIZE) })
    body.stream.pipe(res)
  })
  const gw = await startGateway(t, { routes: { down: route('/down', up.url) } })
  await warmUp(`${gw.url}/down/warm`)
  const probe = await makeProbe()
  const hash = createHash('sha256')
  const res = await request(`${gw.url}/down/file`)
  assert.equal(res.statusCode, 200)
  assert.equal(res.headers['content-length'], String(SIZE))
  const marks = [SIZE / 4, SIZE / 2, (3 * SIZE) / 4]
  for await (const chunk of res.body) {
    hash.update(chunk as Buffer)
    got.add((chunk as Buffer).length)
    if (marks.length > 0 && got.bytes >= marks[0]) {
      marks.shift()
      await probe.sample()
      // A slow reader for a moment: the gateway must pause the upstream, not buffer for us.
      await new Promise((resolve) => setTimeout(resolve, 20))
    }
  }
  assert.equal(got.bytes, SIZE)
  assert.equal(hash.digest('hex'), sent?.())
  t.diagnostic(`peak live external memory growth mid-transfer: ${(probe.peak() / MiB).toFixed(2)} MiB`)
  assert.ok(probe.peak() < 8 * MiB, `live external memory grew by ${(probe.peak() / MiB).toFixed(1)} MiB`)
})

/** Resolves when `emitter` emits `event`, or rejects after `ms`. */
async function within (emitter: NodeJS.EventEmitter, event: string, ms: number, what: string): Promise<void> {
  let timer: NodeJS.Timeout | undefined
  try {
    await Promise.race([
      // Not events.once(): it rejects on 'error', and an aborted upstream request emits one first.
      new Promise((resolve) => emitter.once(event, resolve)),
      new Promise((_resolve, reject) => { timer = setTimeout(() => reject(new Error(`${what}: no '${event}' within ${ms} ms`)), ms) })
    ])
  } finally {
    clearTimeout(timer)
  }
}

test('a client that disconnects while the upstream holds the request aborts the upstream request', async (t) => {
  const arrived: Array<{ req: IncomingMessage, res: ServerResponse }> = []
  let notify: (() => void) | undefined
  const up = await startUpstream(t, (req, res) => { arrived.push({ req, res }); notify?.() })
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url) } })
  const reached = new Promise<void>((resolve) => { notify = resolve })
  const sock = net.connect(gw.port, '127.0.0.1')
  await once(sock, 'connect')
  sock.write('GET /svc/hold HTTP/1.1\r\nHost: gw.test\r\n\r\n')
  await reached
  const closed = within(arrived[0].res, 'close', 5000, 'upstream response')
  sock.destroy()
  await closed
  assert.equal(arrived[0].res.writableFinished, false, 'the upstream never finished answering')
})

test('a client that disconnects mid-download aborts the upstream response', async (t) => {
  let upstreamRes: ServerResponse | undefined
  let notify: (() => void) | undefined
  const up = await startUpstream(t, (_req, res) => {
    upstreamRes = res
    res.writeHead(200, { 'content-type': 'application/octet-stream' })
    // An endless body, written with backpressure.
    const chunk = Buffer.alloc(CHUNK, 'd')
    const pump = (): void => {
      while (!res.destroyed && res.write(chunk));
      if (!res.destroyed) res.once('drain', pump)
    }
    pump()
    notify?.()
  })
  const gw = await startGateway(t, { routes: { svc: route('/svc', up.url) } })
  const started = new Promise<void>((resolve) => { notify = resolve })
  const sock = net.connect(gw.port, '127.0.0.1')
  await once(sock, 'connect')
  sock.write('GET /svc/endless HTTP/1.1\r\nHost: gw.test\r\n\r\n')
  await once(sock, 'data')
  await started
  const closed = within(upstreamRes as ServerResponse, 'close', 5000, 'upstream response')
  sock.destroy()
  await closed
  assert.equal(upstreamRes?.writableFinished, false)
})

for (const framing of ['content-length', 'chunked'] as const) {
  test(`a client that disconnects mid-upload (${framing}) aborts the upstream request, which never sees the body end`, async (t) => {
    let upstreamReq: IncomingMessage | undefined
    let ended = false
    let notify: (() => void) | undefined
    const up = await startUpstream(t, (req, res) => {
      upstreamReq = req
      req.on('error', () => {}) // 'aborted': what the test wants to see
      req.once('data', () => notify?.())
      req.on('end', () => { ended = true; res.end() })
      req.resume()
    })
    const gw = await startGateway(t, { routes: { svc: route('/svc', up.url) } })
    const flowing = new Promise<void>((resolve) => { notify = resolve })
    const sock = net.connect(gw.port, '127.0.0.1')
    await once(sock, 'connect')
    sock.on('error', () => {})
    // The gateway runs in this process: an 'aborted' stream error nobody listens to fails the test.
    if (framing === 'content-length') {
      sock.write('POST /svc/upload HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 1000000\r\n\r\n')
      sock.write(Buffer.alloc(100_000, 'u'))
    } else {
      sock.write(`POST /svc/upload HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n${(100_000).toString(16)}\r\n`)
      sock.write(Buffer.alloc(100_000, 'u'))
    }
    await flowing
    const closed = within(upstreamReq as IncomingMessage, 'close', 5000, 'upstream request')
    sock.destroy()
    await closed
    assert.equal(ended, false)
    assert.equal(upstreamReq?.complete, false)
  })
}
