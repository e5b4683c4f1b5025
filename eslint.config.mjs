import neostandard from 'neostandard'

export default [
  ...neostandard({ ts: true, ignores: ['dist/**', 'node_modules/**', 'bench/results/**'] }),
  // `void promise` marks a deliberately unawaited promise (signal handlers, background work).
  { rules: { 'no-void': ['error', { allowAsStatement: true }] } }
]
