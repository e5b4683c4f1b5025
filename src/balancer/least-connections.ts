import type { Algorithm } from './algorithm.js'
import type { Target } from './target.js'

/**
 * The available target with the fewest requests in flight relative to its weight; ties go round
 * the list, so an idle route still spreads its requests.
 */
export class LeastConnections implements Algorithm {
  readonly name = 'least-connections'
  private start = 0

  pick (targets: readonly Target[], ok: (t: Target) => boolean): Target | undefined {
    const n = targets.length
    let best: Target | undefined
    let bestLoad = Infinity
    for (let i = 0; i < n; i++) {
      const t = targets[(this.start + i) % n]
      if (!ok(t)) continue
      const load = t.inflight / t.weight
      if (load < bestLoad) {
        best = t
        bestLoad = load
      }
    }
    this.start = (this.start + 1) % Math.max(1, n)
    return best
  }
}
