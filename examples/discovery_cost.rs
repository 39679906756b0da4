//! What a discovery answer costs, natively: the JSON tree built per request
//! ([`latchkey::discovery::document`]) against the per-configuration
//! [`latchkey::discovery::Index`], at 10 and 10,000 routes.
//!
//! `cargo run --release --example discovery_cost [ROUNDS]` (default 11 rounds; each
//! figure is the median over rounds, a round running the operation for ~50 ms).
//! Memory comes from a counting allocator: per answer, every byte allocated and the
//! peak held at once; per index, the bytes it keeps.
//!
//! The configuration: N routes, each guarded by one of 10 groups or `all`, with one
//! inject entry choosing between a group's connection and an `authenticated` one.
//! Callers: `all` (may use every route), `g3` (one route in ten) and anonymous
//! (no route: policy only).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use latchkey::claims::Identity;
use latchkey::config::Config;
use latchkey::discovery::{document, Index, Limits};
use serde_json::json;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static TOTAL: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let live = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(live, Relaxed);
    TOTAL.fetch_add(n, Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grew(l.size());
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_sub(l.size(), Relaxed);
        grew(new);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

type Error = Box<dyn std::error::Error>;

fn config(routes: usize) -> Result<Config, Error> {
    let mut connections = serde_json::Map::new();
    for g in 0..10 {
        connections.insert(
            format!("team{g}"),
            json!({ "provider": "partner", "api_key": "k", "access": { "groups": [format!("g{g}")] } }),
        );
    }
    connections.insert(
        "shared".into(),
        json!({ "provider": "partner", "api_key": "k", "access": { "authenticated": true } }),
    );
    let routes: Vec<_> = (0..routes)
        .map(|i| {
            json!({
                "name": format!("service-{i}"),
                "match": { "host": "api.example.com", "path_prefix": format!("/services/{i}/"),
                           "methods": ["GET", "POST"] },
                "access": { "groups": [format!("g{}", i % 10), "all"] },
                "inject": [ { "connections": [format!("team{}", i % 10), "shared"],
                              "header": "x-api-key" } ]
            })
        })
        .collect();
    let v = json!({
        "secrets": { "k": { "env": "K" } },
        "providers": { "partner": { "type": "api_key" } },
        "connections": connections,
        "routes": routes,
        "discovery": { "path": "/.well-known/latchkey" }
    });
    let env = |_: &str| Some("secret-value".to_string());
    Ok(Config::parse(v.to_string().as_bytes(), &env)?)
}

/// Median seconds per call of `f` over `rounds` rounds of ~50 ms each.
fn time<T>(rounds: usize, mut f: impl FnMut() -> T) -> f64 {
    let start = Instant::now();
    black_box(f());
    let once = start.elapsed().as_secs_f64().max(1e-9);
    let iters = ((0.05 / once) as usize).clamp(1, 1_000_000);
    let mut per_call: Vec<f64> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iters {
                black_box(f());
            }
            start.elapsed().as_secs_f64() / iters as f64
        })
        .collect();
    per_call.sort_by(f64::total_cmp);
    per_call.get(rounds / 2).copied().unwrap_or(f64::NAN)
}

/// Bytes allocated by one call of `f`, and the most held at once above what was live before.
fn memory<T>(f: impl FnOnce() -> T) -> (usize, usize, T) {
    let live = LIVE.load(Relaxed);
    PEAK.store(live, Relaxed);
    let total = TOTAL.load(Relaxed);
    let out = f();
    (TOTAL.load(Relaxed) - total, PEAK.load(Relaxed) - live, out)
}

fn us(s: f64) -> String {
    format!("{:.1} µs", s * 1e6)
}

fn kib(b: usize) -> String {
    format!("{:.1} KiB", b as f64 / 1024.0)
}

fn main() -> Result<(), Error> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(11);
    println!(
        "discovery cost, median of {rounds} rounds (cargo run --release --example discovery_cost)"
    );
    for n in [10, 10_000] {
        let t_parse = time(rounds.min(5), || config(n));
        let before = LIVE.load(Relaxed);
        let c = config(n)?;
        let config_keeps = LIVE.load(Relaxed) - before;
        let t_build = time(rounds, || Index::new(&c));
        let before = LIVE.load(Relaxed);
        let ix = Index::new(&c);
        let kept = LIVE.load(Relaxed) - before;
        println!(
            "\n{n} routes: configuration (JSON + Config::parse) {} (keeps {}) | Index::new {} (keeps {})",
            us(t_parse),
            kib(config_keeps),
            us(t_build),
            kib(kept)
        );
        println!(
            "  {:<9} {:<22} {:>12} {:>13} {:>11} {:>12}",
            "caller", "answer", "time", "allocated", "peak", "body"
        );
        let id = |groups: &[&str]| {
            Identity::from_json(&json!({ "sub": "u", "groups": groups }), &c.claim_paths)
        };
        let callers = [
            ("all", id(&["all"])),
            ("g3", id(&["g3"])),
            ("anonymous", None),
        ];
        let unlimited = Limits {
            routes: usize::MAX,
            bytes: usize::MAX,
        };
        for (name, who) in &callers {
            let who = who.as_ref();
            let ways: [(&str, &dyn Fn() -> String); 3] = [
                ("document (before)", &|| document(&c, who).to_string()),
                ("Index::answer", &|| ix.answer(&c, who)),
                ("Index, uncapped", &|| ix.answer_within(&c, who, unlimited)),
            ];
            for (way, f) in ways {
                let t = time(rounds, f);
                let (allocated, peak, body) = memory(f);
                println!(
                    "  {name:<9} {way:<22} {:>12} {:>13} {:>11} {:>12}",
                    us(t),
                    kib(allocated),
                    kib(peak),
                    kib(body.len())
                );
            }
        }
    }
    Ok(())
}
