import type { FastifyRequest } from 'fastify'
import { Target } from './target.js'

export { Target }

/** Picks a target for a request among the route's available targets. */
export interface Balancer {
  readonly targets: readonly Target[]
  /** A target other than those in `exclude`, or undefined when none is available. */
  pick (request: FastifyRequest, exclude?: ReadonlySet<Target>): Target | undefined
}

export class RoundRobin implements Balancer {
  readonly targets: readonly Target[]
  private next = 0

  constructor (targets: readonly Target[]) {
    this.targets = targets
  }

  pick (_request: FastifyRequest, exclude?: ReadonlySet<Target>): Target | undefined {
    const n = this.targets.length
    const now = Date.now()
    for (let i = 0; i < n; i++) {
      const t = this.targets[(this.next + i) % n]
      if (t.available(now) && (exclude === undefined || !exclude.has(t))) {
        this.next = (this.next + i + 1) % n
        return t
      }
    }
    return undefined
  }
}
