import type { Algorithm } from './algorithm.js'
import type { Target } from './target.js'

/**
 * Smooth weighted round-robin, as nginx does it: each pick adds every available target's weight
 * to its running score, takes the highest and subtracts the total from it. Weights 5,1,1 give
 * a a b a c a a, not a a a a a b c, so no target gets a burst.
 */
export class Weighted implements Algorithm {
  readonly name = 'weighted'
  private readonly current = new Map<Target, number>()

  pick (targets: readonly Target[], ok: (t: Target) => boolean): Target | undefined {
    let best: Target | undefined
    let bestScore = -Infinity
    let total = 0
    for (const t of targets) {
      if (!ok(t)) continue
      const score = (this.current.get(t) ?? 0) + t.weight
      this.current.set(t, score)
      total += t.weight
      if (score > bestScore) {
        best = t
        bestScore = score
      }
    }
    if (best !== undefined) this.current.set(best, bestScore - total)
    return best
  }
}
