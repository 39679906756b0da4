// Validates Kubernetes YAML files against Istio's CRD schemas, as shipped by npm
// @kubernetes-models/istio (validators generated from Istio's crd-all.gen.yaml), and
// core Kubernetes kinds (Deployment, ConfigMap, Service, ...) against npm kubernetes-models
// (generated from Kubernetes' OpenAPI).
//
// Usage: node validate.mjs FILE...
// Prints one JSON line per document: {file, index, apiVersion, kind, name, status, errors}
// with status "valid" or "invalid"; `schema` names the package whose schema was used.
// Exit 1 if any document is invalid or has no schema, 2 on a usage or read error.

import fs from 'node:fs';
import { parseAllDocuments } from 'yaml';

const files = process.argv.slice(2);
if (files.length === 0) {
  process.stderr.write('usage: node validate.mjs FILE...\n');
  process.exit(2);
}

const ISTIO_GROUPS = ['networking.istio.io', 'security.istio.io', 'extensions.istio.io',
  'telemetry.istio.io', 'install.istio.io'];

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
    const [group, version] = apiVersion.split('/');
    const out = { file, index, apiVersion, kind, name };
    const istio = ISTIO_GROUPS.includes(group);
    const schema = istio ? '@kubernetes-models/istio' : 'kubernetes-models';
    // Core kinds: kubernetes-models/v1/ConfigMap, kubernetes-models/apps/v1/Deployment.
    const modulePath = istio ? `${schema}/${group}/${version}/${kind}`
      : `${schema}/${version === undefined ? group : `${group}/${version}`}/${kind}`;
    out.schema = schema;
    let Model;
    try {
      Model = (await import(modulePath))[kind];
      if (typeof Model !== 'function') throw new Error('no model');
    } catch (e) {
      failed = true;
      console.log(JSON.stringify({ ...out, status: 'invalid', errors: [`no schema for ${apiVersion} ${kind}`] }));
      continue;
    }
    try {
      new Model(data).validate();
      console.log(JSON.stringify({ ...out, status: 'valid' }));
    } catch (e) {
      failed = true;
      console.log(JSON.stringify({ ...out, status: 'invalid', errors: [e.message] }));
    }
  }
}
process.exit(failed ? 1 : 0);
