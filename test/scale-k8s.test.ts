import { test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { parseAllDocuments } from 'yaml'
import { loadGatewayConfig, loadRoutes } from '../src/config.js'

const MANIFEST = resolve(__dirname, '..', '..', 'deploy', 'k8s', 'gatehouse.yaml')

interface K8sObject { kind: string, metadata: { name: string }, data?: Record<string, string>, spec?: any }

test('the Kubernetes example: its ConfigMap is a valid config and route set, and the Deployment matches it', async (t) => {
  const objects = parseAllDocuments(readFileSync(MANIFEST, 'utf8')).map((d) => d.toJS() as K8sObject)
  const configMap = objects.find((o) => o.kind === 'ConfigMap')
  const deployment = objects.find((o) => o.kind === 'Deployment' && o.metadata.name === 'gatehouse')
  assert.ok(configMap?.data !== undefined && deployment !== undefined)

  // Lay the ConfigMap out the way the Deployment mounts it: the config file, routes/ beside it.
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-k8s-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  mkdirSync(join(dir, 'routes'))
  const spec = deployment.spec.template.spec
  const volumes = new Map<string, Array<{ key: string, path: string }>>(spec.volumes.map((v: any) => [v.name, v.configMap.items]))
  const container = spec.containers[0]
  for (const mount of container.volumeMounts as Array<{ name: string, mountPath: string, subPath?: string }>) {
    for (const item of volumes.get(mount.name) ?? []) {
      const target = mount.subPath !== undefined ? mount.mountPath : `${mount.mountPath}/${item.path}`
      assert.ok(target.startsWith('/etc/gatehouse/'), target)
      writeFileSync(join(dir, target.slice('/etc/gatehouse/'.length)), configMap.data[item.key])
    }
  }
  const args = container.args as string[]
  assert.equal(args[args.indexOf('--config') + 1], '/etc/gatehouse/gatehouse.yaml')
  const { config, routesDir } = loadGatewayConfig(join(dir, 'gatehouse.yaml'), {}, {})
  const routes = await loadRoutes(routesDir, {})
  assert.deepEqual(routes.map((r) => r.name), ['users'])

  const ports = new Map((container.ports as Array<{ name: string, containerPort: number }>).map((p) => [p.name, p.containerPort]))
  assert.equal(ports.get('http'), config.listen.port)
  assert.ok(config.admin !== false)
  assert.equal(ports.get('admin'), config.admin.port)
  assert.equal(config.admin.host, '0.0.0.0', 'kubelet probes reach the admin listener on the pod IP')
  assert.equal(container.readinessProbe.httpGet.path, '/readyz')
  assert.equal(container.livenessProbe.httpGet.path, '/healthz')
  assert.ok(config.redis !== undefined && config.cache.store === 'redis', 'replicas share limits and cache')
  // The drain must finish before Kubernetes kills the pod.
  const preStop = Number(container.lifecycle.preStop.exec.command[1])
  assert.ok(spec.terminationGracePeriodSeconds >= preStop + config.limits.shutdownTimeout / 1000 + 5)
})
