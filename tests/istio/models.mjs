// Which published model (npm package) checks a Kubernetes document, shared by validate.mjs
// (the packages' validators) and strict.mjs (their type declarations).
//
// Istio 1.30's TrafficExtension is in no published package (@kubernetes-models/istio
// 3.0.1 is generated from Istio 1.29.2's CRDs; PyPI cloudcoil-models-istio ships it only
// from Istio 1.31 on, for Python >= 3.14). What can be checked with a published schema is
// its WasmPlugin projection: in Istio 1.30's CRDs, TrafficExtension's `wasm` block and its
// selector, targetRefs, match and priority have exactly WasmPlugin's schemas (the same
// proto messages; compared field by field in istio/api 1.30.3's
// kubernetes/customresourcedefinitions.gen.yaml), and its phase enum differs only in the
// name of the unset value. So `wasm` is lifted into `spec` and the result validated as a
// WasmPlugin. The TrafficExtension envelope itself (wasm xor lua, the lua block, what may
// not sit where) is checked by the hand-written tests/istio/trafficextension.schema.json.

const ISTIO_GROUPS = ['networking.istio.io', 'security.istio.io', 'extensions.istio.io',
  'telemetry.istio.io', 'install.istio.io'];
const PACKAGES = {
  'gateway.envoyproxy.io': '@kubernetes-models/envoy-gateway',
  'gateway.networking.k8s.io': '@kubernetes-models/gateway-api',
};

export function trafficExtensionAsWasmPlugin(te) {
  const { wasm, lua, phase, ...rest } = te.spec ?? {};
  const spec = { ...rest, ...(wasm ?? {}) };
  if (lua !== undefined) spec.lua = lua; // not a WasmPlugin field: reported as unknown
  if (phase !== undefined) spec.phase = phase === 'UNSPECIFIED' ? 'UNSPECIFIED_PHASE' : phase;
  return { apiVersion: te.apiVersion, kind: 'WasmPlugin', metadata: te.metadata, spec };
}

// {module, typeName, schema, projected, doc}: the module exporting the model class `kind`
// and its interface `I<kind>`, the package name, and the document to check with it.
export function modelRef(data) {
  let { apiVersion = '', kind = '' } = data;
  let doc = data;
  let projected;
  const [group, version] = apiVersion.split('/');
  if (group === 'extensions.istio.io' && kind === 'TrafficExtension') {
    doc = trafficExtensionAsWasmPlugin(data);
    kind = 'WasmPlugin';
    projected = 'WasmPlugin';
  }
  let schema;
  let module;
  if (ISTIO_GROUPS.includes(group)) {
    schema = '@kubernetes-models/istio';
    module = `${schema}/${group}/${version}/${kind}`;
  } else if (PACKAGES[group]) {
    schema = PACKAGES[group];
    module = `${schema}/${group}/${version}/${kind}`;
  } else {
    // Core kinds: kubernetes-models/v1/ConfigMap, kubernetes-models/apps/v1/Deployment.
    schema = 'kubernetes-models';
    module = `${schema}/${version === undefined ? group : `${group}/${version}`}/${kind}`;
  }
  return { module, kind, typeName: `I${kind}`, schema, projected, doc };
}

export async function modelFor(data) {
  const ref = modelRef(data);
  try {
    const Model = (await import(ref.module))[ref.kind];
    if (typeof Model !== 'function') return null;
    return { ...ref, Model };
  } catch (e) {
    return null;
  }
}
