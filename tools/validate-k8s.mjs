// Validates the Kubernetes manifests offline, as a real cluster would take them.
//   node tools/validate-k8s.mjs deploy/k8s/base deploy/k8s/overlays/redis   (renders each with kubectl kustomize)
//   kubectl kustomize DIR | node tools/validate-k8s.mjs                     (rendered objects on stdin)
// Checks: every object against the Kubernetes schema (kubernetes-models); kustomize renders without a
// warning and no kustomization uses a deprecated field (patchesJson6902, patchesStrategicMerge,
// bases, vars, commonLabels); every namespaced object lands in one namespace that the manifests
// create; every Secret a pod uses exists there, and a non-root pod can read the Secrets it mounts
// (files are owned by root: readable only through fsGroup or mode bits); Services select pods that
// exist; the broker is a native sidecar with gRPC probes on a numeric port; everything runs as
// non-root with a read-only root filesystem. Exits 1 with every problem listed.
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { parse, parseAllDocuments } from "yaml";

const CLUSTER_SCOPED = new Set(["Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
  "CustomResourceDefinition", "PriorityClass", "IngressClass", "RuntimeClass"]);
const DEPRECATED = {
  patchesJson6902: "use patches:",
  patchesStrategicMerge: "use patches:",
  bases: "list them under resources:",
  vars: "use replacements:",
  commonLabels: "use labels:",
};

async function modelFor(apiVersion, kind, problems) {
  const group = apiVersion.includes("/") ? apiVersion : `v1`;
  try {
    const mod = await import(`kubernetes-models/${group}/${kind}`);
    return mod[kind];
  } catch (e) {
    problems.push(`${kind} ${apiVersion}: no schema (${e.message})`);
    return null;
  }
}

function podSpecOf(obj) {
  if (["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"].includes(obj.kind)) return obj.spec?.template?.spec;
  if (obj.kind === "CronJob") return obj.spec?.jobTemplate?.spec?.template?.spec;
  if (obj.kind === "Pod") return obj.spec;
  return null;
}

function podLabelsOf(obj) {
  if (obj.kind === "Pod") return obj.metadata?.labels || {};
  return obj.spec?.template?.metadata?.labels || {};
}

// The kustomization files of `dir` and of every folder it includes, for deprecated fields.
function kustomizationProblems(dir, seen = new Set()) {
  const problems = [];
  const full = resolve(dir);
  if (seen.has(full)) return problems;
  seen.add(full);
  const file = ["kustomization.yaml", "kustomization.yml", "Kustomization"].map((f) => join(full, f)).find(existsSync);
  if (!file) return problems;
  const k = parse(readFileSync(file, "utf8")) || {};
  for (const [field, instead] of Object.entries(DEPRECATED)) {
    if (k[field] !== undefined) problems.push(`${join(dir, "kustomization.yaml")}: '${field}' is deprecated (${instead})`);
  }
  for (const r of [...(k.resources || []), ...(k.bases || []), ...(k.components || [])]) {
    if (typeof r === "string" && !r.includes("://")) problems.push(...kustomizationProblems(join(dir, r), seen));
  }
  return problems;
}

// Whether a process of the pod's container can read files of a Secret/ConfigMap volume. Such files
// are owned by root (uid 0, gid 0, or gid fsGroup when the pod sets one: kubelet then adds group read).
function volumeReadable(spec, container, volume) {
  const pod = spec.securityContext || {};
  const own = container.securityContext || {};
  const uid = own.runAsUser ?? pod.runAsUser;
  const gid = own.runAsGroup ?? pod.runAsGroup;
  if (uid === 0) return true;
  const source = volume.secret || volume.configMap || volume.projected;
  const modes = [];
  const defaultMode = source.defaultMode ?? 0o644;
  if (volume.projected) {
    for (const s of volume.projected.sources || []) {
      const items = (s.secret || s.configMap)?.items;
      if (items?.length) items.forEach((i) => modes.push(i.mode ?? defaultMode));
      else modes.push(defaultMode);
    }
  } else if (source.items?.length) {
    source.items.forEach((i) => modes.push(i.mode ?? defaultMode));
  } else {
    modes.push(defaultMode);
  }
  const inRootGroup = gid === 0 || (pod.supplementalGroups || []).includes(0);
  return modes.every((m) => (m & 0o004) !== 0 || pod.fsGroup !== undefined || (inRootGroup && (m & 0o040) !== 0));
}

export async function validate(objects) {
  const problems = [];
  for (const obj of objects) {
    const name = `${obj.kind}/${obj.metadata?.name}`;
    const Model = await modelFor(obj.apiVersion, obj.kind, problems);
    if (Model) {
      try {
        new Model(obj).validate();
      } catch (e) {
        problems.push(`${name}: ${e.message}`);
      }
    }
  }

  // One namespace for everything, created by the manifests themselves.
  const namespaces = new Set(objects.filter((o) => !CLUSTER_SCOPED.has(o.kind)).map((o) => o.metadata?.namespace));
  for (const o of objects) {
    if (!CLUSTER_SCOPED.has(o.kind) && !o.metadata?.namespace) {
      problems.push(`${o.kind}/${o.metadata?.name}: no namespace (it would land in the current context's, e.g. default)`);
    }
  }
  namespaces.delete(undefined);
  if (namespaces.size > 1) problems.push(`objects are spread over namespaces ${[...namespaces].join(", ")}: use one`);
  for (const ns of namespaces) {
    if (!objects.some((o) => o.kind === "Namespace" && o.metadata?.name === ns)) {
      problems.push(`namespace ${ns} is used but no Namespace object creates it`);
    }
  }
  const inNs = (kind, name, ns) => objects.some((o) => o.kind === kind && o.metadata?.name === name && o.metadata?.namespace === ns);

  for (const obj of objects) {
    const spec = podSpecOf(obj);
    if (!spec) continue;
    const workload = obj.metadata.name;
    const ns = obj.metadata.namespace;
    if (spec.securityContext?.runAsNonRoot !== true) problems.push(`${workload}: pod must set runAsNonRoot: true`);
    const containers = [...(spec.initContainers || []), ...(spec.containers || [])];
    for (const c of containers) {
      if (c.securityContext?.readOnlyRootFilesystem !== true) problems.push(`${workload}/${c.name}: readOnlyRootFilesystem must be true`);
      if (!c.resources?.requests) problems.push(`${workload}/${c.name}: resource requests are required`);
      for (const e of c.env || []) {
        const ref = e.valueFrom?.secretKeyRef;
        if (ref && !ref.optional && !inNs("Secret", ref.name, ns)) {
          problems.push(`${workload}/${c.name}: env ${e.name} reads Secret ${ref.name}, which is not in namespace ${ns}`);
        }
      }
      for (const m of c.volumeMounts || []) {
        const v = (spec.volumes || []).find((x) => x.name === m.name);
        if (!v) {
          problems.push(`${workload}/${c.name}: mounts volume ${m.name}, which the pod does not define`);
          continue;
        }
        if (!(v.secret || v.configMap || v.projected)) continue;
        if (v.secret && !v.secret.optional && !inNs("Secret", v.secret.secretName, ns)) {
          problems.push(`${workload}: volume ${v.name} mounts Secret ${v.secret.secretName}, which is not in namespace ${ns}`);
        }
        if (!volumeReadable(spec, c, v)) {
          const mode = (v.secret || v.configMap || v.projected).defaultMode;
          problems.push(`${workload}/${c.name}: runs as non-root but cannot read volume ${v.name} (files owned by root, ` +
            `mode ${mode === undefined ? "0644" : "0" + mode.toString(8)}): set the pod's fsGroup or make the files readable`);
        }
      }
    }
  }

  for (const svc of objects.filter((o) => o.kind === "Service" && o.spec?.selector)) {
    const sel = Object.entries(svc.spec.selector);
    const match = objects.some((o) => podSpecOf(o) && o.metadata?.namespace === svc.metadata?.namespace &&
      sel.every(([k, v]) => podLabelsOf(o)[k] === v));
    if (!match) problems.push(`Service/${svc.metadata.name}: its selector matches no pod in namespace ${svc.metadata.namespace}`);
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
    const monitorArg = sidecar.args?.find((a) => a.startsWith("--quota_monitor="));
    const monitorHost = monitorArg?.slice("--quota_monitor=".length).split(":")[0];
    if (monitorHost && !inNs("Service", monitorHost, proxy.metadata.namespace)) {
      problems.push(`proxy/tokenbroker: --quota_monitor names ${monitorHost}, which is no Service in namespace ${proxy.metadata.namespace}`);
    }
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
    const policy = objects.find((o) => o.kind === "NetworkPolicy" && o.spec?.podSelector?.matchLabels?.["app.kubernetes.io/name"] === "tokenbroker-redis");
    if (!policy) {
      problems.push("tokenbroker-redis holds tokens: a NetworkPolicy must limit who reaches it");
    } else if (policy.metadata?.namespace !== redis.metadata?.namespace) {
      problems.push("NetworkPolicy/tokenbroker-redis must be in tokenbroker-redis's namespace (it selects pods of its own)");
    }
  }
  return { problems, redis: Boolean(redis) };
}

// Values to replace before applying for real (reported, not a problem).
function placeholders(objects) {
  const out = [];
  for (const o of objects.filter((x) => x.kind === "Secret")) {
    const keys = Object.entries(o.stringData || {}).filter(([, v]) => String(v).includes("replace-me")).map(([k]) => k);
    if (keys.length) out.push(`Secret ${o.metadata.name} (${keys.join(", ")})`);
  }
  for (const o of objects) {
    for (const c of [...(podSpecOf(o)?.initContainers || []), ...(podSpecOf(o)?.containers || [])]) {
      if (c.image?.startsWith("example/")) out.push(`image ${c.image} (${o.metadata.name}/${c.name})`);
    }
  }
  return out;
}

async function check(label, text, extra) {
  const objects = parseAllDocuments(text).map((d) => d.toJS()).filter(Boolean);
  const { problems, redis } = await validate(objects);
  problems.unshift(...extra);
  if (problems.length > 0) {
    console.error(`k8s manifests${label}: ${problems.length} problem(s)\n  ${problems.join("\n  ")}`);
    return false;
  }
  console.log(`k8s manifests${label}: ${objects.length} objects valid (schema, one namespace, readable Secrets, ` +
    `native sidecar, gRPC probes, non-root, read-only root fs${redis ? ", shared Redis state" : ""})`);
  const todo = placeholders(objects);
  if (todo.length) console.log(`  placeholders to replace before applying: ${todo.join("; ")}`);
  return true;
}

const dirs = process.argv.slice(2);
let ok = true;
if (dirs.length === 0) {
  ok = await check("", readFileSync(0, "utf8"), []);
} else {
  for (const dir of dirs) {
    let text = "";
    const extra = kustomizationProblems(dir);
    try {
      text = execFileSync("kubectl", ["kustomize", dir], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
    } catch (e) {
      extra.push(`kubectl kustomize ${dir} failed: ${(e.stderr || e.message).trim()}`);
    }
    // kubectl prints warnings (deprecated fields, ...) on stderr even when it succeeds.
    try {
      const result = execFileSync("sh", ["-c", `kubectl kustomize "$1" 2>&1 >/dev/null`, "sh", dir], { encoding: "utf8" });
      for (const line of result.split("\n").filter((l) => /warning|deprecated/i.test(l))) extra.push(`kubectl kustomize ${dir}: ${line.replace(/^#\s*/, "")}`);
    } catch {
      // reported above
    }
    ok = (await check(` (${dir})`, text, extra)) && ok;
  }
}
process.exit(ok ? 0 : 1);
