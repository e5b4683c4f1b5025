import type { FastifyRequest } from 'fastify'
import type { Target } from './target.js'

/**
 * One balancing algorithm. It sees all of a route's targets and a predicate telling which may be
 * picked now (healthy, not ejected, circuit closed, not yet tried by this request), so its own
 * state (positions, weights, the hash ring) stays stable while targets come and go.
 */
export interface Algorithm {
  readonly name: string
  pick (targets: readonly Target[], ok: (t: Target) => boolean, request: FastifyRequest): Target | undefined
}
