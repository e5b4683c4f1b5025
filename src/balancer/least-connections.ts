import type { Algorithm } from './algorithm.js'
import type { Target } from './target.js'

/**
 * The available target with the fewest requests in flight relative to its weight; ties take
 * turns, so an idle route still spreads its requests evenly.
 */
export class LeastConnections implements Algorithm {
  readonly name = 'least-connections'
  private turn = 0

  pick (targets: readonly Target[], ok: (t: Target) => boolean): Target | undefined {
    let ties: Target[] = []
    let bestLoad = Infinity
    for (const t of targets) {
      if (!ok(t)) continue
      const load = t.inflight / t.weight
      if (load < bestLoad) {
        ties = [t]
        bestLoad = load
      } else if (load === bestLoad) {
        ties.push(t)
      }
    }
    if (ties.length === 0) return undefined
    return ties[this.turn++ % ties.length]
  }
}
