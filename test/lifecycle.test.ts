import { test } from 'node:test'
import assert from 'node:assert/strict'
import net from 'node:net'
import { join } from 'node:path'
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import type { ServerResponse } from 'node:http'
import { Pool, request } from 'undici'
import { stringify } from 'yaml'
import { startGateway, startUpstream, type TestGateway, type Upstream } from './helper.js'
import { route, until } from './core-helper.js'

const CLI = join(__dirname, '..', 'src', 'cli.js')

async function answering (t: { after: (fn: () => Promise<void>) => void }, body: string): Promise<Upstream> {
  return await startUpstream(t, (_req, res) => {
    res.setHeader('content-type', 'text/plain')
    res.end(body)
  })
}

/**
 * A gateway whose one request is held by a slow upstream while a reload swaps the route to an
 * upstream answering "new": the held request belongs to the old table.
 */
async function reloadWhileARequestIsHeld (t: { after: (fn: () => Promise<void>) => void }): Promise<{ gw: TestGateway, held: ServerResponse[], inflight: ReturnType<typeof request> }> {
  const held: ServerResponse[] = []
  let arrived: (() => void) | undefined
  const slow = await startUpstream(t, (_req, res) => { held.push(res); arrived?.() })
  const fresh = await answering(t, 'new')
  const gw = await startGateway(t, { routes: { svc: route('/svc', slow.url) } })
  const reached = new Promise<void>((resolve) => { arrived = resolve })
  const inflight = request(`${gw.url}/svc/slow`)
  await reached
  gw.writeRoute('svc', route('/svc', fresh.url))
  assert.equal((await gw.gateway.reload()).ok, true)
  return { gw, held, inflight }
}

test('reload under keep-alive traffic: zero failed requests, no dropped connection, the new table takes over', async (t) => {
  const v1 = await answering(t, 'v1')
  const v2 = await answering(t, 'v2')
  const gw = await startGateway(t, { routes: { svc: route('/svc', v1.url) } })
  let connections = 0
  gw.gateway.server.on('connection', () => { connections++ })

  const pool = new Pool(gw.url, { connections: 4, pipelining: 1 })
  t.after(async () => { await pool.close() })
  const PER_WORKER = 100
  const results: Array<{ status: number, body: string, afterReload: boolean }> = []
  const failures: unknown[] = []
  let reloaded = false
  let sent = 0
  let reloadStarted: (() => void) | undefined
  const halfway = new Promise<void>((resolve) => { reloadStarted = resolve })

  async function worker (): Promise<void> {
    for (let i = 0; i < PER_WORKER; i++) {
      const afterReload = reloaded
      try {
        const res = await pool.request({ path: '/svc/x', method: 'GET' })
        results.push({ status: res.statusCode, body: await res.body.text(), afterReload })
      } catch (err) {
        failures.push(err)
      }
      if (++sent === PER_WORKER) reloadStarted?.()
    }
  }
  const traffic = Promise.all([worker(), worker(), worker(), worker()])
  await halfway
  const versionBefore = gw.gateway.version
  gw.writeRoute('svc', route('/svc', v2.url))
  const result = await gw.gateway.reload()
  reloaded = true
  await traffic

  assert.equal(result.ok, true)
  assert.equal(result.version, versionBefore + 1)
  assert.deepEqual(failures, [])
  assert.equal(results.length, 4 * PER_WORKER)
  assert.deepEqual(results.filter((r) => r.status !== 200), [])
  assert.ok(results.some((r) => r.body === 'v1'), 'the old table served before the reload')
  const late = results.filter((r) => r.afterReload)
  assert.ok(late.length > 0)
  assert.deepEqual(late.filter((r) => r.body !== 'v2'), [], 'every request sent after reload() resolved got the new table')
  assert.equal(connections, 4, 'the keep-alive connections survived the swap')
})

test('a request in flight during a reload completes on the old table', async (t) => {
  const { gw, held, inflight } = await reloadWhileARequestIsHeld(t)
  assert.equal(await (await request(`${gw.url}/svc/x`)).body.text(), 'new')
  held[0].end('old, finished')
  const res = await inflight
  assert.equal(res.statusCode, 200)
  assert.equal(await res.body.text(), 'old, finished')
})

test('an invalid route file on reload keeps the old table and says why', async (t) => {
  const v1 = await answering(t, 'v1')
  const gw = await startGateway(t, { routes: { svc: route('/svc', v1.url) } })
  const before = gw.gateway.version
  gw.writeRoute('svc', { match: { prefix: '/svc', hostz: ['x'] }, upstream: { targets: [{ url: 'not a url' }] } })
  const result = await gw.gateway.reload()
  assert.equal(result.ok, false)
  assert.equal(result.version, before)
  assert.match(result.error ?? '', /svc\.yaml: \/match\/hostz: /)
  assert.match(result.error ?? '', /svc\.yaml: \/upstream\/targets\/0\/url: /)
  assert.equal(gw.gateway.version, before)
  const res = await request(`${gw.url}/svc/x`)
  assert.equal(res.statusCode, 200)
  assert.equal(await res.body.text(), 'v1')
  // The admin API reports the same refusal.
  const admin = await request(`${gw.adminUrl}/reload`, { method: 'POST' })
  assert.equal(admin.statusCode, 422)
  assert.equal(((await admin.body.json()) as { ok: boolean }).ok, false)
})

interface Child {
  proc: ChildProcess
  port: number
  /** Resolves with the first log line whose msg is `msg`. */
  logged: (msg: string) => Promise<Record<string, unknown>>
  exited: Promise<number | null>
}

/** Starts the real CLI on a temporary config and waits for its "listening" log line. */
async function startCli (t: { after: (fn: () => unknown) => void }, routes: Record<string, Record<string, unknown>>): Promise<Child & { dir: string }> {
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-cli-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  mkdirSync(join(dir, 'routes'))
  for (const [name, r] of Object.entries(routes)) writeFileSync(join(dir, 'routes', `${name}.yaml`), stringify(r))
  writeFileSync(join(dir, 'gatehouse.yaml'), stringify({
    listen: { host: '127.0.0.1', port: 0 },
    admin: { host: '127.0.0.1', port: 0 },
    limits: { shutdownTimeout: '20s' },
    logging: { level: 'info', accessLog: true }
  }))
  const proc = spawn(process.execPath, [CLI, 'start', '--config', join(dir, 'gatehouse.yaml')], { stdio: ['ignore', 'pipe', 'pipe'] })
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)))
  t.after(async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGKILL')
      await exited
    }
  })
  const lines: Array<Record<string, unknown>> = []
  const waiters: Array<{ msg: string, resolve: (l: Record<string, unknown>) => void }> = []
  let buffered = ''
  proc.stdout?.on('data', (chunk: Buffer) => {
    buffered += chunk.toString()
    let nl: number
    while ((nl = buffered.indexOf('\n')) !== -1) {
      const text = buffered.slice(0, nl)
      buffered = buffered.slice(nl + 1)
      try {
        const line = JSON.parse(text) as Record<string, unknown>
        lines.push(line)
        for (const w of waiters.filter((w) => w.msg === line.msg)) w.resolve(line)
      } catch {}
    }
  })
  let stderr = ''
  proc.stderr?.on('data', (c: Buffer) => { stderr += c.toString() })
  const logged = async (msg: string): Promise<Record<string, unknown>> => {
    const seen = lines.find((l) => l.msg === msg)
    if (seen !== undefined) return seen
    return await Promise.race([
      new Promise<Record<string, unknown>>((resolve) => waiters.push({ msg, resolve })),
      exited.then((code) => { throw new Error(`gatehouse exited (${String(code)}) before logging "${msg}": ${stderr}`) })
    ])
  }
  const listening = await logged('gatehouse listening')
  return { proc, port: (listening.address as { port: number }).port, logged, exited, dir }
}

async function refused (port: number): Promise<boolean> {
  return await new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1')
    s.once('connect', () => { s.destroy(); resolve(false) })
    s.once('error', (err: NodeJS.ErrnoException) => resolve(err.code === 'ECONNREFUSED'))
  })
}

test('SIGTERM drains: the in-flight request completes with 200, new connections are refused, exit code 0', async (t) => {
  const held: ServerResponse[] = []
  let arrived: (() => void) | undefined
  const slow = await startUpstream(t, (_req, res) => { held.push(res); arrived?.() })
  const gw = await startCli(t, { svc: route('/svc', slow.url) })
  const reached = new Promise<void>((resolve) => { arrived = resolve })
  const inflight = request(`http://127.0.0.1:${gw.port}/svc/slow`)
  await reached

  gw.proc.kill('SIGTERM')
  await gw.logged('shutting down: draining in-flight requests')
  // The listener closes at once, while the request is still held by the upstream.
  await until(async () => (await refused(gw.port)) ? true : undefined, 10_000)
  assert.equal(gw.proc.exitCode, null, 'still running while a request is in flight')

  held[0].end('finished during drain')
  const res = await inflight
  assert.equal(res.statusCode, 200)
  assert.equal(await res.body.text(), 'finished during drain')
  assert.equal(await gw.exited, 0)
  // Log lines are written in batches; what was still buffered at exit reached stdout all the same.
  const stdout = gw.proc.stdout as NodeJS.ReadableStream & { readableEnded: boolean }
  if (!stdout.readableEnded) await once(stdout, 'end')
  assert.equal((await gw.logged('request')).status, 200)
  await gw.logged('gatehouse stopped')
})

test('SIGHUP re-reads the route files in the running CLI', async (t) => {
  const v1 = await answering(t, 'v1')
  const v2 = await answering(t, 'v2')
  const gw = await startCli(t, { svc: route('/svc', v1.url) })
  const url = `http://127.0.0.1:${gw.port}/svc/x`
  assert.equal(await (await request(url)).body.text(), 'v1')
  writeFileSync(join(gw.dir, 'routes', 'svc.yaml'), stringify(route('/svc', v2.url)))
  gw.proc.kill('SIGHUP')
  await gw.logged('routes reloaded')
  assert.equal(await (await request(url)).body.text(), 'v2')
  gw.proc.kill('SIGTERM')
  assert.equal(await gw.exited, 0)
})

test('a keep-alive client gets Connection: close during the drain', async (t) => {
  const held: ServerResponse[] = []
  let arrived: (() => void) | undefined
  const slow = await startUpstream(t, (_req, res) => { held.push(res); arrived?.() })
  const gw = await startGateway(t, { routes: { svc: route('/svc', slow.url) } })
  const reached = new Promise<void>((resolve) => { arrived = resolve })
  const sock = net.connect(gw.port, '127.0.0.1')
  await once(sock, 'connect')
  const chunks: Buffer[] = []
  sock.on('data', (c: Buffer) => chunks.push(c))
  sock.write('GET /svc/a HTTP/1.1\r\nHost: gw.test\r\n\r\n')
  await reached
  const closing = gw.gateway.close()
  // Readiness turns to 503 as soon as the drain begins, so a load balancer stops sending.
  const ready = await request(`${gw.adminUrl}/readyz`)
  assert.equal(ready.statusCode, 503)
  assert.deepEqual(await ready.body.json(), { status: 'draining' })
  held[0].end('done')
  await once(sock, 'close')
  await closing
  const raw = Buffer.concat(chunks).toString()
  assert.match(raw, /^HTTP\/1\.1 200/)
  assert.match(raw, /\r\nconnection: close\r\n/i)
  assert.ok(raw.endsWith('done'))
})

test('a shutdown right after a reload also drains the requests of the old table', async (t) => {
  const { gw, held, inflight } = await reloadWhileARequestIsHeld(t)
  const closing = gw.gateway.close()
  // The listener is closed at once; the old table's request is still held.
  await until(async () => (await refused(gw.port)) ? true : undefined, 10_000)
  held[0].end('old table, drained')
  const res = await inflight
  assert.equal(res.statusCode, 200)
  assert.equal(await res.body.text(), 'old table, drained')
  await closing
})

test('a reload during shutdown is refused and leaves nothing running', async (t) => {
  const v1 = await answering(t, 'v1')
  const gw = await startGateway(t, { routes: { svc: route('/svc', v1.url) } })
  const reloading = gw.gateway.reload()
  const closing = gw.gateway.close()
  const during = await reloading
  await closing
  // Either the reload finished before the shutdown began, or it was refused; never a new table after it.
  if (!during.ok) assert.match(during.error ?? '', /shutting down/)
  const after = await gw.gateway.reload()
  assert.equal(after.ok, false)
  assert.match(after.error ?? '', /shutting down/)
})
