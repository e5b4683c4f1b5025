import { test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import { request } from 'undici'
import { stringify } from 'yaml'
import { freePort, startRedis, startUpstream } from './helper.js'

const CLI = resolve(__dirname, '..', 'src', 'cli.js')

/** One gateway process (`gatehouse start`) on free loopback ports; resolves once it listens. */
async function startProcess (t: { after: (fn: () => Promise<void> | void) => void }, config: Record<string, unknown>, routes: Record<string, Record<string, unknown>>): Promise<string> {
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-scale-'))
  mkdirSync(join(dir, 'routes'))
  for (const [name, route] of Object.entries(routes)) writeFileSync(join(dir, 'routes', `${name}.yaml`), stringify(route))
  const port = await freePort()
  writeFileSync(join(dir, 'gatehouse.yaml'), stringify({ ...config, listen: { host: '127.0.0.1', port }, admin: false, routes: './routes', logging: { level: 'info', accessLog: false } }))
  const child = spawn(process.execPath, [CLI, 'start', '--config', join(dir, 'gatehouse.yaml')], { stdio: ['ignore', 'pipe', 'pipe'] })
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)))
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM')
      await exited
    }
    rmSync(dir, { recursive: true, force: true })
  })
  let stderr = ''
  child.stderr?.on('data', (c: Buffer) => { stderr += c.toString() })
  const lines = createInterface({ input: child.stdout as NodeJS.ReadableStream })
  await Promise.race([
    new Promise<void>((resolve) => lines.on('line', (l) => { if (l.includes('"gatehouse listening"')) resolve() })),
    exited.then((code) => { throw new Error(`gateway exited (${String(code)}): ${stderr}`) })
  ])
  return `http://127.0.0.1:${port}`
}

test('two gateway processes sharing one Redis enforce one rate limit and share one cache entry', async (t) => {
  const redis = await startRedis(t)
  const up = await startUpstream(t, (req, res) => {
    const body = JSON.stringify({ url: req.url })
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), 'cache-control': 'public, max-age=60' })
    res.end(body)
  })
  const config = { redis: { url: redis.url, keyPrefix: 'scale-test:' }, cache: { store: 'redis' } }
  const routes = {
    limited: { match: { prefix: '/limited' }, upstream: { targets: [{ url: up.url }] }, rateLimit: { max: 4, window: '1m', key: 'ip' } },
    cached: { match: { prefix: '/cached' }, upstream: { targets: [{ url: up.url }] }, cache: { enabled: true } }
  }
  const [a, b] = await Promise.all([startProcess(t, config, routes), startProcess(t, config, routes)])

  // Four requests, two through each instance: each instance alone has seen only two of its four.
  for (const base of [a, b, a, b]) {
    const res = await request(`${base}/limited/x`)
    await res.body.dump()
    assert.equal(res.statusCode, 200)
  }
  for (const base of [a, b]) {
    const res = await request(`${base}/limited/x`)
    const body = await res.body.json() as { code: string }
    assert.equal(res.statusCode, 429, `${base} counts the other instance's requests`)
    assert.equal(body.code, 'GATEHOUSE_RATE_LIMITED')
    assert.ok(Number(res.headers['retry-after']) > 0)
  }
  const limitedHits = up.received.filter((r) => r.url.startsWith('/x')).length
  assert.equal(limitedHits, 4)

  const first = await request(`${a}/cached/item?id=1`)
  assert.equal(first.statusCode, 200)
  assert.equal(first.headers['x-cache'], 'MISS')
  const firstBody = await first.body.text()
  const second = await request(`${b}/cached/item?id=1`)
  assert.equal(second.statusCode, 200)
  assert.equal(second.headers['x-cache'], 'HIT', 'the entry stored by one instance is served by the other')
  assert.equal(await second.body.text(), firstBody)
  assert.equal(up.received.filter((r) => r.url.startsWith('/item')).length, 1)
})
