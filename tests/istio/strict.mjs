// Unknown fields in Kubernetes YAML files, refused as `kubectl apply` (strict field
// validation) refuses them. The validators validate.mjs uses check types, enums and
// required fields but let unknown fields through (a typo such as `pullSecretref` would pass),
// so each document is also type-checked, as a TypeScript object literal, against the
// interface its package declares for it (`I<Kind>` in the same module as the model
// validate.mjs uses): TypeScript's excess property check refuses any field the interface
// does not declare, at any depth, and free-form fields (pluginConfig, a Wasm `config`)
// are declared as open maps, so their contents pass. A TrafficExtension is checked as its
// WasmPlugin projection (models.mjs).
//
// Usage: node strict.mjs FILE...
// Prints one JSON line per document: {file, index, kind, name, status, errors}; exit 1 if
// any document has an unknown field or no type declaration, 2 on a usage or read error.

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';
import { parseAllDocuments } from 'yaml';
import { modelRef } from './models.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const files = process.argv.slice(2);
if (files.length === 0) {
  process.stderr.write('usage: node strict.mjs FILE...\n');
  process.exit(2);
}

// One virtual source file per document, next to node_modules so that imports resolve.
const sources = new Map();
const docs = [];
for (const file of files) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    process.stderr.write(`${file}: ${e.message}\n`);
    process.exit(2);
  }
  let index = 0;
  for (const doc of parseAllDocuments(text)) {
    index += 1;
    const data = doc.toJS();
    if (data === null || data === undefined) continue;
    const ref = modelRef(data);
    const name = path.join(HERE, `__strict_${docs.length}.ts`);
    sources.set(name, `import type { ${ref.typeName} } from ${JSON.stringify(ref.module)};\n`
      + `export const doc: ${ref.typeName} = ${JSON.stringify(ref.doc, null, 1)};\n`);
    docs.push({ file, index, kind: data.kind, name: data.metadata?.name, source: name });
  }
}

const options = {
  strict: true, noEmit: true, skipLibCheck: true, target: ts.ScriptTarget.ES2022,
  module: ts.ModuleKind.NodeNext, moduleResolution: ts.ModuleResolutionKind.NodeNext,
  types: [],
};
const host = ts.createCompilerHost(options);
const getSourceFile = host.getSourceFile.bind(host);
host.getSourceFile = (fileName, languageVersion, ...rest) => (sources.has(fileName)
  ? ts.createSourceFile(fileName, sources.get(fileName), languageVersion)
  : getSourceFile(fileName, languageVersion, ...rest));
const fileExists = host.fileExists.bind(host);
host.fileExists = (fileName) => sources.has(fileName) || fileExists(fileName);
const readFile = host.readFile.bind(host);
host.readFile = (fileName) => sources.get(fileName) ?? readFile(fileName);
// The virtual files are ES modules (tests/istio/package.json says "type": "module").
const program = ts.createProgram([...sources.keys()], options, host);

let failed = false;
for (const d of docs) {
  const sf = program.getSourceFile(d.source);
  const diags = [...program.getSyntacticDiagnostics(sf), ...program.getSemanticDiagnostics(sf)];
  const errors = diags.map((g) => ts.flattenDiagnosticMessageText(g.messageText, '\n'));
  const { source, ...out } = d;
  if (errors.length) failed = true;
  console.log(JSON.stringify({ ...out, status: errors.length ? 'invalid' : 'valid', errors }));
}
process.exit(failed ? 1 : 0);
