import { readFileSync, readdirSync, statSync, existsSync } from 'node:fs'
import { basename, extname, isAbsolute, join, resolve, dirname } from 'node:path'
import { pathToFileURL } from 'node:url'
import { createRequire } from 'node:module'
import { Type, type TSchema, type StaticDecode, FormatRegistry } from '@sinclair/typebox'
import { Value, type ValueError } from '@sinclair/typebox/value'
import { parse as parseYaml } from 'yaml'
import { isIP } from 'node:net'
import type { FastifyPluginAsync } from 'fastify'
import { DURATION_PATTERN, SIZE_PATTERN, parseDuration, parseSize } from './units.js'

/*
 * One place for every schema: gatehouse.yaml and route files are validated against these, and the
 * TypeScript types used everywhere else are their decoded `StaticDecode<>` types. Durations and
 * sizes are decoded to milliseconds and bytes, so no other module parses a unit.
 */

const Duration = Type.Transform(Type.Union([
  Type.Integer({ minimum: 0 }),
  Type.String({ pattern: DURATION_PATTERN })
], { hint: 'use a duration such as 250ms, 5s, 1m or a number of milliseconds' }))
  .Decode((v) => parseDuration(v))
  .Encode((v) => v)

const Size = Type.Transform(Type.Union([
  Type.Integer({ minimum: 0 }),
  Type.String({ pattern: SIZE_PATTERN })
], { hint: 'use a size such as 512KiB, 10MiB or a number of bytes' }))
  .Decode((v) => parseSize(v))
  .Encode((v) => v)

FormatRegistry.Set('cidr', (v) => {
  if (['loopback', 'linklocal', 'uniquelocal'].includes(v)) return true
  const [addr, bits, extra] = v.split('/')
  if (extra !== undefined) return false
  const family = isIP(addr)
  if (family === 0) return false
  if (bits === undefined) return true
  const n = Number(bits)
  return /^\d+$/.test(bits) && n >= 0 && n <= (family === 4 ? 32 : 128)
})
FormatRegistry.Set('http-url', (v) => {
  try {
    const u = new URL(v)
    return (u.protocol === 'http:' || u.protocol === 'https:') && u.username === '' && u.password === ''
  } catch { return false }
})

const Cidr = Type.String({ format: 'cidr', hint: 'use an address (10.0.0.1), a CIDR (10.0.0.0/8) or loopback' })
const CidrList = Type.Array(Cidr)
const HeaderName = Type.String({ pattern: '^[!#$%&\'*+.^_`|~0-9A-Za-z-]+$', hint: 'use a header name such as x-user-id' })
const Strict = { additionalProperties: false }

export const RateLimitKey = Type.String({
  pattern: '^(ip|apikey|jwt:[A-Za-z0-9_.-]+|header:[!#$%&\'*+.^_`|~0-9A-Za-z-]+)$',
  hint: 'use ip, apikey, jwt:CLAIM or header:NAME'
})

export const RateLimitSettings = Type.Object({
  max: Type.Integer({ minimum: 1 }),
  window: Duration,
  key: Type.Optional(RateLimitKey)
}, Strict)

export const JwtGlobal = Type.Object({
  secret: Type.Optional(Type.String({ minLength: 1 })),
  publicKey: Type.Optional(Type.String({ minLength: 1, hint: 'the path of a PEM public key file' })),
  jwksUrl: Type.Optional(Type.String({ format: 'http-url' })),
  algorithms: Type.Optional(Type.Array(Type.String({ pattern: '^(HS|RS|PS|ES)(256|384|512)$|^EdDSA$', hint: 'use HS256, RS256, ES256, PS256 ... (never none)' }), { minItems: 1 })),
  issuer: Type.Optional(Type.Union([Type.String(), Type.Array(Type.String(), { minItems: 1 })])),
  audience: Type.Optional(Type.Union([Type.String(), Type.Array(Type.String(), { minItems: 1 })])),
  clockSkew: Type.Optional(Duration),
  jwksRefreshInterval: Type.Optional(Duration),
  jwksRefreshCooldown: Type.Optional(Duration)
}, Strict)

export const GatewayConfigSchema = Type.Object({
  listen: Type.Object({
    host: Type.String({ default: '0.0.0.0' }),
    port: Type.Integer({ minimum: 0, maximum: 65535, default: 8080 })
  }, { ...Strict, default: {} }),
  tls: Type.Optional(Type.Object({
    cert: Type.String(),
    key: Type.String(),
    ca: Type.Optional(Type.String()),
    sni: Type.Optional(Type.Record(Type.String(), Type.Object({ cert: Type.String(), key: Type.String() }, Strict))),
    redirectHttpPort: Type.Optional(Type.Integer({ minimum: 0, maximum: 65535 })),
    minVersion: Type.Optional(Type.Union([Type.Literal('TLSv1.2'), Type.Literal('TLSv1.3')]))
  }, Strict)),
  trustProxy: Type.Union([Type.Literal(false), CidrList, Cidr], {
    default: false,
    hint: 'list the CIDRs of your load balancers, e.g. [10.0.0.0/8]; true and hop counts are refused because they let clients spoof their address'
  }),
  routes: Type.String({ default: './routes' }),
  redis: Type.Optional(Type.Object({
    url: Type.String({ pattern: '^rediss?://', hint: 'use redis://host:port/db' }),
    keyPrefix: Type.String({ default: 'gatehouse:' }),
    connectTimeout: Duration
  }, Strict)),
  jwt: Type.Optional(JwtGlobal),
  apiKeys: Type.Optional(Type.Object({
    header: Type.String({ default: 'x-api-key' }),
    keys: Type.Record(Type.String({ pattern: '^[A-Za-z0-9_.-]+$' }), Type.String({ minLength: 8, hint: 'API keys must be at least 8 characters' }))
  }, Strict)),
  rateLimit: Type.Optional(RateLimitSettings),
  cache: Type.Object({
    store: Type.Union([Type.Literal('memory'), Type.Literal('redis')], { default: 'memory' }),
    maxBytes: Size,
    maxEntryBytes: Size
  }, { ...Strict, default: {} }),
  compress: Type.Object({
    threshold: Size,
    encodings: Type.Array(Type.Union([Type.Literal('br'), Type.Literal('gzip'), Type.Literal('deflate')]), { default: ['br', 'gzip', 'deflate'] })
  }, { ...Strict, default: {} }),
  limits: Type.Object({
    bodyLimit: Size,
    maxHeaderBytes: Size,
    headersTimeout: Duration,
    requestTimeout: Duration,
    keepAliveTimeout: Duration,
    shutdownTimeout: Duration,
    maxConnectionsPerIp: Type.Optional(Type.Integer({ minimum: 1 })),
    maxConcurrent: Type.Optional(Type.Integer({ minimum: 1 })),
    maxEventLoopDelay: Type.Optional(Duration)
  }, { ...Strict, default: {} }),
  ipFilter: Type.Object({
    allow: Type.Array(Cidr, { default: [] }),
    deny: Type.Array(Cidr, { default: [] })
  }, { ...Strict, default: {} }),
  securityHeaders: Type.Boolean({ default: true }),
  cors: Type.Union([Type.Boolean(), Type.Object({
    origin: Type.Union([Type.Boolean(), Type.String(), Type.Array(Type.String())]),
    credentials: Type.Optional(Type.Boolean()),
    methods: Type.Optional(Type.Array(Type.String())),
    maxAge: Type.Optional(Type.Integer({ minimum: 0 }))
  }, Strict)], { default: false }),
  admin: Type.Union([Type.Literal(false), Type.Object({
    host: Type.String({ default: '127.0.0.1' }),
    port: Type.Integer({ minimum: 0, maximum: 65535, default: 9901 })
  }, Strict)], { default: {} }),
  logging: Type.Object({
    level: Type.Union(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map((l) => Type.Literal(l)), { default: 'info' }),
    accessLog: Type.Boolean({ default: true })
  }, { ...Strict, default: {} }),
  metrics: Type.Object({
    onMainListener: Type.Boolean({ default: false })
  }, { ...Strict, default: {} })
}, Strict)

// Defaults of sizes and durations are given encoded, and decoded with everything else.
const gatewayDefaults = {
  cache: { maxBytes: '256MiB', maxEntryBytes: '8MiB' },
  compress: { threshold: '1KiB' },
  limits: { bodyLimit: '10MiB', maxHeaderBytes: '16KiB', headersTimeout: '15s', requestTimeout: '0', keepAliveTimeout: '65s', shutdownTimeout: '30s' },
  redis: { connectTimeout: '2s' }
}

const Target = Type.Object({
  url: Type.String({ format: 'http-url', hint: 'use http://host:port or https://host:port' }),
  weight: Type.Integer({ minimum: 1, maximum: 1000, default: 1 })
}, Strict)

export const RouteSchema = Type.Object({
  name: Type.Optional(Type.String({ pattern: '^[a-z0-9][a-z0-9_-]*$', hint: 'use lower-case letters, digits, - and _' })),
  match: Type.Object({
    prefix: Type.String({ pattern: "^/([A-Za-z0-9._~!$&'()+,;=@-]+(/[A-Za-z0-9._~!$&'()+,;=@-]+)*)?/?$", hint: 'start with /, e.g. /orders; letters, digits and -._~!$&\'()+,;=@ only, no empty segments' }),
    hosts: Type.Optional(Type.Array(Type.String({ pattern: '^(\\*\\.)?[A-Za-z0-9.-]+$', hint: 'use a host name such as api.example.com or *.example.com, without port' }), { minItems: 1 })),
    methods: Type.Optional(Type.Array(Type.String({ pattern: '^[A-Z][A-Z0-9-]*$', hint: 'use upper-case method names such as GET' }), { minItems: 1 }))
  }, Strict),
  rewrite: Type.Optional(Type.Object({ prefix: Type.String({ pattern: '^/', hint: 'start with /' }) }, Strict)),
  preserveHost: Type.Boolean({ default: false }),
  upstream: Type.Optional(Type.Object({
    targets: Type.Array(Target, { minItems: 1, hint: 'list at least one target: [{ url: http://127.0.0.1:3001 }]' }),
    balancer: Type.Union(['round-robin', 'weighted', 'least-connections', 'p2c', 'random', 'consistent-hash'].map((b) => Type.Literal(b)), { default: 'round-robin' }),
    hashKey: Type.Optional(Type.String({ pattern: '^(ip|header:[!#$%&\'*+.^_`|~0-9A-Za-z-]+|cookie:[!#$%&\'*+.^_`|~0-9A-Za-z-]+)$', hint: 'use ip, header:NAME or cookie:NAME' })),
    healthCheck: Type.Optional(Type.Object({
      path: Type.String({ pattern: '^/', default: '/health' }),
      interval: Duration,
      timeout: Duration,
      healthyThreshold: Type.Integer({ minimum: 1, default: 2 }),
      unhealthyThreshold: Type.Integer({ minimum: 1, default: 3 }),
      expectStatus: Type.Optional(Type.Array(Type.Integer({ minimum: 100, maximum: 599 })))
    }, Strict)),
    passive: Type.Optional(Type.Object({
      consecutiveFailures: Type.Integer({ minimum: 1, default: 5 }),
      ejectFor: Duration,
      maxEjectFor: Type.Optional(Duration),
      maxEjectedPercent: Type.Integer({ minimum: 0, maximum: 100, default: 50 })
    }, Strict)),
    timeouts: Type.Object({
      connect: Duration,
      response: Duration,
      idle: Type.Optional(Duration)
    }, { ...Strict, default: {} }),
    retries: Type.Object({
      attempts: Type.Integer({ minimum: 0, maximum: 10, default: 2 }),
      methods: Type.Optional(Type.Array(Type.String({ pattern: '^[A-Z][A-Z0-9-]*$' }))),
      backoff: Type.Optional(Duration),
      budget: Type.Optional(Type.Number({ minimum: 0, maximum: 1 })),
      idempotencyKey: Type.Optional(Type.Boolean())
    }, { ...Strict, default: {} }),
    circuitBreaker: Type.Optional(Type.Object({
      failureRatio: Type.Number({ minimum: 0, maximum: 1, default: 0.5 }),
      minRequests: Type.Integer({ minimum: 1, default: 20 }),
      window: Duration,
      openFor: Duration,
      halfOpenRequests: Type.Integer({ minimum: 1, default: 3 })
    }, Strict)),
    connections: Type.Integer({ minimum: 1, maximum: 10000, default: 128 }),
    keepAliveTimeout: Duration,
    http2: Type.Boolean({ default: false, hint: 'true speaks HTTP/2 to the targets: h2 by ALPN on https targets, h2c on http targets' }),
    tls: Type.Optional(Type.Object({
      ca: Type.Optional(Type.String({ hint: 'the path of a PEM CA bundle' })),
      cert: Type.Optional(Type.String()),
      key: Type.Optional(Type.String()),
      servername: Type.Optional(Type.String()),
      rejectUnauthorized: Type.Boolean({ default: true })
    }, Strict))
  }, Strict)),
  static: Type.Optional(Type.Object({
    root: Type.String({ minLength: 1 }),
    maxAge: Duration,
    index: Type.Union([Type.Literal(false), Type.Array(Type.String())], { default: ['index.html'] })
  }, Strict)),
  auth: Type.Optional(Type.Union([Type.Literal('none'), Type.Object({
    jwt: Type.Optional(Type.Union([Type.Boolean(), Type.Object({
      audience: Type.Optional(Type.Union([Type.String(), Type.Array(Type.String())])),
      issuer: Type.Optional(Type.Union([Type.String(), Type.Array(Type.String())])),
      requireClaims: Type.Optional(Type.Record(Type.String(), Type.Union([Type.String(), Type.Array(Type.String()), Type.Boolean(), Type.Number()]))),
      claimsToHeaders: Type.Optional(Type.Record(Type.String(), HeaderName)),
      cookie: Type.Optional(Type.String()),
      optional: Type.Optional(Type.Boolean())
    }, Strict)])),
    apiKey: Type.Optional(Type.Boolean())
  }, Strict)])),
  rateLimit: Type.Optional(Type.Union([Type.Literal(false), RateLimitSettings])),
  cache: Type.Optional(Type.Object({
    enabled: Type.Boolean({ default: true }),
    maxEntryBytes: Type.Optional(Size),
    defaultTtl: Type.Optional(Duration)
  }, Strict)),
  compress: Type.Boolean({ default: true }),
  headers: Type.Optional(Type.Object({
    request: Type.Optional(Type.Object({ set: Type.Record(HeaderName, Type.String(), { default: {} }), remove: Type.Array(HeaderName, { default: [] }) }, Strict)),
    response: Type.Optional(Type.Object({ set: Type.Record(HeaderName, Type.String(), { default: {} }), remove: Type.Array(HeaderName, { default: [] }) }, Strict))
  }, Strict)),
  bodyLimit: Type.Optional(Size),
  websocket: Type.Boolean({ default: false }),
  ipFilter: Type.Optional(Type.Object({
    allow: Type.Array(Cidr, { default: [] }),
    deny: Type.Array(Cidr, { default: [] })
  }, Strict)),
  cors: Type.Optional(Type.Union([Type.Boolean(), Type.Object({
    origin: Type.Union([Type.Boolean(), Type.String(), Type.Array(Type.String())]),
    credentials: Type.Optional(Type.Boolean()),
    methods: Type.Optional(Type.Array(Type.String())),
    maxAge: Type.Optional(Type.Integer({ minimum: 0 }))
  }, Strict)]))
}, Strict)

const routeDefaults = {
  upstream: { timeouts: { connect: '2s', response: '30s' }, keepAliveTimeout: '60s' },
  static: { maxAge: '0' },
  upstreamHealthCheck: { interval: '5s', timeout: '1s' },
  upstreamPassive: { ejectFor: '30s' },
  upstreamBreaker: { window: '10s', openFor: '30s' }
}

export type GatewayConfig = StaticDecode<typeof GatewayConfigSchema>
export type RouteSpec = StaticDecode<typeof RouteSchema>

/** A validated route: its spec, the file it came from and, for .ts/.js files, its Fastify plugin. */
export type RouteDefinition = RouteSpec & {
  name: string
  file: string
  plugin?: FastifyPluginAsync
}

/** The shape a .ts/.js route file default-exports. `defineRoute` only types it. */
export type RouteInput = Record<string, unknown> & { plugin?: FastifyPluginAsync }
export function defineRoute<T extends RouteInput> (route: T): T {
  return route
}

export interface ConfigProblem { file: string, path: string, message: string, hint?: string }

export class ConfigError extends Error {
  readonly problems: ConfigProblem[]
  constructor (problems: ConfigProblem[]) {
    super(problems.map(formatProblem).join('\n'))
    this.name = 'ConfigError'
    this.problems = problems
  }
}

export function formatProblem (p: ConfigProblem): string {
  return `${p.file}: ${p.path || '/'}: ${p.message}${p.hint ? ` (${p.hint})` : ''}`
}

const ENV_REF = /\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}/g

/** Replaces `${VAR}` and `${VAR:-default}` in every string of a parsed document. */
function interpolate (value: unknown, file: string, path: string, env: NodeJS.ProcessEnv, problems: ConfigProblem[]): unknown {
  if (typeof value === 'string') {
    if (!value.includes('${')) return value
    return value.replace(ENV_REF, (_all, name: string, fallback: string | undefined) => {
      const v = env[name]
      if (v !== undefined && v !== '') return v
      if (fallback !== undefined) return fallback
      problems.push({ file, path, message: `environment variable ${name} is not set`, hint: `export ${name}, or write \${${name}:-default}` })
      return ''
    })
  }
  if (Array.isArray(value)) return value.map((v, i) => interpolate(v, file, `${path}/${i}`, env, problems))
  if (value !== null && typeof value === 'object') {
    const out: Record<string, unknown> = {}
    for (const [k, v] of Object.entries(value)) out[k] = interpolate(v, file, `${path}/${k}`, env, problems)
    return out
  }
  return value
}

function restoreRefs (value: unknown, refs: string[]): unknown {
  if (typeof value === 'string') return value.replace(/__gatehouse_env_(\d+)__/g, (_m, i: string) => refs[Number(i)])
  if (Array.isArray(value)) return value.map((v) => restoreRefs(v, refs))
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, restoreRefs(v, refs)]))
  }
  return value
}

function schemaAt (schema: TSchema, path: string): TSchema | undefined {
  let s: TSchema | undefined = schema
  for (const part of path.split('/').slice(1)) {
    if (s === undefined) return undefined
    if (s.type === 'object' && s.properties?.[part] !== undefined) s = s.properties[part]
    else if (s.type === 'object' && s.patternProperties !== undefined) s = Object.values(s.patternProperties)[0] as TSchema
    else if (s.type === 'array') s = s.items
    else if (s.anyOf !== undefined) s = (s.anyOf as TSchema[]).find((x) => x.type === 'object' || x.type === 'array')
    else return undefined
    if (s?.anyOf !== undefined && !(/^\d+$/.test(part))) {
      const obj: TSchema | undefined = (s.anyOf as TSchema[]).find((x) => x.type === 'object')
      if (obj !== undefined && s.hint === undefined) s = obj
    }
  }
  return s
}

function hintFor (error: ValueError, root: TSchema): string | undefined {
  if (error.message === 'Unexpected property') {
    const parent = schemaAt(root, error.path.split('/').slice(0, -1).join('/'))
    const keys = parent?.properties !== undefined ? Object.keys(parent.properties) : []
    return keys.length > 0 ? `allowed keys here: ${keys.join(', ')}` : 'remove it'
  }
  if (error.schema.hint !== undefined) return error.schema.hint as string
  const own = schemaAt(root, error.path)
  if (own?.hint !== undefined) return own.hint as string
  if (error.schema.anyOf !== undefined && (error.schema.anyOf as TSchema[]).every((s) => s.const !== undefined)) {
    return `use one of: ${(error.schema.anyOf as TSchema[]).map((s) => String(s.const)).join(', ')}`
  }
  return typeHints[error.schema.type as string]
}

/** The hint of a plain wrong-type error, so that every problem says how to fix it. */
const typeHints: Record<string, string> = {
  boolean: 'use true or false',
  integer: 'use a whole number',
  number: 'use a number',
  string: 'use a string; quote it if YAML reads it as something else',
  array: 'use a list, e.g. [a, b]',
  object: 'use a mapping, e.g. { key: value }'
}

/** Validates `raw` against `schema`; returns the decoded value or pushes every problem found. */
function validate<S extends TSchema> (schema: S, raw: unknown, file: string, problems: ConfigProblem[]): StaticDecode<S> | undefined {
  let value = Value.Default(schema, raw)
  // Convert turns interpolated strings ("8080", "true") into their types; it would also turn
  // `bodyLimit: true` into 1 byte: conversions from anything but a string are undone.
  value = onlyFromStrings(value, Value.Convert(schema, Value.Clone(value)))
  const errors = [...Value.Errors(schema, value)]
  if (errors.length > 0) {
    // A union reports its own failure and each branch's: keep the most specific ones.
    const seen = new Set<string>()
    const specific = errors.filter((e) => !errors.some((o) => o !== e && o.path.startsWith(e.path + '/')))
    for (const e of specific.length > 0 ? specific : errors) {
      const key = e.path + e.message
      // A field already reported (a missing environment variable) is not reported twice.
      if (seen.has(key) || problems.some((p) => p.file === file && p.path === e.path)) continue
      seen.add(key)
      // Only the first letter: the message may quote a pattern, whose case matters.
      problems.push({ file, path: e.path, message: e.message.charAt(0).toLowerCase() + e.message.slice(1), hint: hintFor(e, schema) })
    }
    return undefined
  }
  return Value.Decode(schema, value)
}

/** `converted`, except where the original was not a string and Convert changed its type. */
function onlyFromStrings (original: unknown, converted: unknown): unknown {
  if (original === converted) return converted
  if (Array.isArray(original) && Array.isArray(converted)) return converted.map((v, i) => onlyFromStrings(original[i], v))
  if (isObject(original) && isObject(converted)) {
    const out: Record<string, unknown> = {}
    for (const [k, v] of Object.entries(converted)) out[k] = onlyFromStrings(original[k], v)
    return out
  }
  if (original !== undefined && original !== null && typeof original !== 'string' && typeof original !== typeof converted) return original
  return converted
}

function deepFreeze<T> (value: T): T {
  if (value !== null && typeof value === 'object' && !Object.isFrozen(value)) {
    Object.freeze(value)
    for (const v of Object.values(value)) deepFreeze(v)
  }
  return value
}

function mergeDefaults (target: Record<string, unknown>, defaults: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = { ...target }
  for (const [k, v] of Object.entries(defaults)) {
    const cur = out[k]
    if (cur === undefined) out[k] = v
    else if (v !== null && typeof v === 'object' && cur !== null && typeof cur === 'object' && !Array.isArray(cur)) {
      out[k] = mergeDefaults(cur as Record<string, unknown>, v as Record<string, unknown>)
    }
  }
  return out
}

function readDocument (file: string, problems: ConfigProblem[]): unknown {
  let text: string
  try {
    text = readFileSync(file, 'utf8')
  } catch (err) {
    problems.push({ file, path: '', message: `cannot be read: ${(err as NodeJS.ErrnoException).code ?? String(err)}`, hint: 'check the path and its permissions' })
    return undefined
  }
  try {
    if (extname(file) === '.json') return JSON.parse(text)
    // `${VAR}` is not valid YAML everywhere (in a flow mapping it reads as one): hide the
    // references behind placeholders while parsing, then put them back for interpolate().
    const refs: string[] = []
    const hidden = text.replace(ENV_REF, (ref) => `__gatehouse_env_${refs.push(ref) - 1}__`)
    return refs.length === 0 ? parseYaml(hidden) : restoreRefs(parseYaml(hidden), refs)
  } catch (err) {
    problems.push({ file, path: '', message: `is not valid ${extname(file) === '.json' ? 'JSON' : 'YAML'}: ${(err as Error).message.split('\n')[0]}` })
    return undefined
  }
}

export interface CliOverrides {
  port?: number
  host?: string
  routes?: string
}

export interface LoadedConfig {
  /** The config file, or undefined when none was given and the embedded defaults apply. */
  file?: string
  config: GatewayConfig
  /** The routes directory, resolved against the config file's folder. */
  routesDir: string
}

/** Reads, interpolates and validates gatehouse.yaml. Throws ConfigError listing every problem. */
export function loadGatewayConfig (file: string | undefined, overrides: CliOverrides = {}, env: NodeJS.ProcessEnv = process.env): LoadedConfig {
  const problems: ConfigProblem[] = []
  const label = file ?? '(defaults)'
  let raw: unknown = {}
  if (file !== undefined) {
    raw = readDocument(file, problems) ?? {}
    if (problems.length > 0) throw new ConfigError(problems)
    if (raw === null) raw = {}
    if (typeof raw !== 'object' || Array.isArray(raw)) throw new ConfigError([{ file: label, path: '', message: 'must be a mapping of settings' }])
  }
  raw = interpolate(raw, label, '', env, problems)
  const doc = raw as Record<string, unknown>
  if (overrides.port !== undefined || overrides.host !== undefined) {
    doc.listen = { ...(doc.listen as object ?? {}), ...(overrides.port !== undefined ? { port: overrides.port } : {}), ...(overrides.host !== undefined ? { host: overrides.host } : {}) }
  }
  if (overrides.routes !== undefined) doc.routes = overrides.routes
  const withDefaults = mergeDefaults(doc, Object.fromEntries(Object.entries(gatewayDefaults).filter(([k]) => k !== 'redis' || doc.redis !== undefined)))
  const config = validate(GatewayConfigSchema, withDefaults, label, problems)
  if (config !== undefined) checkGateway(config, label, file, problems)
  if (problems.length > 0 || config === undefined) throw new ConfigError(problems)
  const base = file !== undefined ? dirname(resolve(file)) : process.cwd()
  if (config.jwt?.publicKey !== undefined) config.jwt.publicKey = resolve(base, config.jwt.publicKey)
  const routesDir = overrides.routes !== undefined ? resolve(overrides.routes) : resolve(base, config.routes)
  return { file, config: deepFreeze(config), routesDir }
}

function checkGateway (config: GatewayConfig, label: string, file: string | undefined, problems: ConfigProblem[]): void {
  const base = file !== undefined ? dirname(resolve(file)) : process.cwd()
  const mustExist = (p: string | undefined, path: string): void => {
    if (p !== undefined && !existsSync(isAbsolute(p) ? p : resolve(base, p))) {
      problems.push({ file: label, path, message: `file ${p} does not exist`, hint: 'paths are relative to the config file' })
    }
  }
  if (config.tls !== undefined) {
    mustExist(config.tls.cert, '/tls/cert')
    mustExist(config.tls.key, '/tls/key')
    mustExist(config.tls.ca, '/tls/ca')
    for (const [host, pair] of Object.entries(config.tls.sni ?? {})) {
      mustExist(pair.cert, `/tls/sni/${host}/cert`)
      mustExist(pair.key, `/tls/sni/${host}/key`)
    }
  }
  const jwt = config.jwt
  if (jwt !== undefined) {
    const sources = [jwt.secret, jwt.publicKey, jwt.jwksUrl].filter((s) => s !== undefined).length
    if (sources !== 1) problems.push({ file: label, path: '/jwt', message: 'needs exactly one of secret, publicKey or jwksUrl', hint: 'pick the one your identity provider uses' })
    if (jwt.jwksUrl !== undefined && jwt.issuer === undefined) {
      problems.push({ file: label, path: '/jwt/issuer', message: 'is required with jwksUrl', hint: 'list the issuers you trust, or any token could name its own key server' })
    }
    if (jwt.secret !== undefined && jwt.secret.length < 32) {
      problems.push({ file: label, path: '/jwt/secret', message: 'is shorter than 32 characters', hint: 'use a random secret of at least 32 characters' })
    }
    mustExist(jwt.publicKey, '/jwt/publicKey')
    const hmac = jwt.algorithms?.filter((a) => a.startsWith('HS')) ?? []
    if (jwt.secret !== undefined && hmac.length !== (jwt.algorithms?.length ?? 0)) {
      problems.push({ file: label, path: '/jwt/algorithms', message: 'lists algorithms a secret cannot verify', hint: 'with secret use HS256, HS384 or HS512' })
    }
    if (jwt.secret === undefined && hmac.length > 0) {
      problems.push({ file: label, path: '/jwt/algorithms', message: `${hmac.join(', ')} cannot be used with a public key or JWKS`, hint: 'HMAC with a public key would let anyone sign tokens: use RS256, PS256, ES256 or EdDSA' })
    }
  }
  if (config.cache.store === 'redis' && config.redis === undefined) {
    problems.push({ file: label, path: '/cache/store', message: 'is redis but no redis is configured', hint: 'add redis: { url: redis://127.0.0.1:6379 } or use store: memory' })
  }
}

const ROUTE_EXTENSIONS = new Set(['.yaml', '.yml', '.json', '.ts', '.js', '.mjs', '.cjs'])

async function importRouteModule (file: string): Promise<unknown> {
  const ext = extname(file)
  if (ext === '.ts' && !(process.features as { typescript?: unknown }).typescript) {
    // Node without type stripping: transpile with the TypeScript compiler when it is installed.
    const req = createRequire(file)
    let ts: typeof import('typescript')
    try {
      ts = createRequire(__filename)('typescript')
    } catch {
      throw new Error('TypeScript route files need Node >= 22.18 or the typescript package (npm i -D typescript), or write the route as .js')
    }
    const out = ts.transpileModule(readFileSync(file, 'utf8'), {
      compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022, esModuleInterop: true },
      fileName: file
    })
    const Mod = req('node:module') as { new (id: string): NodeJS.Module & { _compile(code: string, file: string): void }, _nodeModulePaths(dir: string): string[] }
    const mod = new Mod(file)
    mod.filename = file
    mod.paths = Mod._nodeModulePaths(dirname(file))
    mod._compile(out.outputText, file)
    return mod.exports
  }
  // A cache-busting query so that a reload sees an edited file.
  return await import(pathToFileURL(file).href + `?v=${statSync(file).mtimeMs}`)
}

async function readRouteFile (file: string, problems: ConfigProblem[]): Promise<RouteInput | undefined> {
  const ext = extname(file)
  if (ext === '.yaml' || ext === '.yml' || ext === '.json') {
    const doc = readDocument(file, problems)
    if (doc === undefined) return undefined
    if (doc === null || typeof doc !== 'object' || Array.isArray(doc)) {
      problems.push({ file, path: '', message: 'must be a mapping describing one service' })
      return undefined
    }
    return doc as RouteInput
  }
  try {
    const mod = await importRouteModule(file) as { default?: unknown }
    let value: unknown = mod.default ?? mod
    if (value !== null && typeof value === 'object' && 'default' in value) value = (value as { default: unknown }).default
    if (value === null || typeof value !== 'object') {
      problems.push({ file, path: '', message: 'must default-export a route object', hint: 'export default defineRoute({ match: { prefix: ... }, upstream: ... })' })
      return undefined
    }
    return value as RouteInput
  } catch (err) {
    problems.push({ file, path: '', message: `cannot be loaded: ${(err as Error).message.split('\n')[0]}` })
    return undefined
  }
}

/** Validates one route object (already read and interpolated). */
export function validateRoute (input: RouteInput, file: string, problems: ConfigProblem[], env: NodeJS.ProcessEnv = process.env): RouteDefinition | undefined {
  const { plugin, ...rest } = input
  if (plugin !== undefined && typeof plugin !== 'function') {
    problems.push({ file, path: '/plugin', message: 'must be a Fastify plugin function' })
  }
  const doc = interpolate(rest, file, '', env, problems) as Record<string, unknown>
  const withDefaults = { ...doc }
  if (isObject(doc.upstream)) {
    const up = mergeDefaults(doc.upstream, routeDefaults.upstream)
    if (isObject(up.healthCheck)) up.healthCheck = mergeDefaults(up.healthCheck, routeDefaults.upstreamHealthCheck)
    if (isObject(up.passive)) up.passive = mergeDefaults(up.passive, routeDefaults.upstreamPassive)
    if (isObject(up.circuitBreaker)) up.circuitBreaker = mergeDefaults(up.circuitBreaker, routeDefaults.upstreamBreaker)
    withDefaults.upstream = up
  }
  if (isObject(doc.static)) withDefaults.static = mergeDefaults(doc.static, routeDefaults.static)
  const before = problems.length
  const spec = validate(RouteSchema, withDefaults, file, problems)
  if (spec === undefined) return undefined
  if (spec.upstream === undefined && spec.static === undefined) {
    problems.push({ file, path: '/upstream', message: 'is required', hint: 'add upstream: { targets: [{ url: http://host:port }] }, or static: { root: ./public }' })
  }
  if (spec.upstream !== undefined && spec.static !== undefined) {
    problems.push({ file, path: '/static', message: 'cannot be combined with upstream', hint: 'a route either forwards or serves files' })
  }
  if (spec.upstream?.balancer === 'consistent-hash' && spec.upstream.hashKey === undefined) {
    problems.push({ file, path: '/upstream/hashKey', message: 'is required by the consistent-hash balancer', hint: 'use ip, header:NAME or cookie:NAME' })
  }
  if (spec.static !== undefined) {
    const root = isAbsolute(spec.static.root) ? spec.static.root : resolve(dirname(file), spec.static.root)
    if (!existsSync(root) || !statSync(root).isDirectory()) {
      problems.push({ file, path: '/static/root', message: `directory ${spec.static.root} does not exist`, hint: 'paths are relative to the route file' })
    } else {
      spec.static.root = root
    }
  }
  const upstreamTls = spec.upstream?.tls
  if (upstreamTls !== undefined) {
    for (const key of ['ca', 'cert', 'key'] as const) {
      const p = upstreamTls[key]
      if (p === undefined) continue
      const abs = isAbsolute(p) ? p : resolve(dirname(file), p)
      if (existsSync(abs)) upstreamTls[key] = abs
      else problems.push({ file, path: `/upstream/tls/${key}`, message: `file ${p} does not exist`, hint: 'paths are relative to the route file' })
    }
    if ((upstreamTls.cert === undefined) !== (upstreamTls.key === undefined)) {
      problems.push({ file, path: '/upstream/tls', message: 'cert and key go together', hint: 'give both the client certificate and its key, for mTLS to the upstream' })
    }
  }
  if (problems.length > before) return undefined
  const name = spec.name ?? basename(file, extname(file)).toLowerCase().replace(/[^a-z0-9_-]/g, '-')
  return { ...spec, name, file, ...(typeof plugin === 'function' ? { plugin } : {}) }
}

function isObject (v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v)
}

/** The route key used to find duplicates: the same prefix for an overlapping host set. */
function routeKeys (route: RouteDefinition): string[] {
  const prefix = normalizePrefix(route.match.prefix)
  return (route.match.hosts ?? ['*']).map((h) => `${h.toLowerCase()} ${prefix}`)
}

export function normalizePrefix (prefix: string): string {
  return prefix.length > 1 && prefix.endsWith('/') ? prefix.slice(0, -1) : prefix
}

/** Loads and validates every route file of a directory. Throws ConfigError listing every problem. */
export async function loadRoutes (dir: string, env: NodeJS.ProcessEnv = process.env): Promise<RouteDefinition[]> {
  const problems: ConfigProblem[] = []
  let files: string[]
  try {
    files = readdirSync(dir).filter((f) => ROUTE_EXTENSIONS.has(extname(f)) && !f.endsWith('.d.ts') && !f.startsWith('.')).sort()
  } catch (err) {
    throw new ConfigError([{ file: dir, path: '', message: `routes directory cannot be read: ${(err as NodeJS.ErrnoException).code ?? String(err)}`, hint: 'set routes: in gatehouse.yaml or pass --routes DIR' }])
  }
  const routes: RouteDefinition[] = []
  for (const f of files) {
    const file = join(dir, f)
    const input = await readRouteFile(file, problems)
    if (input === undefined) continue
    const route = validateRoute(input, file, problems, env)
    if (route !== undefined) routes.push(route)
  }
  checkRouteSet(routes, problems)
  if (problems.length > 0) throw new ConfigError(problems)
  return routes.map(deepFreezeRoute)
}

function deepFreezeRoute (route: RouteDefinition): RouteDefinition {
  const { plugin, ...rest } = route
  deepFreeze(rest)
  return Object.freeze({ ...rest, ...(plugin !== undefined ? { plugin } : {}) }) as RouteDefinition
}

export function checkRouteSet (routes: RouteDefinition[], problems: ConfigProblem[]): void {
  const names = new Map<string, string>()
  const keys = new Map<string, string>()
  for (const r of routes) {
    const other = names.get(r.name)
    if (other !== undefined) problems.push({ file: r.file, path: '/name', message: `"${r.name}" is also the name of ${other}`, hint: 'give each route file its own name' })
    names.set(r.name, r.file)
    for (const k of routeKeys(r)) {
      const dup = keys.get(k)
      if (dup !== undefined) problems.push({ file: r.file, path: '/match/prefix', message: `${r.match.prefix} is already routed by ${dup}`, hint: 'use another prefix, or split the traffic by match.hosts' })
      keys.set(k, r.file)
    }
  }
}
