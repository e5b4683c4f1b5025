import { test } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync, readdirSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { parse } from 'yaml'
import { registry } from '../src/metrics.js'

// Prometheus and Grafana cannot run here: parse their files and check every expression against the
// metrics the gateway really exports, so a renamed metric or label breaks this test, not a dashboard.
const root = resolve(__dirname, '..', '..')
const read = (path: string): string => readFileSync(join(root, path), 'utf8')

interface Exported { type: string, labels: Set<string> }
/** Metric names as Prometheus sees them: histogram series have _bucket, _sum and _count. */
function exported (): Map<string, Exported> {
  const out = new Map<string, Exported>()
  // Prometheus adds these to every scraped series; `up` is its own per target.
  const scrapeLabels = ['instance', 'job']
  out.set('up', { type: 'gauge', labels: new Set(scrapeLabels) })
  for (const m of registry.getMetricsAsArray() as unknown as Array<{ name: string, type: string, labelNames: string[] }>) {
    const labels = new Set([...m.labelNames, ...scrapeLabels])
    if (m.type === 'histogram') {
      out.set(`${m.name}_bucket`, { type: 'histogram_bucket', labels: new Set([...labels, 'le']) })
      out.set(`${m.name}_sum`, { type: 'counter', labels })
      out.set(`${m.name}_count`, { type: 'counter', labels })
    } else out.set(m.name, { type: m.type, labels })
  }
  return out
}
const METRICS = exported()

const WORDS = new Set([
  // aggregations, keywords and functions of PromQL that the files may use
  'sum', 'min', 'max', 'avg', 'count', 'topk', 'bottomk', 'quantile', 'stddev', 'by', 'without', 'on', 'ignoring',
  'group_left', 'group_right', 'and', 'or', 'unless', 'bool', 'offset', 'rate', 'irate', 'increase', 'delta', 'changes',
  'histogram_quantile', 'label_replace', 'clamp_min', 'clamp_max', 'abs', 'absent', 'vector', 'time', 'max_over_time',
  'min_over_time', 'avg_over_time', 'resets', 'label_values', 'Inf', 'NaN'
])

interface Use { metric: string, labels: string[] }
interface Analysis { uses: Use[], grouping: string[][], rated: string[] }

/** The metrics (with the labels their selectors name), groupings and rate() arguments of an expression. */
export function analyse (source: string): Analysis {
  const expr = source.replace(/\$__rate_interval|\$__interval|\$__range/g, '5m')
  const uses: Use[] = []
  const grouping: string[][] = []
  const rated = [...expr.matchAll(/\b(?:rate|irate|increase|resets)\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)/g)].map((m) => m[1])
  let rest = expr.replace(/([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{((?:[^}"]|"(?:[^"\\]|\\.)*")*)\}/g, (_all, name: string | undefined, body: string) => {
    const labels = [...body.matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"/g)].map((m) => m[1])
    assert.ok(name !== undefined, `a selector without metric name in ${source}`)
    uses.push({ metric: name, labels })
    return ' '
  })
  rest = rest.replace(/\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)/g, (_all, list: string) => {
    grouping.push(list.split(',').map((l) => l.trim()).filter((l) => l !== ''))
    return ' '
  })
  rest = rest.replace(/"(?:[^"\\]|\\.)*"/g, ' ').replace(/\[[^\]]*\]/g, ' ').replace(/\b\d+(\.\d+)?(e[-+]?\d+)?\b/gi, ' ')
  const label = /label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)/.exec(rest)
  if (label !== null) {
    uses.push({ metric: label[1], labels: [label[2]] })
    rest = rest.replace(label[0], ' ')
  }
  for (const word of rest.match(/[a-zA-Z_:][a-zA-Z0-9_:]*/g) ?? []) {
    if (!WORDS.has(word)) uses.push({ metric: word, labels: [] })
  }
  return { uses, grouping, rated }
}

/** Every metric and label an expression names exists; rate() is taken of counters only. */
function checkExpr (where: string, expr: string): Analysis {
  const a = analyse(expr)
  assert.ok(a.uses.length > 0, `${where}: no metric in ${expr}`)
  let depth = 0
  for (const c of expr) {
    if (c === '(') depth++
    if (c === ')') depth--
    assert.ok(depth >= 0, `${where}: unbalanced parentheses`)
  }
  assert.equal(depth, 0, `${where}: unbalanced parentheses`)
  const known = new Set<string>()
  for (const use of a.uses) {
    const m = METRICS.get(use.metric)
    assert.ok(m !== undefined, `${where}: ${use.metric} is not a metric the gateway exports`)
    for (const l of use.labels) assert.ok(m.labels.has(l), `${where}: ${use.metric} has no label ${l}`)
    for (const l of m.labels) known.add(l)
  }
  for (const list of a.grouping) for (const l of list) assert.ok(known.has(l), `${where}: grouping by ${l}, which none of its metrics has`)
  for (const r of a.rated) assert.ok(['counter', 'histogram_bucket'].includes(METRICS.get(r)?.type ?? ''), `${where}: rate() of ${r}, which is not a counter`)
  if (expr.includes('histogram_quantile')) {
    assert.ok(a.uses.some((u) => u.metric.endsWith('_bucket')), `${where}: histogram_quantile of no _bucket series`)
    assert.ok(a.grouping.some((g) => g.includes('le')), `${where}: histogram_quantile needs le kept`)
  }
  return a
}

const compose = parse(read('docker-compose.yml')) as { services: Record<string, { volumes?: string[], environment?: Record<string, string> }> }
const mounts = (service: string): Map<string, string> => new Map((compose.services[service]?.volumes ?? []).map((v) => {
  const [host, container] = v.split(':')
  return [host.replace(/^\.\//, ''), container]
}))

test('the PromQL checker finds metrics, labels and groupings, and refuses unknown ones', () => {
  const a = analyse('sum by (route, le) (rate(gatehouse_request_duration_seconds_bucket{route=~"$route", status!="x"}[$__rate_interval])) / on (route) up')
  assert.deepEqual(a.uses.map((u) => u.metric), ['gatehouse_request_duration_seconds_bucket', 'up'])
  assert.deepEqual(a.uses[0].labels, ['route', 'status'])
  assert.deepEqual(a.grouping, [['route', 'le'], ['route']])
  assert.throws(() => checkExpr('t', 'rate(gatehouse_requests_totl[5m])'), /not a metric/)
  assert.throws(() => checkExpr('t', 'rate(gatehouse_requests_total{path="/x"}[5m])'), /no label path/)
  assert.throws(() => checkExpr('t', 'sum by (path) (rate(gatehouse_requests_total[5m]))'), /grouping by path/)
  assert.throws(() => checkExpr('t', 'rate(gatehouse_upstream_healthy[5m])'), /not a counter/)
  assert.throws(() => checkExpr('t', 'histogram_quantile(0.9, sum by (route) (rate(gatehouse_request_duration_seconds_bucket[5m])))'), /le kept/)
})

test('alert rules parse, are complete, and use only exported metrics and labels', () => {
  const rules = parse(read('deploy/prometheus/alerts.yml')) as { groups: Array<{ name: string, rules: Array<{ alert: string, expr: string, for?: string, labels: Record<string, string>, annotations: Record<string, string> }> }> }
  const names = new Set<string>()
  const metricsUsed = new Set<string>()
  for (const group of rules.groups) {
    assert.ok(group.name)
    for (const rule of group.rules) {
      assert.ok(/^[A-Z][A-Za-z0-9]+$/.test(rule.alert), rule.alert)
      assert.ok(!names.has(rule.alert), `${rule.alert} once`)
      names.add(rule.alert)
      assert.ok(['page', 'warning'].includes(rule.labels.severity), `${rule.alert}: severity`)
      assert.ok(rule.annotations.summary && rule.annotations.description, `${rule.alert}: summary and description`)
      if (rule.for !== undefined) assert.match(rule.for, /^\d+[smh]$/)
      for (const u of checkExpr(rule.alert, rule.expr).uses) metricsUsed.add(u.metric)
    }
  }
  // What the on-call engineer is promised: a 5xx ratio, an upstream down, a p99 over a threshold.
  for (const alert of ['GatehouseHigh5xxRatio', 'GatehouseUpstreamDown', 'GatehouseHighLatencyP99']) assert.ok(names.has(alert), alert)
  for (const m of ['gatehouse_requests_total', 'gatehouse_upstream_healthy', 'gatehouse_request_duration_seconds_bucket']) assert.ok(metricsUsed.has(m), m)

  // Prometheus loads the file where docker-compose mounts it, and scrapes every gateway replica.
  const prom = parse(read('deploy/prometheus/prometheus.yml')) as { rule_files: string[], scrape_configs: Array<{ job_name: string, static_configs: Array<{ targets: string[] }> }> }
  assert.ok(prom.rule_files.includes(mounts('prometheus').get('deploy/prometheus/alerts.yml') as string))
  const job = prom.scrape_configs.find((c) => c.job_name === 'gatehouse')
  assert.ok(job !== undefined, 'the alerts select job="gatehouse"')
})

test('the Grafana dashboard is provisioned, well-formed, and every query uses exported metrics and labels', () => {
  const datasources = parse(read('deploy/grafana/provisioning/datasources/prometheus.yml')) as { datasources: Array<{ uid: string, type: string, url: string }> }
  const ds = datasources.datasources[0]
  assert.equal(ds.type, 'prometheus')
  assert.ok(compose.services[new URL(ds.url).hostname], 'the datasource is the compose Prometheus')
  const providers = parse(read('deploy/grafana/provisioning/dashboards/gatehouse.yml')) as { providers: Array<{ options: { path: string } }> }
  const grafana = mounts('grafana')
  assert.equal(grafana.get('deploy/grafana/provisioning'), '/etc/grafana/provisioning')
  assert.equal(grafana.get('deploy/grafana/dashboards'), providers.providers[0].options.path)

  const files = readdirSync(join(root, 'deploy/grafana/dashboards')).filter((f) => f.endsWith('.json'))
  assert.ok(files.length > 0)
  const used = new Map<string, string[]>()
  for (const file of files) {
    const dash = JSON.parse(read(`deploy/grafana/dashboards/${file}`)) as {
      uid: string
      title: string
      templating: { list: Array<{ name: string, query: { query: string } | string, datasource: { uid: string } }> }
      annotations: { list: Array<{ expr?: string, datasource: { uid: string } }> }
      panels: Array<{ id: number, type: string, title: string, gridPos: { x: number, y: number, w: number, h: number }, datasource?: { uid: string }, targets?: Array<{ expr: string, refId: string, datasource: { uid: string } }> }>
    }
    assert.ok(dash.uid && dash.title, file)
    const vars = new Set(dash.templating.list.map((v) => v.name))
    for (const v of dash.templating.list) {
      assert.equal(v.datasource.uid, ds.uid, `${file}: variable ${v.name}`)
      checkExpr(`${file} $${v.name}`, typeof v.query === 'string' ? v.query : v.query.query)
    }
    for (const a of dash.annotations.list) {
      if (a.expr === undefined) continue
      assert.equal(a.datasource.uid, ds.uid)
      checkExpr(`${file} annotation`, a.expr)
    }
    const ids = new Set<number>()
    for (const panel of dash.panels) {
      assert.ok(!ids.has(panel.id), `${file}: panel id ${panel.id} once`)
      ids.add(panel.id)
      assert.ok(panel.gridPos.x >= 0 && panel.gridPos.x + panel.gridPos.w <= 24, `${file}: ${panel.title} fits 24 columns`)
      if (panel.type === 'row') continue
      assert.equal(panel.datasource?.uid, ds.uid, `${file}: ${panel.title}`)
      assert.ok((panel.targets ?? []).length > 0, `${file}: ${panel.title} has queries`)
      for (const target of panel.targets ?? []) {
        assert.equal(target.datasource.uid, ds.uid)
        for (const v of target.expr.matchAll(/\$(\w+)/g)) assert.ok(v[1].startsWith('__') || vars.has(v[1]), `${file}: ${panel.title} uses undefined $${v[1]}`)
        const a = checkExpr(`${file}: ${panel.title}`, target.expr)
        used.set(target.expr, a.uses.map((u) => u.metric))
      }
    }
  }
  // The questions the dashboard answers: rate, errors, latency percentiles per route, upstream
  // health, cache hit ratio, rate-limited requests.
  const exprs = [...used.keys()]
  const has = (re: RegExp): boolean => exprs.some((e) => re.test(e))
  assert.ok(has(/sum by \(route\) \(rate\(gatehouse_requests_total\{/), 'request rate per route')
  assert.ok(has(/gatehouse_requests_total\{status=~"5\.\."/), '5xx errors')
  for (const q of ['0.5', '0.9', '0.99']) assert.ok(has(new RegExp(`histogram_quantile\\(${q.replace('.', '\\.')}, sum by \\(route, le\\) \\(rate\\(gatehouse_request_duration_seconds_bucket`)), `p${q} per route`)
  assert.ok(has(/gatehouse_upstream_healthy/), 'upstream health')
  assert.ok(has(/gatehouse_cache_total\{result="hit".*\/.*gatehouse_cache_total/), 'cache hit ratio')
  assert.ok(has(/gatehouse_rate_limited_total/), 'rate-limited requests')
})
