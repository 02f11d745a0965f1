// Validates rendered Kubernetes manifests offline (stdin: the output of `kubectl kustomize`):
// every object against the Kubernetes schema (kubernetes-models), and the deployment rules we
// promise: the broker is a native sidecar with gRPC probes on a numeric port, everything runs as
// non-root with a read-only root filesystem. Exits 1 with every problem listed.
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";

const text = readFileSync(0, "utf8");
const problems = [];
const objects = parseAllDocuments(text).map((d) => d.toJS()).filter(Boolean);

async function modelFor(apiVersion, kind) {
  const group = apiVersion.includes("/") ? apiVersion : `v1`;
  try {
    const mod = await import(`kubernetes-models/${group}/${kind}`);
    return mod[kind];
  } catch (e) {
    problems.push(`${kind} ${apiVersion}: no schema (${e.message})`);
    return null;
  }
}

function podSpecs(obj) {
  return obj.kind === "Deployment" ? [[obj.metadata.name, obj.spec.template.spec]] : [];
}

for (const obj of objects) {
  const name = `${obj.kind}/${obj.metadata?.name}`;
  const Model = await modelFor(obj.apiVersion, obj.kind);
  if (Model) {
    try {
      new Model(obj).validate();
    } catch (e) {
      problems.push(`${name}: ${e.message}`);
    }
  }
  for (const [deployment, spec] of podSpecs(obj)) {
    if (spec.securityContext?.runAsNonRoot !== true) problems.push(`${deployment}: pod must set runAsNonRoot: true`);
    for (const c of [...(spec.initContainers || []), ...(spec.containers || [])]) {
      if (c.securityContext?.readOnlyRootFilesystem !== true) problems.push(`${deployment}/${c.name}: readOnlyRootFilesystem must be true`);
      if (!c.resources?.requests) problems.push(`${deployment}/${c.name}: resource requests are required`);
    }
  }
}

const proxy = objects.find((o) => o.kind === "Deployment" && o.metadata.name === "proxy");
const sidecar = proxy?.spec.template.spec.initContainers?.find((c) => c.name === "tokenbroker");
if (!sidecar) {
  problems.push("proxy: the tokenbroker sidecar must be an init container");
} else {
  if (sidecar.restartPolicy !== "Always") problems.push("proxy/tokenbroker: restartPolicy must be Always (native sidecar)");
  for (const probe of ["startupProbe", "readinessProbe", "livenessProbe"]) {
    const port = sidecar[probe]?.grpc?.port;
    if (!Number.isInteger(port)) problems.push(`proxy/tokenbroker: ${probe} must be a gRPC probe on a numeric port`);
  }
  const mounts = (c) => (c.volumeMounts || []).map((m) => m.name);
  const app = proxy.spec.template.spec.containers[0];
  const socketVolume = proxy.spec.template.spec.volumes.find((v) => v.emptyDir && mounts(sidecar).includes(v.name) && mounts(app).includes(v.name));
  if (!socketVolume) problems.push("proxy: broker and proxy must share an emptyDir for the unix socket");
  if (!sidecar.args?.some((a) => a.startsWith("--listen=unix:"))) problems.push("proxy/tokenbroker: must listen on the shared unix socket");
}
if (!objects.some((o) => o.kind === "Service" && o.metadata.name === "tokenbroker-monitor")) {
  problems.push("the monitor must have a Service");
}

// The Redis overlay: every sidecar shares state through the Redis the overlay deploys.
const redis = objects.find((o) => o.kind === "Deployment" && o.metadata.name === "tokenbroker-redis");
if (redis) {
  if (!objects.some((o) => o.kind === "Service" && o.metadata.name === "tokenbroker-redis")) {
    problems.push("tokenbroker-redis must have a Service");
  }
  if (!sidecar?.args?.some((a) => a.startsWith("--state_backend=redis://tokenbroker-redis:"))) {
    problems.push("proxy/tokenbroker: with the Redis overlay, --state_backend must point at tokenbroker-redis");
  }
  if (!sidecar?.env?.some((e) => e.name === "TOKENBROKER_REDIS_PASSWORD" && e.valueFrom?.secretKeyRef)) {
    problems.push("proxy/tokenbroker: the Redis password must come from a Secret (TOKENBROKER_REDIS_PASSWORD)");
  }
  if (!objects.some((o) => o.kind === "NetworkPolicy" && o.spec?.podSelector?.matchLabels?.["app.kubernetes.io/name"] === "tokenbroker-redis")) {
    problems.push("tokenbroker-redis holds tokens: a NetworkPolicy must limit who reaches it");
  }
}

if (problems.length > 0) {
  console.error(`k8s manifests: ${problems.length} problem(s)\n  ${problems.join("\n  ")}`);
  process.exit(1);
}
console.log(`k8s manifests: ${objects.length} objects valid (schema, native sidecar, gRPC probes, non-root, read-only root fs${redis ? ", shared Redis state" : ""})`);
