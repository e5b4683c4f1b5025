import { readFileSync } from 'node:fs'
import { createHash, createPublicKey, timingSafeEqual } from 'node:crypto'
import fp from 'fastify-plugin'
import jwtPlugin from '@fastify/jwt'
import type { FastifyPluginAsync, FastifyReply, FastifyRequest, onRequestHookHandler } from 'fastify'
import type { GatewayConfig, RouteDefinition } from '../src/config.js'
import { GATEHOUSE_FORBIDDEN, GATEHOUSE_UNAUTHORIZED } from '../src/errors.js'
import { metrics } from '../src/metrics.js'
import { Jwks, JwksError } from '../src/jwks.js'

declare module 'fastify' {
  interface FastifyRequest {
    /** The verified JWT claims, on routes that authenticate with JWT. */
    claims?: Record<string, unknown>
    /** The API key's consumer name, on routes that authenticate with API keys. */
    consumer?: string
  }
}

/** The header that tells an upstream which API consumer called; never taken from a client. */
export const CONSUMER_HEADER = 'x-gatehouse-consumer'
/** The ProcessState key of the JWKS cache (one per process, kept across reloads). */
export const JWKS_STATE_KEY = 'jwks'

const HS = ['HS256', 'HS384', 'HS512']
const ASYMMETRIC = ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512', 'EdDSA']
const DEFAULT_SKEW = 30_000
const kToken = Symbol('gatehouse.token')

type TokenRequest = FastifyRequest & { [kToken]?: string } & Record<string, unknown>
type Want = string | number | boolean | readonly string[]

/** A verified token's claims, and until when they are taken without checking the token again. */
export interface Verified { claims: Record<string, unknown>, until: number }

/**
 * The last Authorization header a connection sent that a route admitted: a client sends the same
 * header on every request of a keep-alive connection, and this answers it with one string
 * comparison, before the header is parsed or the token looked up (0.8 % of the all-features
 * route's CPU). It lasts no longer than the VerifiedTokens entry it copies.
 */
interface Memo { policy: Policy, header: string, verified: Verified }
const kMemo = Symbol('gatehouse.auth.memo')
type MemoSocket = { [kMemo]?: Memo }

/**
 * Tokens this route verified, by their exact text, with the claims they carried: a token seen
 * again is not decoded and its signature not checked again while the entry lasts (Envoy's
 * jwt_authn does the same). An entry ends at the token's exp (plus the clock skew allowed), after
 * VERIFIED_TTL_MS at most, so a key taken out of a JWKS stops admitting its tokens soon. Only
 * successes are kept. Bounded: past VERIFIED_MAX entries the oldest go first.
 */
export class VerifiedTokens {
  private readonly entries = new Map<string, Verified>()
  private readonly skewMs: number
  private readonly max: number
  private readonly ttlMs: number

  constructor (skewMs: number, max = VERIFIED_MAX, ttlMs = VERIFIED_TTL_MS) {
    this.skewMs = skewMs
    this.max = max
    this.ttlMs = ttlMs
  }

  get (token: string, now: number): Verified | undefined {
    const e = this.entries.get(token)
    if (e === undefined) return undefined
    if (e.until > now) return e
    this.entries.delete(token)
    return undefined
  }

  set (token: string, claims: Record<string, unknown>, now: number): Verified | undefined {
    const exp = typeof claims.exp === 'number' ? claims.exp * 1000 + this.skewMs : Infinity
    const until = Math.min(exp, now + this.ttlMs)
    if (until <= now) return undefined
    if (this.entries.size >= this.max) this.entries.delete(this.entries.keys().next().value as string)
    const e = { claims, until }
    this.entries.set(token, e)
    return e
  }

  get size (): number { return this.entries.size }
}

const VERIFIED_MAX = 10_000
const VERIFIED_TTL_MS = 60_000

interface Policy {
  /** The name of this route's @fastify/jwt request decorator, when it accepts JWTs. */
  verifyName?: string
  /** Tokens verified on this route (its audience and issuers), kept for a while. */
  verified?: VerifiedTokens
  /** With a static key, this route's @fastify/jwt verifier, called directly (synchronous). */
  verifySync?: (token: string) => Record<string, unknown>
  jwtOptional: boolean
  cookie?: string
  requireClaims: Array<[string, Want]>
  claimsToHeaders: Array<[string, string]>
  apiKey: boolean
  /** Client-sent headers removed before anything else: the ones this route sets itself. */
  strip: string[]
  challenge: string[]
}

/** The algorithms a key can verify: `none` is never among them, nor HMAC for a public key. */
export function allowedAlgorithms (jwt: NonNullable<GatewayConfig['jwt']>, publicKeyPem?: string): string[] {
  let possible: string[]
  if (jwt.secret !== undefined) possible = HS
  else if (publicKeyPem !== undefined) {
    const key = createPublicKey(publicKeyPem)
    const curve = key.asymmetricKeyDetails?.namedCurve
    switch (key.asymmetricKeyType) {
      case 'rsa': possible = ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512']; break
      case 'rsa-pss': possible = ['PS256', 'PS384', 'PS512']; break
      case 'ec': possible = [{ prime256v1: 'ES256', secp384r1: 'ES384', secp521r1: 'ES512' }[curve ?? ''] ?? ''].filter(Boolean); break
      case 'ed25519': possible = ['EdDSA']; break
      default: possible = []
    }
  } else possible = ASYMMETRIC
  if (jwt.algorithms === undefined) return possible
  const wrong = jwt.algorithms.filter((a) => !possible.includes(a))
  if (wrong.length > 0) {
    throw new Error(`jwt.algorithms: ${wrong.join(', ')} cannot be verified with the configured ${jwt.secret !== undefined ? 'secret' : 'public key'} (allowed: ${possible.join(', ') || 'none'})`)
  }
  return [...jwt.algorithms]
}

function list (v: string | readonly string[] | undefined): string[] | undefined {
  return v === undefined ? undefined : typeof v === 'string' ? [v] : [...v]
}

/** The bearer token of the request: from Authorization, or from the route's cookie. */
function extractToken (request: FastifyRequest, cookie: string | undefined): string | undefined {
  const header = request.headers.authorization
  if (header !== undefined) {
    const m = /^Bearer +([A-Za-z0-9._~+/-]+=*) *$/i.exec(header)
    return m === null ? undefined : m[1]
  }
  if (cookie === undefined) return undefined
  const cookies = request.headers.cookie
  if (cookies === undefined) return undefined
  for (const part of cookies.split(';')) {
    const eq = part.indexOf('=')
    if (eq !== -1 && part.slice(0, eq).trim() === cookie) return part.slice(eq + 1).trim() || undefined
  }
  return undefined
}

/** Whether a claim satisfies a requirement; strings match as space-separated lists (OAuth scope). */
export function satisfies (value: unknown, want: Want): boolean {
  if (want === true) return value !== undefined && value !== null && value !== false
  if (want === false) return value === undefined || value === false
  if (typeof want === 'number') return value === want
  const have = Array.isArray(value) ? value.map(String) : typeof value === 'string' ? value.split(' ') : value === undefined || value === null ? [] : [String(value)]
  return (typeof want === 'string' ? [want] : want).every((w) => have.includes(w))
}

function headerValue (v: unknown): string | undefined {
  if (v === undefined || v === null) return undefined
  const s = Array.isArray(v) ? v.map(String).join(',') : typeof v === 'object' ? JSON.stringify(v) : String(v)
  // A claim value is client-influenced: no control characters or CR/LF may reach a header.
  return /^[\t\x20-\x7e]*$/.test(s) ? s : encodeURIComponent(s)
}

function sha256 (s: string): Buffer {
  return createHash('sha256').update(s).digest()
}

/** Why a token was refused, as a bounded metric label and a client-safe message. */
function tokenFailure (err: unknown): { reason: string, detail: string } {
  if (err instanceof JwksError) return { reason: err.reason, detail: 'The token\'s signing key is not known' }
  const code = (err as { code?: string }).code
  if (code === 'FST_JWT_AUTHORIZATION_TOKEN_EXPIRED' || code === 'FAST_JWT_EXPIRED') return { reason: 'expired', detail: 'The token has expired' }
  if (code === 'FAST_JWT_INACTIVE') return { reason: 'not_yet_valid', detail: 'The token is not valid yet' }
  if (code === 'FAST_JWT_INVALID_ALGORITHM' || code === 'FAST_JWT_MISSING_SIGNATURE') return { reason: 'algorithm', detail: 'The token is not signed with an accepted algorithm' }
  return { reason: 'invalid', detail: 'The token is invalid' }
}

/**
 * Authentication per route (`auth:` of the route file): JWT with @fastify/jwt (one namespace per
 * route, so each route's verifier with its audience and issuer is built once and cached), and API
 * keys compared in constant time. It is a route's own onRequest hook, so it runs after every
 * gateway-wide one (load shedding, the IP filter, the IP rate limit, a CORS preflight's answer),
 * before the consumer-keyed limits and the cache (preHandler), and before any body is read.
 */
const auth: FastifyPluginAsync = async function auth (fastify) {
  fastify.decorateRequest('claims', undefined)
  fastify.decorateRequest('consumer', undefined)
  const { config, routes, state } = fastify.gatehouse
  const jwt = config.jwt
  const policies = new Map<string, Policy>()

  let publicKeyPem: string | undefined
  let secret: unknown
  let jwks: Jwks | undefined
  let algorithms: string[] = []
  if (jwt !== undefined) {
    if (jwt.publicKey !== undefined) publicKeyPem = readFileSync(jwt.publicKey, 'utf8')
    algorithms = allowedAlgorithms(jwt, publicKeyPem)
    if (jwt.secret !== undefined) secret = jwt.secret
    else if (publicKeyPem !== undefined) secret = { public: publicKeyPem }
    else if (jwt.jwksUrl !== undefined) {
      const url = jwt.jwksUrl
      jwks = state.get(JWKS_STATE_KEY, () => new Jwks({ url, maxAgeMs: jwt.jwksRefreshInterval ?? 600_000, cooldownMs: jwt.jwksRefreshCooldown ?? 10_000 }))
      const set = jwks
      secret = async (_request: FastifyRequest, token: { header: { kid?: unknown, alg?: unknown } }) => await set.keyFor(token.header)
    }
  }

  const apiKeys = config.apiKeys
  const keyDigests = Object.entries(apiKeys?.keys ?? {}).map(([name, key]) => [name, sha256(key)] as const)
  const apiKeyHeader = apiKeys?.header.toLowerCase() ?? 'x-api-key'

  let n = 0
  for (const route of routes) {
    const spec = route.auth === 'none' ? undefined : route.auth
    if (spec === undefined || (spec.jwt === undefined && spec.apiKey !== true) || (spec.jwt === false && spec.apiKey !== true)) continue
    const policy: Policy = { jwtOptional: false, requireClaims: [], claimsToHeaders: [], apiKey: spec.apiKey === true, strip: [], challenge: [] }
    if (policy.apiKey) {
      if (apiKeys === undefined) throw new Error(`${route.file}: auth.apiKey needs apiKeys in gatehouse.yaml`)
      policy.challenge.push(`ApiKey realm="gatehouse", header="${apiKeyHeader}"`)
    }
    if (spec.jwt !== undefined && spec.jwt !== false) {
      if (jwt === undefined) throw new Error(`${route.file}: auth.jwt needs jwt in gatehouse.yaml`)
      const rj = spec.jwt === true ? {} : spec.jwt
      const issuer = list(rj.issuer) ?? list(jwt.issuer)
      if (jwks !== undefined && list(rj.issuer)?.some((i) => !(list(jwt.issuer) ?? []).includes(i)) === true) {
        throw new Error(`${route.file}: auth.jwt.issuer must be one of jwt.issuer of gatehouse.yaml (the issuers trusted with the JWKS)`)
      }
      const audience = list(rj.audience) ?? list(jwt.audience)
      const namespace = `gatehouse${n}`
      const verifyName = `gatehouseJwtVerify${n}`
      await fastify.register(jwtPlugin, {
        secret: secret as string,
        namespace,
        jwtVerify: verifyName,
        jwtDecode: `gatehouseJwtDecode${n}`,
        jwtSign: `gatehouseJwtSign${n}`,
        decoratorName: 'jwtPayload',
        decode: { complete: jwks !== undefined },
        verify: {
          algorithms,
          ...(issuer !== undefined ? { allowedIss: issuer } : {}),
          ...(audience !== undefined ? { allowedAud: audience } : {}),
          // fast-jwt skips the aud/iss check of a token that has no such claim: require them.
          requiredClaims: [...(issuer !== undefined ? ['iss'] : []), ...(audience !== undefined ? ['aud'] : [])],
          clockTolerance: jwt.clockSkew ?? DEFAULT_SKEW,
          // Verified tokens are kept by the policy (VerifiedTokens), keyed by the token itself:
          // fast-jwt's own cache hashes each token with SHA-256 for its key, which costs as much
          // as checking an HMAC signature.
          cache: false,
          extractToken: (request: TokenRequest) => request[kToken]
        }
      } as unknown as Parameters<typeof jwtPlugin>[1])
      n++
      policy.verifyName = verifyName
      if (jwks === undefined) {
        // A static key needs no lookup per token: skip request decoration and go straight to
        // the namespace's cached verifier.
        const ns = (fastify as unknown as { jwt: Record<string, { verify: (token: string) => Record<string, unknown> }> }).jwt[namespace]
        policy.verifySync = (token) => ns.verify(token)
      }
      policy.verified = new VerifiedTokens(jwt.clockSkew ?? DEFAULT_SKEW)
      policy.jwtOptional = rj.optional === true
      policy.cookie = rj.cookie
      policy.requireClaims = Object.entries(rj.requireClaims ?? {})
      policy.claimsToHeaders = Object.entries(rj.claimsToHeaders ?? {}).map(([c, h]) => [c, h.toLowerCase()])
      policy.strip.push(...policy.claimsToHeaders.map(([, h]) => h))
      policy.challenge.unshift('Bearer realm="gatehouse"')
    }
    policies.set(route.name, policy)
  }

  function matchKey (presented: string): string | undefined {
    const digest = sha256(presented)
    let found: string | undefined
    // Every key is compared, whatever matched: the time does not tell which key came close.
    for (const [name, d] of keyDigests) if (timingSafeEqual(digest, d) && found === undefined) found = name
    return found
  }

  function refuse (request: FastifyRequest, reply: FastifyReply, route: RouteDefinition, policy: Policy, reason: string, detail: string, error?: string): Error {
    metrics.authFailures.inc({ route: route.name, reason })
    reply.header('www-authenticate', policy.challenge.map((c) => error !== undefined && c.startsWith('Bearer') ? `${c}, error="${error}"` : c))
    return reason === 'forbidden' ? new GATEHOUSE_FORBIDDEN(detail) : new GATEHOUSE_UNAUTHORIZED(detail)
  }

  /** Checks the request's credentials: undefined when settled synchronously, a promise when a JWKS lookup is involved. Throws the refusal. */
  function authenticate (request: FastifyRequest, reply: FastifyReply, route: RouteDefinition, policy: Policy): Promise<void> | undefined {
    if (policy.apiKey) {
      const presented = request.headers[apiKeyHeader]
      if (typeof presented === 'string' && presented !== '') {
        const name = matchKey(presented)
        if (name === undefined) throw refuse(request, reply, route, policy, 'invalid_api_key', 'The API key is not valid')
        request.consumer = name
        request.headers[CONSUMER_HEADER] = name
        // The key is the gateway's business: upstreams get the consumer name instead.
        delete request.headers[apiKeyHeader]
        return
      }
      if (policy.verifyName === undefined) throw refuse(request, reply, route, policy, 'missing_api_key', 'An API key is required')
    }
    const header = request.headers.authorization
    const socket = request.raw.socket as MemoSocket | null
    const now = Date.now()
    const memo = socket?.[kMemo]
    if (memo !== undefined && memo.header === header && memo.policy === policy && memo.verified.until > now) {
      admit(request, reply, route, policy, memo.verified.claims)
      return
    }
    const token = extractToken(request, policy.cookie)
    if (token === undefined) {
      if (policy.jwtOptional) return
      throw refuse(request, reply, route, policy, 'missing', policy.apiKey ? 'A bearer token or an API key is required' : 'A bearer token is required')
    }
    const verified = policy.verified as VerifiedTokens
    const remember = (e: Verified | undefined): void => {
      if (e !== undefined && socket != null && typeof header === 'string') socket[kMemo] = { policy, header, verified: e }
    }
    const known = verified.get(token, now)
    if (known !== undefined) {
      remember(known)
      admit(request, reply, route, policy, known.claims)
      return
    }
    if (policy.verifySync !== undefined) {
      let claims: Record<string, unknown>
      try {
        claims = policy.verifySync(token)
      } catch (err) {
        throw invalid(request, reply, route, policy, err)
      }
      remember(verified.set(token, claims, now))
      admit(request, reply, route, policy, claims)
      return
    }
    const r = request as TokenRequest
    r[kToken] = token
    return (r[policy.verifyName as string] as () => Promise<Record<string, unknown>>).call(request).then((claims) => {
      remember(verified.set(token, claims, Date.now()))
      admit(request, reply, route, policy, claims)
    }, (err: unknown) => { throw invalid(request, reply, route, policy, err) })
  }

  function invalid (request: FastifyRequest, reply: FastifyReply, route: RouteDefinition, policy: Policy, err: unknown): Error {
    const { reason, detail } = tokenFailure(err)
    return refuse(request, reply, route, policy, reason, detail, 'invalid_token')
  }

  /** A verified token: its required claims checked, then its claims forwarded as configured. */
  function admit (request: FastifyRequest, reply: FastifyReply, route: RouteDefinition, policy: Policy, claims: Record<string, unknown>): void {
    for (const [claim, want] of policy.requireClaims) {
      if (!satisfies(claims[claim], want)) throw refuse(request, reply, route, policy, 'forbidden', `The token lacks the required claim ${claim}`, 'insufficient_scope')
    }
    request.claims = claims
    for (const [claim, header] of policy.claimsToHeaders) {
      const v = headerValue(claims[claim])
      if (v !== undefined) request.headers[header] = v
    }
  }

  // Whatever the route, a client never names the consumer itself.
  fastify.addHook('onRequest', function stripConsumer (request, _reply, done) {
    // A delete of a field the object lacks still costs a runtime call.
    if (request.headers[CONSUMER_HEADER] !== undefined) delete request.headers[CONSUMER_HEADER]
    done()
  })

  // Authentication is a hook of the routes that have a policy only. In onRequest, not preParsing:
  // a route with no other preParsing hook then runs no such stage at all.
  fastify.addHook('onRoute', (options) => {
    const route = options.config?.gatehouse
    const policy = route !== undefined ? policies.get(route.name) : undefined
    if (route === undefined || policy === undefined) return
    const authenticateRequest: onRequestHookHandler = function authenticateRequest (request, reply, done) {
      for (const h of policy.strip) delete request.headers[h]
      let pending: Promise<void> | undefined
      try {
        pending = authenticate(request, reply, route, policy)
      } catch (err) {
        return done(err as Error)
      }
      if (pending === undefined) done()
      else pending.then(() => done(), (err: Error) => done(err))
    }
    const own = options.onRequest
    options.onRequest = own === undefined ? [authenticateRequest] : [...(Array.isArray(own) ? own : [own]), authenticateRequest]
  })
}

export default fp(auth, { name: 'auth', fastify: '5.x', dependencies: ['problem'] })
