import { test } from 'node:test'
import assert from 'node:assert/strict'
import http from 'node:http'
import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import { stringify } from 'yaml'
import { freePort, startUpstream } from './helper.js'
import { parseWorkers } from '../src/cluster.js'

const CLI = resolve(__dirname, '..', 'src', 'cli.js')

interface LogLine { msg?: string, pid?: number, worker?: number, [k: string]: unknown }

interface Cluster {
  child: ChildProcess
  url: string
  adminUrl: string
  dir: string
  /** Resolves with the first log line (already seen or coming) that matches. */
  waitFor: (match: (line: LogLine) => boolean, what: string) => Promise<LogLine>
  exited: Promise<number | null>
}

/** Runs `gatehouse start --workers N` as a real process on free loopback ports. */
async function startCluster (t: { after: (fn: () => Promise<void> | void) => void }, routes: Record<string, Record<string, unknown>>, workers = 2): Promise<Cluster> {
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-cluster-'))
  mkdirSync(join(dir, 'routes'))
  for (const [name, route] of Object.entries(routes)) writeFileSync(join(dir, 'routes', `${name}.yaml`), stringify(route))
  const port = await freePort()
  const adminPort = await freePort()
  writeFileSync(join(dir, 'gatehouse.yaml'), stringify({
    listen: { host: '127.0.0.1', port },
    admin: { host: '127.0.0.1', port: adminPort },
    routes: './routes',
    logging: { level: 'info', accessLog: false },
    metrics: { onMainListener: true },
    limits: { shutdownTimeout: '20s' }
  }))
  const child = spawn(process.execPath, [CLI, 'start', '--config', join(dir, 'gatehouse.yaml'), '--workers', String(workers)], { stdio: ['ignore', 'pipe', 'pipe'] })
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)))
  const lines: LogLine[] = []
  const waiters: Array<{ match: (l: LogLine) => boolean, resolve: (l: LogLine) => void }> = []
  let stderr = ''
  child.stderr?.on('data', (c: Buffer) => { stderr += c.toString() })
  createInterface({ input: child.stdout as NodeJS.ReadableStream }).on('line', (text) => {
    let line: LogLine
    try { line = JSON.parse(text) as LogLine } catch { return }
    lines.push(line)
    for (const w of [...waiters]) {
      if (w.match(line)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(line) }
    }
  })
  const waitFor = async (match: (l: LogLine) => boolean, what: string): Promise<LogLine> => {
    const seen = lines.find(match)
    if (seen !== undefined) return seen
    return await Promise.race([
      new Promise<LogLine>((resolve) => waiters.push({ match, resolve })),
      exited.then((code) => { throw new Error(`gatehouse exited (${String(code)}) before ${what}: ${stderr}`) })
    ])
  }
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL')
      await exited
    }
    // Workers of a killed primary see the IPC channel close and drain themselves.
    rmSync(dir, { recursive: true, force: true })
  })
  await waitFor((l) => l.msg === 'gatehouse cluster started', 'start')
  return { child, url: `http://127.0.0.1:${port}`, adminUrl: `http://127.0.0.1:${adminPort}`, dir, waitFor, exited }
}

/** A GET on a new connection each time, so Node's round-robin spreads requests over the workers. */
async function get (url: string): Promise<{ status: number, body: string }> {
  return await new Promise((resolve, reject) => {
    http.get(url, { agent: false, headers: { connection: 'close' } }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString() }))
    }).on('error', reject)
  })
}

async function requestsTotal (adminUrl: string, route: string): Promise<number> {
  const { status, body } = await get(`${adminUrl}/metrics`)
  assert.equal(status, 200)
  const re = new RegExp(`^gatehouse_requests_total\\{route="${route}",method="GET",status="200"\\} (\\d+)$`, 'm')
  return Number(re.exec(body)?.[1] ?? 0)
}

test('--workers: auto is the number of cores; anything but a positive integer is refused', () => {
  assert.equal(parseWorkers(undefined), 1)
  assert.equal(parseWorkers('3'), 3)
  assert.ok(parseWorkers('auto') >= 1)
  for (const bad of ['0', '-1', '1.5', 'many', '']) assert.throws(() => parseWorkers(bad), /--workers/)
})

test('--workers 2 serves on one port, aggregates /metrics, survives a killed worker and reloads every worker on SIGHUP', async (t) => {
  const up = await startUpstream(t, (req, res) => {
    const body = JSON.stringify({ url: req.url })
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), 'cache-control': 'public, max-age=60' })
    res.end(body)
  })
  const cluster = await startCluster(t, {
    svc: { match: { prefix: '/svc' }, upstream: { targets: [{ url: up.url }] } },
    cached: { match: { prefix: '/cached' }, upstream: { targets: [{ url: up.url }] }, cache: { enabled: true } }
  })

  const workers = JSON.parse((await get(`${cluster.adminUrl}/workers`)).body) as { workers: Array<{ pid: number, ready: boolean }> }
  assert.equal(workers.workers.length, 2)
  assert.ok(workers.workers.every((w) => w.ready))
  assert.equal((await get(`${cluster.adminUrl}/readyz`)).status, 200)

  for (let i = 0; i < 10; i++) assert.equal((await get(`${cluster.url}/svc/a`)).status, 200)
  // Round-robin gave each worker about half: only a sum over both registries says 10.
  assert.equal(await requestsTotal(cluster.adminUrl, 'svc'), 10)
  // metrics.onMainListener: a worker's own /metrics serves the same aggregate.
  const main = await get(`${cluster.url}/metrics`)
  assert.match(main.body, /^gatehouse_requests_total\{route="svc",method="GET",status="200"\} 10$/m)

  const victim = workers.workers[0].pid
  process.kill(victim, 'SIGKILL')
  await cluster.waitFor((l) => l.msg === 'worker died, restarting it' && l.pid === victim, 'the worker death was noticed')
  // The survivor serves while the replacement starts.
  for (let i = 0; i < 4; i++) assert.equal((await get(`${cluster.url}/svc/b`)).status, 200)
  const replacement = await cluster.waitFor((l) => l.msg === 'worker ready' && typeof l.pid === 'number' && !workers.workers.some((w) => w.pid === l.pid), 'a new worker')
  for (let i = 0; i < 4; i++) assert.equal((await get(`${cluster.url}/svc/c`)).status, 200)
  const after = JSON.parse((await get(`${cluster.adminUrl}/workers`)).body) as { workers: Array<{ pid: number }>, restarts: number }
  assert.deepEqual(after.workers.map((w) => w.pid).sort(), [workers.workers[1].pid, replacement.pid].sort())
  assert.equal(after.restarts, 1)
  // The dead worker's requests are still counted: the total never goes backwards.
  assert.equal(await requestsTotal(cluster.adminUrl, 'svc'), 18)

  // Admin requests other than /metrics, /readyz and /reload are the workers': reads from one...
  const upstreams = await get(`${cluster.adminUrl}/upstreams`)
  assert.equal(upstreams.status, 200)
  assert.deepEqual((JSON.parse(upstreams.body) as { routes: Array<{ route: string }> }).routes.map((r) => r.route).sort(), ['cached', 'svc'])
  // ...writes to all: each worker has its own memory cache, and a purge must empty every one.
  // Sequential new connections alternate between the two workers: each misses once, then hits.
  const xcache = async (): Promise<string> => await new Promise((resolve, reject) => {
    http.get(`${cluster.url}/cached/item`, { agent: false }, (res) => { res.resume(); res.on('end', () => resolve(String(res.headers['x-cache']))) }).on('error', reject)
  })
  assert.deepEqual([await xcache(), await xcache(), await xcache(), await xcache()], ['MISS', 'MISS', 'HIT', 'HIT'])
  const purge = await new Promise<number>((resolve, reject) => {
    const req = http.request(`${cluster.adminUrl}/cache/purge`, { method: 'POST', agent: false, headers: { 'content-type': 'application/json' } }, (res) => { res.resume(); resolve(res.statusCode ?? 0) })
    req.on('error', reject)
    req.end(JSON.stringify({ route: 'cached' }))
  })
  assert.equal(purge, 200)
  assert.deepEqual([await xcache(), await xcache()], ['MISS', 'MISS'], 'both workers dropped their copy')

  writeFileSync(join(cluster.dir, 'routes', 'extra.yaml'), stringify({ match: { prefix: '/extra' }, upstream: { targets: [{ url: up.url }] } }))
  assert.equal((await get(`${cluster.url}/extra/x`)).status, 404)
  cluster.child.kill('SIGHUP')
  await cluster.waitFor((l) => l.msg === 'routes reloaded in every worker', 'the reload')
  // Every worker has the new route: new connections land on both.
  for (let i = 0; i < 6; i++) assert.equal((await get(`${cluster.url}/extra/x`)).status, 200)
  const ready = JSON.parse((await get(`${cluster.adminUrl}/readyz`)).body) as { version: number, routes: number }
  assert.equal(ready.version, 2)
  assert.equal(ready.routes, 3)
})

test('SIGTERM to the primary: every worker finishes its in-flight request, then the primary exits 0', async (t) => {
  const held: http.ServerResponse[] = []
  let arrived: (() => void) | undefined
  const up = await startUpstream(t, (_req, res) => {
    held.push(res)
    arrived?.()
  })
  const cluster = await startCluster(t, { slow: { match: { prefix: '/slow' }, upstream: { targets: [{ url: up.url }] } } })

  const inflight = new Promise<void>((resolve) => { arrived = resolve })
  const pending = get(`${cluster.url}/slow/x`)
  await inflight
  cluster.child.kill('SIGTERM')
  await cluster.waitFor((l) => l.msg === 'shutting down: workers drain in-flight requests', 'the drain')
  assert.equal(cluster.child.exitCode, null, 'the primary waits for its workers')
  const body = 'finished after SIGTERM'
  held[0].writeHead(200, { 'content-type': 'text/plain', 'content-length': String(body.length) })
  held[0].end(body)
  assert.deepEqual(await pending, { status: 200, body })
  assert.equal(await cluster.exited, 0)
})
