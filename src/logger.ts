import type { FastifyBaseLogger } from 'fastify'
import type { Bindings, ChildLoggerOptions, Logger } from 'pino'

type Level = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace'
type LogFn = (...args: unknown[]) => void

/**
 * The request logger Fastify hands each request (its childLoggerFactory), made only when used.
 *
 * Fastify makes a pino child per request to bind the request id; pino serialises the bindings
 * when the child is made, used or not. A gateway logs nothing per request through it (the access
 * line is written by plugins/access-log.ts), only errors, so most children were made for nothing:
 * ~1.5 % of the plain route's CPU (profile, 2026-11-23). This one keeps the bindings and makes the
 * real child the first time a line at an enabled level is written (or child() or a level change
 * asks for it).
 */
export class RequestLogger {
  private readonly root: Logger
  private readonly own: Bindings
  private real: Logger | undefined

  constructor (root: Logger, bindings: Bindings) {
    this.root = root
    this.own = bindings
  }

  private materialize (): Logger {
    this.real ??= this.root.child(this.own)
    return this.real
  }

  private write (level: Level, args: unknown[]): void {
    if (!(this.real ?? this.root).isLevelEnabled(level)) return
    (this.materialize()[level] as LogFn)(...args)
  }

  get level (): string { return (this.real ?? this.root).level }
  set level (level: string) { this.materialize().level = level }

  isLevelEnabled (level: string): boolean { return (this.real ?? this.root).isLevelEnabled(level) }

  /** Adds bindings (the trace id): kept until a child is made. */
  setBindings (bindings: Bindings): void {
    if (this.real !== undefined) this.real.setBindings(bindings)
    else Object.assign(this.own, bindings)
  }

  bindings (): Bindings {
    return this.real !== undefined ? this.real.bindings() : { ...this.root.bindings(), ...this.own }
  }

  child (bindings: Bindings, options?: ChildLoggerOptions): FastifyBaseLogger {
    return this.materialize().child(bindings, options) as unknown as FastifyBaseLogger
  }

  fatal (...args: unknown[]): void { this.write('fatal', args) }
  error (...args: unknown[]): void { this.write('error', args) }
  warn (...args: unknown[]): void { this.write('warn', args) }
  info (...args: unknown[]): void { this.write('info', args) }
  debug (...args: unknown[]): void { this.write('debug', args) }
  trace (...args: unknown[]): void { this.write('trace', args) }
  silent (): void {}
}

/** Fastify's childLoggerFactory: a lazy request logger, unless the route asks for its own level or serializers. */
export function requestLoggerFactory (logger: FastifyBaseLogger, bindings: Bindings, opts: ChildLoggerOptions): FastifyBaseLogger {
  const root = logger as unknown as Logger
  if (opts.level !== undefined || opts.serializers !== undefined || typeof root.isLevelEnabled !== 'function') return logger.child(bindings, opts)
  return new RequestLogger(root, bindings) as unknown as FastifyBaseLogger
}
