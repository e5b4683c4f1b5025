/*
 * The route is chosen on the normalized path, and the upstream receives that same normalized path,
 * so what was authorized is what is forwarded. Normalization (RFC 3986 §6.2.2):
 * - percent-encoded unreserved characters are decoded (`/%73ecure` is `/secure`);
 * - `.` and `..` segments are resolved, encoded dots included (`/a/%2e%2e/b` is `/b`);
 * - empty segments are merged (`//secure` is `/secure`);
 * - an encoded slash or backslash, a raw backslash, a NUL, a bad escape: the request is refused,
 *   since upstreams disagree on what they mean;
 * - a `#` is refused anywhere in the target: a fragment is never sent (RFC 9112 §3.2), and Node's
 *   parser lets it through, so the router and an upstream would each cut the URL elsewhere.
 * Every other byte, and the query string, is forwarded as the client sent it.
 */

export class BadPathError extends Error {}

function isUnreserved (c: number): boolean {
  return (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || (c >= 0x30 && c <= 0x39) ||
    c === 0x2d || c === 0x2e || c === 0x5f || c === 0x7e
}

function hexVal (c: number): number {
  if (c >= 0x30 && c <= 0x39) return c - 0x30
  if (c >= 0x41 && c <= 0x46) return c - 0x37
  if (c >= 0x61 && c <= 0x66) return c - 0x57
  return -1
}

/** Whether a path can be used as it is: the common case, checked without allocating. */
function isPlain (path: string): boolean {
  let prev = 0
  for (let i = 0; i < path.length; i++) {
    const c = path.charCodeAt(i)
    if (c === 0x25 || c === 0x5c) return false // % and backslash
    if (c === 0x2f && prev === 0x2f) return false // //
    if (c === 0x2e && prev === 0x2f) return false // /. (a dot segment, or a dotfile: checked below)
    prev = c
  }
  return true
}

function decodeUnreserved (path: string): string {
  let out = ''
  let last = 0
  for (let i = path.indexOf('%'); i !== -1; i = path.indexOf('%', i + 1)) {
    const hi = hexVal(path.charCodeAt(i + 1))
    const lo = hexVal(path.charCodeAt(i + 2))
    if (hi < 0 || lo < 0) throw new BadPathError('malformed percent-encoding')
    const c = hi * 16 + lo
    if (c === 0x2f || c === 0x5c) throw new BadPathError('encoded slash or backslash')
    if (c === 0) throw new BadPathError('encoded NUL')
    if (isUnreserved(c)) {
      out += path.slice(last, i) + String.fromCharCode(c)
      last = i + 3
    }
  }
  return last === 0 ? path : out + path.slice(last)
}

/** Normalizes the path of a request target (`/a/../b?x=1`); the query is kept as it is. */
export function normalizeUrl (url: string): string {
  if (url.charCodeAt(0) !== 0x2f) {
    if (url === '*') return url
    throw new BadPathError('the request target must start with /')
  }
  if (url.includes('#')) throw new BadPathError('a fragment (#) is not part of a request target')
  const q = url.indexOf('?')
  const path = q === -1 ? url : url.slice(0, q)
  if (isPlain(path)) return url
  if (path.includes('\\')) throw new BadPathError('backslash')
  const decoded = decodeUnreserved(path)
  const segments = decoded.split('/')
  const out: string[] = []
  for (let i = 1; i < segments.length; i++) {
    const s = segments[i]
    const last = i === segments.length - 1
    if (s === '.' || s === '') {
      if (last) out.push('')
    } else if (s === '..') {
      out.pop()
      if (last) out.push('')
    } else {
      out.push(s)
    }
  }
  const normalized = '/' + out.join('/')
  return q === -1 ? normalized : normalized + url.slice(q)
}

/**
 * Builds the upstream path: the route's rewrite prefix followed by what follows the matched prefix.
 * `prefix` has no trailing slash (except `/` itself); `url` is normalized and starts with it.
 */
export function upstreamPath (url: string, prefix: string, rewrite: string): string {
  const q = url.indexOf('?')
  const path = q === -1 ? url : url.slice(0, q)
  const rest = prefix === '/' ? path : path.slice(prefix.length)
  let out: string
  if (rest === '') out = rewrite
  else if (rewrite.endsWith('/')) out = rewrite + rest.slice(1)
  else out = rewrite + rest
  return out
}
