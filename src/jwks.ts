import { createPublicKey, type JsonWebKey } from 'node:crypto'
import { request } from 'undici'

/*
 * A JSON Web Key Set fetched from one configured URL (never from a URL a token names: no SSRF,
 * no key server chosen by the attacker). Keys are cached; an unknown `kid` triggers a refresh,
 * but at most one per `cooldownMs` and one at a time, so a flood of tokens with made-up kids
 * costs one request to the key server, not one each. A failed refresh keeps the known keys.
 */

export class JwksError extends Error {
  readonly reason: 'unknown_key' | 'jwks_unavailable'
  constructor (reason: 'unknown_key' | 'jwks_unavailable', message: string) {
    super(message)
    this.reason = reason
  }
}

interface Key { kid?: string, alg?: string, kty: string, crv?: string, pem: string }

export interface JwksOptions {
  url: string
  /** How long a fetched set is trusted before the next lookup refreshes it. */
  maxAgeMs: number
  /** Minimum time between two refreshes caused by unknown kids. */
  cooldownMs: number
  timeoutMs?: number
  maxBytes?: number
}

/** Which key types can verify a JWS algorithm. */
function fits (key: Key, alg: string): boolean {
  if (key.alg !== undefined && key.alg !== alg) return false
  if (alg.startsWith('RS') || alg.startsWith('PS')) return key.kty === 'RSA'
  if (alg.startsWith('ES')) return key.kty === 'EC' && key.crv === { ES256: 'P-256', ES384: 'P-384', ES512: 'P-521' }[alg]
  if (alg === 'EdDSA') return key.kty === 'OKP'
  return false
}

export class Jwks {
  private readonly options: Required<JwksOptions>
  private keys: Key[] = []
  private fetchedAt = -Infinity
  private lastAttempt = -Infinity
  private inflight: Promise<void> | undefined
  /** Key-server requests made so far (tests read it). */
  fetches = 0

  constructor (options: JwksOptions) {
    this.options = { timeoutMs: 5000, maxBytes: 512 * 1024, ...options }
  }

  /** The PEM public key for a token header; rejects with JwksError when there is none. */
  async keyFor (header: { kid?: unknown, alg?: unknown }): Promise<string> {
    const alg = typeof header.alg === 'string' ? header.alg : ''
    const kid = typeof header.kid === 'string' ? header.kid : undefined
    if (this.inflight !== undefined) await this.inflight
    const now = performance.now()
    if (now - this.fetchedAt > this.options.maxAgeMs && now - this.lastAttempt >= this.options.cooldownMs) await this.refresh(now)
    let key = this.find(kid, alg)
    if (key === undefined && now - this.lastAttempt >= this.options.cooldownMs) {
      await this.refresh(now)
      key = this.find(kid, alg)
    }
    if (key === undefined) {
      if (this.keys.length === 0 && this.fetchedAt === -Infinity) throw new JwksError('jwks_unavailable', 'the key set could not be fetched')
      throw new JwksError('unknown_key', 'no key matches the token')
    }
    return key.pem
  }

  private find (kid: string | undefined, alg: string): Key | undefined {
    if (kid !== undefined) return this.keys.find((k) => k.kid === kid && fits(k, alg))
    // A token without kid is accepted only when the set leaves no choice.
    const candidates = this.keys.filter((k) => fits(k, alg))
    return candidates.length === 1 ? candidates[0] : undefined
  }

  private async refresh (now: number): Promise<void> {
    if (this.inflight === undefined) {
      this.lastAttempt = now
      this.inflight = this.fetch().finally(() => { this.inflight = undefined })
    }
    await this.inflight
  }

  private async fetch (): Promise<void> {
    this.fetches++
    try {
      const res = await request(this.options.url, {
        headersTimeout: this.options.timeoutMs,
        bodyTimeout: this.options.timeoutMs,
        headers: { accept: 'application/json' },
        maxRedirections: 0
      } as Parameters<typeof request>[1])
      if (res.statusCode !== 200) {
        await res.body.dump()
        return
      }
      const chunks: Buffer[] = []
      let size = 0
      for await (const chunk of res.body) {
        size += (chunk as Buffer).length
        if (size > this.options.maxBytes) {
          res.body.destroy()
          return
        }
        chunks.push(chunk as Buffer)
      }
      const doc = JSON.parse(Buffer.concat(chunks).toString('utf8')) as { keys?: unknown }
      if (!Array.isArray(doc.keys)) return
      const keys: Key[] = []
      for (const jwk of doc.keys as Array<JsonWebKey & { kid?: unknown, alg?: unknown, use?: unknown }>) {
        if (jwk === null || typeof jwk !== 'object' || typeof jwk.kty !== 'string' || jwk.kty === 'oct') continue
        if (jwk.use !== undefined && jwk.use !== 'sig') continue
        try {
          const pem = createPublicKey({ key: jwk, format: 'jwk' }).export({ type: 'spki', format: 'pem' }).toString()
          keys.push({ kid: typeof jwk.kid === 'string' ? jwk.kid : undefined, alg: typeof jwk.alg === 'string' ? jwk.alg : undefined, kty: jwk.kty, crv: typeof jwk.crv === 'string' ? jwk.crv : undefined, pem })
        } catch {
          // A key node:crypto cannot read is skipped; the others still work.
        }
      }
      this.keys = keys
      this.fetchedAt = performance.now()
    } catch {
      // Unreachable or invalid: keep the keys we have; the next refresh is after the cooldown.
    }
  }
}
