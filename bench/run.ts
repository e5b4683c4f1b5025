import { fork, spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { createHmac } from 'node:crypto'
import { once } from 'node:events'
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import http from 'node:http'
import http2 from 'node:http2'
import https from 'node:https'
import net from 'node:net'
import os from 'node:os'
import { basename, join, resolve } from 'node:path'
import { parseArgs } from 'node:util'
import { stringify } from 'yaml'
import type { LoadRequest, LoadResult } from './load.js'
import { summarizeProfile } from './profile.js'

/*
 * `npm run bench`: the upstream, the reply-from baseline, one gateway per scenario and the load
 * generator each run as their own process; the gateways (and the baseline) are pinned to one
 * core, the upstream and the load generator to the other, as nginx comparisons are taken here.
 * Scenarios are measured in interleaved rounds, every other one in reverse order (A B C C B A
 * A B C ...), so that background noise hits them alike and no scenario always follows the same
 * one; the table shows the median round. Options: see USAGE.
 */

const USAGE = `Usage: npm run bench -- [options]
  --only a,b        run only these scenarios (see --list); direct and plain are added for the ratios
  --list            list the scenarios and exit
  --duration S      seconds per closed-loop round (default 2)
  --rounds N        interleaved rounds, alternately forward and reversed (default 5)
  --warmup S        seconds of warm-up per scenario and replica (default 2.5)
  --replicas N      processes per proxied scenario, taking the rounds in turn (default 1)
  --settle S        seconds of unmeasured full load on a proxy just before each of its measured
                    runs, so that each round measures a busy process, not one waking up (default 2)
  --connections N   concurrent connections (default 50)
  --rate N          fixed-rate run at N req/s for the latency column; keep it below every
                    scenario's capacity (open loop: above it, queues grow); 0 skips it (default 1000)
  --rate-duration S seconds of the fixed-rate run (default 2)
  --no-pin          do not pin processes to cores
  --soak S          instead of the table: one S-second full-load run of one scenario (--only, default all or plain), sampling RSS
  --profile         run the gateways under --cpu-prof and print their top costs
  --out DIR         results directory (default bench/results)
  --compare DIST    also run each selected gateway scenario on another build (a copy of dist/),
                    interleaved with this one: an A/B measurement of a hot-path change (repeatable)
`

const DIST = resolve(__dirname, '..')
const ROOT = resolve(DIST, '..')
const CLI = join(DIST, 'src', 'cli.js')
const JWT_SECRET = 'bench-secret-0123456789abcdef0123456789abcdef'

interface Options {
  only?: string[]
  duration: number
  rounds: number
  warmup: number
  replicas: number
  settle: number
  connections: number
  rate: number
  rateDuration: number
  pin: boolean
  soak: number
  profile: boolean
  out: string
  compare: string[]
}

interface Ports { upstream: number[], tlsDir: string }

interface Scenario {
  name: string
  title: string
  kind: 'direct' | 'baseline' | 'gateway'
  /** Gateway modules (relative to dist/) this scenario needs, wired in src/app.ts. */
  needs?: string[]
  /** Modules whose absence is noted but does not skip the scenario. */
  notes?: string[]
  gateway?: (p: Ports) => { config: Record<string, unknown>, routes: Record<string, Record<string, unknown>> }
  path: string
  headers?: Record<string, string>
  protocol?: 'http' | 'https' | 'h2'
  /** The cli.js to start (the --compare build's), default this build's. */
  cli?: string
  /** Checks the second probe response; returns why the scenario does not measure what it says. */
  verify?: (res: Probe) => string | undefined
}

interface Probe { status: number, headers: Record<string, string | string[] | undefined>, body: string }

function route (targets: number[], extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { match: { prefix: '/api' }, upstream: { targets: targets.map((port) => ({ url: `http://127.0.0.1:${port}` })) }, ...extra }
}

function jwt (): string {
  const b64 = (o: unknown): string => Buffer.from(JSON.stringify(o)).toString('base64url')
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub: 'bench-user', iat: Math.floor(Date.now() / 1000), exp: Math.floor(Date.now() / 1000) + 86400 })}`
  return `${head}.${createHmac('sha256', JWT_SECRET).update(head).digest('base64url')}`
}

const quiet = { logging: { level: 'warn', accessLog: false } }
const observed = { logging: { level: 'info', accessLog: true } }
const authRoute = { auth: { jwt: true }, rateLimit: { max: 1_000_000_000, window: '1m', key: 'jwt:sub' } }
const tlsConfig = (p: Ports): Record<string, unknown> => ({ tls: { cert: join(p.tlsDir, 'cert.pem'), key: join(p.tlsDir, 'key.pem') } })

const SCENARIOS: Scenario[] = [
  { name: 'direct', title: 'direct to upstream (no proxy)', kind: 'direct', path: '/api/items' },
  { name: 'reply-from', title: 'minimal @fastify/reply-from proxy (baseline)', kind: 'baseline', path: '/api/items' },
  {
    name: 'plain',
    title: 'Gatehouse, plain route',
    kind: 'gateway',
    path: '/api/items',
    gateway: (p) => ({ config: quiet, routes: { bench: route([p.upstream[0]]) } })
  },
  {
    name: 'balanced',
    title: 'Gatehouse, 3-target round-robin route',
    kind: 'gateway',
    path: '/api/items',
    gateway: (p) => ({ config: quiet, routes: { bench: route(p.upstream.slice(0, 3)) } })
  },
  {
    name: 'auth',
    title: 'Gatehouse, JWT + rate limit',
    kind: 'gateway',
    needs: ['plugins/auth.js', 'plugins/rate-limit.js'],
    path: '/api/items',
    headers: { authorization: `Bearer ${jwt()}` },
    gateway: (p) => ({ config: { ...quiet, jwt: { secret: JWT_SECRET } }, routes: { bench: route([p.upstream[0]], authRoute) } })
  },
  {
    name: 'observed',
    title: 'Gatehouse, metrics + access log',
    kind: 'gateway',
    notes: ['plugins/metrics.js'],
    path: '/api/items',
    gateway: (p) => ({ config: observed, routes: { bench: route([p.upstream[0]]) } })
  },
  {
    name: 'all',
    title: 'Gatehouse, all features (JWT + rate limit + metrics + access log)',
    kind: 'gateway',
    needs: ['plugins/auth.js', 'plugins/rate-limit.js'],
    notes: ['plugins/metrics.js'],
    path: '/api/items',
    headers: { authorization: `Bearer ${jwt()}` },
    gateway: (p) => ({ config: { ...observed, jwt: { secret: JWT_SECRET } }, routes: { bench: route([p.upstream[0]], authRoute) } })
  },
  {
    name: 'cache',
    title: 'Gatehouse, cache HIT',
    kind: 'gateway',
    needs: ['plugins/cache.js'],
    path: '/api/cache/items',
    gateway: (p) => ({ config: quiet, routes: { bench: route([p.upstream[0]], { cache: { enabled: true } }) } }),
    verify: (r) => String(r.headers['x-cache']).toUpperCase() === 'HIT' ? undefined : `second response has X-Cache: ${String(r.headers['x-cache'])}, not HIT`
  },
  {
    name: 'compress',
    title: 'Gatehouse, gzip-compressed route',
    kind: 'gateway',
    needs: ['plugins/compress.js'],
    path: '/api/items',
    headers: { 'accept-encoding': 'gzip' },
    gateway: (p) => ({ config: { ...quiet, compress: { threshold: 256 } }, routes: { bench: route([p.upstream[0]], { compress: true }) } }),
    verify: (r) => r.headers['content-encoding'] === 'gzip' ? undefined : `response not compressed (Content-Encoding: ${String(r.headers['content-encoding'])})`
  },
  {
    name: 'tls-h1',
    title: 'Gatehouse, TLS HTTP/1.1',
    kind: 'gateway',
    protocol: 'https',
    path: '/api/items',
    gateway: (p) => ({ config: { ...quiet, ...tlsConfig(p) }, routes: { bench: route([p.upstream[0]]) } })
  },
  {
    name: 'tls-h2',
    title: 'Gatehouse, TLS HTTP/2',
    kind: 'gateway',
    protocol: 'h2',
    path: '/api/items',
    gateway: (p) => ({ config: { ...quiet, ...tlsConfig(p) }, routes: { bench: route([p.upstream[0]]) } })
  }
]

function parseOptions (): Options {
  const { values } = parseArgs({
    options: {
      only: { type: 'string', multiple: true },
      list: { type: 'boolean' },
      duration: { type: 'string' },
      rounds: { type: 'string' },
      warmup: { type: 'string' },
      replicas: { type: 'string' },
      settle: { type: 'string' },
      connections: { type: 'string' },
      rate: { type: 'string' },
      'rate-duration': { type: 'string' },
      'no-pin': { type: 'boolean' },
      soak: { type: 'string' },
      profile: { type: 'boolean' },
      out: { type: 'string' },
      compare: { type: 'string', multiple: true },
      help: { type: 'boolean', short: 'h' }
    }
  })
  if (values.help === true) { process.stdout.write(USAGE); process.exit(0) }
  if (values.list === true) {
    for (const s of SCENARIOS) process.stdout.write(`${s.name.padEnd(12)} ${s.title}\n`)
    process.exit(0)
  }
  const num = (v: string | undefined, d: number, name: string): number => {
    if (v === undefined) return d
    const n = Number(v)
    if (!Number.isFinite(n) || n < 0) { process.stderr.write(`--${name}: ${v} is not a number\n`); process.exit(1) }
    return n
  }
  const only = values.only?.flatMap((s) => s.split(',')).map((s) => s.trim()).filter((s) => s !== '')
  for (const name of only ?? []) {
    if (!SCENARIOS.some((s) => s.name === name)) { process.stderr.write(`--only: no scenario ${name} (see --list)\n`); process.exit(1) }
  }
  return {
    only,
    duration: num(values.duration, 2, 'duration'),
    rounds: Math.max(1, num(values.rounds, 5, 'rounds')),
    warmup: num(values.warmup, 2.5, 'warmup'),
    replicas: Math.max(1, num(values.replicas, 1, 'replicas')),
    settle: num(values.settle, 2, 'settle'),
    connections: Math.max(1, num(values.connections, 50, 'connections')),
    rate: num(values.rate, 1000, 'rate'),
    rateDuration: num(values['rate-duration'], 2, 'rate-duration'),
    pin: values['no-pin'] !== true && os.availableParallelism() >= 2 && spawnSync('taskset', ['-V']).status === 0,
    soak: num(values.soak, 0, 'soak'),
    profile: values.profile === true,
    out: resolve(values.out ?? join(ROOT, 'bench', 'results')),
    compare: (values.compare ?? []).map((d) => resolve(d))
  }
}

/** Pins a process and all its threads to the given CPU list (taskset). */
function pin (opts: Options, pid: number | undefined, cpus: string): void {
  if (!opts.pin || pid === undefined) return
  spawnSync('taskset', ['-a', '-p', '-c', cpus, String(pid)], { stdio: 'ignore' })
}

async function message<T> (child: ChildProcess, type: string): Promise<T> {
  return await new Promise<T>((resolve, reject) => {
    const onMessage = (m: { type: string } & T): void => {
      if (m.type === type) { cleanup(); resolve(m) }
    }
    const onExit = (code: number | null): void => { cleanup(); reject(new Error(`child exited (${String(code)}) before ${type}`)) }
    const cleanup = (): void => { child.off('message', onMessage); child.off('exit', onExit) }
    child.on('message', onMessage)
    child.on('exit', onExit)
  })
}

async function freePort (): Promise<number> {
  const srv = net.createServer()
  srv.listen(0, '127.0.0.1')
  await once(srv, 'listening')
  const port = (srv.address() as net.AddressInfo).port
  await new Promise<void>((resolve) => srv.close(() => resolve()))
  return port
}

async function waitForPort (port: number, child: ChildProcess, stderr: () => string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (Date.now() < deadline) {
    if (child.exitCode !== null) {
      // 'exit' can come before the last of stderr: read it to its end, for the whole message.
      if (child.stderr !== null && !child.stderr.readableEnded) await Promise.race([once(child.stderr, 'end'), new Promise((resolve) => setTimeout(resolve, 1000))])
      throw new Error(`exited with ${child.exitCode}: ${stderr().slice(-500)}`)
    }
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1')
      s.once('connect', () => { s.destroy(); resolve(true) })
      s.once('error', () => resolve(false))
    })
    if (ok) return
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  throw new Error(`did not listen on ${port} within ${timeoutMs} ms: ${stderr().slice(-500)}`)
}

async function probe (scenario: Scenario, url: string): Promise<Probe> {
  if (scenario.protocol === 'h2') {
    const u = new URL(url)
    const session = http2.connect(u.origin, { rejectUnauthorized: false })
    try {
      return await new Promise<Probe>((resolve, reject) => {
        session.once('error', reject)
        const stream = session.request({ ':path': u.pathname, ...scenario.headers })
        let headers: Record<string, string | string[] | undefined> = {}
        const chunks: Buffer[] = []
        stream.on('response', (h) => { headers = h as typeof headers })
        stream.on('data', (c: Buffer) => chunks.push(c))
        stream.on('end', () => resolve({ status: Number(headers[':status']), headers, body: Buffer.concat(chunks).toString() }))
        stream.on('error', reject)
      })
    } finally {
      session.close()
    }
  }
  const mod = scenario.protocol === 'https' ? https : http
  return await new Promise<Probe>((resolve, reject) => {
    const req = mod.get(url, { headers: scenario.headers, rejectUnauthorized: false, agent: false, timeout: 5000 }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString() }))
    })
    req.on('timeout', () => req.destroy(new Error('probe timed out')))
    req.on('error', reject)
  })
}

/** Whether a gateway module exists and src/app.ts wires it in. */
function present (mod: string): boolean {
  if (!existsSync(join(DIST, mod))) return false
  const app = readFileSync(join(DIST, 'src', 'app.js'), 'utf8')
  return app.includes(mod.replace(/^plugins\//, '../plugins/'))
}

function peakRssMiB (pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
    return m !== null ? Math.round(Number(m[1]) / 1024) : undefined
  } catch { return undefined }
}

/** CPU time (µs, utime + stime) and minor page faults of a process so far. */
function usage (pid: number | undefined): { cpu: number, faults: number } | undefined {
  if (pid === undefined) return undefined
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    // Fields 10, 14 and 15 of proc(5) (minflt, utime, stime), counted from after the command
    // name; times in clock ticks (100 Hz).
    return { cpu: (Number(fields[11]) + Number(fields[12])) * 10_000, faults: Number(fields[7]) }
  } catch { return undefined }
}

function rssMiB (pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
    return m !== null ? Math.round(Number(m[1]) / 102.4) / 10 : undefined
  } catch { return undefined }
}

interface Replica { url: string, process?: ChildProcess }

interface Running {
  scenario: Scenario
  /**
   * The processes of this scenario, which take the rounds in turn (--replicas). Two processes
   * of one build once differed by up to 35 % in CPU per request for a whole run: one of them
   * had fallen into the promotion chain that src/inflight.ts explains, the other had not. With
   * that fixed, one process per scenario is the default; more spread the rounds over processes.
   */
  replicas: Replica[]
  skipped?: string
  note?: string
  rounds: LoadResult[]
  /** CPU time the proxy process spent per request in each round, µs (utime + stime, all threads). */
  cpuPerRequest: number[]
  /** Minor page faults of the proxy process per request in each round. */
  faultsPerRequest: number[]
  fixed?: LoadResult
  peakRss?: number
  /** When its process was started (profiles leave out the start-up). */
  spawned?: number
}

class Bench {
  readonly opts: Options
  readonly tmp = mkdtempSync(join(os.tmpdir(), 'gatehouse-bench-'))
  readonly children: ChildProcess[] = []
  loader!: ChildProcess
  private runs = 0

  constructor (opts: Options) { this.opts = opts }

  async startUpstream (): Promise<number[]> {
    const child = fork(join(DIST, 'bench', 'upstream.js'), ['3'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
    this.children.push(child)
    const { ports } = await message<{ ports: number[] }>(child, 'ready')
    pin(this.opts, child.pid, '1')
    return ports
  }

  async startLoader (): Promise<void> {
    this.loader = fork(join(DIST, 'bench', 'load.js'), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
    this.children.push(this.loader)
    await message(this.loader, 'ready')
    pin(this.opts, this.loader.pid, '1')
  }

  async load (request: LoadRequest): Promise<LoadResult> {
    const id = ++this.runs
    const reply = message<{ id: number, result?: LoadResult, error?: string }>(this.loader, 'result')
    this.loader.send({ type: 'run', id, request })
    const { result, error } = await reply
    if (result === undefined) throw new Error(`load generator failed: ${error ?? 'unknown'}`)
    return result
  }

  tlsFiles (): string {
    const dir = join(this.tmp, 'tls')
    mkdirSync(dir, { recursive: true })
    const r = spawnSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2',
      '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
      '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem')], { stdio: 'ignore' })
    if (r.status !== 0) throw new Error('openssl could not make a test certificate')
    return dir
  }

  async startBaseline (upstream: number): Promise<{ port: number, child: ChildProcess }> {
    const child = fork(join(DIST, 'bench', 'baseline.js'), [`http://127.0.0.1:${upstream}`], {
      stdio: ['ignore', 'ignore', 'inherit', 'ipc'],
      execArgv: this.profileArgs('reply-from')
    })
    this.children.push(child)
    const { port } = await message<{ port: number }>(child, 'ready')
    pin(this.opts, child.pid, '0')
    return { port, child }
  }

  private profileArgs (name: string): string[] {
    return this.opts.profile ? ['--cpu-prof', '--cpu-prof-dir', join(this.opts.out, 'profiles', name)] : []
  }

  async startGateway (scenario: Scenario, ports: Ports, replica = 0): Promise<{ port: number, child: ChildProcess }> {
    const dir = join(this.tmp, `${scenario.name}-${replica}`)
    mkdirSync(join(dir, 'routes'), { recursive: true })
    const { config, routes } = (scenario.gateway as NonNullable<Scenario['gateway']>)(ports)
    const port = await freePort()
    const adminPort = await freePort()
    writeFileSync(join(dir, 'gatehouse.yaml'), stringify({ ...config, listen: { host: '127.0.0.1', port }, admin: { host: '127.0.0.1', port: adminPort }, routes: './routes' }))
    for (const [name, r] of Object.entries(routes)) writeFileSync(join(dir, 'routes', `${name}.yaml`), stringify(r))
    // The access log goes to /dev/null (stdout ignored); stderr is kept for start-up failures.
    const child = spawn(process.execPath, [...this.profileArgs(scenario.name), scenario.cli ?? CLI, 'start', '--config', join(dir, 'gatehouse.yaml')], { stdio: ['ignore', 'ignore', 'pipe'], cwd: dir })
    this.children.push(child)
    let stderr = ''
    child.stderr?.on('data', (c: Buffer) => { stderr = (stderr + c.toString()).slice(-4000) })
    await waitForPort(port, child, () => stderr)
    pin(this.opts, child.pid, '0')
    return { port, child }
  }

  async stop (): Promise<void> {
    for (const child of this.children.reverse()) {
      if (child.exitCode !== null || child.signalCode !== null) continue
      const exited = once(child, 'exit')
      child.kill('SIGCONT')
      child.kill('SIGTERM')
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000)
      await exited
      clearTimeout(timer)
    }
    rmSync(this.tmp, { recursive: true, force: true })
  }
}

function median (xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 === 1 ? s[m] : (s[m - 1] + s[m]) / 2
}

function fmt (n: number | undefined, digits = 2): string {
  return n === undefined ? '' : n.toFixed(digits)
}

function machine (opts: Options): Record<string, unknown> {
  return {
    cpus: os.availableParallelism(),
    cpuModel: os.cpus()[0]?.model.trim(),
    node: process.version,
    platform: `${os.type()} ${os.release()} ${os.arch()}`,
    loadAverage: os.loadavg().map((l) => Math.round(l * 100) / 100),
    pinned: opts.pin ? 'gateway/baseline on CPU 0; upstream + load generator on CPU 1' : 'not pinned'
  }
}

function summary (r: Running): { rps?: number, p50?: number, p99?: number, cpu?: number, faults?: number, errors: number } {
  if (r.rounds.length === 0) return { errors: 0 }
  return {
    rps: Math.round(median(r.rounds.map((x) => x.rps))),
    p50: median(r.rounds.map((x) => x.p50)),
    p99: median(r.rounds.map((x) => x.p99)),
    cpu: r.cpuPerRequest.length > 0 ? Math.round(median(r.cpuPerRequest)) : undefined,
    faults: r.faultsPerRequest.length > 0 ? Math.round(median(r.faultsPerRequest) * 100) / 100 : undefined,
    errors: r.rounds.reduce((n, x) => n + x.errors + x.non2xx + x.timeouts, 0) + (r.fixed !== undefined ? r.fixed.errors + r.fixed.non2xx + r.fixed.timeouts : 0)
  }
}

/**
 * a / b as the median of the per-round ratios: rounds are interleaved, so a round's two numbers
 * were taken a few seconds apart, under the same background load. Steadier than a ratio of medians
 * on a shared machine. Falls back to the ratio of medians when the rounds do not pair up.
 */
function paired (a: Running | undefined, b: Running | undefined, of: 'rps' | 'cpu' = 'rps'): number | undefined {
  if (a === undefined || b === undefined || a.skipped !== undefined || b.skipped !== undefined) return undefined
  const xs = of === 'rps' ? a.rounds.map((r) => r.rps) : a.cpuPerRequest
  const ys = of === 'rps' ? b.rounds.map((r) => r.rps) : b.cpuPerRequest
  if (xs.length === 0 || ys.length === 0) return undefined
  if (xs.length !== ys.length) return median(xs) / median(ys)
  return median(xs.map((x, i) => x / ys[i]))
}

function times (x: number | undefined): string {
  return x === undefined || !Number.isFinite(x) ? '' : `${x.toFixed(2)}×`
}

function markdown (runs: Running[], opts: Options, taken: Date, mach: Record<string, unknown>): string {
  const directRun = runs.find((r) => r.scenario.name === 'direct')
  const plainRun = runs.find((r) => r.scenario.name === 'plain')
  const lines = [
    '# Gatehouse benchmark',
    '',
    `Taken ${taken.toISOString().slice(0, 16).replace('T', ' ')} UTC on ${String(mach.cpus)} × ${String(mach.cpuModel)}, Node ${String(mach.node)}, ${String(mach.platform)}; ${String(mach.pinned)}; load average at start ${(mach.loadAverage as number[]).join(' ')}.`,
    `Closed loop: autocannon, ${opts.connections} connections, ${opts.rounds} interleaved round(s) of ${opts.duration} s per scenario (every other round in reverse order; each proxy run as ${opts.replicas} process(es) taking the rounds in turn, after ${opts.warmup} s of warm-up each; each measured run preceded by ${opts.settle} s of unmeasured load on the proxy, which had been stopped meanwhile), median round shown; the × columns are medians of the per-round ratios.` +
      (opts.rate > 0 ? ` Fixed rate: ${opts.rate} req/s for ${opts.rateDuration} s, open loop, evenly paced, ${opts.connections} keep-alive connections.` : '') +
      ' Upstream: node:http, ~1 KiB JSON, keep-alive. HTTP/2 load: a node:http2 client (autocannon has no h2).' +
      ' CPU µs/req: CPU time of the proxy process per request during the closed-loop rounds (less sensitive to a busy machine than req/s).' +
      ' Faults/req: its minor page faults per request in those rounds (a process in steady state takes almost none).',
    '',
    `| Scenario | req/s | p50 ms | p99 ms | × direct | × plain | p99 ms @ ${opts.rate} req/s | CPU µs/req | faults/req | peak RSS MiB | errors |`,
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
  ]
  for (const r of runs) {
    if (r.skipped !== undefined) {
      lines.push(`| ${r.scenario.title} | skipped: ${r.skipped} | | | | | | | | | |`)
      continue
    }
    const s = summary(r)
    const title = r.note !== undefined ? `${r.scenario.title} (${r.note})` : r.scenario.title
    lines.push(`| ${title} | ${s.rps ?? ''} | ${fmt(s.p50)} | ${fmt(s.p99)} | ${times(paired(r, directRun))} | ${times(paired(r, plainRun))} | ${fmt(r.fixed?.p99)} | ${s.cpu ?? ''} | ${s.faults ?? ''} | ${r.peakRss ?? ''} | ${s.errors} |`)
  }
  const get = (name: string): Running | undefined => runs.find((x) => x.scenario.name === name)
  lines.push('')
  const goals: string[] = []
  // CPU per request: the inverse ratio (less CPU per request is more throughput on one core).
  const goal = (a: string, b: string, text: string, target: string): void => {
    const byRps = paired(get(a), get(b))
    const byCpu = paired(get(b), get(a), 'cpu')
    if (byRps !== undefined) goals.push(`${text} = ${times(byRps)} by req/s, ${times(byCpu)} by CPU per request (goal ≥ ${target})`)
  }
  goal('plain', 'reply-from', 'plain route / reply-from baseline', '1.15×')
  goal('all', 'plain', 'all features / plain route', '0.85×')
  goal('auth', 'plain', 'JWT + rate limit / plain route', '0.85×')
  goal('observed', 'plain', 'metrics + access log / plain route', '0.9×')
  if (goals.length > 0) lines.push(goals.join('; ') + '.', '')
  lines.push('Reproduce: `npm run bench` (or `npm run bench -- --only plain --duration 5`). Numbers from a shared machine are noisy: compare ratios within one run, not across runs.', '')
  return lines.join('\n')
}

async function soak (bench: Bench, runs: Running[], opts: Options): Promise<void> {
  const r = runs.find((x) => x.scenario.kind === 'gateway' && x.skipped === undefined)
  if (r === undefined) throw new Error('no runnable gateway scenario to soak')
  // The soak starts one process per scenario.
  const { url, process: child } = r.replicas[0]
  const pid = child?.pid
  // JIT, pools and caches fill up first: RSS growth is measured on a warm process.
  const warmup = Math.max(opts.warmup, 10)
  process.stdout.write(`soak: warming ${r.scenario.name} up for ${warmup} s ...\n`)
  await bench.load({ url, headers: r.scenario.headers, connections: opts.connections, duration: warmup, rate: 0, h2: r.scenario.protocol === 'h2' })
  const samples: Array<{ t: number, rssMiB?: number }> = []
  const started = Date.now()
  const timer = setInterval(() => samples.push({ t: Math.round((Date.now() - started) / 1000), rssMiB: rssMiB(pid) }), 1000)
  process.stdout.write(`soak: ${r.scenario.name} at full load for ${opts.soak} s ...\n`)
  const result = await bench.load({ url, headers: r.scenario.headers, connections: opts.connections, duration: opts.soak, rate: 0, h2: r.scenario.protocol === 'h2' })
  clearInterval(timer)
  // Growth is measured from the end of warm-up (10 % into the run) to the end, not from start-up.
  const base = samples[Math.max(0, Math.floor(samples.length / 10))]?.rssMiB ?? 0
  const end = samples.at(-1)?.rssMiB ?? 0
  const growth = base > 0 ? Math.round(1000 * (end - base) / base) / 10 : 0
  // Under load RSS is a sawtooth: the heap grows to its next collection and falls back (by up to
  // 60 MiB here), so a single sample says more about where the cycle was than about a leak. What
  // a leak raises is the floor, the RSS the process falls back to: the lowest sample of the
  // first third of the run against the lowest of the last third.
  const third = Math.max(1, Math.floor(samples.length / 3))
  const floor = (xs: typeof samples): number => Math.min(...xs.map((x) => x.rssMiB ?? Infinity))
  const firstFloor = floor(samples.slice(0, third))
  const lastFloor = floor(samples.slice(-third))
  const floorGrowth = Number.isFinite(firstFloor) && Number.isFinite(lastFloor) && firstFloor > 0 ? Math.round(1000 * (lastFloor - firstFloor) / firstFloor) / 10 : 0
  const out = { taken: new Date().toISOString(), machine: machine(opts), scenario: r.scenario.name, result, rss: { baseMiB: base, endMiB: end, peakMiB: peakRssMiB(pid), growthPercent: growth, firstThirdFloorMiB: firstFloor, lastThirdFloorMiB: lastFloor, floorGrowthPercent: floorGrowth, samples } }
  const stamp = out.taken.replace(/[:.]/g, '-')
  writeFileSync(join(opts.out, `soak-${stamp}.json`), JSON.stringify(out, null, 2))
  const md = [
    '# Gatehouse soak',
    '',
    `Taken ${out.taken.slice(0, 16).replace('T', ' ')} UTC on ${String(out.machine.cpus)} × ${String(out.machine.cpuModel)}, Node ${process.version}; ${String(out.machine.pinned)}.`,
    '',
    `${r.scenario.title}: ${opts.soak} s at full load (${opts.connections} connections): ${result.requests} requests, ${result.rps} req/s, ` +
      `${result.errors + result.timeouts} errors, ${result.non2xx} non-2xx; p99 ${fmt(result.p99)} ms. ` +
      `RSS floor (lowest sample) ${firstFloor} MiB in the first third -> ${lastFloor} MiB in the last third (${floorGrowth >= 0 ? '+' : ''}${floorGrowth} %); ` +
      `single samples: ${base} MiB after ${warmup} s of warm-up -> ${end} MiB at the end (${growth >= 0 ? '+' : ''}${growth} %), peak ${out.rss.peakMiB ?? '?'} MiB.`,
    ''
  ].join('\n')
  writeFileSync(join(opts.out, 'soak-latest.md'), md)
  process.stdout.write(md)
}

async function main (): Promise<void> {
  const opts = parseOptions()
  mkdirSync(opts.out, { recursive: true })
  const taken = new Date()
  const mach = machine(opts)
  let selected = SCENARIOS
  if (opts.only !== undefined) {
    const want = new Set(opts.only)
    // Ratios need their reference points (except in a soak, which runs one scenario alone).
    if (opts.soak === 0) { want.add('direct'); want.add('plain') }
    selected = SCENARIOS.filter((s) => want.has(s.name))
  } else if (opts.soak > 0) {
    const all = SCENARIOS.find((s) => s.name === 'all') as Scenario
    selected = [all.needs?.every(present) === true ? all : SCENARIOS.find((s) => s.name === 'plain') as Scenario]
  }

  for (const dir of opts.compare) {
    const cli = join(dir, 'src', 'cli.js')
    if (!existsSync(cli)) { process.stderr.write(`--compare: ${cli} does not exist\n`); process.exit(1) }
  }
  if (opts.compare.length > 0) {
    selected = selected.flatMap((s) => s.kind !== 'gateway' || s.cli !== undefined
      ? [s]
      : [s, ...opts.compare.map((dir) => ({ ...s, name: `${s.name}@${basename(dir)}`, title: `${s.title} [${basename(dir)}]`, cli: join(dir, 'src', 'cli.js') }))])
  }
  const bench = new Bench(opts)
  const skip = new Map<string, number>()
  const cleanup = (): void => { void bench.stop().finally(() => process.exit(130)) }
  process.once('SIGINT', cleanup)
  try {
    process.stdout.write(`gatehouse bench: ${selected.map((s) => s.name).join(', ')}\n`)
    const upstream = await bench.startUpstream()
    await bench.startLoader()
    const ports: Ports = { upstream, tlsDir: selected.some((s) => s.protocol !== undefined) ? bench.tlsFiles() : '' }
    const runs: Running[] = []
    for (const scenario of selected) {
      const r: Running = { scenario, rounds: [], cpuPerRequest: [], faultsPerRequest: [], replicas: [] }
      runs.push(r)
      const missing = (scenario.needs ?? []).filter((m) => !present(m))
      if (missing.length > 0) {
        r.skipped = `${missing.map((m) => m.replace(/\.js$/, '.ts')).join(', ')} not in the build`
        continue
      }
      const absent = (scenario.notes ?? []).filter((m) => !present(m))
      if (absent.length > 0) r.note = `without ${absent.map((m) => m.replace(/\.js$/, '.ts')).join(', ')}`
      try {
        r.spawned = Date.now()
        for (let i = 0; i < (scenario.kind === 'direct' || opts.soak > 0 ? 1 : opts.replicas) && r.skipped === undefined; i++) {
          let port: number
          let child: ChildProcess | undefined
          if (scenario.kind === 'direct') port = upstream[0]
          else if (scenario.kind === 'baseline') ({ port, child } = await bench.startBaseline(upstream[0]))
          else ({ port, child } = await bench.startGateway(scenario, ports, i))
          const url = `${scenario.protocol === 'https' || scenario.protocol === 'h2' ? 'https' : 'http'}://127.0.0.1:${port}${scenario.path}`
          r.replicas.push({ url, process: child })
          await probe(scenario, url)
          const second = await probe(scenario, url)
          if (second.status !== 200) r.skipped = `probe answered ${second.status} ${String(second.headers['content-type']).includes('problem') ? String((JSON.parse(second.body) as { code?: string }).code) : second.body.slice(0, 80)}`
          else r.skipped = scenario.verify?.(second)
        }
      } catch (err) {
        const message = (err as Error).message
        r.skipped = message.includes('wrong version number')
          ? 'the gateway answered plain HTTP on its TLS port (tls: not implemented in this build)'
          : `did not start or answer: ${message.split('\n')[0].slice(0, 160)}`
      }
      if (r.skipped !== undefined) process.stdout.write(`  ${scenario.name}: skipped (${r.skipped})\n`)
    }
    const active = runs.filter((r) => r.skipped === undefined)
    if (opts.soak > 0) {
      await soak(bench, active, opts)
      return
    }
    const base = { connections: opts.connections }
    const loadStarted = Date.now()
    // Only the proxy being measured runs: the others are stopped (SIGSTOP) meanwhile, so their
    // timers (metrics sampling, connection checks) never take CPU 0 from it. With eleven
    // scenarios alive, the idle ones had moved the plain/baseline ratio by up to 20 %.
    const park = (p: Replica, on: boolean): void => {
      if (p.process?.pid !== undefined && opts.pin) {
        try { process.kill(p.process.pid, on ? 'SIGCONT' : 'SIGSTOP') } catch {}
      }
    }
    // A parked proxy wakes up as if it had been idle for the whole time it was stopped: V8 then
    // judges its allocation rate low, shrinks and releases the young generation, and for about
    // two seconds of full load every new allocation touches fresh pages (0.5-2 minor page faults
    // per request here, against 0.04 when busy; the baseline and the gateways alike, the larger
    // heap more). Unmeasured load first, so that rounds compare busy processes, as in service.
    const measure = async (p: Replica, r: Running, duration: number, rate: number, settle = opts.settle): Promise<{ result: LoadResult, cpu?: number, faults?: number }> => {
      const load = async (seconds: number, perSecond: number): Promise<LoadResult> =>
        await bench.load({ ...base, url: p.url, headers: r.scenario.headers, duration: seconds, rate: perSecond, h2: r.scenario.protocol === 'h2' })
      park(p, true)
      if (p.process !== undefined && settle > 0) await load(settle, 0)
      const before = usage(p.process?.pid)
      const result = await load(duration, rate)
      const after = usage(p.process?.pid)
      park(p, false)
      if (before === undefined || after === undefined || result.requests === 0) return { result }
      return { result, cpu: (after.cpu - before.cpu) / result.requests, faults: (after.faults - before.faults) / result.requests }
    }
    for (const r of active) for (const p of r.replicas) park(p, false)
    if (opts.warmup > 0) {
      for (const r of active) for (const p of r.replicas) await measure(p, r, opts.warmup, 0, 0)
    }
    // On this shared VM the neighbours' load changes within seconds: short rounds, many of them,
    // and the order reversed every other round (each pair of scenarios is measured side by side
    // both ways round) made the paired ratios steadier than five rounds of 3 s in one order.
    for (let round = 1; round <= opts.rounds; round++) {
      for (const r of round % 2 === 1 ? active : [...active].reverse()) {
        const p = r.replicas[(round - 1) % r.replicas.length]
        const { result, cpu, faults } = await measure(p, r, opts.duration, 0)
        r.rounds.push(result)
        if (cpu !== undefined) r.cpuPerRequest.push(cpu)
        if (faults !== undefined) r.faultsPerRequest.push(faults)
        process.stdout.write(`  round ${round} ${r.scenario.name.padEnd(11)} ${String(result.rps).padStart(7)} req/s  p50 ${fmt(result.p50)} ms  p99 ${fmt(result.p99)} ms${cpu !== undefined ? `  ${Math.round(cpu)} µs/req` : ''}${faults !== undefined ? `  ${faults.toFixed(2)} faults/req` : ''}${result.errors + result.non2xx > 0 ? `  errors ${result.errors} non-2xx ${result.non2xx}` : ''}\n`)
      }
    }
    if (opts.rate > 0) {
      for (const r of active) {
        r.fixed = (await measure(r.replicas[0], r, opts.rateDuration, opts.rate, Math.min(opts.settle, 1))).result
        process.stdout.write(`  @${opts.rate}/s  ${r.scenario.name.padEnd(11)} p50 ${fmt(r.fixed.p50)} ms  p99 ${fmt(r.fixed.p99)} ms\n`)
      }
    }
    for (const r of active) for (const p of r.replicas) park(p, true)
    for (const r of active) {
      const peaks = r.replicas.map((p) => peakRssMiB(p.process?.pid)).filter((m): m is number => m !== undefined)
      r.peakRss = peaks.length > 0 ? Math.max(...peaks) : undefined
    }

    const stamp = taken.toISOString().replace(/[:.]/g, '-')
    const json = {
      taken: taken.toISOString(),
      machine: mach,
      options: opts,
      scenarios: runs.map((r) => ({ name: r.scenario.name, title: r.scenario.title, skipped: r.skipped, note: r.note, ...summary(r), peakRssMiB: r.peakRss, cpuPerRequest: r.cpuPerRequest, faultsPerRequest: r.faultsPerRequest, rounds: r.rounds, fixedRate: r.fixed }))
    }
    writeFileSync(join(opts.out, `${stamp}.json`), JSON.stringify(json, null, 2))
    const md = markdown(runs, opts, taken, mach)
    writeFileSync(join(opts.out, 'latest.md'), md)
    process.stdout.write('\n' + md)
    process.stdout.write(`\nwritten: ${join(opts.out, `${stamp}.json`)}, ${join(opts.out, 'latest.md')}\n`)
    for (const r of active) skip.set(r.scenario.name, loadStarted - (r.spawned ?? loadStarted))
  } finally {
    await bench.stop()
  }
  if (opts.profile) {
    const dir = join(opts.out, 'profiles')
    for (const name of existsSync(dir) ? readdirSync(dir) : []) {
      const files = readdirSync(join(dir, name)).filter((f) => f.endsWith('.cpuprofile')).sort()
      if (files.length === 0) continue
      const s = summarizeProfile(join(dir, name, files[files.length - 1]), ROOT, 25, skip.get(name) ?? 0)
      process.stdout.write(`\nprofile ${name} (idle ${s.idlePercent}%; % of busy time)\n`)
      for (const p of s.packages.slice(0, 10)) process.stdout.write(`  ${String(p.selfPercent).padStart(5)}%  ${p.name}\n`)
      for (const f of s.functions) process.stdout.write(`  ${String(f.selfPercent).padStart(5)}%  ${f.name}\n`)
    }
  }
}

main().catch((err: Error) => {
  process.stderr.write(`bench failed: ${err.stack ?? err.message}\n`)
  process.exit(1)
})
