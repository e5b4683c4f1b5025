import http2 from 'node:http2'
import autocannon from 'autocannon'
import { Pool } from 'undici'
import * as hdr from 'hdr-histogram-js'

/*
 * The load generator, run as its own process (pinned to another core than the gateway's) so it
 * never competes with the process it measures. The parent sends one `run` message per
 * measurement and gets a `result` back. Closed-loop HTTP/1.1 and TLS runs go through autocannon;
 * autocannon does not speak HTTP/2, so h2 uses a small client on node:http2. Fixed-rate runs are
 * open loop and evenly paced (every 10 ms) on undici or node:http2: autocannon's own rate limit
 * sends each second's quota in one burst, which measures its bursts rather than the proxy.
 * Latencies are recorded in microseconds from each response's own timing (autocannon's own
 * histogram has whole-millisecond resolution, too coarse for a proxy that adds ~0.1 ms).
 */

export interface LoadRequest {
  url: string
  headers?: Record<string, string>
  connections: number
  /** seconds */
  duration: number
  /** requests per second across all connections; 0 = as fast as possible (closed loop) */
  rate: number
  h2?: boolean
}

export interface LoadResult {
  requests: number
  /** requests per second over the run */
  rps: number
  /** ms */
  p50: number
  p90: number
  p99: number
  max: number
  non2xx: number
  errors: number
  timeouts: number
  seconds: number
}

function histogram (): hdr.Histogram {
  return hdr.build({ lowestDiscernibleValue: 1, highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: 3 })
}

function summarize (h: hdr.Histogram, requests: number, seconds: number, non2xx: number, errors: number, timeouts: number): LoadResult {
  const ms = (us: number): number => Math.round(us) / 1000
  return {
    requests,
    rps: Math.round(requests / seconds),
    p50: ms(h.getValueAtPercentile(50)),
    p90: ms(h.getValueAtPercentile(90)),
    p99: ms(h.getValueAtPercentile(99)),
    max: ms(h.maxValue),
    non2xx,
    errors,
    timeouts,
    seconds
  }
}

async function runH1 (req: LoadRequest): Promise<LoadResult> {
  const h = histogram()
  let ok = 0
  let non2xx = 0
  const started = process.hrtime.bigint()
  let done!: (r: { err?: Error, result?: autocannon.Result }) => void
  const finished = new Promise<{ err?: Error, result?: autocannon.Result }>((resolve) => { done = resolve })
  const instance = autocannon({
    url: req.url,
    headers: req.headers,
    connections: req.connections,
    duration: req.duration,
    ...(req.rate > 0 ? { overallRate: req.rate } : {}),
    // The gateway's TLS certificate is self-signed; autocannon does not verify it anyway.
    timeout: 10
  } as autocannon.Options, (err: Error | null, result: autocannon.Result) => { done({ err: err ?? undefined, result }) })
  instance.on('response', (_client: unknown, statusCode: number, _bytes: number, responseTime: number) => {
    if (statusCode >= 200 && statusCode < 300) {
      ok++
      h.recordValue(Math.max(1, Math.round(responseTime * 1000)))
    } else {
      non2xx++
    }
  })
  const { err, result } = await finished
  if (err !== undefined || result === undefined) throw err ?? new Error('autocannon gave no result')
  const seconds = Number(process.hrtime.bigint() - started) / 1e9
  return summarize(h, ok + non2xx, Math.min(seconds, result.duration > 0 ? result.duration : seconds), non2xx, result.errors, result.timeouts)
}

/** A minimal h2 load generator: `connections` concurrent streams over a few sessions. */
async function runH2 (req: LoadRequest): Promise<LoadResult> {
  const url = new URL(req.url)
  const sessions = Array.from({ length: Math.min(4, req.connections) }, () => http2.connect(url.origin, { rejectUnauthorized: false }))
  await Promise.all(sessions.map(async (s) => await new Promise<void>((resolve, reject) => {
    s.once('connect', () => resolve())
    s.once('error', reject)
  })))
  const h = histogram()
  let requests = 0
  let non2xx = 0
  let errors = 0
  const headers = { ':method': 'GET', ':path': url.pathname + url.search, ...req.headers }
  const deadline = Date.now() + req.duration * 1000
  const started = process.hrtime.bigint()
  let n = 0

  const one = async (): Promise<void> => await new Promise<void>((resolve) => {
    const session = sessions[n++ % sessions.length]
    const t0 = process.hrtime.bigint()
    const stream = session.request(headers)
    let status = 0
    stream.on('response', (hs) => { status = Number(hs[':status']) })
    stream.on('data', () => {})
    stream.on('end', () => {
      requests++
      if (status >= 200 && status < 300) h.recordValue(Math.max(1, Number(process.hrtime.bigint() - t0) / 1000 | 0))
      else non2xx++
      resolve()
    })
    stream.on('error', () => { errors++; resolve() })
  })

  if (req.rate > 0) {
    await paced(req.rate, deadline, one)
  } else {
    await Promise.all(Array.from({ length: req.connections }, async () => {
      while (Date.now() < deadline) await one()
    }))
  }
  const seconds = Number(process.hrtime.bigint() - started) / 1e9
  for (const s of sessions) s.close()
  return summarize(h, requests, seconds, non2xx, errors, 0)
}

/** Open loop: `rate` requests per second, issued every 10 ms whatever the responses do. */
async function paced (rate: number, deadline: number, one: () => Promise<void>): Promise<void> {
  const pending = new Set<Promise<void>>()
  const perTick = rate / 100
  let owed = 0
  await new Promise<void>((resolve) => {
    const timer = setInterval(() => {
      if (Date.now() >= deadline) { clearInterval(timer); resolve(); return }
      owed += perTick
      for (; owed >= 1; owed--) {
        const p = one()
        pending.add(p)
        void p.then(() => pending.delete(p))
      }
    }, 10)
  })
  await Promise.all(pending)
}

/** Fixed-rate HTTP/1.1 (and TLS) on an undici pool of `connections` keep-alive connections. */
async function runH1Paced (req: LoadRequest): Promise<LoadResult> {
  const url = new URL(req.url)
  const pool = new Pool(url.origin, { connections: req.connections, connect: { rejectUnauthorized: false } })
  const h = histogram()
  let requests = 0
  let non2xx = 0
  let errors = 0
  const started = process.hrtime.bigint()
  const one = async (): Promise<void> => {
    const t0 = process.hrtime.bigint()
    try {
      const res = await pool.request({ path: url.pathname + url.search, method: 'GET', headers: req.headers })
      await res.body.dump()
      requests++
      if (res.statusCode >= 200 && res.statusCode < 300) h.recordValue(Math.max(1, Number(process.hrtime.bigint() - t0) / 1000 | 0))
      else non2xx++
    } catch {
      errors++
    }
  }
  await paced(req.rate, Date.now() + req.duration * 1000, one)
  const seconds = Number(process.hrtime.bigint() - started) / 1e9
  await pool.close()
  return summarize(h, requests, seconds, non2xx, errors, 0)
}

process.on('message', (msg: { type: string, id: number, request: LoadRequest }) => {
  if (msg.type !== 'run') return
  const run = msg.request.h2 === true ? runH2 : msg.request.rate > 0 ? runH1Paced : runH1
  run(msg.request).then(
    (result) => process.send?.({ type: 'result', id: msg.id, result }),
    (err: Error) => process.send?.({ type: 'result', id: msg.id, error: err.message })
  )
})
process.on('disconnect', () => process.exit(0))
process.send?.({ type: 'ready' })
