import { test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { summarizeProfile } from '../bench/profile.js'

test('bench profile summary: the gap of a stopped (parked) process is charged to no function', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-profile-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  const frame = (functionName: string): { functionName: string, url: string, lineNumber: number } => ({ functionName, url: `file://${dir}/app.js`, lineNumber: 0 })
  const profile = {
    nodes: [
      { id: 1, callFrame: { functionName: '(root)', url: '', lineNumber: -1 }, children: [2, 3] },
      { id: 2, callFrame: frame('handle') },
      { id: 3, callFrame: frame('lastBeforeStop') }
    ],
    // Samples ~1 ms apart, then one that comes 30 s later: the process was SIGSTOPped meanwhile.
    samples: [2, 2, 3, 3, 2],
    timeDeltas: [1000, 1000, 1000, 30_000_000, 1000],
    startTime: 0,
    endTime: 30_004_000
  }
  const file = join(dir, 'p.cpuprofile')
  writeFileSync(file, JSON.stringify(profile))
  const s = summarizeProfile(file, dir)
  const share = (name: string): number => s.functions.find((f) => f.name.startsWith(name))?.selfPercent ?? 0
  assert.equal(share('handle'), 75)
  assert.equal(share('lastBeforeStop'), 25)
})
