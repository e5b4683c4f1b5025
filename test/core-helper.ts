import net from 'node:net'
import { once } from 'node:events'
import { request, type Dispatcher } from 'undici'

/** A route file object forwarding `prefix` to `url`. */
export function route (prefix: string, url: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  const { match, upstream, ...rest } = extra as { match?: Record<string, unknown>, upstream?: Record<string, unknown> }
  return { match: { prefix, ...match }, upstream: { targets: [{ url }], ...upstream }, ...rest }
}

export interface Reply {
  status: number
  headers: Record<string, string | string[] | undefined>
  text: string
  json: <T = Record<string, unknown>>() => T
}

/** One request with undici, body read as text. */
export async function call (url: string, opts: Omit<Dispatcher.RequestOptions, 'origin' | 'path' | 'method'> & { method?: Dispatcher.HttpMethod | string } = {}): Promise<Reply> {
  const res = await request(url, opts as Parameters<typeof request>[1])
  const text = await res.body.text()
  return { status: res.statusCode, headers: res.headers, text, json: <T>() => JSON.parse(text) as T }
}

export interface RawReply {
  status: number
  /** Header names lower-cased; repeated headers in order. */
  headers: Array<[string, string]>
  header: (name: string) => string | undefined
  body: string
  /** Everything received, unparsed. */
  raw: string
}

/** Parses one HTTP/1.1 response received whole (Connection: close). Chunked bodies are de-chunked. */
export function parseResponse (raw: string): RawReply {
  const end = raw.indexOf('\r\n\r\n')
  if (end === -1) throw new Error(`no complete response head in ${JSON.stringify(raw.slice(0, 200))}`)
  const [statusLine, ...lines] = raw.slice(0, end).split('\r\n')
  const headers = lines.map((l) => {
    const i = l.indexOf(':')
    return [l.slice(0, i).trim().toLowerCase(), l.slice(i + 1).trim()] as [string, string]
  })
  const header = (name: string): string | undefined => headers.find(([k]) => k === name)?.[1]
  let body = raw.slice(end + 4)
  if (header('transfer-encoding') === 'chunked') {
    let out = ''
    let rest = body
    for (;;) {
      const nl = rest.indexOf('\r\n')
      const size = parseInt(rest.slice(0, nl), 16)
      if (nl === -1 || Number.isNaN(size) || size === 0) break
      out += rest.slice(nl + 2, nl + 2 + size)
      rest = rest.slice(nl + 2 + size + 2)
    }
    body = out
  }
  return { status: Number(statusLine.split(' ')[1]), headers, header, body, raw }
}

/** Sends a raw request head (lines joined with CRLF, Connection: close added) and parses the answer. */
export async function rawCall (port: number, lines: string[], body = ''): Promise<RawReply> {
  const socket = net.connect(port, '127.0.0.1')
  await once(socket, 'connect')
  const chunks: Buffer[] = []
  socket.on('data', (c: Buffer) => chunks.push(c))
  socket.on('error', () => {})
  socket.write([...lines, 'Connection: close', '', ''].join('\r\n') + body)
  const timer = setTimeout(() => socket.destroy(), 10_000)
  await once(socket, 'close')
  clearTimeout(timer)
  return parseResponse(Buffer.concat(chunks).toString('latin1'))
}

/** Resolves with the first value `fn` returns that is not undefined, polling every `every` ms. */
export async function until<T> (fn: () => T | undefined | Promise<T | undefined>, timeoutMs = 10_000, every = 10): Promise<T> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const v = await fn()
    if (v !== undefined) return v
    if (Date.now() > deadline) throw new Error('condition not met in time')
    await new Promise((resolve) => setTimeout(resolve, every))
  }
}
