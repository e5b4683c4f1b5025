import http from 'node:http'
import net from 'node:net'
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import type { TestContext } from 'node:test'
import pino from 'pino'
import { stringify } from 'yaml'
import { GatewayServer } from '../src/server.js'

type Cleanup = TestContext['after']

/** A real upstream server on a free loopback port, counting the requests it got. */
export interface Upstream {
  server: http.Server
  port: number
  url: string
  /** Requests received so far (method, url, headers), in order. */
  received: Array<{ method: string, url: string, headers: http.IncomingHttpHeaders, rawHeaders: string[] }>
  close: () => Promise<void>
}

export async function startUpstream (t: { after: Cleanup }, handler: http.RequestListener = defaultHandler): Promise<Upstream> {
  const received: Upstream['received'] = []
  const server = http.createServer((req, res) => {
    received.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers, rawHeaders: req.rawHeaders })
    handler(req, res)
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const port = (server.address() as net.AddressInfo).port
  const close = async (): Promise<void> => {
    if (!server.listening) return
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  }
  t.after(close)
  return { server, port, url: `http://127.0.0.1:${port}`, received, close }
}

/** Answers JSON describing what arrived: method, url and headers. */
export function defaultHandler (req: http.IncomingMessage, res: http.ServerResponse): void {
  const body = JSON.stringify({ method: req.method, url: req.url, headers: req.headers })
  res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) })
  res.end(body)
}

export interface TestGateway {
  gateway: GatewayServer
  url: string
  port: number
  adminUrl: string
  dir: string
  routesDir: string
  /** Rewrites (or adds) one route file; call gateway.reload() to apply. */
  writeRoute: (name: string, route: Record<string, unknown>) => void
  close: () => Promise<void>
}

export interface GatewayFixture {
  /** Route files by file name (without extension), written as YAML. */
  routes: Record<string, Record<string, unknown>>
  /** gatehouse.yaml settings; listen and admin default to port 0 on loopback. */
  config?: Record<string, unknown>
  env?: NodeJS.ProcessEnv
  /** The gateway's logger; silent when omitted (access-log tests pass one that records lines). */
  logger?: pino.Logger
}

/** A gateway on free loopback ports, built from route objects written to a temporary directory. */
export async function startGateway (t: { after: Cleanup }, fixture: GatewayFixture): Promise<TestGateway> {
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-test-'))
  const routesDir = join(dir, 'routes')
  const { mkdirSync } = await import('node:fs')
  mkdirSync(routesDir)
  const writeRoute = (name: string, route: Record<string, unknown>): void => {
    writeFileSync(join(routesDir, `${name}.yaml`), stringify(route))
  }
  for (const [name, route] of Object.entries(fixture.routes)) writeRoute(name, route)
  const config = {
    listen: { host: '127.0.0.1', port: 0 },
    admin: { host: '127.0.0.1', port: 0 },
    routes: './routes',
    ...fixture.config
  }
  writeFileSync(join(dir, 'gatehouse.yaml'), stringify(config))
  const gateway = new GatewayServer({ configFile: join(dir, 'gatehouse.yaml'), logger: fixture.logger ?? pino({ level: 'silent' }), env: { ...process.env, ...fixture.env } })
  await gateway.start()
  const port = gateway.address().port
  const admin = gateway.adminAddress()
  let closed = false
  const close = async (): Promise<void> => {
    if (closed) return
    closed = true
    await gateway.close()
    rmSync(dir, { recursive: true, force: true })
  }
  t.after(close)
  return { gateway, url: `http://127.0.0.1:${port}`, port, adminUrl: admin !== undefined ? `http://127.0.0.1:${admin.port}` : '', dir, routesDir, writeRoute, close }
}

/** A free TCP port on loopback (for servers that cannot listen on port 0, such as redis-server). */
export async function freePort (): Promise<number> {
  const srv = net.createServer()
  srv.listen(0, '127.0.0.1')
  await once(srv, 'listening')
  const port = (srv.address() as net.AddressInfo).port
  await new Promise<void>((resolve) => srv.close(() => resolve()))
  return port
}

export interface RedisServer { port: number, url: string, process: ChildProcess, stop: () => Promise<void> }

/** Starts a private redis-server on a free loopback port, without persistence; stopped after the test. */
export async function startRedis (t: { after: Cleanup }): Promise<RedisServer> {
  const port = await freePort()
  const proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: ['ignore', 'pipe', 'pipe'] })
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('redis-server did not start in 10s')), 10_000)
    proc.stdout?.on('data', (chunk: Buffer) => {
      if (chunk.toString().includes('Ready to accept connections')) { clearTimeout(timer); resolve() }
    })
    proc.once('exit', (code) => { clearTimeout(timer); reject(new Error(`redis-server exited with ${String(code)}`)) })
  })
  const stop = async (): Promise<void> => {
    if (proc.exitCode !== null || proc.signalCode !== null) return
    proc.kill('SIGKILL')
    await once(proc, 'exit')
  }
  t.after(stop)
  return { port, url: `redis://127.0.0.1:${port}`, process: proc, stop }
}

/** Sends raw bytes on a new connection and resolves with everything the server sent back before closing. */
export async function rawRequest (port: number, data: string | Buffer, timeoutMs = 5000): Promise<string> {
  const socket = net.connect(port, '127.0.0.1')
  await once(socket, 'connect')
  socket.write(data)
  const chunks: Buffer[] = []
  socket.on('data', (c: Buffer) => chunks.push(c))
  const timer = setTimeout(() => socket.destroy(), timeoutMs)
  await Promise.race([once(socket, 'close'), once(socket, 'end')])
  clearTimeout(timer)
  socket.destroy()
  return Buffer.concat(chunks).toString('latin1')
}
