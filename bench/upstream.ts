import http from 'node:http'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'

/*
 * The benchmark's upstream, run as its own process so it never shares the gateway's event loop:
 * a tight node:http server answering every request with the same ~1 KiB JSON body over
 * keep-alive. Paths containing "cache" are answered cacheable, for the cache-HIT scenario.
 * argv[2] is how many listeners to open (the balanced route needs three); the ports go back
 * to the parent over IPC.
 */

const items = Array.from({ length: 14 }, (_, i) => ({ id: i + 1, name: `item-${i + 1}`, price: 9.99 + i, tags: ['bench', 'json'] }))
const BODY = Buffer.from(JSON.stringify({ ok: true, service: 'bench-upstream', items }))

const plainHeaders = { 'content-type': 'application/json', 'content-length': String(BODY.length) }
const cacheHeaders = { ...plainHeaders, 'cache-control': 'public, max-age=3600', etag: '"bench-1"' }

function handler (req: http.IncomingMessage, res: http.ServerResponse): void {
  const url = req.url ?? '/'
  res.writeHead(200, url.includes('cache') ? cacheHeaders : plainHeaders)
  res.end(BODY)
}

async function main (): Promise<void> {
  const count = Number(process.argv[2] ?? 1)
  const ports: number[] = []
  for (let i = 0; i < count; i++) {
    const server = http.createServer({ keepAliveTimeout: 120_000 }, handler)
    server.listen(0, '127.0.0.1')
    await once(server, 'listening')
    ports.push((server.address() as AddressInfo).port)
  }
  process.send?.({ type: 'ready', ports, bodyBytes: BODY.length })
  process.on('disconnect', () => process.exit(0))
}

void main()
