//! `latchkey`: the offline configuration checker (a native binary of the same crate).
//!
//! `latchkey check FILE…` validates latchkey configurations with the filter's own
//! code ([`latchkey::config::Config::parse`]), so it reports exactly what the filter
//! would log (`latchkey: configuration rejected: …`) before Envoy ever sees the file.
//! A FILE may be
//! - a latchkey configuration (JSON, or the same document written in YAML);
//! - Kubernetes YAML: every `WasmPlugin` whose `pluginName` is `latchkey` (or whose
//!   name or `url` says latchkey) has its `pluginConfig` checked, other resources are
//!   skipped;
//! - an Envoy configuration (bootstrap, LDS or ECDS resources, YAML or JSON): every
//!   `envoy.extensions.filters.http.wasm.v3.Wasm` filter running latchkey has its
//!   `configuration` checked.
//!
//! `{"env": NAME}` secrets: deploy-time values are not known here. A variable given
//! inline next to the configuration (Envoy `environment_variables.key_values`, a
//! WasmPlugin `vmConfig.env` entry with `valueFrom: INLINE`) is used as given; any
//! other is taken as set to a placeholder (and said so), or with `--env` read from
//! this process's environment. Where the file says which variables the VM gets
//! (a WasmPlugin's `vmConfig.env`, Envoy's `environment_variables`), a variable it
//! does not list is unset, as it would be in the VM.
//!
//! `latchkey schema` prints the JSON Schema of the configuration
//! (`schema/latchkey.schema.json`).
//!
//! Exit status: 0 every configuration is valid, 1 one is not, 2 usage or I/O error
//! (or a file with nothing to check).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::ExitCode;

use serde_json::{Map, Number, Value};
use yaml_rust2::{Yaml, YamlLoader};

use latchkey::config::Config;

const SCHEMA: &str = include_str!("../../schema/latchkey.schema.json");
const PLACEHOLDER: &str = "latchkey-check-placeholder";
const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

const USAGE: &str = "\
usage: latchkey check [--env] [--quiet] FILE...
       latchkey schema
       latchkey --version

check   Validate latchkey configurations with the filter's own code: a latchkey
        configuration (JSON or YAML), the pluginConfig of each latchkey WasmPlugin in
        Kubernetes YAML, or each latchkey wasm filter in an Envoy configuration.
        FILE may be - for standard input.
        --env    resolve {\"env\": NAME} secrets from this process's environment
                 (default: a variable not given inline is taken as set to a placeholder)
        --quiet  print errors only
schema  Print the JSON Schema (draft 2020-12) of the latchkey configuration.

Exit status: 0 valid, 1 invalid configuration, 2 usage or I/O error.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check") => check_command(args.get(1..).unwrap_or_default()),
        Some("schema") if args.len() == 1 => {
            print!("{SCHEMA}");
            ExitCode::SUCCESS
        }
        Some("--version" | "-V") => {
            println!("latchkey {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => usage_error("expected a command"),
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("latchkey: {msg}\n{USAGE}");
    ExitCode::from(2)
}

#[derive(Debug, Default, Clone, Copy)]
struct Options {
    process_env: bool,
    quiet: bool,
}

fn check_command(args: &[String]) -> ExitCode {
    let mut opts = Options::default();
    let mut files = Vec::new();
    for a in args {
        match a.as_str() {
            "--env" => opts.process_env = true,
            "--quiet" | "-q" => opts.quiet = true,
            "-" => files.push(a.clone()),
            s if s.starts_with('-') => return usage_error(&format!("unknown option {s}")),
            _ => files.push(a.clone()),
        }
    }
    if files.is_empty() {
        return usage_error("check needs at least one FILE");
    }
    let mut worst = 0u8;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for file in &files {
        let code = match read(file) {
            Ok(bytes) => {
                let report = check_bytes(&bytes, opts);
                let _ = write!(out, "{}", report.render(file, opts.quiet));
                report.code()
            }
            Err(e) => {
                eprintln!("{file}: error: {e}");
                2
            }
        };
        worst = worst.max(code);
    }
    ExitCode::from(worst)
}

fn read(file: &str) -> std::io::Result<Vec<u8>> {
    if file == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(buf)
    } else {
        std::fs::read(file)
    }
}

// --------------------------------------------------------------------------- report

/// What checking one file found.
#[derive(Debug, Default)]
struct Report {
    /// One entry per latchkey configuration found.
    checked: Vec<Checked>,
    /// The file could not be read as anything (not YAML/JSON, nothing to check).
    fatal: Option<String>,
}

#[derive(Debug)]
struct Checked {
    /// Where in the file: "" for a plain configuration, else e.g. `WasmPlugin orders/latchkey`.
    place: String,
    outcome: Result<String, String>,
    warnings: Vec<String>,
    notes: Vec<String>,
}

impl Report {
    fn code(&self) -> u8 {
        if self.fatal.is_some() {
            2
        } else if self.checked.iter().any(|c| c.outcome.is_err()) {
            1
        } else {
            0
        }
    }

    fn render(&self, file: &str, quiet: bool) -> String {
        let mut s = String::new();
        if let Some(f) = &self.fatal {
            s.push_str(&format!("{file}: error: {f}\n"));
            return s;
        }
        for c in &self.checked {
            let head = if c.place.is_empty() {
                file.to_string()
            } else {
                format!("{file}: {}", c.place)
            };
            match &c.outcome {
                Err(e) => s.push_str(&format!("{head}: error: {e}\n")),
                Ok(summary) if !quiet => s.push_str(&format!("{head}: ok ({summary})\n")),
                Ok(_) => {}
            }
            if !quiet {
                for w in &c.warnings {
                    s.push_str(&format!("{head}: warning: {w}\n"));
                }
                for n in &c.notes {
                    s.push_str(&format!("{head}: note: {n}\n"));
                }
            }
        }
        s
    }
}

// --------------------------------------------------------------------------- environment

/// The VM environment a configuration will see, as far as the file tells.
#[derive(Debug, Default)]
struct VmEnv {
    /// `None`: the file does not say (a bare configuration): every variable may be set.
    declared: Option<BTreeMap<String, Declared>>,
}

#[derive(Debug, Clone)]
enum Declared {
    Inline(String),
    /// From the host (Envoy's own environment): `host_env_keys`, `valueFrom: HOST`.
    Host,
}

impl VmEnv {
    fn declare(&mut self, name: &str, d: Declared) {
        self.declared
            .get_or_insert_with(BTreeMap::new)
            .insert(name.to_string(), d);
    }
}

/// Checks one configuration document with the filter's own parser.
fn check_config(place: String, text: &[u8], env: &VmEnv, opts: Options) -> Checked {
    let placeholders = RefCell::new(Vec::<String>::new());
    let unset = RefCell::new(Vec::<String>::new());
    let lookup = |name: &str| -> Option<String> {
        let declared = match &env.declared {
            None => Some(Declared::Host),
            Some(map) => map.get(name).cloned(),
        };
        match declared {
            Some(Declared::Inline(v)) => Some(v),
            Some(Declared::Host) if opts.process_env => std::env::var(name).ok(),
            Some(Declared::Host) => {
                placeholders.borrow_mut().push(name.to_string());
                Some(PLACEHOLDER.to_string())
            }
            None => {
                unset.borrow_mut().push(name.to_string());
                None
            }
        }
    };
    let result = Config::parse(text, &lookup);
    let mut notes = Vec::new();
    let mut names = placeholders.into_inner();
    names.sort();
    names.dedup();
    if !names.is_empty() {
        notes.push(format!(
            "environment variable{} {} taken as set (placeholder value); \
             pass --env to read {} from this environment",
            if names.len() == 1 { "" } else { "s" },
            names.join(", "),
            if names.len() == 1 { "it" } else { "them" },
        ));
    }
    for name in unset.into_inner() {
        notes.push(format!(
            "{name} is not among the VM's environment variables in this file \
             (WasmPlugin vmConfig.env, Envoy vm_config.environment_variables)"
        ));
    }
    match result {
        Ok(config) => Checked {
            place,
            outcome: Ok(format!(
                "{} routes, {} connections, {} providers",
                config.routes.len(),
                config.connections.len(),
                config.providers.len()
            )),
            warnings: config.warnings.clone(),
            notes,
        },
        Err(e) => Checked {
            place,
            outcome: Err(e.to_string()),
            warnings: Vec::new(),
            notes,
        },
    }
}

// --------------------------------------------------------------------------- files

fn check_bytes(bytes: &[u8], opts: Options) -> Report {
    let trimmed = bytes.trim_ascii_start();
    if trimmed.starts_with(b"{") || trimmed.starts_with(b"[") {
        // JSON. A bare latchkey configuration goes to the filter's parser byte for
        // byte, so even a syntax error reads as the filter would log it.
        return match serde_json::from_slice::<Value>(bytes) {
            Ok(doc) if is_envoy_or_k8s(&doc) => check_documents(&[doc], opts),
            _ => Report {
                checked: vec![check_config(String::new(), bytes, &VmEnv::default(), opts)],
                fatal: None,
            },
        };
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(_) => {
            return Report {
                fatal: Some("not UTF-8 text".into()),
                ..Report::default()
            }
        }
    };
    let docs = match YamlLoader::load_from_str(text) {
        Ok(docs) => docs,
        Err(e) => {
            return Report {
                fatal: Some(format!("not YAML or JSON: {e}")),
                ..Report::default()
            }
        }
    };
    let mut values = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        match yaml_to_json(d) {
            Ok(Value::Null) => {}
            Ok(v) => values.push(v),
            Err(e) => {
                return Report {
                    fatal: Some(format!("YAML document {}: {e}", i + 1)),
                    ..Report::default()
                }
            }
        }
    }
    if let [only] = values.as_slice() {
        if is_envoy_or_k8s(only) {
            return check_documents(&values, opts);
        }
        // A latchkey configuration written in YAML (a pluginConfig on its own).
        let text = only.to_string();
        return Report {
            checked: vec![check_config(
                String::new(),
                text.as_bytes(),
                &VmEnv::default(),
                opts,
            )],
            fatal: None,
        };
    }
    check_documents(&values, opts)
}

/// A Kubernetes resource or an Envoy configuration (not a bare latchkey config).
fn is_envoy_or_k8s(doc: &Value) -> bool {
    let Some(obj) = doc.as_object() else {
        return false;
    };
    const MARKERS: &[&str] = &[
        "apiVersion",
        "kind",
        "static_resources",
        "dynamic_resources",
        "admin",
        "resources",
        "typed_config",
        "@type",
        "filter_chains",
    ];
    obj.keys().any(|k| MARKERS.contains(&k.as_str()))
}

fn check_documents(docs: &[Value], opts: Options) -> Report {
    let mut report = Report::default();
    let many = docs.len() > 1;
    for (i, doc) in docs.iter().enumerate() {
        let doc_place = if many {
            format!("document {}: ", i + 1)
        } else {
            String::new()
        };
        if doc.get("kind").and_then(Value::as_str) == Some("WasmPlugin") {
            if let Some(c) = check_wasm_plugin(doc, &doc_place, opts) {
                report.checked.push(c);
            }
            continue;
        }
        let mut found = Vec::new();
        find_wasm_filters(doc, &mut found);
        for filter in found {
            if let Some(c) = check_envoy_wasm(filter, &doc_place, opts) {
                report.checked.push(c);
            }
        }
    }
    if report.checked.is_empty() {
        report.fatal = Some(
            "no latchkey configuration found (a latchkey WasmPlugin, an Envoy wasm filter \
             running latchkey, or a latchkey configuration)"
                .into(),
        );
    }
    report
}

fn mentions_latchkey(v: Option<&Value>) -> bool {
    v.and_then(Value::as_str)
        .is_some_and(|s| s.to_ascii_lowercase().contains("latchkey"))
}

fn check_wasm_plugin(doc: &Value, doc_place: &str, opts: Options) -> Option<Checked> {
    let spec = doc.get("spec");
    let get = |k: &str| spec.and_then(|s| s.get(k));
    let meta = doc.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str);
    let is_latchkey = get("pluginName").and_then(Value::as_str) == Some("latchkey")
        || mentions_latchkey(get("url"))
        || name.to_ascii_lowercase().contains("latchkey");
    if !is_latchkey {
        return None;
    }
    let place = match ns {
        Some(ns) => format!("{doc_place}WasmPlugin {ns}/{name}"),
        None => format!("{doc_place}WasmPlugin {name}"),
    };
    let mut env = VmEnv {
        declared: Some(BTreeMap::new()),
    };
    let mut extra_warnings = Vec::new();
    if let Some(list) = get("vmConfig")
        .and_then(|v| v.get("env"))
        .and_then(Value::as_array)
    {
        for e in list {
            let Some(n) = e.get("name").and_then(Value::as_str) else {
                continue;
            };
            match e.get("valueFrom").and_then(Value::as_str) {
                Some("HOST") => env.declare(n, Declared::Host),
                // INLINE is the default.
                _ => env.declare(
                    n,
                    Declared::Inline(
                        e.get("value")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                    ),
                ),
            }
        }
    }
    match get("phase").and_then(Value::as_str) {
        Some("AUTHZ") => {}
        other => extra_warnings.push(format!(
            "spec.phase is {}: use AUTHZ so that Istio's RequestAuthentication has \
             verified the caller (claims in metadata \"payload\") before latchkey runs",
            other.map_or("not set".to_string(), |p| format!("{p:?}"))
        )),
    }
    if get("failStrategy").and_then(Value::as_str) == Some("FAIL_OPEN") {
        extra_warnings.push(
            "spec.failStrategy is FAIL_OPEN: requests would pass without their \
             credentials when the module can't run; a credential broker should FAIL_CLOSE"
                .into(),
        );
    }
    let text = match get("pluginConfig") {
        None | Some(Value::Null) => "{}".to_string(),
        Some(v) => v.to_string(),
    };
    let mut checked = check_config(place, text.as_bytes(), &env, opts);
    checked.warnings.extend(extra_warnings);
    Some(checked)
}

/// Every object whose `@type` is the wasm HTTP filter, anywhere in the document.
fn find_wasm_filters<'a>(v: &'a Value, out: &mut Vec<&'a Map<String, Value>>) {
    match v {
        Value::Object(map) => {
            if map.get("@type").and_then(Value::as_str) == Some(WASM_TYPE) {
                out.push(map);
                return;
            }
            for child in map.values() {
                find_wasm_filters(child, out);
            }
        }
        Value::Array(items) => {
            for child in items {
                find_wasm_filters(child, out);
            }
        }
        _ => {}
    }
}

fn check_envoy_wasm(
    filter: &Map<String, Value>,
    doc_place: &str,
    opts: Options,
) -> Option<Checked> {
    let config = filter.get("config")?;
    let vm = config.get("vm_config");
    let code_file = vm
        .and_then(|v| v.get("code"))
        .and_then(|c| c.get("local"))
        .and_then(|l| l.get("filename"));
    let name = config.get("name").and_then(Value::as_str).unwrap_or("");
    let is_latchkey = mentions_latchkey(config.get("name"))
        || mentions_latchkey(config.get("root_id"))
        || mentions_latchkey(code_file);
    if !is_latchkey {
        return None;
    }
    let place = format!("{doc_place}wasm filter {name:?}");
    let mut env = VmEnv {
        declared: Some(BTreeMap::new()),
    };
    if let Some(vars) = vm.and_then(|v| v.get("environment_variables")) {
        if let Some(kv) = vars.get("key_values").and_then(Value::as_object) {
            for (k, v) in kv {
                let value = v.as_str().map(str::to_string).unwrap_or_default();
                env.declare(k, Declared::Inline(value));
            }
        }
        if let Some(keys) = vars.get("host_env_keys").and_then(Value::as_array) {
            for k in keys.iter().filter_map(Value::as_str) {
                env.declare(k, Declared::Host);
            }
        }
    }
    // `configuration` is an Any: a StringValue holding the JSON (what latchkey reads).
    let text = match config.get("configuration") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(any) => match any.get("value") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Some(Checked {
                    place,
                    outcome: Err(
                        "configuration: expected a google.protobuf.StringValue holding \
                         the JSON configuration"
                            .into(),
                    ),
                    warnings: Vec::new(),
                    notes: Vec::new(),
                })
            }
        },
    };
    Some(check_config(place, text.as_bytes(), &env, opts))
}

// --------------------------------------------------------------------------- YAML

/// YAML to JSON as Kubernetes does it: mapping keys become strings.
fn yaml_to_json(y: &Yaml) -> Result<Value, String> {
    Ok(match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => Value::Number((*i).into()),
        Yaml::Real(s) => {
            let f: f64 = s
                .parse()
                .map_err(|_| format!("can't read {s:?} as a number"))?;
            Value::Number(Number::from_f64(f).ok_or_else(|| format!("{s} is not a JSON number"))?)
        }
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(items) => Value::Array(
            items
                .iter()
                .map(yaml_to_json)
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Yaml::Hash(h) => {
            let mut map = Map::new();
            for (k, v) in h {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    Yaml::Real(s) => s.clone(),
                    Yaml::Null => "null".to_string(),
                    _ => return Err("a mapping key that is not a scalar".into()),
                };
                if map.insert(key.clone(), yaml_to_json(v)?).is_some() {
                    return Err(format!("duplicate key {key:?}"));
                }
            }
            Value::Object(map)
        }
        Yaml::Alias(_) => return Err("YAML aliases are not supported".into()),
        Yaml::BadValue => return Err("a value YAML can't represent".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTS: Options = Options {
        process_env: false,
        quiet: false,
    };

    fn check(text: &str) -> Report {
        check_bytes(text.as_bytes(), OPTS)
    }

    #[test]
    fn bare_json_config_is_checked_with_the_filters_messages() {
        let r =
            check(r#"{"connections": {"c": {"provider": "nope", "access": {"public": true}}}}"#);
        assert_eq!(r.code(), 1);
        assert_eq!(
            r.checked[0].outcome,
            Err("connections.c.provider: unknown provider \"nope\"".to_string())
        );
    }

    #[test]
    fn json_syntax_errors_are_reported_like_the_filter() {
        let r = check("{\"routes\": [");
        assert_eq!(r.code(), 1);
        let e = r.checked[0].outcome.clone().unwrap_err();
        assert!(e.starts_with("configuration is not valid JSON"), "{e}");
    }

    #[test]
    fn env_secrets_of_a_bare_config_get_a_placeholder_and_a_note() {
        let r = check(
            r#"{"secrets": {"k": {"env": "PARTNER_API_KEY"}},
                "providers": {"p": {"type": "api_key"}},
                "connections": {"c": {"provider": "p", "api_key": "k", "access": {"public": true}}}}"#,
        );
        assert_eq!(r.code(), 0, "{r:?}");
        assert_eq!(r.checked[0].notes.len(), 1);
        assert!(r.checked[0].notes[0].contains("PARTNER_API_KEY taken as set"));
    }

    #[test]
    fn wasm_plugin_env_not_listed_in_vm_config_is_unset() {
        let yaml = r#"
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: latchkey, namespace: gw}
spec:
  url: oci://registry.example.com/latchkey:0.1.0
  phase: AUTHZ
  vmConfig:
    env:
      - {name: LISTED, valueFrom: HOST}
      - {name: GIVEN, value: "v"}
  pluginConfig:
    secrets:
      a: {env: LISTED}
      b: {env: GIVEN}
      c: {env: MISSING}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: idp}
spec: {hosts: [idp.example.com]}
"#;
        let r = check(yaml);
        assert_eq!(r.code(), 1);
        assert_eq!(r.checked.len(), 1);
        assert_eq!(r.checked[0].place, "document 1: WasmPlugin gw/latchkey");
        assert_eq!(
            r.checked[0].outcome,
            Err("secrets.c.env: environment variable \"MISSING\" is not set".to_string())
        );
    }

    #[test]
    fn wasm_plugin_phase_other_than_authz_is_a_warning() {
        let yaml = "kind: WasmPlugin\nmetadata: {name: latchkey}\nspec:\n  phase: AUTHN\n  pluginConfig: {unmatched: deny}\n";
        let r = check(yaml);
        assert_eq!(r.code(), 0, "{r:?}");
        assert!(r.checked[0].warnings[0].starts_with("spec.phase is \"AUTHN\""));
    }

    #[test]
    fn envoy_wasm_filter_configuration_is_checked() {
        let yaml = r#"
static_resources:
  listeners:
    - filter_chains:
        - filters:
            - typed_config:
                http_filters:
                  - name: envoy.filters.http.wasm
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
                      config:
                        name: latchkey
                        vm_config:
                          code: {local: {filename: /opt/latchkey/latchkey.wasm}}
                          environment_variables: {key_values: {K: "v"}}
                        configuration:
                          "@type": type.googleapis.com/google.protobuf.StringValue
                          value: '{"unmatched": "sometimes"}'
"#;
        let r = check(yaml);
        assert_eq!(r.code(), 1);
        assert_eq!(r.checked[0].place, "wasm filter \"latchkey\"");
        let e = r.checked[0].outcome.clone().unwrap_err();
        assert!(
            e.starts_with("unmatched: invalid value \"sometimes\""),
            "{e}"
        );
    }

    #[test]
    fn a_yaml_latchkey_config_is_checked_as_json() {
        let r = check("unmatched: deny\nroutes:\n  - {name: a, match: {path_prefix: /a}}\n");
        assert_eq!(r.code(), 0, "{r:?}");
        assert_eq!(
            r.checked[0].outcome,
            Ok("1 routes, 0 connections, 0 providers".into())
        );
    }

    #[test]
    fn files_without_latchkey_are_a_usage_error() {
        let r = check("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n");
        assert_eq!(r.code(), 2);
    }

    #[test]
    fn yaml_numbers_and_keys_become_json() {
        let docs = YamlLoader::load_from_str("a: 1\nb: 2.5\n3: x\nc: [true, null]\n").unwrap();
        let v = yaml_to_json(&docs[0]).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a": 1, "b": 2.5, "3": "x", "c": [true, null]})
        );
    }

    #[test]
    fn duplicate_yaml_keys_are_refused() {
        let docs = YamlLoader::load_from_str("a: 1\na: 2\n");
        // yaml-rust2 may refuse them itself; either way they never reach the filter.
        if let Ok(docs) = docs {
            assert!(yaml_to_json(&docs[0]).is_err());
        }
    }

    #[test]
    fn schema_is_json() {
        let v: Value = serde_json::from_str(SCHEMA).unwrap();
        assert_eq!(v["$schema"], "https://json-schema.org/draft/2020-12/schema");
    }
}
