import { EventEmitter } from 'node:events'
import { X509Certificate, createPrivateKey } from 'node:crypto'
import { readFileSync, watch, type FSWatcher } from 'node:fs'
import http from 'node:http'
import http2 from 'node:http2'
import type { Http2SecureServer, Http2Session } from 'node:http2'
import tls from 'node:tls'
import type { TLSSocket } from 'node:tls'
import { basename, dirname, isAbsolute, resolve } from 'node:path'
import type { Logger } from 'pino'
import { ConfigError, type ConfigProblem, type GatewayConfig } from './config.js'
import { GATEHOUSE_HEADERS_TOO_LARGE, problemType } from './errors.js'

/*
 * TLS termination: the certificate files (a default pair and one per SNI name), their validation
 * at start-up, and their hot reload; the HTTPS listener (HTTP/2 and HTTP/1.1 on one port, chosen by
 * ALPN) and the plain-HTTP listener that redirects to it.
 */

type TlsConfig = NonNullable<GatewayConfig['tls']>
type Limits = GatewayConfig['limits']

/** The HTTP/1.1 parser and timeout settings of every public listener, plain or TLS. */
export function http1Options (limits: Limits): http.ServerOptions {
  return {
    maxHeaderSize: limits.maxHeaderBytes,
    headersTimeout: limits.headersTimeout,
    requestTimeout: limits.requestTimeout,
    keepAliveTimeout: limits.keepAliveTimeout,
    // Node enforces the two timeouts above only every 30 s by default: check every second.
    connectionsCheckingInterval: 1000,
    // Duplicate headers are joined rather than dropped, so that two Host headers can be seen.
    joinDuplicateHeaders: true,
    requireHostHeader: false
  }
}

/**
 * TLS 1.2 suites with forward secrecy and AEAD only (Mozilla "intermediate" without DHE); TLS 1.3
 * keeps OpenSSL's defaults, which are all modern. HTTP/2 (RFC 9113 §9.2.2) forbids the rest.
 */
export const CIPHERS = [
  'ECDHE-ECDSA-AES128-GCM-SHA256',
  'ECDHE-RSA-AES128-GCM-SHA256',
  'ECDHE-ECDSA-AES256-GCM-SHA384',
  'ECDHE-RSA-AES256-GCM-SHA384',
  'ECDHE-ECDSA-CHACHA20-POLY1305',
  'ECDHE-RSA-CHACHA20-POLY1305'
].join(':')

/** One certificate and its key, as configured (`path` is where it sits in gatehouse.yaml). */
interface Pair {
  path: string
  certFile: string
  keyFile: string
  /** The PEM texts last loaded, to tell a real change from a touched file. */
  loaded?: string
}

export interface CertificatesOptions {
  /** gatehouse.yaml, for error messages and to resolve relative paths; undefined: the working directory. */
  configFile?: string
  logger: Logger
  /** How long file events are collected before a reload (renewals write cert and key one after the other). */
  debounceMs?: number
}

/**
 * The gateway's certificates. `secureContext()` and `SNICallback` serve the handshake; the files
 * are watched, and a changed pair is validated and swapped in for new connections while open ones
 * keep the context they were made with. A renewal that leaves a broken pair keeps the old one.
 *
 * Emits `reloaded` (names of the pairs swapped) and `reloadFailed` (the ConfigError) after each
 * reload attempt that saw a change.
 */
export class Certificates extends EventEmitter {
  private readonly config: TlsConfig
  private readonly label: string
  private readonly base: string
  private readonly logger: Logger
  private readonly debounceMs: number
  private readonly defaultPair: Pair
  private readonly sniPairs = new Map<string, Pair>()
  private defaultOptions!: tls.SecureContextOptions
  private readonly contexts = new Map<string, tls.SecureContext>()
  private readonly ca: Buffer | undefined
  private watchers: FSWatcher[] = []
  private timer: NodeJS.Timeout | undefined
  private server: tls.Server | undefined

  constructor (config: TlsConfig, options: CertificatesOptions) {
    super()
    this.config = config
    this.label = options.configFile ?? '(defaults)'
    this.base = options.configFile !== undefined ? dirname(resolve(options.configFile)) : process.cwd()
    this.logger = options.logger
    this.debounceMs = options.debounceMs ?? 250
    this.defaultPair = { path: '/tls', certFile: this.resolve(config.cert), keyFile: this.resolve(config.key) }
    for (const [host, pair] of Object.entries(config.sni ?? {})) {
      this.sniPairs.set(host.toLowerCase(), { path: `/tls/sni/${host}`, certFile: this.resolve(pair.cert), keyFile: this.resolve(pair.key) })
    }
    const problems: ConfigProblem[] = []
    this.ca = config.ca !== undefined ? this.read(this.resolve(config.ca), '/tls/ca', problems) : undefined
    const loaded = this.loadPair(this.defaultPair, problems)
    if (loaded !== undefined) this.defaultOptions = loaded.options
    for (const [host, pair] of this.sniPairs) {
      const p = this.loadPair(pair, problems)
      if (p !== undefined) this.contexts.set(host, tls.createSecureContext(p.options))
    }
    if (problems.length > 0) throw new ConfigError(problems)
  }

  /** The options of the default certificate's context, for the server constructor and setSecureContext. */
  secureContextOptions (): tls.SecureContextOptions {
    return this.defaultOptions
  }

  /**
   * Picks the context for the name the client asked for: an exact SNI entry, then a `*.` entry for
   * its parent domain, else (no callback value) the server's default certificate.
   */
  readonly SNICallback = (servername: string, cb: (err: Error | null, ctx?: tls.SecureContext) => void): void => {
    const name = servername.toLowerCase()
    let ctx = this.contexts.get(name)
    if (ctx === undefined) {
      const dot = name.indexOf('.')
      if (dot !== -1) ctx = this.contexts.get('*' + name.slice(dot))
    }
    cb(null, ctx)
  }

  /** Watches the folders of every file (a renewal often replaces files by rename) and reloads on change. */
  watch (server: tls.Server): void {
    this.server = server
    const files = [this.defaultPair, ...this.sniPairs.values()].flatMap((p) => [p.certFile, p.keyFile])
    const names = new Map<string, Set<string>>()
    for (const f of files) {
      const dir = dirname(f)
      const set = names.get(dir) ?? new Set<string>()
      set.add(basename(f))
      names.set(dir, set)
    }
    for (const [dir, set] of names) {
      try {
        const watcher = watch(dir, { persistent: false }, (_event, filename) => {
          // Kubernetes secrets swap a `..data` symlink: any dot-dot entry may change every file.
          if (filename === null || set.has(filename) || filename.startsWith('..')) this.schedule()
        })
        watcher.on('error', (err) => this.logger.warn({ dir, err: err.message }, 'certificate folder cannot be watched'))
        this.watchers.push(watcher)
      } catch (err) {
        this.logger.warn({ dir, err: (err as Error).message }, 'certificate folder cannot be watched; certificates will not be reloaded')
      }
    }
  }

  private schedule (): void {
    clearTimeout(this.timer)
    this.timer = setTimeout(() => this.reload(), this.debounceMs)
    this.timer.unref()
  }

  /**
   * Re-reads every pair; a changed and valid one replaces its context. Returns the names swapped.
   * Open connections keep the context they were made with.
   */
  reload (): string[] {
    const problems: ConfigProblem[] = []
    const swapped: string[] = []
    const def = this.loadPair(this.defaultPair, problems, true)
    if (def !== undefined) {
      this.defaultOptions = def.options
      this.server?.setSecureContext(def.options)
      swapped.push('default')
    }
    for (const [host, pair] of this.sniPairs) {
      const p = this.loadPair(pair, problems, true)
      if (p !== undefined) {
        this.contexts.set(host, tls.createSecureContext(p.options))
        swapped.push(host)
      }
    }
    if (problems.length > 0) {
      const err = new ConfigError(problems)
      this.logger.error({ error: err.message }, 'certificate reload failed, keeping the previous certificates')
      this.emit('reloadFailed', err)
    }
    if (swapped.length > 0) {
      this.logger.info({ certificates: swapped }, 'certificates reloaded')
      this.emit('reloaded', swapped)
    }
    return swapped
  }

  close (): void {
    clearTimeout(this.timer)
    for (const w of this.watchers) w.close()
    this.watchers = []
  }

  private resolve (p: string): string {
    return isAbsolute(p) ? p : resolve(this.base, p)
  }

  private read (file: string, path: string, problems: ConfigProblem[]): Buffer | undefined {
    try {
      return readFileSync(file)
    } catch (err) {
      problems.push({ file: this.label, path, message: `file ${file} cannot be read: ${(err as NodeJS.ErrnoException).code ?? String(err)}`, hint: 'paths are relative to the config file' })
      return undefined
    }
  }

  /**
   * Reads and checks one pair: the certificate parses, the key parses and belongs to it. With
   * `onlyIfChanged`, an unchanged pair gives undefined without a problem.
   */
  private loadPair (pair: Pair, problems: ConfigProblem[], onlyIfChanged = false): { options: tls.SecureContextOptions } | undefined {
    const before = problems.length
    const cert = this.read(pair.certFile, `${pair.path}/cert`, problems)
    const key = this.read(pair.keyFile, `${pair.path}/key`, problems)
    if (cert === undefined || key === undefined) return undefined
    const text = cert.toString('latin1') + key.toString('latin1')
    if (onlyIfChanged && text === pair.loaded) return undefined
    let x509: X509Certificate | undefined
    try {
      x509 = new X509Certificate(cert)
    } catch {
      problems.push({ file: this.label, path: `${pair.path}/cert`, message: `file ${pair.certFile} is not a PEM certificate`, hint: 'use a PEM file starting with -----BEGIN CERTIFICATE-----, the chain after the leaf' })
    }
    let privateKey
    try {
      privateKey = createPrivateKey(key)
    } catch {
      problems.push({ file: this.label, path: `${pair.path}/key`, message: `file ${pair.keyFile} is not an unencrypted PEM private key`, hint: 'use a PEM key without a passphrase' })
    }
    if (x509 !== undefined && privateKey !== undefined && !x509.checkPrivateKey(privateKey)) {
      problems.push({ file: this.label, path: `${pair.path}/key`, message: `file ${pair.keyFile} does not match the certificate ${pair.certFile}`, hint: 'a renewal must replace both files' })
    }
    if (problems.length > before) return undefined
    const options: tls.SecureContextOptions = {
      cert,
      key,
      ...(this.ca !== undefined ? { ca: this.ca } : {}),
      minVersion: this.config.minVersion ?? 'TLSv1.2',
      ciphers: CIPHERS,
      honorCipherOrder: true
    }
    try {
      // What OpenSSL refuses that the checks above let through (an unsupported key type, say).
      tls.createSecureContext(options)
    } catch (err) {
      problems.push({ file: this.label, path: `${pair.path}/cert`, message: `file ${pair.certFile} cannot be used: ${(err as Error).message}` })
      return undefined
    }
    const validTo = Date.parse((x509 as X509Certificate).validTo)
    if (validTo < Date.now()) this.logger.warn({ file: pair.certFile, validTo: (x509 as X509Certificate).validTo }, 'certificate has expired')
    pair.loaded = text
    return { options }
  }
}

/** The HTTPS listener; drain and forced close work as on http.Server. */
export interface SecureListener extends Http2SecureServer {
  closeIdleConnections: () => void
  closeAllConnections: () => void
}

/**
 * HTTP/2 and HTTP/1.1 on one TLS port (ALPN). HTTP/1.1 connections are served by Node's HTTP/1
 * parser with the same limits as the plain listener; HTTP/2 sessions close after keepAliveTimeout
 * of silence. `closeIdleConnections` also sends GOAWAY to every HTTP/2 session (streams in flight
 * finish), `closeAllConnections` destroys every TLS connection, upgraded ones included.
 */
export function createSecureListener (certs: Certificates, limits: Limits, handler: (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => void): SecureListener {
  const server = http2.createSecureServer({
    ...certs.secureContextOptions(),
    SNICallback: certs.SNICallback,
    allowHTTP1: true,
    ALPNProtocols: ['h2', 'http/1.1'],
    settings: { maxHeaderListSize: limits.maxHeaderBytes }
  }, (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => {
    // nghttp2 enforces maxHeaderListSize (with a stream reset) only once the client acknowledged
    // our SETTINGS: the first requests of a connection are measured here (RFC 9113 §6.5.2 sizes).
    if (req.httpVersionMajor === 2 && headerListSize(req.rawHeaders) > limits.maxHeaderBytes) {
      const body = JSON.stringify({ type: problemType('GATEHOUSE_HEADERS_TOO_LARGE'), title: 'Request Header Fields Too Large', status: 431, detail: new GATEHOUSE_HEADERS_TOO_LARGE().message, code: 'GATEHOUSE_HEADERS_TOO_LARGE', requestId: null })
      res.writeHead(431, { 'content-type': 'application/problem+json', 'content-length': Buffer.byteLength(body) })
      res.end(body)
      return
    }
    handler(req, res)
  }) as SecureListener
  // The HTTP/1.1 fallback reads these from the server object, as http.Server's constructor sets them.
  Object.assign(server, http1Options(limits))
  const sockets = new Set<TLSSocket>()
  const sessions = new Set<Http2Session>()
  server.on('secureConnection', (socket: TLSSocket) => {
    sockets.add(socket)
    socket.once('close', () => sockets.delete(socket))
  })
  server.on('session', (session: Http2Session) => {
    sessions.add(session)
    session.once('close', () => sessions.delete(session))
    session.setTimeout(limits.keepAliveTimeout, () => session.close())
  })
  const closeIdleHttp1 = server.closeIdleConnections.bind(server)
  server.closeIdleConnections = () => {
    closeIdleHttp1()
    for (const s of sessions) s.close()
  }
  server.closeAllConnections = () => {
    for (const s of sessions) s.destroy()
    for (const s of sockets) s.destroy()
  }
  certs.watch(server)
  return server
}

function headerListSize (raw: string[]): number {
  let size = 0
  for (let i = 0; i < raw.length; i += 2) size += raw[i].length + raw[i + 1].length + 32
  return size
}

/**
 * The plain-HTTP listener of `tls.redirectHttpPort`: every request gets 308 to the same host, path
 * and query on HTTPS. A Host that is not a plain host name is refused, so no odd redirect target
 * can be built from it.
 */
export function createRedirectServer (httpsPort: () => number, limits: Limits): http.Server {
  return http.createServer({
    maxHeaderSize: limits.maxHeaderBytes,
    headersTimeout: limits.headersTimeout,
    keepAliveTimeout: limits.keepAliveTimeout,
    requireHostHeader: false
  }, (req, res) => {
    const host = /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$/.exec(req.headers.host ?? '')
    const url = req.url ?? '/'
    if (host === null || !url.startsWith('/')) {
      const body = JSON.stringify({ type: problemType('GATEHOUSE_BAD_HOST'), title: 'Bad Request', status: 400, detail: 'The request must carry one Host header naming this service', code: 'GATEHOUSE_BAD_HOST', requestId: null })
      res.writeHead(400, { 'content-type': 'application/problem+json', 'content-length': Buffer.byteLength(body), connection: 'close' })
      res.end(body)
      return
    }
    const port = httpsPort()
    const location = `https://${host[1]}${port === 443 ? '' : `:${port}`}${url}`
    res.writeHead(308, { location, 'content-length': 0 })
    res.end()
  })
}
