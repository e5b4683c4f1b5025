import type { FastifyRequest } from 'fastify'
import type { Algorithm } from './algorithm.js'
import type { Target } from './target.js'

/** Virtual nodes per unit of weight: enough for an even spread of keys over a handful of targets. */
const VNODES = 160

/** FNV-1a, then murmur3's finalizer so that similar keys ("a#1", "a#2") land far apart. */
export function hash32 (s: string): number {
  let h = 0x811c9dc5
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i)
    h = Math.imul(h, 0x01000193)
  }
  h ^= h >>> 16
  h = Math.imul(h, 0x85ebca6b)
  h ^= h >>> 13
  h = Math.imul(h, 0xc2b2ae35)
  h ^= h >>> 16
  return h >>> 0
}

/**
 * A hash ring with virtual nodes, placed by each target's origin: adding or removing one of N
 * targets moves only the keys of its own arcs (about 1/N of them), and a key whose target is
 * unavailable goes to the next available target clockwise, not to a reshuffle.
 */
export class HashRing {
  private readonly points: Uint32Array
  private readonly owners: Target[]
  private readonly distinct: number

  constructor (targets: readonly Target[]) {
    const nodes: Array<{ point: number, target: Target }> = []
    for (const t of targets) {
      for (let i = 0; i < VNODES * t.weight; i++) nodes.push({ point: hash32(`${t.origin}#${i}`), target: t })
    }
    nodes.sort((a, b) => a.point - b.point)
    this.points = Uint32Array.from(nodes.map((n) => n.point))
    this.owners = nodes.map((n) => n.target)
    this.distinct = new Set(targets).size
  }

  lookup (key: string, ok: (t: Target) => boolean = () => true): Target | undefined {
    const n = this.points.length
    if (n === 0) return undefined
    const h = hash32(key)
    let lo = 0
    let hi = n
    while (lo < hi) {
      const mid = (lo + hi) >>> 1
      if (this.points[mid] < h) lo = mid + 1
      else hi = mid
    }
    const seen = new Set<Target>()
    for (let i = 0; i < n && seen.size < this.distinct; i++) {
      const t = this.owners[(lo + i) % n]
      if (seen.has(t)) continue
      if (ok(t)) return t
      seen.add(t)
    }
    return undefined
  }
}

/** The hash key of a request: `ip`, `header:NAME` or `cookie:NAME`; the client address when absent. */
export function hashKeyOf (spec: string, request: FastifyRequest): string {
  if (spec.startsWith('header:')) {
    const v = request.headers[spec.slice(7).toLowerCase()]
    const s = Array.isArray(v) ? v[0] : v
    if (s !== undefined && s !== '') return s
  } else if (spec.startsWith('cookie:')) {
    const v = cookie(request.headers.cookie, spec.slice(7))
    if (v !== undefined && v !== '') return v
  }
  return request.ip
}

function cookie (header: string | undefined, name: string): string | undefined {
  if (header === undefined) return undefined
  for (const part of header.split(';')) {
    const eq = part.indexOf('=')
    if (eq !== -1 && part.slice(0, eq).trim() === name) return part.slice(eq + 1).trim()
  }
  return undefined
}

export class ConsistentHash implements Algorithm {
  readonly name = 'consistent-hash'
  private readonly ring: HashRing
  private readonly key: string

  constructor (targets: readonly Target[], key = 'ip') {
    this.ring = new HashRing(targets)
    this.key = key
  }

  pick (_targets: readonly Target[], ok: (t: Target) => boolean, request: FastifyRequest): Target | undefined {
    return this.ring.lookup(hashKeyOf(this.key, request), ok)
  }
}
