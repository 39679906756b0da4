//! `latchkey`: the offline configuration checker (a native binary of the same crate).
//!
//! `latchkey check PATH…` validates latchkey configurations with the filter's own
//! code ([`latchkey::config::Config::parse`]), so it reports exactly what the filter
//! would log (`latchkey: configuration rejected: …`) before Envoy ever sees the file.
//! A PATH is a file or a directory (its `*.yaml`, `*.yml` and `*.json` files, recursively).
//! A file may be
//! - a latchkey configuration (JSON, or the same document written in YAML);
//! - Kubernetes YAML: every latchkey `WasmPlugin` (its `pluginConfig`), Istio 1.30
//!   `TrafficExtension` (`wasm.pluginConfig`) and Envoy Gateway `EnvoyExtensionPolicy`
//!   (each `wasm[].config`) is checked, other resources are skipped;
//! - an Envoy configuration (bootstrap, LDS or ECDS resources, YAML or JSON): every
//!   `envoy.extensions.filters.http.wasm.v3.Wasm` filter running latchkey has its
//!   `configuration` checked, a `google.protobuf.StringValue` holding the JSON or a
//!   `google.protobuf.Struct` (the configuration written as YAML).
//!
//! A file with nothing to check is a note, not a failure. Every file and every
//! configuration is checked and reported (the filter's parser stops at the first error
//! of a configuration), with the line and column in the file, as text, JSON
//! (`--format json`) or GitHub Actions annotations (`--format github`).
//!
//! Across the files given (best effort, warnings): a `match.route_name` that no
//! VirtualService, HTTPRoute or Envoy route among them names, and a `cluster` that no
//! Envoy cluster, Istio ServiceEntry or Kubernetes Service among them defines, and a
//! `valueFrom: HOST` variable that no proxy container among them sets. And one error:
//! a `tls_client_auth` provider (v1.2) whose cluster is an Envoy cluster among them
//! with no client certificate in its transport socket.
//!
//! `{"env": NAME}` secrets: deploy-time values are not known here. A variable given
//! inline next to the configuration (Envoy `environment_variables.key_values`, a
//! WasmPlugin `vmConfig.env` entry with `valueFrom: INLINE`) is used as given; any
//! other is taken as set to a placeholder (and said so), or with `--env` read from
//! this process's environment. Where the file says which variables the VM gets
//! (`vmConfig.env`, Envoy's `environment_variables`, an EnvoyExtensionPolicy's
//! `env.hostKeys`), a variable it does not list is unset, as it would be in the VM.
//!
//! `latchkey schema` prints the JSON Schema of the configuration
//! (`schema/latchkey.schema.json`).
//!
//! Exit status: 0 every configuration is valid, 1 one is not (or, with `--strict`, has a
//! warning), 2 usage or I/O error, or a file that is not YAML or JSON.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;
use yaml_rust2::{Yaml, YamlLoader};

use latchkey::config::{Config, TOP_LEVEL_FIELDS};

const SCHEMA: &str = include_str!("../../schema/latchkey.schema.json");
/// The value of an `{"env": …}` secret the checker can't know. At least 32 bytes: a
/// consent `state_key` shorter than that is refused (v1.2), and the checker must not
/// refuse a configuration for its own placeholder.
const PLACEHOLDER: &str = "latchkey-check-placeholder-of-32-bytes-or-more";
const _: () = assert!(PLACEHOLDER.len() >= 32);
const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

const USAGE: &str = "\
usage: latchkey check [--env] [--quiet] [--strict] [--format text|json|github] PATH...
       latchkey schema
       latchkey --version

check   Validate latchkey configurations with the filter's own code: a latchkey
        configuration (JSON or YAML), each latchkey WasmPlugin, TrafficExtension or
        EnvoyExtensionPolicy in Kubernetes YAML, or each latchkey wasm filter in an
        Envoy configuration. PATH is a file, a directory (its *.yaml, *.yml and *.json
        files, recursively) or - for standard input. Every error is reported.
        --env     resolve {\"env\": NAME} secrets from this process's environment
                  (default: a variable not given inline is taken as set to a placeholder)
        --quiet   print errors only
        --strict  warnings fail the check too (exit status 1)
        --format  text (default), json, or github (GitHub Actions annotations)
schema  Print the JSON Schema (draft 2020-12) of the latchkey configuration.

Exit status: 0 valid, 1 invalid configuration (or a warning with --strict), 2 usage or
I/O error.";

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

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Format {
    #[default]
    Text,
    Json,
    Github,
}

#[derive(Debug, Default, Clone, Copy)]
struct Options {
    process_env: bool,
    quiet: bool,
    strict: bool,
    format: Format,
    /// The file was found in a directory, not named: a document that has none of a
    /// latchkey configuration's fields is not one (Prometheus rules, a JWKS, …).
    found: bool,
}

/// Whether a document found in a directory is to be read as a latchkey configuration.
fn looks_like_config(doc: &Value, opts: Options) -> bool {
    !opts.found
        || doc
            .as_object()
            .is_some_and(|o| o.keys().any(|k| TOP_LEVEL_FIELDS.contains(&k.as_str())))
}

/// Parses `check`'s arguments: the options and the paths.
fn parse_args(args: &[String]) -> Result<(Options, Vec<String>), String> {
    let mut opts = Options::default();
    let mut paths = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let format = if a == "--format" {
            Some(
                it.next()
                    .ok_or("--format needs a value: text, json or github")?
                    .as_str(),
            )
        } else {
            a.strip_prefix("--format=")
        };
        if let Some(f) = format {
            opts.format = match f {
                "text" => Format::Text,
                "json" => Format::Json,
                "github" => Format::Github,
                other => return Err(format!("unknown format {other:?}: text, json or github")),
            };
            continue;
        }
        match a.as_str() {
            "--env" => opts.process_env = true,
            "--quiet" | "-q" => opts.quiet = true,
            "--strict" => opts.strict = true,
            "-" => paths.push(a.clone()),
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            _ => paths.push(a.clone()),
        }
    }
    if paths.is_empty() {
        return Err("check needs at least one FILE".into());
    }
    Ok((opts, paths))
}

/// The files a path stands for: itself, or a directory's YAML and JSON files, recursively
/// and sorted (hidden entries skipped).
fn expand(path: &str) -> std::io::Result<Vec<String>> {
    if path == "-" || !Path::new(path).is_dir() {
        return Ok(vec![path.to_string()]);
    }
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(path)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        let Some(s) = p.to_str() else { continue };
        if p.is_dir() {
            out.extend(expand(s)?);
        } else if [".yaml", ".yml", ".json"].iter().any(|e| name.ends_with(e)) {
            out.push(s.to_string());
        }
    }
    Ok(out)
}

fn check_command(args: &[String]) -> ExitCode {
    let (opts, paths) = match parse_args(args) {
        Ok(p) => p,
        Err(e) => return usage_error(&e),
    };
    let mut reports = Vec::new();
    for path in &paths {
        let files = match expand(path) {
            Ok(f) => f,
            Err(e) => {
                reports.push((path.clone(), Report::fatal(format!("{e}"))));
                continue;
            }
        };
        if files.is_empty() {
            let mut r = Report::default();
            r.file_notes
                .push("no YAML or JSON files in this directory".into());
            reports.push((path.clone(), r));
        }
        let found = Options {
            found: files.len() != 1 || files.first() != Some(path),
            ..opts
        };
        for file in files {
            let report = match read(&file) {
                Ok(bytes) => check_bytes(&bytes, found),
                Err(e) => Report::fatal(format!("{e}")),
            };
            reports.push((file, report));
        }
    }
    cross_check(&mut reports);
    let diags: Vec<Diag> = reports.iter().flat_map(|(file, r)| r.diags(file)).collect();
    let worst = reports
        .iter()
        .map(|(_, r)| r.code(opts.strict))
        .max()
        .unwrap_or(0);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let _ = write!(out, "{}", render(&diags, reports.len(), opts));
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

/// A line and column in a file, both from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    line: usize,
    col: usize,
}

/// What checking one file found.
#[derive(Debug, Default)]
struct Report {
    /// One entry per latchkey configuration found.
    checked: Vec<Checked>,
    /// The file could not be read as anything (not YAML/JSON, I/O error).
    fatal: Option<String>,
    /// Notes about the file as a whole (nothing to check in it).
    file_notes: Vec<String>,
    /// What the file defines, for the checks across files.
    defines: Defines,
}

/// Route and cluster names a file defines (VirtualService, HTTPRoute, Envoy routes;
/// Envoy clusters, ServiceEntries, Services).
#[derive(Debug, Default)]
struct Defines {
    /// `Some` once a file defines routes at all.
    routes: Option<BTreeSet<String>>,
    /// Generated route names begin with one of these (Envoy Gateway's
    /// `httproute/<ns>/<name>/rule/<n>/…`).
    route_prefixes: BTreeSet<String>,
    clusters: Option<BTreeSet<String>>,
    /// The Envoy clusters whose definition was seen (static or a CDS resource), and
    /// whether their transport_socket presents a client certificate (any definition
    /// of the name among the files given does).
    client_certs: BTreeMap<String, bool>,
    /// Envoy's clusters come from CDS: their names are not known here.
    dynamic_clusters: bool,
    /// Which kinds of cluster sources were given: an Istio cluster name of an external
    /// host is compared only when ServiceEntries were given, of a `*.svc.cluster.local`
    /// host only when Services were, and a plain name only when Envoy clusters were.
    envoy_clusters: bool,
    service_entries: bool,
    services: bool,
    /// The environment variables set on a proxy container (`istio-proxy`, `envoy`,
    /// Envoy Gateway's `envoyDeployment.container`).
    proxy_env: Option<BTreeSet<String>>,
}

impl Defines {
    fn route(&mut self, name: &str) {
        self.routes
            .get_or_insert_with(BTreeSet::new)
            .insert(name.to_string());
    }
    fn cluster(&mut self, name: &str) {
        self.clusters
            .get_or_insert_with(BTreeSet::new)
            .insert(name.to_string());
    }
    /// An Envoy cluster `name`, defined by `def`.
    fn envoy_cluster(&mut self, name: &str, def: &Value) {
        self.envoy_clusters = true;
        self.cluster(name);
        *self.client_certs.entry(name.to_string()).or_default() |= presents_client_cert(def);
    }
    /// Whether the files given define the kind of cluster `name` is.
    fn knows_kind_of(&self, name: &str) -> bool {
        let istio = ["outbound|", "inbound-vip|", "inbound|"]
            .iter()
            .any(|p| name.starts_with(p));
        if !istio {
            return self.envoy_clusters && !self.dynamic_clusters;
        }
        let host = name.rsplit('|').next().unwrap_or_default();
        if host.ends_with(".svc.cluster.local") {
            self.services
        } else {
            self.service_entries
        }
    }

    fn env(&mut self, name: &str) {
        self.proxy_env
            .get_or_insert_with(BTreeSet::new)
            .insert(name.to_string());
    }
    fn merge(&mut self, other: &Defines) {
        for (mine, theirs) in [
            (&mut self.routes, &other.routes),
            (&mut self.clusters, &other.clusters),
            (&mut self.proxy_env, &other.proxy_env),
        ] {
            if let Some(t) = theirs {
                mine.get_or_insert_with(BTreeSet::new)
                    .extend(t.iter().cloned());
            }
        }
        self.route_prefixes
            .extend(other.route_prefixes.iter().cloned());
        for (name, cert) in &other.client_certs {
            *self.client_certs.entry(name.clone()).or_default() |= cert;
        }
        self.dynamic_clusters |= other.dynamic_clusters;
        self.envoy_clusters |= other.envoy_clusters;
        self.service_entries |= other.service_entries;
        self.services |= other.services;
    }
}

#[derive(Debug)]
struct Checked {
    /// Where in the file: "" for a plain configuration, else e.g. `WasmPlugin orders/latchkey`.
    place: String,
    /// Where the configuration (or, for an error, the field it names) is in the file.
    pos: Option<Pos>,
    outcome: Result<String, String>,
    warnings: Vec<String>,
    /// The position of a warning that names a field of its own (by index in `warnings`).
    warning_pos: BTreeMap<usize, Pos>,
    /// The positions of the configuration's fields, by JSON pointer within it.
    field_pos: PosMap,
    notes: Vec<String>,
    /// The configuration as JSON, when it is valid (for the checks across files).
    config: Option<Value>,
    /// The variables it reads that the file says come from the proxy's own environment
    /// (`valueFrom: HOST`, `host_env_keys`, `env.hostKeys`).
    host_vars: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Severity {
    Ok,
    Error,
    Warning,
    Note,
}

impl Severity {
    fn name(self) -> &'static str {
        match self {
            Severity::Ok => "ok",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Note => "note",
        }
    }
}

/// One line of output.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Diag {
    file: String,
    pos: Option<Pos>,
    place: String,
    severity: Severity,
    message: String,
}

impl Report {
    fn fatal(msg: String) -> Report {
        Report {
            fatal: Some(msg),
            ..Report::default()
        }
    }

    fn code(&self, strict: bool) -> u8 {
        if self.fatal.is_some() {
            2
        } else if self.checked.iter().any(|c| c.outcome.is_err())
            || (strict && self.checked.iter().any(|c| !c.warnings.is_empty()))
        {
            1
        } else {
            0
        }
    }

    fn diags(&self, file: &str) -> Vec<Diag> {
        let d = |pos, place: &str, severity, message: &str| Diag {
            file: file.to_string(),
            pos,
            place: place.to_string(),
            severity,
            message: message.to_string(),
        };
        let mut out = Vec::new();
        if let Some(f) = &self.fatal {
            out.push(d(None, "", Severity::Error, f));
        }
        for n in &self.file_notes {
            out.push(d(None, "", Severity::Note, n));
        }
        for c in &self.checked {
            match &c.outcome {
                Err(e) => out.push(d(c.pos, &c.place, Severity::Error, e)),
                Ok(s) => out.push(d(c.pos, &c.place, Severity::Ok, s)),
            }
            for (i, w) in c.warnings.iter().enumerate() {
                let pos = c.warning_pos.get(&i).copied().or(c.pos);
                out.push(d(pos, &c.place, Severity::Warning, w));
            }
            for n in &c.notes {
                out.push(d(c.pos, &c.place, Severity::Note, n));
            }
        }
        out
    }
}

/// Whether `--quiet` keeps a line: errors, and warnings when they fail (`--strict`).
fn shown(d: &Diag, opts: Options) -> bool {
    !opts.quiet || d.severity == Severity::Error || (opts.strict && d.severity == Severity::Warning)
}

fn render(diags: &[Diag], files: usize, opts: Options) -> String {
    let mut s = String::new();
    match opts.format {
        Format::Text => {
            for d in diags.iter().filter(|d| shown(d, opts)) {
                s.push_str(&d.file);
                if let Some(p) = d.pos {
                    s.push_str(&format!(":{}:{}", p.line, p.col));
                }
                if !d.place.is_empty() {
                    s.push_str(&format!(": {}", d.place));
                }
                match d.severity {
                    Severity::Ok => s.push_str(&format!(": ok ({})\n", d.message)),
                    other => s.push_str(&format!(": {}: {}\n", other.name(), d.message)),
                }
            }
        }
        Format::Github => {
            for d in diags.iter().filter(|d| shown(d, opts)) {
                let level = match d.severity {
                    Severity::Ok => {
                        let head = if d.place.is_empty() {
                            d.file.clone()
                        } else {
                            format!("{}: {}", d.file, d.place)
                        };
                        s.push_str(&format!("{head}: ok ({})\n", d.message));
                        continue;
                    }
                    Severity::Error => "error",
                    Severity::Warning => "warning",
                    Severity::Note => "notice",
                };
                let mut props = format!("file={}", gh_property(&d.file));
                if let Some(p) = d.pos {
                    props.push_str(&format!(",line={},col={}", p.line, p.col));
                }
                let title = if d.place.is_empty() {
                    "latchkey".to_string()
                } else {
                    format!("latchkey: {}", d.place)
                };
                props.push_str(&format!(",title={}", gh_property(&title)));
                s.push_str(&format!("::{level} {props}::{}\n", gh_data(&d.message)));
            }
        }
        Format::Json => {
            let count = |sev| diags.iter().filter(|d| d.severity == sev).count();
            let list: Vec<Value> = diags
                .iter()
                .filter(|d| shown(d, opts))
                .map(|d| {
                    let mut o = Map::new();
                    o.insert("file".into(), Value::String(d.file.clone()));
                    if let Some(p) = d.pos {
                        o.insert("line".into(), p.line.into());
                        o.insert("column".into(), p.col.into());
                    }
                    o.insert("place".into(), Value::String(d.place.clone()));
                    o.insert("severity".into(), Value::String(d.severity.name().into()));
                    o.insert("message".into(), Value::String(d.message.clone()));
                    Value::Object(o)
                })
                .collect();
            let doc = serde_json::json!({
                "files": files,
                "configurations": count(Severity::Ok) + diags
                    .iter()
                    .filter(|d| d.severity == Severity::Error && !d.place.is_empty())
                    .count(),
                "errors": count(Severity::Error),
                "warnings": count(Severity::Warning),
                "diagnostics": list,
            });
            s.push_str(&format!("{doc:#}\n"));
        }
    }
    s
}

/// GitHub workflow command data: `%`, CR and LF escaped.
fn gh_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// GitHub workflow command property: also `:` and `,`.
fn gh_property(s: &str) -> String {
    gh_data(s).replace(':', "%3A").replace(',', "%2C")
}

// --------------------------------------------------------------------------- across files

/// Warnings for names a configuration uses that the files given do not define, when
/// they define any of that kind.
fn cross_check(reports: &mut [(String, Report)]) {
    let mut all = Defines::default();
    for (_, r) in reports.iter() {
        all.merge(&r.defines);
    }
    for (_, r) in reports.iter_mut() {
        for c in &mut r.checked {
            let Some(config) = &c.config else { continue };
            let errors = cross_errors(config, &all);
            let mut ws = cross_warnings(config, &all);
            ws.extend(env_warnings(config, &c.host_vars, &all));
            for (path, w) in ws {
                if let Some(pos) = locate(&c.field_pos, &path) {
                    c.warning_pos.insert(c.warnings.len(), pos);
                }
                c.warnings.push(w);
            }
            // What would fail at run time though the filter loads it: the configuration
            // is reported as an error, at the first field concerned.
            if let Some((path, _)) = errors.first() {
                if let Some(pos) = locate(&c.field_pos, path) {
                    c.pos = Some(pos);
                }
                let messages: Vec<String> = errors.into_iter().map(|(_, m)| m).collect();
                c.outcome = Err(messages.join("; "));
            }
        }
    }
}

/// Errors about what the files given show of the configuration's Envoy side: a
/// `tls_client_auth` provider whose cluster, defined among them, presents no
/// client certificate (the token server could never authenticate the client).
fn cross_errors(config: &Value, all: &Defines) -> Vec<(Vec<String>, String)> {
    let mut out = Vec::new();
    let Some(providers) = config.get("providers").and_then(Value::as_object) else {
        return out;
    };
    for (name, p) in providers {
        let tls = p.get("type").and_then(Value::as_str) == Some("oauth2")
            && p.get("auth_method").and_then(Value::as_str) == Some("tls_client_auth");
        let Some(cluster) = p.get("cluster").and_then(Value::as_str).filter(|_| tls) else {
            continue;
        };
        if all.client_certs.get(cluster) == Some(&false) {
            let at = ["providers", name, "auth_method"]
                .iter()
                .map(|s| pointer_escape(s))
                .collect();
            out.push((
                at,
                format!(
                    "providers.{name}.auth_method: \"tls_client_auth\" needs a client \
                     certificate, but cluster {cluster:?} presents none (its transport_socket \
                     has no common_tls_context with tls_certificates or \
                     tls_certificate_sds_secret_configs): the token server can't authenticate \
                     the client"
                ),
            ));
        }
    }
    out
}

/// Whether an Envoy cluster's transport socket (or one of its
/// `transport_socket_matches`) has a TLS context with a client certificate: inline
/// or from files (`tls_certificates`), from SDS (`tls_certificate_sds_secret_configs`)
/// or a certificate provider. Wrapping sockets (`tcp_stats`, `http_11_proxy`, …)
/// are looked into.
fn presents_client_cert(cluster: &Value) -> bool {
    fn has_cert(v: &Value) -> bool {
        match v {
            Value::Object(map) => {
                let in_context = map.get("common_tls_context").is_some_and(|ctx| {
                    [
                        "tls_certificates",
                        "tls_certificate_sds_secret_configs",
                        "tls_certificate_provider_instance",
                        "tls_certificate_certificate_provider_instance",
                    ]
                    .iter()
                    .any(|f| match ctx.get(*f) {
                        Some(Value::Array(a)) => !a.is_empty(),
                        Some(Value::Null) | None => false,
                        Some(_) => true,
                    })
                });
                in_context || map.values().any(has_cert)
            }
            Value::Array(items) => items.iter().any(has_cert),
            _ => false,
        }
    }
    let sockets = cluster.get("transport_socket").into_iter().chain(
        cluster
            .get("transport_socket_matches")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|m| m.get("transport_socket")),
    );
    sockets.into_iter().any(has_cert)
}

/// A variable the configuration reads from the proxy's environment that no proxy
/// container among the files given sets (when some do).
fn env_warnings(config: &Value, host_vars: &[String], all: &Defines) -> Vec<(Vec<String>, String)> {
    let Some(known) = &all.proxy_env else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for name in host_vars.iter().filter(|n| !known.contains(*n)) {
        // The secret that reads it, for the position.
        let at = config
            .get("secrets")
            .and_then(Value::as_object)
            .and_then(|m| {
                m.iter()
                    .find(|(_, v)| v.get("env").and_then(Value::as_str) == Some(name))
            })
            .map(|(k, _)| vec!["secrets".to_string(), pointer_escape(k), "env".into()])
            .unwrap_or_default();
        out.push((
            at,
            format!(
                "environment variable {name:?} comes from the proxy's environment, but no \
                 proxy container among the files given sets it (istio-proxy or envoy \
                 container env, an EnvoyProxy's envoyDeployment.container.env): {}",
                list(known)
            ),
        ));
    }
    out
}

/// The position of the field at `path` (pointer segments), or of the nearest enclosing
/// field that has one.
fn locate(field_pos: &PosMap, path: &[String]) -> Option<Pos> {
    (1..=path.len())
        .rev()
        .find_map(|n| field_pos.get(&format!("/{}", path.get(..n)?.join("/"))))
        .copied()
}

/// Each warning with the pointer segments of the field it is about.
fn cross_warnings(config: &Value, all: &Defines) -> Vec<(Vec<String>, String)> {
    let seg = |parts: &[&str]| parts.iter().map(|p| pointer_escape(p)).collect::<Vec<_>>();
    let mut out = Vec::new();
    if let (Some(known), Some(routes)) =
        (&all.routes, config.get("routes").and_then(Value::as_array))
    {
        for (i, r) in routes.iter().enumerate() {
            let m = r.get("match");
            if let Some(name) = m.and_then(|m| m.get("route_name")).and_then(Value::as_str) {
                let generated = all.route_prefixes.iter().any(|p| name.starts_with(p));
                if !known.contains(name) && !generated {
                    let at = seg(&["routes", &i.to_string(), "match", "route_name"]);
                    out.push((
                        at,
                        format!(
                            "routes[{i}].match.route_name {name:?} is not a route among the files \
                         given (VirtualService http[].name, HTTPRoute rules[].name, Envoy \
                         routes[].name): {}",
                            list(known)
                        ),
                    ));
                }
            }
            if let Some(p) = m
                .and_then(|m| m.get("route_name_prefix"))
                .and_then(Value::as_str)
            {
                if !known.iter().any(|k| k.starts_with(p)) {
                    let at = seg(&["routes", &i.to_string(), "match", "route_name_prefix"]);
                    out.push((
                        at,
                        format!(
                            "routes[{i}].match.route_name_prefix {p:?} begins no route among the \
                         files given: {}",
                            list(known)
                        ),
                    ));
                }
            }
        }
    }
    if let Some(known) = &all.clusters {
        for (path, cluster) in clusters_named(config) {
            if all.knows_kind_of(&cluster) && !known.contains(&cluster) {
                let at = path.iter().map(|p| pointer_escape(p)).collect();
                out.push((
                    at,
                    format!(
                        "{} {cluster:?} is not a cluster among the files given (Envoy \
                         clusters; Istio's outbound|PORT||HOST of a ServiceEntry or Service): {}",
                        path.join("."),
                        list(known)
                    ),
                ));
            }
        }
    }
    out
}

/// Every `cluster` a configuration names, with the path of its field (unescaped
/// segments): a provider's, a connection's (client certificates), a secret
/// store's (beside `azure_key_vault`, or inside `vault`), a token store's
/// (the same two places) and a provider's signing key's (beside
/// `azure_key_vault_key`, or inside `vault_transit`).
fn clusters_named(config: &Value) -> Vec<(Vec<String>, String)> {
    let mut out = Vec::new();
    for section in ["providers", "connections", "secrets", "token_stores"] {
        let Some(entries) = config.get(section).and_then(Value::as_object) else {
            continue;
        };
        for (name, e) in entries {
            let key = e.get("signing_key");
            let places = [
                (e.get("cluster"), vec![section, name, "cluster"]),
                (
                    e.get("vault").and_then(|v| v.get("cluster")),
                    vec![section, name, "vault", "cluster"],
                ),
                // A private_key_jwt provider's key service (v1.2).
                (
                    key.and_then(|k| k.get("cluster")),
                    vec![section, name, "signing_key", "cluster"],
                ),
                (
                    key.and_then(|k| k.get("vault_transit"))
                        .and_then(|v| v.get("cluster")),
                    vec![section, name, "signing_key", "vault_transit", "cluster"],
                ),
            ];
            for (value, path) in places {
                if let Some(cluster) = value.and_then(Value::as_str) {
                    let path = path.into_iter().map(str::to_string).collect();
                    out.push((path, cluster.to_string()));
                }
            }
        }
    }
    out
}

fn list(names: &BTreeSet<String>) -> String {
    let v: Vec<String> = names.iter().take(8).map(|n| format!("{n:?}")).collect();
    let more = names.len().saturating_sub(8);
    if more > 0 {
        format!("{} and {more} more", v.join(", "))
    } else {
        v.join(", ")
    }
}

/// What a Kubernetes or Envoy document defines, into `d`.
fn collect_defines(doc: &Value, d: &mut Defines) {
    collect_proxy_env(doc, d);
    let spec = doc.get("spec");
    let strs = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let arr = |v: Option<&Value>| v.and_then(Value::as_array).cloned().unwrap_or_default();
    match doc.get("kind").and_then(Value::as_str) {
        Some("VirtualService") => {
            for r in arr(spec.and_then(|s| s.get("http"))) {
                if let Some(n) = r.get("name").and_then(Value::as_str) {
                    d.route(n);
                }
            }
        }
        Some("HTTPRoute") => {
            let meta = doc.get("metadata");
            let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
            let ns = meta
                .and_then(|m| m.get("namespace"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            for (i, r) in arr(spec.and_then(|s| s.get("rules"))).iter().enumerate() {
                if let Some(n) = r.get("name").and_then(Value::as_str) {
                    d.route(n);
                }
                // Envoy Gateway's generated names: httproute/<ns>/<name>/rule/<n>/match/…
                if let Some(name) = name {
                    d.route_prefixes
                        .insert(format!("httproute/{ns}/{name}/rule/{i}/"));
                    d.route(&format!("httproute/{ns}/{name}/rule/{i}"));
                }
            }
        }
        Some("ServiceEntry") => {
            d.service_entries = true;
            let hosts = strs(spec.and_then(|s| s.get("hosts")));
            for p in arr(spec.and_then(|s| s.get("ports"))) {
                if let Some(n) = p.get("number").and_then(Value::as_u64) {
                    for h in &hosts {
                        istio_clusters(d, n, h);
                    }
                }
            }
        }
        Some("Service") => {
            let meta = doc.get("metadata");
            let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
            let ns = meta
                .and_then(|m| m.get("namespace"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if let Some(name) = name {
                d.services = true;
                for p in arr(spec.and_then(|s| s.get("ports"))) {
                    if let Some(n) = p.get("port").and_then(Value::as_u64) {
                        istio_clusters(d, n, &format!("{name}.{ns}.svc.cluster.local"));
                    }
                }
            }
        }
        Some("EnvoyProxy") => {
            // Envoy Gateway: clusters added to the bootstrap (a YAML string).
            let boot = spec
                .and_then(|s| s.get("bootstrap"))
                .and_then(|b| b.get("value"))
                .and_then(Value::as_str);
            if let Some(docs) = boot.and_then(|b| YamlLoader::load_from_str(b).ok()) {
                for y in &docs {
                    if let Ok(v) = yaml_to_json(y) {
                        collect_envoy(&v, d);
                    }
                }
            }
        }
        Some(_) => {}
        None => collect_envoy(doc, d),
    }
}

/// The environment of proxy containers anywhere in a document: a pod template's
/// `istio-proxy` or `envoy` container, an EnvoyProxy's `envoyDeployment.container`, and
/// the same inside a ConfigMap's YAML values (Istio's Gateway API deployment options).
fn collect_proxy_env(v: &Value, d: &mut Defines) {
    let env_names = |c: &Value, d: &mut Defines| {
        for e in c.get("env").and_then(Value::as_array).into_iter().flatten() {
            if let Some(n) = e.get("name").and_then(Value::as_str) {
                d.env(n);
            }
        }
    };
    match v {
        Value::Object(map) => {
            for c in map
                .get("containers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if matches!(
                    c.get("name").and_then(Value::as_str),
                    Some("istio-proxy" | "envoy")
                ) {
                    env_names(c, d);
                }
            }
            if let Some(c) = map.get("envoyDeployment").and_then(|e| e.get("container")) {
                env_names(c, d);
            }
            if v.get("kind").and_then(Value::as_str) == Some("ConfigMap") {
                for text in map
                    .get("data")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flat_map(|m| m.values())
                    .filter_map(Value::as_str)
                {
                    for y in YamlLoader::load_from_str(text).unwrap_or_default() {
                        if let Ok(inner) = yaml_to_json(&y) {
                            collect_proxy_env(&inner, d);
                        }
                    }
                }
            }
            for child in map.values() {
                collect_proxy_env(child, d);
            }
        }
        Value::Array(items) => {
            for child in items {
                collect_proxy_env(child, d);
            }
        }
        _ => {}
    }
}

/// The clusters Istio builds for a host and port: a sidecar's or gateway's outbound one,
/// and a waypoint's `inbound-vip` ones.
fn istio_clusters(d: &mut Defines, port: u64, host: &str) {
    d.cluster(&format!("outbound|{port}||{host}"));
    for proto in ["http", "tcp"] {
        d.cluster(&format!("inbound-vip|{port}|{proto}|{host}"));
    }
}

/// Envoy routes (`virtual_hosts[].routes[].name`) and clusters (static, or CDS resources).
fn collect_envoy(v: &Value, d: &mut Defines) {
    match v {
        Value::Object(map) => {
            if map.get("@type").and_then(Value::as_str) == Some(CLUSTER_TYPE) {
                if let Some(n) = map.get("name").and_then(Value::as_str) {
                    d.envoy_cluster(n, v);
                }
            }
            if map.get("cds_config").is_some() {
                d.dynamic_clusters = true;
            }
            if let Some(cs) = map
                .get("static_resources")
                .and_then(|s| s.get("clusters"))
                .and_then(Value::as_array)
            {
                for c in cs {
                    if let Some(n) = c.get("name").and_then(Value::as_str) {
                        d.envoy_cluster(n, c);
                    }
                }
            }
            if let Some(vhs) = map.get("virtual_hosts").and_then(Value::as_array) {
                for vh in vhs {
                    for r in vh
                        .get("routes")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        if let Some(n) = r.get("name").and_then(Value::as_str) {
                            d.route(n);
                        }
                    }
                }
            }
            for child in map.values() {
                collect_envoy(child, d);
            }
        }
        Value::Array(items) => {
            for child in items {
                collect_envoy(child, d);
            }
        }
        _ => {}
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

/// Where a configuration sits in its file: the positions of its document's nodes, the
/// JSON pointer of the configuration in that document, and whether the configuration is
/// that node's own structure (so that an error's field has a position of its own) rather
/// than a JSON string.
#[derive(Debug, Clone, Copy)]
struct At<'a> {
    map: Option<&'a PosMap>,
    base: &'a str,
    structured: bool,
}

impl At<'_> {
    const NOWHERE: At<'static> = At {
        map: None,
        base: "",
        structured: false,
    };

    fn pos(&self) -> Option<Pos> {
        self.map.and_then(|m| m.get(self.base)).copied()
    }

    /// The position of the field an error names (`routes[0].inject[0]: …`), or of the
    /// nearest enclosing node that has one, or of the configuration.
    fn error_pos(&self, error: &str) -> Option<Pos> {
        let (Some(map), true) = (self.map, self.structured) else {
            return self.pos();
        };
        let Some(mut segs) = error_path(error) else {
            return self.pos();
        };
        while !segs.is_empty() {
            let p = format!("{}/{}", self.base, segs.join("/"));
            if let Some(pos) = map.get(&p) {
                return Some(*pos);
            }
            segs.pop();
        }
        self.pos()
    }
}

/// The JSON pointer segments of the field an error message starts with:
/// `routes[0].match.route_name: …` → routes, 0, match, route_name.
fn error_path(error: &str) -> Option<Vec<String>> {
    let (path, _) = error.split_once(": ")?;
    // `#`: a signing key's `x5t#S256` (v1.2).
    let ok = |c: char| c.is_ascii_alphanumeric() || "_-.[]#".contains(c);
    if path.is_empty() || !path.chars().all(ok) {
        return None;
    }
    let mut segs = Vec::new();
    for part in path.split('.') {
        let mut pieces = part.split('[');
        let name = pieces.next().unwrap_or_default();
        if !name.is_empty() {
            segs.push(pointer_escape(name));
        }
        for idx in pieces {
            segs.push(idx.trim_end_matches(']').to_string());
        }
    }
    Some(segs)
}

/// Checks one configuration document with the filter's own parser.
fn check_config(place: String, text: &[u8], env: &VmEnv, opts: Options, at: At) -> Checked {
    let placeholders = RefCell::new(Vec::<String>::new());
    let unset = RefCell::new(Vec::<String>::new());
    let host_vars = RefCell::new(Vec::<String>::new());
    let lookup = |name: &str| -> Option<String> {
        let declared = match &env.declared {
            None => Some(Declared::Host),
            Some(map) => map.get(name).cloned(),
        };
        if env.declared.is_some() && matches!(declared, Some(Declared::Host)) {
            host_vars.borrow_mut().push(name.to_string());
        }
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
    let mut host_vars = host_vars.into_inner();
    host_vars.sort();
    host_vars.dedup();
    let field_pos: PosMap = match (at.map, at.structured) {
        (Some(map), true) => {
            let prefix = format!("{}/", at.base);
            map.range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .filter_map(|(k, v)| Some((k.strip_prefix(at.base)?.to_string(), *v)))
                .collect()
        }
        _ => PosMap::new(),
    };
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
            pos: at.pos(),
            config: serde_json::from_slice(text).ok(),
            outcome: Ok(format!(
                "{} routes, {} connections, {} providers",
                config.routes.len(),
                config.connections.len(),
                config.providers.len()
            )),
            warnings: config.warnings.clone(),
            warning_pos: BTreeMap::new(),
            field_pos,
            host_vars,
            notes,
        },
        Err(e) => Checked {
            place,
            pos: at.error_pos(&e.to_string()),
            config: None,
            outcome: Err(e.to_string()),
            warnings: Vec::new(),
            warning_pos: BTreeMap::new(),
            field_pos,
            host_vars,
            notes,
        },
    }
}

// --------------------------------------------------------------------------- files

const NOTHING: &str = "nothing to check: no latchkey configuration (a latchkey WasmPlugin, \
                       TrafficExtension or EnvoyExtensionPolicy, an Envoy wasm filter \
                       running latchkey, or a latchkey configuration)";

fn check_bytes(bytes: &[u8], opts: Options) -> Report {
    let text = std::str::from_utf8(bytes).ok();
    // Positions of every node (JSON is read as YAML for them); best effort.
    let positions = text.map(positions).unwrap_or_default();
    let trimmed = bytes.trim_ascii_start();
    if trimmed.starts_with(b"{") || trimmed.starts_with(b"[") {
        // JSON. A bare latchkey configuration goes to the filter's parser byte for
        // byte, so even a syntax error reads as the filter would log it.
        return match serde_json::from_slice::<Value>(bytes) {
            Ok(doc) if is_envoy_or_k8s(&doc) || !looks_like_config(&doc, opts) => {
                check_documents(&[(doc, positions.into_iter().next())], opts)
            }
            _ => {
                let map = positions.first();
                let at = At {
                    map,
                    base: "",
                    structured: true,
                };
                Report {
                    checked: vec![check_config(
                        String::new(),
                        bytes,
                        &VmEnv::default(),
                        opts,
                        at,
                    )],
                    ..Report::default()
                }
            }
        };
    }
    let Some(text) = text else {
        return Report::fatal("not UTF-8 text".into());
    };
    let docs = match YamlLoader::load_from_str(text) {
        Ok(docs) => docs,
        Err(e) => return Report::fatal(format!("not YAML or JSON: {e}")),
    };
    let aligned = positions.len() == docs.len();
    let mut values = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        match yaml_to_json(d) {
            Ok(Value::Null) => {}
            Ok(v) => values.push((v, positions.get(i).filter(|_| aligned).cloned())),
            Err(e) => return Report::fatal(format!("YAML document {}: {e}", i + 1)),
        }
    }
    if let [(only, map)] = values.as_slice() {
        if !is_envoy_or_k8s(only) && looks_like_config(only, opts) {
            // A latchkey configuration written in YAML (a pluginConfig on its own).
            let text = only.to_string();
            let at = At {
                map: map.as_ref(),
                base: "",
                structured: true,
            };
            return Report {
                checked: vec![check_config(
                    String::new(),
                    text.as_bytes(),
                    &VmEnv::default(),
                    opts,
                    at,
                )],
                ..Report::default()
            };
        }
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

fn check_documents(docs: &[(Value, Option<PosMap>)], opts: Options) -> Report {
    let mut report = Report::default();
    let many = docs.len() > 1;
    for (i, (doc, map)) in docs.iter().enumerate() {
        let doc_place = if many {
            format!("document {}: ", i + 1)
        } else {
            String::new()
        };
        let map = map.as_ref();
        collect_defines(doc, &mut report.defines);
        match doc.get("kind").and_then(Value::as_str) {
            Some("WasmPlugin") => {
                report
                    .checked
                    .extend(check_wasm_plugin(doc, &doc_place, opts, map, false));
                continue;
            }
            Some("TrafficExtension") => {
                report
                    .checked
                    .extend(check_wasm_plugin(doc, &doc_place, opts, map, true));
                continue;
            }
            Some("EnvoyExtensionPolicy") => {
                report
                    .checked
                    .extend(check_extension_policy(doc, &doc_place, opts, map));
                continue;
            }
            _ => {}
        }
        let mut found = Vec::new();
        find_wasm_filters(doc, String::new(), &mut found);
        for (pointer, filter) in found {
            if let Some(c) = check_envoy_wasm(filter, &doc_place, opts, map, &pointer) {
                report.checked.push(c);
            }
        }
    }
    if report.checked.is_empty() {
        report.file_notes.push(NOTHING.into());
    }
    report
}

fn mentions_latchkey(v: Option<&Value>) -> bool {
    v.and_then(Value::as_str)
        .is_some_and(|s| s.to_ascii_lowercase().contains("latchkey"))
}

fn resource_name(doc: &Value) -> (String, Option<String>) {
    let meta = doc.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .map(str::to_string);
    (name, ns)
}

/// A WasmPlugin, or (`traffic_extension`) an Istio 1.30 TrafficExtension, whose module
/// fields (url, pluginName, failStrategy, vmConfig, pluginConfig) sit under `spec.wasm`.
fn check_wasm_plugin(
    doc: &Value,
    doc_place: &str,
    opts: Options,
    map: Option<&PosMap>,
    traffic_extension: bool,
) -> Option<Checked> {
    let spec = doc.get("spec");
    let module = if traffic_extension {
        spec.and_then(|s| s.get("wasm"))
    } else {
        spec
    };
    let get = |k: &str| module.and_then(|s| s.get(k));
    let (name, ns) = resource_name(doc);
    let is_latchkey = get("pluginName").and_then(Value::as_str) == Some("latchkey")
        || mentions_latchkey(get("url"))
        || name.to_ascii_lowercase().contains("latchkey");
    if !is_latchkey {
        return None;
    }
    let kind = if traffic_extension {
        "TrafficExtension"
    } else {
        "WasmPlugin"
    };
    let prefix = if traffic_extension {
        "spec.wasm"
    } else {
        "spec"
    };
    let place = match ns {
        Some(ns) => format!("{doc_place}{kind} {ns}/{name}"),
        None => format!("{doc_place}{kind} {name}"),
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
    match spec.and_then(|s| s.get("phase")).and_then(Value::as_str) {
        Some("AUTHZ") => {}
        other => extra_warnings.push(format!(
            "spec.phase is {}: use AUTHZ so that Istio's RequestAuthentication has \
             verified the caller (claims in metadata \"payload\") before latchkey runs",
            other.map_or("not set".to_string(), |p| format!("{p:?}"))
        )),
    }
    if get("failStrategy").and_then(Value::as_str) == Some("FAIL_OPEN") {
        extra_warnings.push(format!(
            "{prefix}.failStrategy is FAIL_OPEN: requests would pass without their \
             credentials when the module can't run; a credential broker should FAIL_CLOSE"
        ));
    }
    let base = if traffic_extension {
        "/spec/wasm/pluginConfig"
    } else {
        "/spec/pluginConfig"
    };
    let (text, at) = match get("pluginConfig") {
        None | Some(Value::Null) => (
            "{}".to_string(),
            At {
                map,
                base: "",
                structured: false,
            },
        ),
        Some(v) => (
            v.to_string(),
            At {
                map,
                base,
                structured: true,
            },
        ),
    };
    let mut checked = check_config(place, text.as_bytes(), &env, opts, at);
    checked.warnings.extend(extra_warnings);
    Some(checked)
}

/// Envoy Gateway's EnvoyExtensionPolicy: each latchkey entry of `spec.wasm`.
fn check_extension_policy(
    doc: &Value,
    doc_place: &str,
    opts: Options,
    map: Option<&PosMap>,
) -> Vec<Checked> {
    let (name, ns) = resource_name(doc);
    let head = match ns {
        Some(ns) => format!("{doc_place}EnvoyExtensionPolicy {ns}/{name}"),
        None => format!("{doc_place}EnvoyExtensionPolicy {name}"),
    };
    let entries = doc
        .get("spec")
        .and_then(|s| s.get("wasm"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for (i, w) in entries.iter().enumerate() {
        let code = w.get("code");
        let url = code
            .and_then(|c| c.get("image").or_else(|| c.get("http")))
            .and_then(|c| c.get("url"));
        let is_latchkey = mentions_latchkey(w.get("name"))
            || mentions_latchkey(w.get("rootID"))
            || mentions_latchkey(url)
            || (entries.len() == 1 && name.to_ascii_lowercase().contains("latchkey"));
        if !is_latchkey {
            continue;
        }
        let entry = w.get("name").and_then(Value::as_str).unwrap_or("");
        let place = format!("{head} wasm[{i}] {entry:?}");
        let mut env = VmEnv {
            declared: Some(BTreeMap::new()),
        };
        for k in w
            .get("env")
            .and_then(|e| e.get("hostKeys"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            env.declare(k, Declared::Host);
        }
        let base = format!("/spec/wasm/{i}/config");
        let (text, at) = match w.get("config") {
            None | Some(Value::Null) => ("{}".to_string(), At::NOWHERE),
            Some(v) => (
                v.to_string(),
                At {
                    map,
                    base: &base,
                    structured: true,
                },
            ),
        };
        let at = if at.map.is_none() {
            At { map, ..at }
        } else {
            at
        };
        let mut checked = check_config(place, text.as_bytes(), &env, opts, at);
        if w.get("failOpen").and_then(Value::as_bool) == Some(true) {
            checked.warnings.push(format!(
                "spec.wasm[{i}].failOpen is true: requests would pass without their \
                 credentials when the module can't run; a credential broker should fail closed"
            ));
        }
        out.push(checked);
    }
    out
}

/// Every object whose `@type` is the wasm HTTP filter, anywhere in the document, with
/// its JSON pointer.
fn find_wasm_filters<'a>(
    v: &'a Value,
    pointer: String,
    out: &mut Vec<(String, &'a Map<String, Value>)>,
) {
    match v {
        Value::Object(map) => {
            if map.get("@type").and_then(Value::as_str) == Some(WASM_TYPE) {
                out.push((pointer, map));
                return;
            }
            for (k, child) in map {
                find_wasm_filters(child, format!("{pointer}/{}", pointer_escape(k)), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                find_wasm_filters(child, format!("{pointer}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn check_envoy_wasm(
    filter: &Map<String, Value>,
    doc_place: &str,
    opts: Options,
    map: Option<&PosMap>,
    pointer: &str,
) -> Option<Checked> {
    let config = filter.get("config")?;
    let vm = config.get("vm_config");
    let code_file = vm
        .and_then(|v| v.get("code"))
        .and_then(|c| c.get("local"))
        .and_then(|l| l.get("filename"));
    let code_url = vm
        .and_then(|v| v.get("code"))
        .and_then(|c| c.get("remote"))
        .and_then(|r| r.get("http_uri"))
        .and_then(|h| h.get("uri"));
    let name = config.get("name").and_then(Value::as_str).unwrap_or("");
    let is_latchkey = mentions_latchkey(config.get("name"))
        || mentions_latchkey(config.get("root_id"))
        || mentions_latchkey(code_file)
        || mentions_latchkey(code_url);
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
    // `configuration` is an Any: a StringValue holding the JSON (what latchkey reads),
    // or a Struct (Envoy hands the module its JSON form).
    let base_cfg = format!("{pointer}/config/configuration");
    let base_value = format!("{base_cfg}/value");
    let string_at = |base| At {
        map,
        base,
        structured: false,
    };
    let (text, at) = match config.get("configuration") {
        None | Some(Value::Null) => (String::new(), string_at(&base_cfg)),
        Some(Value::String(s)) => (s.clone(), string_at(&base_cfg)),
        Some(any) => match any.get("value") {
            Some(Value::String(s)) => (s.clone(), string_at(&base_value)),
            Some(v @ Value::Object(_)) => (
                v.to_string(),
                At {
                    map,
                    base: &base_value,
                    structured: true,
                },
            ),
            _ => {
                return Some(Checked {
                    place,
                    pos: string_at(&base_cfg).pos(),
                    outcome: Err(
                        "configuration: expected a google.protobuf.StringValue holding \
                         the JSON configuration, or a google.protobuf.Struct"
                            .into(),
                    ),
                    warnings: Vec::new(),
                    warning_pos: BTreeMap::new(),
                    field_pos: PosMap::new(),
                    host_vars: Vec::new(),
                    notes: Vec::new(),
                    config: None,
                })
            }
        },
    };
    Some(check_config(place, text.as_bytes(), &env, opts, at))
}

// --------------------------------------------------------------------------- positions

/// The position of every node of one YAML document, by JSON pointer ("" the root).
type PosMap = BTreeMap<String, Pos>;

fn pointer_escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The positions of the nodes of each document of a YAML (or JSON) text; empty when the
/// text does not parse.
fn positions(text: &str) -> Vec<PosMap> {
    let mut rec = PosRecorder::default();
    match Parser::new_from_str(text).load(&mut rec, true) {
        Ok(()) => rec.docs,
        Err(_) => Vec::new(),
    }
}

#[derive(Debug)]
enum Frame {
    /// A mapping, and the key (with its position) whose value comes next.
    Map {
        path: String,
        key: Option<(String, Marker)>,
    },
    Seq {
        path: String,
        index: usize,
    },
}

#[derive(Debug, Default)]
struct PosRecorder {
    docs: Vec<PosMap>,
    stack: Vec<Frame>,
}

impl PosRecorder {
    /// The pointer of the node that comes next, and where to point for it: a mapping's
    /// value at its key (`pluginConfig:`), anything else at its own start.
    fn next(&self, mark: Marker) -> (String, Marker) {
        match self.stack.last() {
            None => (String::new(), mark),
            Some(Frame::Map { path, key }) => match key {
                Some((k, at)) => (format!("{path}/{}", pointer_escape(k)), *at),
                None => (format!("{path}/"), mark),
            },
            Some(Frame::Seq { path, index }) => (format!("{path}/{index}"), mark),
        }
    }

    /// A node is complete: the parent mapping waits for a key, the sequence moves on.
    fn advance(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key, .. }) => *key = None,
            Some(Frame::Seq { index, .. }) => *index += 1,
            None => {}
        }
    }

    fn record(&mut self, path: &str, mark: Marker) {
        if let Some(doc) = self.docs.last_mut() {
            // yaml-rust2's lines count from 1, its columns from 0.
            doc.entry(path.to_string()).or_insert(Pos {
                line: mark.line(),
                col: mark.col() + 1,
            });
        }
    }

    /// Takes a scalar (or alias) as the next mapping key, if one is awaited.
    fn take_key(&mut self, s: String, mark: Marker) -> bool {
        if let Some(Frame::Map {
            key: key @ None, ..
        }) = self.stack.last_mut()
        {
            *key = Some((s, mark));
            return true;
        }
        false
    }
}

impl MarkedEventReceiver for PosRecorder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::DocumentStart => {
                self.docs.push(PosMap::new());
                self.stack.clear();
            }
            Event::Scalar(s, ..) => {
                if self.take_key(s, mark) {
                    return;
                }
                let (p, at) = self.next(mark);
                self.record(&p, at);
                self.advance();
            }
            Event::Alias(_) => {
                if self.take_key(String::new(), mark) {
                    return;
                }
                let (p, at) = self.next(mark);
                self.record(&p, at);
                self.advance();
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let (path, at) = self.next(mark);
                self.record(&path, at);
                self.stack.push(if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map { path, key: None }
                } else {
                    Frame::Seq { path, index: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.advance();
            }
            _ => {}
        }
    }
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
        strict: false,
        format: Format::Text,
        found: false,
    };

    fn check(text: &str) -> Report {
        check_bytes(text.as_bytes(), OPTS)
    }

    #[test]
    fn bare_json_config_is_checked_with_the_filters_messages() {
        let r =
            check(r#"{"connections": {"c": {"provider": "nope", "access": {"public": true}}}}"#);
        assert_eq!(r.code(false), 1);
        assert_eq!(
            r.checked[0].outcome,
            Err("connections.c.provider: unknown provider \"nope\"".to_string())
        );
    }

    #[test]
    fn json_syntax_errors_are_reported_like_the_filter() {
        let r = check("{\"routes\": [");
        assert_eq!(r.code(false), 1);
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
        assert_eq!(r.code(false), 0, "{r:?}");
        assert_eq!(r.checked[0].notes.len(), 1);
        assert!(r.checked[0].notes[0].contains("PARTNER_API_KEY taken as set"));
        // Long enough for any secret with a minimum length (a consent state key).
        let r = check(
            r#"{"secrets": {"k": {"env": "STATE_KEY"}},
                "consent": {"path": "/c", "redirect_uri": "https://gw.example.com/cb", "state_key": "k"}}"#,
        );
        assert_eq!(r.code(false), 0, "{r:?}");
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
        assert_eq!(r.code(false), 1);
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
        assert_eq!(r.code(false), 0, "{r:?}");
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
        assert_eq!(r.code(false), 1);
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
        assert_eq!(r.code(false), 0, "{r:?}");
        assert_eq!(
            r.checked[0].outcome,
            Ok("1 routes, 0 connections, 0 providers".into())
        );
    }

    #[test]
    fn files_without_latchkey_are_a_note_not_a_failure() {
        let r = check("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n");
        assert_eq!(r.code(false), 0);
        assert_eq!(r.file_notes, vec![NOTHING.to_string()]);
        assert_eq!(r.diags("f")[0].severity, Severity::Note);
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

    fn args(a: &[&str]) -> Result<(Options, Vec<String>), String> {
        parse_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_are_parsed() {
        let (o, p) = args(&["--strict", "--format", "json", "a", "-"]).unwrap();
        assert!(o.strict && o.format == Format::Json);
        assert_eq!(p, vec!["a", "-"]);
        let (o, _) = args(&["--format=github", "-q", "a"]).unwrap();
        assert!(o.quiet && o.format == Format::Github);
        assert!(args(&["--format", "xml", "a"]).is_err());
        assert!(args(&["--format"]).is_err());
        assert!(args(&["--strict"]).is_err());
        assert!(args(&["--frob", "a"]).is_err());
    }

    #[test]
    fn every_configuration_of_a_file_is_reported_with_its_position() {
        let yaml = "\
kind: WasmPlugin
metadata: {name: latchkey, namespace: a}
spec:
  phase: AUTHZ
  pluginConfig:
    unmatched: sometimes
---
kind: WasmPlugin
metadata: {name: latchkey, namespace: b}
spec:
  phase: AUTHZ
  pluginConfig:
    routes:
      - name: r
        match: {path_prefix: /r}
        inject:
          - {connections: [nope], header: x}
";
        let r = check(yaml);
        assert_eq!(r.code(false), 1);
        assert_eq!(r.checked.len(), 2);
        assert!(r.checked.iter().all(|c| c.outcome.is_err()));
        // The field the error names: `unmatched:`, then `connections: [nope]`'s item.
        assert_eq!(r.checked[0].pos, Some(Pos { line: 6, col: 5 }));
        assert_eq!(r.checked[1].pos, Some(Pos { line: 17, col: 28 }));
    }

    #[test]
    fn positions_point_at_keys_and_items_in_yaml_and_json() {
        let m = &positions("a:\n  b: [x, {c: 1}]\n")[0];
        assert_eq!(m["/a"], Pos { line: 1, col: 1 });
        assert_eq!(m["/a/b"], Pos { line: 2, col: 3 });
        assert_eq!(m["/a/b/1"], Pos { line: 2, col: 10 });
        assert_eq!(m["/a/b/1/c"], Pos { line: 2, col: 11 });
        let m = &positions("{\"k/x\": {\"y\": [1, 2]}}")[0];
        assert_eq!(m["/k~1x/y/1"], Pos { line: 1, col: 19 });
        assert_eq!(positions("a: [").len(), 0);
    }

    #[test]
    fn error_paths_become_pointer_segments() {
        assert_eq!(
            error_path("routes[0].inject[1].connections[0]: unknown connection \"x\""),
            Some(
                ["routes", "0", "inject", "1", "connections", "0"]
                    .map(String::from)
                    .to_vec()
            )
        );
        assert_eq!(
            error_path("providers.p.signing_key.x5t#S256: invalid value \"x\": …"),
            Some(
                ["providers", "p", "signing_key", "x5t#S256"]
                    .map(String::from)
                    .to_vec()
            )
        );
        assert_eq!(error_path("configuration is not valid JSON: x"), None);
        assert_eq!(error_path("no colon"), None);
    }

    #[test]
    fn envoy_struct_configuration_is_checked() {
        let yaml = r#"
typed_config:
  "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
  config:
    name: latchkey
    configuration:
      "@type": type.googleapis.com/google.protobuf.Struct
      value:
        unmatched: deny
        routes:
          - {name: a, match: {route_name: nope}}
"#;
        let r = check(yaml);
        assert_eq!(r.code(false), 0, "{r:?}");
        assert_eq!(r.checked[0].pos, Some(Pos { line: 8, col: 7 }));
        assert_eq!(r.checked[0].config.as_ref().unwrap()["unmatched"], "deny");
        let bad = yaml.replace("unmatched: deny", "unmatched: sometimes");
        let r = check(&bad);
        assert_eq!(r.code(false), 1);
        assert_eq!(r.checked[0].pos, Some(Pos { line: 9, col: 9 }));
    }

    #[test]
    fn traffic_extension_reads_spec_wasm() {
        let yaml = r#"
apiVersion: extensions.istio.io/v1alpha1
kind: TrafficExtension
metadata: {name: latchkey, namespace: gw}
spec:
  phase: AUTHZ
  wasm:
    url: oci://registry.example.com/latchkey:1
    failStrategy: FAIL_OPEN
    vmConfig:
      env: [{name: K, valueFrom: HOST}]
    pluginConfig:
      secrets: {k: {env: K}, m: {env: MISSING}}
"#;
        let r = check(yaml);
        assert_eq!(r.checked[0].place, "TrafficExtension gw/latchkey");
        assert_eq!(
            r.checked[0].outcome,
            Err("secrets.m.env: environment variable \"MISSING\" is not set".to_string())
        );
        let ok = check(&yaml.replace(", m: {env: MISSING}", ""));
        assert_eq!(ok.code(false), 0, "{ok:?}");
        assert_eq!(ok.checked[0].pos, Some(Pos { line: 12, col: 5 }));
        assert!(ok.checked[0].warnings[0].starts_with("spec.wasm.failStrategy is FAIL_OPEN"));
        assert_eq!(ok.code(true), 1, "a warning fails with --strict");
    }

    #[test]
    fn envoy_extension_policy_reads_each_latchkey_wasm_entry() {
        let yaml = r#"
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {name: ext, namespace: gw}
spec:
  wasm:
    - name: other
      code: {type: Image, image: {url: oci://r/other:1}}
      config: {whatever: 1}
    - name: lk
      rootID: latchkey
      failOpen: true
      env: {hostKeys: [K]}
      config:
        secrets: {k: {env: K}, m: {env: M}}
"#;
        let r = check(yaml);
        assert_eq!(r.checked.len(), 1);
        assert_eq!(
            r.checked[0].place,
            "EnvoyExtensionPolicy gw/ext wasm[1] \"lk\""
        );
        assert_eq!(
            r.checked[0].outcome,
            Err("secrets.m.env: environment variable \"M\" is not set".to_string())
        );
        let ok = check(&yaml.replace(", m: {env: M}", ""));
        assert_eq!(ok.code(false), 0, "{ok:?}");
        assert!(ok.checked[0].warnings[0].starts_with("spec.wasm[1].failOpen is true"));
        assert!(ok.checked[0].notes[0].contains("K taken as set"));
    }

    #[test]
    fn documents_found_in_a_directory_need_a_latchkey_field() {
        let found = Options {
            found: true,
            ..OPTS
        };
        let r = check_bytes(b"groups: []\n", found);
        assert_eq!((r.code(false), r.checked.len()), (0, 0));
        assert_eq!(r.file_notes.len(), 1);
        let r = check_bytes(b"{\"keys\": []}", found);
        assert_eq!((r.code(false), r.checked.len()), (0, 0));
        // Named on the command line, it is a configuration (with an unknown field).
        assert_eq!(check("groups: []\n").code(false), 1);
        assert_eq!(check_bytes(b"unmatched: deny\n", found).checked.len(), 1);
        // Every top-level field of the filter's (v1.2's token_stores and consent too).
        for field in TOP_LEVEL_FIELDS {
            let doc = format!("{{\"{field}\": null}}");
            assert_eq!(
                check_bytes(doc.as_bytes(), found).checked.len(),
                1,
                "{field}"
            );
        }
    }

    #[test]
    fn directories_are_expanded_to_their_yaml_and_json_files() {
        let dir = std::env::temp_dir().join(format!("latchkey-check-{}", std::process::id()));
        let sub = dir.join("sub");
        std::fs::create_dir_all(&sub).unwrap();
        for f in ["b.yaml", "a.json", "c.txt", ".hidden.yaml", "sub/d.yml"] {
            std::fs::write(dir.join(f), "{}").unwrap();
        }
        let d = dir.to_str().unwrap();
        let got = expand(d).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            got,
            vec![
                format!("{d}/a.json"),
                format!("{d}/b.yaml"),
                format!("{d}/sub/d.yml")
            ]
        );
        assert_eq!(expand("-").unwrap(), vec!["-"]);
    }

    const ROUTES: &str = "\
kind: VirtualService
metadata: {name: vs}
spec:
  http:
    - name: partner-api
---
kind: ServiceEntry
metadata: {name: se}
spec:
  hosts: [login.example.com]
  ports: [{number: 443, name: https}]
";

    fn cross(config: &str) -> Vec<String> {
        let plugin = format!(
            "kind: WasmPlugin\nmetadata: {{name: latchkey}}\nspec:\n  phase: AUTHZ\n  pluginConfig: {config}\n"
        );
        let mut reports = vec![
            ("p.yaml".to_string(), check(&plugin)),
            ("r.yaml".to_string(), check(ROUTES)),
        ];
        cross_check(&mut reports);
        assert_eq!(reports[0].1.code(false), 0, "{:?}", reports[0].1);
        let c = &reports[0].1.checked[0];
        for (i, w) in c.warnings.iter().enumerate() {
            if w.contains("among the files") {
                // `pluginConfig: {…}` is on line 5: the field, not just the configuration.
                assert!(
                    c.warning_pos[&i].line == 5 && c.warning_pos[&i].col > 17,
                    "{c:?}"
                );
            }
        }
        c.warnings.clone()
    }

    #[test]
    fn route_names_and_clusters_are_checked_across_files() {
        let providers = r#""providers": {"p": {"type": "oauth2", "token_url": "https://login.example.com/t", "client_id": "c", "client_secret": "s", "cluster": "CLUSTER"}}, "secrets": {"s": {"inline": "x"}}"#;
        let good = format!(
            r#"{{"routes": [{{"name": "a", "match": {{"route_name": "partner-api"}}}}], {}}}"#,
            providers.replace("CLUSTER", "outbound|443||login.example.com")
        );
        let w = cross(&good);
        assert!(w.iter().all(|w| !w.contains("among the files")), "{w:?}");
        let bad = format!(
            r#"{{"routes": [{{"name": "a", "match": {{"route_name": "partner"}}}}], {}}}"#,
            providers.replace("CLUSTER", "outbound|80||login.example.com")
        );
        let w: Vec<String> = cross(&bad)
            .into_iter()
            .filter(|w| w.contains("among the files"))
            .collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with("routes[0].match.route_name \"partner\" is not a route"));
        assert!(w[1].starts_with("providers.p.cluster \"outbound|80||login.example.com\""));
        assert!(w[1].contains("\"outbound|443||login.example.com\""));
    }

    #[test]
    fn token_store_and_secret_store_clusters_are_checked_across_files() {
        let good = "outbound|443||login.example.com";
        let config = r#"{"secrets": {"s": {"inline": "x"}, "k": {"inline": "0123456789abcdef0123456789abcdef"},
            "v": {"vault": {"cluster": "SECRET_VAULT", "url": "http://vault.example.com:8200", "path": "p", "field": "f", "token": "s"}}},
          "providers": {"idp": {"type": "oauth2", "cluster": "GOOD", "token_url": "https://login.example.com/t",
                                "authorization_url": "https://login.example.com/authorize", "client_id": "c", "client_secret": "s"},
                        "mi": {"type": "azure_managed_identity", "cluster": "GOOD"}},
          "token_stores": {"t": {"vault": {"cluster": "TOKEN_VAULT", "url": "http://vault.example.com:8200", "token": "s"}},
                           "kv": {"azure_key_vault": "https://kv.vault.azure.net", "cluster": "KEY_VAULT", "identity": "kv_reader"}},
          "consent": {"path": "/.latchkey/connections", "redirect_uri": "https://api.example.com/.latchkey/callback", "state_key": "k"},
          "connections": {"mine": {"provider": "idp", "grant": "authorization_code", "per_user": true, "store": "t", "access": {"authenticated": true}},
                          "team": {"provider": "idp", "grant": "authorization_code", "store": "kv", "consent": {"users": ["admin"]}, "access": {"authenticated": true}},
                          "kv_reader": {"provider": "mi", "resource": "https://vault.azure.net"}}}"#
            .replace('\n', " ")
            .replace("GOOD", good);
        let all_good = config
            .replace("SECRET_VAULT", good)
            .replace("TOKEN_VAULT", good)
            .replace("KEY_VAULT", good);
        let w = cross(&all_good);
        assert!(w.iter().all(|w| !w.contains("among the files")), "{w:?}");
        let bad = config
            .replace("SECRET_VAULT", "outbound|8200||secrets.example.com")
            .replace("TOKEN_VAULT", "outbound|8200||vault.example.com")
            .replace("KEY_VAULT", "outbound|443||kv.vault.azure.net");
        let w: Vec<String> = cross(&bad)
            .into_iter()
            .filter(|w| w.contains("among the files"))
            .collect();
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].starts_with(
            "secrets.v.vault.cluster \"outbound|8200||secrets.example.com\" is not a cluster"
        ));
        assert!(w[1].starts_with(
            "token_stores.kv.cluster \"outbound|443||kv.vault.azure.net\" is not a cluster"
        ));
        assert!(w[2].starts_with(
            "token_stores.t.vault.cluster \"outbound|8200||vault.example.com\" is not a cluster"
        ));
    }

    #[test]
    fn signing_key_clusters_are_checked_across_files() {
        let good = "outbound|443||login.example.com";
        let config = r#"{"secrets": {"t": {"inline": "hvs.x"}},
          "providers": {"transit": {"type": "oauth2", "cluster": "GOOD", "token_url": "https://login.example.com/t",
                                    "client_id": "a", "auth_method": "private_key_jwt",
                                    "signing_key": {"vault_transit": {"cluster": "TRANSIT", "url": "https://vault.example.com", "key": "gw", "token": "t"}}},
                        "kv": {"type": "oauth2", "cluster": "GOOD", "token_url": "https://login.example.com/t",
                               "client_id": "b", "auth_method": "private_key_jwt",
                               "signing_key": {"azure_key_vault_key": "https://kv.vault.azure.net/keys/gw", "cluster": "KEY_VAULT",
                                               "identity": "signer", "alg": "PS256"}},
                        "mi": {"type": "azure_managed_identity", "cluster": "GOOD"}},
          "connections": {"signer": {"provider": "mi", "resource": "https://vault.azure.net"},
                          "a": {"provider": "transit", "grant": "client_credentials", "access": {"public": true}},
                          "b": {"provider": "kv", "grant": "client_credentials", "access": {"public": true}}}}"#
            .replace('\n', " ")
            .replace("GOOD", good);
        let w = cross(&config.replace("TRANSIT", good).replace("KEY_VAULT", good));
        assert!(w.iter().all(|w| !w.contains("among the files")), "{w:?}");
        let bad = config
            .replace("TRANSIT", "outbound|8200||vault.example.com")
            .replace("KEY_VAULT", "outbound|443||kv.vault.azure.net");
        let w: Vec<String> = cross(&bad)
            .into_iter()
            .filter(|w| w.contains("among the files"))
            .collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with(
            "providers.kv.signing_key.cluster \"outbound|443||kv.vault.azure.net\" is not a cluster"
        ));
        assert!(w[1].starts_with(
            "providers.transit.signing_key.vault_transit.cluster \"outbound|8200||vault.example.com\" is not a cluster"
        ));
    }

    /// A bare configuration with a `tls_client_auth` provider on cluster `cluster`,
    /// checked with an Envoy file of `clusters` (YAML list items).
    fn tls_client_auth(cluster: &str, clusters: &str) -> Report {
        let config = format!(
            "{{\"providers\": {{\"idp\": {{\"type\": \"oauth2\", \"cluster\": \"{cluster}\",\n  \
             \"token_url\": \"https://idp.example.com/token\", \"client_id\": \"gw\",\n  \
             \"auth_method\": \"tls_client_auth\"}}}},\n \
             \"connections\": {{\"c\": {{\"provider\": \"idp\", \"grant\": \"client_credentials\", \"access\": {{\"public\": true}}}}}}}}"
        );
        let envoy = format!("static_resources:\n  clusters:\n{clusters}");
        let mut reports = vec![
            ("c.json".to_string(), check(&config)),
            ("envoy.yaml".to_string(), check(&envoy)),
        ];
        assert_eq!(reports[0].1.code(false), 0, "{:?}", reports[0].1);
        cross_check(&mut reports);
        reports.swap_remove(0).1
    }

    const CERT: &str = "  - name: idp_mtls
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        '@type': type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_certificates: [{certificate_chain: {filename: c.pem}, private_key: {filename: k.pem}}]
  - name: idp_sds
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        common_tls_context: {tls_certificate_sds_secret_configs: [{name: gw-cert}]}
  - name: idp_matches
    transport_socket_matches:
      - name: mtls
        match: {}
        transport_socket:
          name: envoy.transport_sockets.tcp_stats
          typed_config:
            transport_socket:
              name: envoy.transport_sockets.tls
              typed_config: {common_tls_context: {tls_certificates: [{}]}}
  - name: idp_tls
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        common_tls_context: {validation_context: {trusted_ca: {filename: ca.pem}}, tls_certificates: []}
  - name: idp_plain
";

    #[test]
    fn tls_client_auth_needs_a_client_certificate_on_a_cluster_the_checker_sees() {
        for ok in ["idp_mtls", "idp_sds", "idp_matches"] {
            let r = tls_client_auth(ok, CERT);
            assert_eq!(r.code(false), 0, "{ok}: {r:?}");
        }
        for bad in ["idp_tls", "idp_plain"] {
            let r = tls_client_auth(bad, CERT);
            assert_eq!(r.code(false), 1, "{bad}: {r:?}");
            let e = r.checked[0].outcome.clone().unwrap_err();
            assert!(
                e.starts_with(&format!(
                    "providers.idp.auth_method: \"tls_client_auth\" needs a client certificate, \
                     but cluster \"{bad}\" presents none"
                )),
                "{e}"
            );
            // At the auth_method field (line 3 of the configuration).
            assert_eq!(r.checked[0].pos.map(|p| p.line), Some(3), "{r:?}");
            let text = render(&r.diags("c.json"), 1, OPTS);
            assert!(text.starts_with("c.json:3:"), "{text}");
        }
        // A cluster the files given don't define: a warning, not this error.
        let r = tls_client_auth("elsewhere", CERT);
        assert_eq!(r.code(false), 0, "{r:?}");
        assert!(r.checked[0].warnings[0].contains("is not a cluster among the files"));
        // Defined twice, once with a certificate: given the benefit of the doubt.
        let r = tls_client_auth("idp_plain", &format!("{CERT}  - name: idp_plain\n    transport_socket: {{typed_config: {{common_tls_context: {{tls_certificates: [{{}}]}}}}}}\n"));
        assert_eq!(r.code(false), 0, "{r:?}");
        // Other auth methods don't need one.
        let config = r#"{"secrets": {"s": {"inline": "x"}},
            "providers": {"idp": {"type": "oauth2", "cluster": "idp_plain", "token_url": "https://idp.example.com/token",
                                  "client_id": "gw", "client_secret": "s"}}}"#;
        let mut reports = vec![
            ("c.json".to_string(), check(config)),
            (
                "envoy.yaml".to_string(),
                check(&format!("static_resources:\n  clusters:\n{CERT}")),
            ),
        ];
        cross_check(&mut reports);
        assert_eq!(reports[0].1.code(false), 0, "{:?}", reports[0].1);
    }

    #[test]
    fn host_variables_are_checked_against_the_proxy_containers_given() {
        let plugin = "kind: WasmPlugin\nmetadata: {name: latchkey}\nspec:\n  phase: AUTHZ\n  vmConfig:\n    env: [{name: A, valueFrom: HOST}, {name: B, valueFrom: HOST}]\n  pluginConfig:\n    secrets:\n      a: {env: A}\n      b: {env: B}\n";
        let deployment = "\
kind: ConfigMap
data:
  deployment: |
    spec:
      template:
        spec:
          containers:
            - name: istio-proxy
              env: [{name: A, value: x}]
            - name: app
              env: [{name: B, value: y}]
";
        let mut reports = vec![
            ("p.yaml".to_string(), check(plugin)),
            ("d.yaml".to_string(), check(deployment)),
        ];
        cross_check(&mut reports);
        let c = &reports[0].1.checked[0];
        assert_eq!(c.host_vars, vec!["A", "B"]);
        assert_eq!(c.warnings.len(), 1, "{c:?}");
        assert!(c.warnings[0].starts_with("environment variable \"B\" comes from the proxy's"));
        assert_eq!(c.warning_pos[&0], Pos { line: 10, col: 11 });
        // Without the deployment, nothing to compare with.
        let mut alone = vec![("p.yaml".to_string(), check(plugin))];
        cross_check(&mut alone);
        assert!(alone[0].1.checked[0].warnings.is_empty());
    }

    #[test]
    fn a_cluster_is_compared_with_sources_of_its_kind_only() {
        let mut d = Defines::default();
        collect_defines(
            &serde_json::json!({"kind": "Service", "metadata": {"name": "gw", "namespace": "ns"},
                                "spec": {"ports": [{"port": 80}]}}),
            &mut d,
        );
        assert!(d.knows_kind_of("outbound|80||x.ns.svc.cluster.local"));
        assert!(!d.knows_kind_of("outbound|443||login.example.com"));
        assert!(!d.knows_kind_of("idp"));
        collect_envoy(
            &serde_json::json!({"static_resources": {"clusters": [{"name": "idp"}]}}),
            &mut d,
        );
        assert!(d.knows_kind_of("idp"));
        d.dynamic_clusters = true;
        assert!(!d.knows_kind_of("idp"));
    }

    #[test]
    fn envoy_gateway_generated_route_names_are_known() {
        let mut d = Defines::default();
        collect_defines(
            &serde_json::json!({"kind": "HTTPRoute", "metadata": {"name": "api", "namespace": "gw"},
                                "spec": {"rules": [{"name": "partner"}, {}]}}),
            &mut d,
        );
        let uses = |name: &str| {
            cross_warnings(
                &serde_json::json!({"routes": [{"name": "a", "match": {"route_name": name}}]}),
                &d,
            )
        };
        assert!(uses("partner").is_empty());
        assert!(uses("httproute/gw/api/rule/1/match/0/api_example_com").is_empty());
        assert_eq!(uses("httproute/gw/api/rule/2/match/0/x").len(), 1);
        assert_eq!(uses("orders").len(), 1);
        let prefix = serde_json::json!({"routes": [{"name": "a", "match": {"route_name_prefix": "httproute/gw/api/"}}]});
        assert!(cross_warnings(&prefix, &d).is_empty());
    }

    #[test]
    fn no_route_sources_given_no_route_warning() {
        let mut reports = vec![(
            "p.json".to_string(),
            check(r#"{"routes": [{"name": "a", "match": {"route_name": "x"}}]}"#),
        )];
        cross_check(&mut reports);
        assert!(reports[0].1.checked[0].warnings.is_empty());
    }

    fn diag(sev: Severity, pos: Option<Pos>) -> Diag {
        Diag {
            file: "d/f.yaml".into(),
            pos,
            place: "WasmPlugin a/b".into(),
            severity: sev,
            message: "50% bad,\nreally".into(),
        }
    }

    #[test]
    fn text_github_and_json_renderings() {
        let p = Some(Pos { line: 3, col: 7 });
        let ds = vec![
            diag(Severity::Error, p),
            diag(Severity::Warning, None),
            diag(Severity::Ok, p),
        ];
        let text = render(&ds, 1, OPTS);
        assert!(text.starts_with("d/f.yaml:3:7: WasmPlugin a/b: error: 50% bad,\nreally\n"));
        assert!(text.contains("d/f.yaml: WasmPlugin a/b: warning: "));
        assert!(text.ends_with("d/f.yaml:3:7: WasmPlugin a/b: ok (50% bad,\nreally)\n"));
        let gh = render(
            &ds,
            1,
            Options {
                format: Format::Github,
                ..OPTS
            },
        );
        let lines: Vec<&str> = gh.lines().collect();
        assert_eq!(
            lines[0],
            "::error file=d/f.yaml,line=3,col=7,title=latchkey%3A WasmPlugin a/b::50%25 bad,%0Areally"
        );
        assert!(lines[1].starts_with("::warning file=d/f.yaml,title="));
        let quiet = render(
            &ds,
            1,
            Options {
                quiet: true,
                ..OPTS
            },
        );
        assert_eq!(quiet.matches("d/f.yaml").count(), 1);
        let strict_quiet = render(
            &ds,
            1,
            Options {
                quiet: true,
                strict: true,
                ..OPTS
            },
        );
        assert_eq!(strict_quiet.matches("d/f.yaml").count(), 2);
        let j: Value = serde_json::from_str(&render(
            &ds,
            1,
            Options {
                format: Format::Json,
                ..OPTS
            },
        ))
        .unwrap();
        assert_eq!(
            (j["errors"].as_u64(), j["warnings"].as_u64()),
            (Some(1), Some(1))
        );
        assert_eq!(j["diagnostics"][0]["line"], 3);
        assert_eq!(j["diagnostics"][0]["column"], 7);
        assert_eq!(j["diagnostics"][0]["severity"], "error");
        assert!(j["diagnostics"][1].get("line").is_none());
    }

    #[test]
    fn schema_is_json() {
        let v: Value = serde_json::from_str(SCHEMA).unwrap();
        assert_eq!(v["$schema"], "https://json-schema.org/draft/2020-12/schema");
    }
}
