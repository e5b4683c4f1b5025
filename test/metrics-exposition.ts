/**
 * A strict parser of the Prometheus text exposition format (0.0.4), for the metrics tests: it
 * throws on anything a Prometheus server would refuse or misread (bad names, bad escapes,
 * duplicate series, TYPE after samples, interleaved families, non-cumulative histograms).
 */

export interface Sample {
  name: string
  labels: Record<string, string>
  value: number
}

export interface Family {
  name: string
  type: string
  help: string
  samples: Sample[]
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/
const TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped'])

/** Prometheus reads values with Go's strconv.ParseFloat: NaN and Inf in any case (prom-client writes `Nan`). */
function parseValue (text: string, line: number): number {
  const lower = text.toLowerCase()
  if (lower === '+inf' || lower === 'inf') return Infinity
  if (lower === '-inf') return -Infinity
  if (lower === 'nan') return NaN
  if (!/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(text)) throw new Error(`line ${line}: bad value ${JSON.stringify(text)}`)
  return Number(text)
}

/** Parses `{a="1",b="x\"y"}` starting at `i` (on the brace); returns the labels and the index after `}`. */
function parseLabels (s: string, i: number, line: number): [Record<string, string>, number] {
  const labels: Record<string, string> = {}
  i++
  while (s[i] !== '}') {
    const eq = s.indexOf('=', i)
    if (eq === -1) throw new Error(`line ${line}: label without =`)
    const name = s.slice(i, eq)
    if (!LABEL_NAME.test(name) || name.startsWith('__')) throw new Error(`line ${line}: bad label name ${JSON.stringify(name)}`)
    if (name in labels) throw new Error(`line ${line}: duplicate label ${name}`)
    if (s[eq + 1] !== '"') throw new Error(`line ${line}: label value not quoted`)
    let j = eq + 2
    let value = ''
    for (;;) {
      const c = s[j]
      if (c === undefined) throw new Error(`line ${line}: unterminated label value`)
      if (c === '"') break
      if (c === '\\') {
        const n = s[j + 1]
        if (n === '\\') value += '\\'
        else if (n === '"') value += '"'
        else if (n === 'n') value += '\n'
        else throw new Error(`line ${line}: bad escape \\${n}`)
        j += 2
        continue
      }
      value += c
      j++
    }
    labels[name] = value
    i = j + 1
    if (s[i] === ',') i++
    else if (s[i] !== '}') throw new Error(`line ${line}: expected , or } after a label`)
  }
  return [labels, i + 1]
}

function familyOf (sample: string, families: Map<string, Family>): string {
  for (const suffix of ['_bucket', '_sum', '_count']) {
    if (sample.endsWith(suffix)) {
      const base = sample.slice(0, -suffix.length)
      const f = families.get(base)
      if (f !== undefined && (f.type === 'histogram' || f.type === 'summary')) return base
    }
  }
  return sample
}

function seriesKey (name: string, labels: Record<string, string>): string {
  return name + JSON.stringify(Object.entries(labels).sort(([a], [b]) => a < b ? -1 : 1))
}

export function parseExposition (text: string): Map<string, Family> {
  if (text.length > 0 && !text.endsWith('\n')) throw new Error('the exposition must end with a newline')
  const families = new Map<string, Family>()
  const seen = new Set<string>()
  const closed = new Set<string>()
  let current: string | undefined
  const lines = text.split('\n')
  lines.pop()
  lines.forEach((raw, idx) => {
    const line = idx + 1
    if (raw.trim() === '') return
    if (raw.startsWith('#')) {
      const m = /^# (HELP|TYPE) (\S+) ?(.*)$/.exec(raw)
      if (m === null) return
      const [, kind, name, rest] = m
      if (!METRIC_NAME.test(name)) throw new Error(`line ${line}: bad metric name ${name}`)
      if (closed.has(name) || (current !== name && families.get(name)?.samples.length)) throw new Error(`line ${line}: ${kind} of ${name} after its samples`)
      if (current !== undefined && current !== name) closed.add(current)
      current = name
      const f = families.get(name) ?? { name, type: 'untyped', help: '', samples: [] }
      families.set(name, f)
      if (kind === 'TYPE') {
        if (!TYPES.has(rest)) throw new Error(`line ${line}: bad type ${rest}`)
        if (f.type !== 'untyped' && f.type !== rest) throw new Error(`line ${line}: second TYPE for ${name}`)
        f.type = rest
      } else {
        if (f.help !== '') throw new Error(`line ${line}: second HELP for ${name}`)
        if (/\\[^\\n]/.test(rest.replace(/\\\\/g, ''))) throw new Error(`line ${line}: bad escape in HELP`)
        f.help = rest
      }
      return
    }
    const brace = raw.indexOf('{')
    const space = raw.indexOf(' ')
    const nameEnd = brace !== -1 && (space === -1 || brace < space) ? brace : space
    if (nameEnd === -1) throw new Error(`line ${line}: sample without value`)
    const name = raw.slice(0, nameEnd)
    if (!METRIC_NAME.test(name)) throw new Error(`line ${line}: bad metric name ${JSON.stringify(name)}`)
    let labels: Record<string, string> = {}
    let i = nameEnd
    if (raw[i] === '{') [labels, i] = parseLabels(raw, i, line)
    if (raw[i] !== ' ') throw new Error(`line ${line}: expected a space before the value`)
    const parts = raw.slice(i + 1).split(' ')
    if (parts.length > 2 || parts[0] === '') throw new Error(`line ${line}: bad value/timestamp`)
    const value = parseValue(parts[0], line)
    if (parts.length === 2 && !/^-?\d+$/.test(parts[1])) throw new Error(`line ${line}: bad timestamp`)
    const familyName = familyOf(name, families)
    if (current !== familyName) {
      if (closed.has(familyName) || families.get(familyName)?.samples.length) throw new Error(`line ${line}: samples of ${familyName} are not together`)
      if (current !== undefined) closed.add(current)
      current = familyName
    }
    const family = families.get(familyName) ?? { name: familyName, type: 'untyped', help: '', samples: [] }
    families.set(familyName, family)
    const key = seriesKey(name, labels)
    if (seen.has(key)) throw new Error(`line ${line}: duplicate series ${key}`)
    seen.add(key)
    if (family.type === 'counter' && !(value >= 0)) throw new Error(`line ${line}: counter ${name} is ${value}`)
    if (family.type === 'histogram' && name.endsWith('_bucket') && labels.le === undefined) throw new Error(`line ${line}: bucket without le`)
    family.samples.push({ name, labels, value })
  })
  for (const f of families.values()) if (f.type === 'histogram') checkHistogram(f)
  return families
}

/** Buckets are cumulative, end with +Inf, and +Inf equals _count, for every label set. */
function checkHistogram (f: Family): void {
  const groups = new Map<string, { buckets: Array<[number, number]>, count?: number, sum?: number }>()
  for (const s of f.samples) {
    const { le, ...rest } = s.labels
    const key = seriesKey('', rest)
    const g = groups.get(key) ?? { buckets: [] }
    groups.set(key, g)
    if (s.name === `${f.name}_bucket`) g.buckets.push([le === '+Inf' ? Infinity : Number(le), s.value])
    else if (s.name === `${f.name}_count`) g.count = s.value
    else if (s.name === `${f.name}_sum`) g.sum = s.value
    else throw new Error(`${f.name}: unexpected sample ${s.name}`)
  }
  for (const [key, g] of groups) {
    if (g.count === undefined || g.sum === undefined) throw new Error(`${f.name}${key}: _count or _sum missing`)
    let last = -Infinity
    let prev = 0
    for (const [le, v] of g.buckets) {
      if (!(le > last)) throw new Error(`${f.name}${key}: buckets not in increasing le order`)
      if (v < prev) throw new Error(`${f.name}${key}: buckets not cumulative`)
      last = le
      prev = v
    }
    if (last !== Infinity) throw new Error(`${f.name}${key}: no +Inf bucket`)
    if (prev !== g.count) throw new Error(`${f.name}${key}: +Inf bucket ${prev} != _count ${g.count}`)
  }
}

/** The value of one series (0 when absent); `labels` must match exactly. */
export function valueOf (families: Map<string, Family>, sample: string, labels: Record<string, string>): number {
  const base = familyOf(sample, families)
  const want = seriesKey(sample, labels)
  for (const s of families.get(base)?.samples ?? []) if (seriesKey(s.name, s.labels) === want) return s.value
  return 0
}

/** Every label set of one sample name. */
export function seriesOf (families: Map<string, Family>, sample: string): Array<Record<string, string>> {
  return (families.get(familyOf(sample, families))?.samples ?? []).filter((s) => s.name === sample).map((s) => s.labels)
}

export async function scrapeAdmin (adminUrl: string): Promise<Map<string, Family>> {
  const res = await fetch(`${adminUrl}/metrics`)
  if (res.status !== 200) throw new Error(`/metrics answered ${res.status}`)
  return parseExposition(await res.text())
}

export type Families = Map<string, Family>

/** Scrapes until `ready` holds (the gateway records a request once its response has finished). */
export async function settled (adminUrl: string, ready: (f: Families) => boolean, timeoutMs = 10_000): Promise<Families> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const f = await scrapeAdmin(adminUrl)
    if (ready(f) || Date.now() > deadline) return f
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

/** How much one series grew between two scrapes. */
export function delta (before: Families, after: Families, sample: string, labels: Record<string, string>): number {
  return valueOf(after, sample, labels) - valueOf(before, sample, labels)
}

/** The sum of every series of `sample` whose labels include `match`. */
export function sumOf (f: Families, sample: string, match: Record<string, string>): number {
  let sum = 0
  for (const s of f.get(familyOf(sample, f))?.samples ?? []) {
    if (s.name === sample && Object.entries(match).every(([k, v]) => s.labels[k] === v)) sum += s.value
  }
  return sum
}
