import { readFileSync } from 'node:fs'
import { relative } from 'node:path'

/*
 * Summarises a V8 .cpuprofile (node --cpu-prof) as the functions with the most self time,
 * plus the same grouped by package, which is what tells where a proxy's time goes.
 */

interface ProfileNode {
  id: number
  callFrame: { functionName: string, url: string, lineNumber: number }
  hitCount?: number
  children?: number[]
}
interface Profile { nodes: ProfileNode[], samples: number[], timeDeltas: number[], startTime: number, endTime: number }

export interface ProfileRow { name: string, selfPercent: number }

function where (url: string, root: string): string {
  if (url === '') return ''
  const path = url.startsWith('file://') ? new URL(url).pathname : url
  const nm = path.lastIndexOf('node_modules/')
  if (nm !== -1) return path.slice(nm + 'node_modules/'.length)
  if (path.startsWith('node:')) return path
  return relative(root, path)
}

function packageOf (url: string, root: string): string {
  const w = where(url, root)
  if (w === '') return '(native / gc / idle)'
  if (w.startsWith('node:')) return 'node core'
  if (w.startsWith('@')) return w.split('/').slice(0, 2).join('/')
  if (url.includes('node_modules/')) return w.split('/')[0]
  return 'gatehouse'
}

/** A gap between two samples longer than this (µs; they are ~1 ms apart) is a stopped process. */
const PARKED_US = 100_000

/** `skipMs`: samples of the first milliseconds (start-up: module loading, building routes) are left out. */
export function summarizeProfile (file: string, root: string, top = 25, skipMs = 0): { functions: ProfileRow[], packages: ProfileRow[], idlePercent: number } {
  const profile = JSON.parse(readFileSync(file, 'utf8')) as Profile
  const byId = new Map(profile.nodes.map((n) => [n.id, n]))
  const self = new Map<number, number>()
  let at = 0
  for (let i = 0; i < profile.samples.length; i++) {
    const delta = profile.timeDeltas[i] ?? 0
    at += delta
    if (at < skipMs * 1000) continue
    // The bench parks (SIGSTOPs) every proxy but the measured one: the first sample after a
    // park carries the whole stopped time, which would be charged to whatever ran last.
    if (delta > PARKED_US) continue
    const id = profile.samples[i]
    self.set(id, (self.get(id) ?? 0) + delta)
  }
  let total = 0
  let idle = 0
  const fns = new Map<string, number>()
  const pkgs = new Map<string, number>()
  for (const [id, t] of self) {
    const node = byId.get(id)
    if (node === undefined) continue
    total += t
    const { functionName, url, lineNumber } = node.callFrame
    if (functionName === '(idle)') { idle += t; continue }
    const name = `${functionName || '(anonymous)'} ${where(url, root)}${url !== '' ? ':' + String(lineNumber + 1) : ''}`.trim()
    fns.set(name, (fns.get(name) ?? 0) + t)
    const pkg = functionName === '(garbage collector)' ? 'garbage collector' : packageOf(url, root)
    pkgs.set(pkg, (pkgs.get(pkg) ?? 0) + t)
  }
  const busy = total - idle
  const rows = (m: Map<string, number>, n: number): ProfileRow[] => [...m.entries()]
    .sort((a, b) => b[1] - a[1]).slice(0, n)
    .map(([name, t]) => ({ name, selfPercent: Math.round(1000 * t / busy) / 10 }))
  return { functions: rows(fns, top), packages: rows(pkgs, 15), idlePercent: Math.round(1000 * idle / total) / 10 }
}

if (require.main === module) {
  const [file, topArg, skipArg] = process.argv.slice(2)
  if (file === undefined) {
    process.stderr.write('usage: node dist/bench/profile.js FILE.cpuprofile [TOP] [SKIP_MS]\n')
    process.exit(1)
  }
  const s = summarizeProfile(file, process.cwd(), Number(topArg ?? 30), Number(skipArg ?? 0))
  process.stdout.write(`idle ${s.idlePercent}% of samples; shares below are of busy time\n\nby package:\n`)
  for (const r of s.packages) process.stdout.write(`  ${String(r.selfPercent).padStart(5)}%  ${r.name}\n`)
  process.stdout.write('\nby function (self time):\n')
  for (const r of s.functions) process.stdout.write(`  ${String(r.selfPercent).padStart(5)}%  ${r.name}\n`)
}
