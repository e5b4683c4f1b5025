import type { Algorithm } from './algorithm.js'
import type { Target } from './target.js'

/** A random available target, with probability proportional to its weight. */
export class Random implements Algorithm {
  readonly name = 'random'
  private readonly random: () => number

  constructor (random: () => number = Math.random) {
    this.random = random
  }

  pick (targets: readonly Target[], ok: (t: Target) => boolean): Target | undefined {
    let total = 0
    for (const t of targets) if (ok(t)) total += t.weight
    if (total === 0) return undefined
    let r = this.random() * total
    let last: Target | undefined
    for (const t of targets) {
      if (!ok(t)) continue
      last = t
      r -= t.weight
      if (r < 0) return t
    }
    return last
  }
}
