import http from 'node:http'
import type { AddressInfo } from 'node:net'

/**
 * Two small, real HTTP services for the demo and docker-compose: users and orders. They answer
 * JSON, a health check, and echo what the gateway forwarded (at /debug/echo) so a newcomer can see
 * the forwarded headers.
 */
export interface Service { name: string, server: http.Server, port: number }

function json (res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body)
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) })
  res.end(text)
}

const users = [
  { id: 1, name: 'Ada Lovelace', email: 'ada@example.com' },
  { id: 2, name: 'Grace Hopper', email: 'grace@example.com' }
]
const orders: Array<{ id: number, userId: number, item: string }> = [
  { id: 1, userId: 1, item: 'analytical engine' }
]

export function usersHandler (req: http.IncomingMessage, res: http.ServerResponse): void {
  const url = new URL(req.url ?? '/', 'http://localhost')
  if (url.pathname === '/health') return json(res, 200, { status: 'ok' })
  if (url.pathname === '/debug/echo') return json(res, 200, { method: req.method, url: req.url, headers: req.headers })
  if (url.pathname === '/' || url.pathname === '') return json(res, 200, users)
  const m = /^\/(\d+)$/.exec(url.pathname)
  const user = m !== null ? users.find((u) => u.id === Number(m[1])) : undefined
  if (user !== undefined) return json(res, 200, user)
  json(res, 404, { error: 'no such user' })
}

export function ordersHandler (req: http.IncomingMessage, res: http.ServerResponse): void {
  const url = new URL(req.url ?? '/', 'http://localhost')
  if (url.pathname === '/health') return json(res, 200, { status: 'ok' })
  if (url.pathname === '/debug/echo') return json(res, 200, { method: req.method, url: req.url, headers: req.headers })
  if (url.pathname === '/orders' || url.pathname === '/orders/') {
    if (req.method === 'POST') {
      let body = ''
      req.setEncoding('utf8')
      req.on('data', (c: string) => { if (body.length < 65536) body += c })
      req.on('end', () => {
        let item = 'unknown'
        try { item = String((JSON.parse(body) as { item?: unknown }).item ?? item) } catch {}
        const order = { id: orders.length + 1, userId: Number(req.headers['x-user-id'] ?? 0), item }
        if (orders.length < 1000) orders.push(order)
        json(res, 201, order)
      })
      return
    }
    return json(res, 200, orders)
  }
  json(res, 404, { error: 'no such order' })
}

export async function startService (name: string, handler: http.RequestListener, port: number, host = '127.0.0.1'): Promise<Service> {
  const server = http.createServer(handler)
  await new Promise<void>((resolve) => server.listen(port, host, resolve))
  return { name, server, port: (server.address() as AddressInfo).port }
}

// Run directly (docker-compose): SERVICE=users|orders PORT=3001 node dist/examples/services.js
if (require.main === module) {
  const name = process.env.SERVICE ?? 'users'
  const port = Number(process.env.PORT ?? (name === 'users' ? 3001 : 3002))
  void startService(name, name === 'orders' ? ordersHandler : usersHandler, port, process.env.HOST ?? '0.0.0.0')
    .then((s) => { process.stdout.write(`${name} service listening on ${s.port}\n`) })
}
