import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { TestContext } from 'node:test'

/*
 * Test certificates, made at test time with the openssl CLI (node:crypto parses certificates but
 * cannot issue them). Nothing here is committed: each test gets a fresh CA in a temporary
 * directory that is removed after it.
 */

export interface IssuedCert {
  certFile: string
  keyFile: string
  cert: string
  key: string
  /** SHA-256 fingerprint as node:tls reports it (`AA:BB:...`), to tell certificates apart. */
  fingerprint256: string
}

export interface TestCa {
  dir: string
  caFile: string
  ca: string
  /** Issues a leaf certificate for DNS names (and 127.0.0.1 unless `ip` is false), signed by this CA. */
  issue: (name: string, hosts?: string[], usage?: 'server' | 'client', ip?: boolean) => IssuedCert
}

function openssl (args: string[]): void {
  execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] })
}

function fingerprint (file: string): string {
  const out = execFileSync('openssl', ['x509', '-in', file, '-noout', '-fingerprint', '-sha256']).toString()
  return out.trim().split('=')[1]
}

/** A private CA in a temporary directory, removed after the test. */
export function createCa (t: { after: TestContext['after'] }, cn = 'Gatehouse Test CA'): TestCa {
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-certs-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  const caKey = join(dir, 'ca.key')
  const caFile = join(dir, 'ca.pem')
  openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', caKey, '-out', caFile, '-days', '2', '-subj', `/CN=${cn}`,
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'])
  let serial = 0
  const issue = (name: string, hosts: string[] = [name], usage: 'server' | 'client' = 'server', ip = true): IssuedCert => {
    const base = join(dir, `${name.replace(/[^A-Za-z0-9.-]/g, '_')}-${++serial}`)
    const keyFile = `${base}.key`
    const certFile = `${base}.pem`
    const ext = `${base}.ext`
    const san = [...hosts.map((h) => `DNS:${h}`), ...(ip ? ['IP:127.0.0.1'] : [])].join(',')
    writeFileSync(ext, `subjectAltName=${san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=${usage === 'server' ? 'serverAuth' : 'clientAuth'}\n`)
    openssl(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', keyFile, '-out', `${base}.csr`, '-subj', `/CN=${name}`])
    openssl(['x509', '-req', '-in', `${base}.csr`, '-CA', caFile, '-CAkey', caKey, '-set_serial', String(1000 + serial),
      '-days', '2', '-out', certFile, '-extfile', ext])
    return { certFile, keyFile, cert: readFileSync(certFile, 'utf8'), key: readFileSync(keyFile, 'utf8'), fingerprint256: fingerprint(certFile) }
  }
  return { dir, caFile, ca: readFileSync(caFile, 'utf8'), issue }
}
