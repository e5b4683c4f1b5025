import type { Algorithm } from './algorithm.js'
import type { Target } from './target.js'

/**
 * Power of two random choices: two distinct random available targets, the less loaded (in flight
 * relative to weight) wins. Nearly as good as least-connections, without herding every new
 * request onto the one target that just became idle.
 */
export class PowerOfTwo implements Algorithm {
  readonly name = 'p2c'
  private readonly random: () => number

  constructor (random: () => number = Math.random) {
    this.random = random
  }

  pick (targets: readonly Target[], ok: (t: Target) => boolean): Target | undefined {
    const candidates = targets.filter(ok)
    const n = candidates.length
    if (n <= 1) return candidates[0]
    const i = Math.floor(this.random() * n)
    let j = Math.floor(this.random() * (n - 1))
    if (j >= i) j++
    const a = candidates[i]
    const b = candidates[j]
    return b.inflight / b.weight < a.inflight / a.weight ? b : a
  }
}
