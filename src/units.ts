const DURATION = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)$/
const SIZE = /^(\d+(?:\.\d+)?)(B|KiB|MiB|GiB|KB|MB|GB|kB)?$/

const durationUnits: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }
const sizeUnits: Record<string, number> = {
  B: 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3, kB: 1000, KB: 1000, MB: 1000 ** 2, GB: 1000 ** 3
}

export const DURATION_PATTERN = DURATION.source
export const SIZE_PATTERN = SIZE.source

/** `250ms`, `5s`, `1m`, `1h` or a number of milliseconds. */
export function parseDuration (value: string | number): number {
  if (typeof value === 'number') return value
  const m = DURATION.exec(value)
  if (m === null) throw new Error(`invalid duration ${JSON.stringify(value)}`)
  return Math.round(Number(m[1]) * durationUnits[m[2]])
}

/** `512KiB`, `10MiB` or a number of bytes. */
export function parseSize (value: string | number): number {
  if (typeof value === 'number') return value
  const m = SIZE.exec(value)
  if (m === null) throw new Error(`invalid size ${JSON.stringify(value)}`)
  return Math.round(Number(m[1]) * sizeUnits[m[2] ?? 'B'])
}

export function formatDuration (ms: number): string {
  if (ms % 3_600_000 === 0 && ms > 0) return `${ms / 3_600_000}h`
  if (ms % 60_000 === 0 && ms > 0) return `${ms / 60_000}m`
  if (ms % 1000 === 0 && ms > 0) return `${ms / 1000}s`
  return `${ms}ms`
}
