// Validates Kubernetes YAML files against the schemas published in npm packages:
// - Istio's kinds: @kubernetes-models/istio (validators generated from Istio 1.29.2's
//   crd-all.gen.yaml; the kinds deploy/ uses are byte-identical in Istio 1.30's CRDs);
// - Envoy Gateway's kinds (gateway.envoyproxy.io): @kubernetes-models/envoy-gateway
//   (generated from Envoy Gateway v1.7.3's API types);
// - Gateway API kinds (gateway.networking.k8s.io): @kubernetes-models/gateway-api
//   (generated from Gateway API v1.5.1's types);
// - core Kubernetes kinds (Deployment, ConfigMap, Service, ...): kubernetes-models
//   (generated from Kubernetes' OpenAPI).
// Istio 1.30's TrafficExtension is in none of them (see models.mjs): its WasmPlugin
// projection is validated instead, and reported with `projected: "WasmPlugin"`.
//
// These validators check types, enums, patterns and required fields; they do not refuse
// unknown fields (strict.mjs does).
//
// Usage: node validate.mjs FILE...
// Prints one JSON line per document: {file, index, apiVersion, kind, name, status, errors}
// with status "valid" or "invalid"; `schema` names the package whose schema was used.
// Exit 1 if any document is invalid or has no schema, 2 on a usage or read error.

import fs from 'node:fs';
import { parseAllDocuments } from 'yaml';
import { modelFor } from './models.mjs';

const files = process.argv.slice(2);
if (files.length === 0) {
  process.stderr.write('usage: node validate.mjs FILE...\n');
  process.exit(2);
}

let failed = false;
for (const file of files) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    process.stderr.write(`${file}: ${e.message}\n`);
    process.exit(2);
  }
  const docs = parseAllDocuments(text);
  let index = 0;
  for (const doc of docs) {
    index += 1;
    if (doc.errors.length) {
      failed = true;
      console.log(JSON.stringify({ file, index, status: 'invalid', errors: doc.errors.map(String) }));
      continue;
    }
    const data = doc.toJS();
    if (data === null || data === undefined) continue;
    const { apiVersion = '', kind = '' } = data;
    const name = data.metadata?.name;
    const out = { file, index, apiVersion, kind, name };
    const found = await modelFor(data);
    if (!found) {
      failed = true;
      console.log(JSON.stringify({ ...out, status: 'invalid', errors: [`no schema for ${apiVersion} ${kind}`] }));
      continue;
    }
    const { Model, schema, projected, doc: checked } = found;
    out.schema = schema;
    if (projected) out.projected = projected;
    try {
      new Model(checked).validate();
      console.log(JSON.stringify({ ...out, status: 'valid' }));
    } catch (e) {
      failed = true;
      console.log(JSON.stringify({ ...out, status: 'invalid', errors: [e.message] }));
    }
  }
}
process.exit(failed ? 1 : 0);
