//! The crate boundaries ARCHITECTURE.md promises, checked on the workspace's resolved dependency
//! graph (`cargo metadata`), so that a new dependency cannot quietly pull an async runtime, a
//! database or the CUDA driver into the pure crates, or the trainer into the server.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::process::Command;

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};

/// What the pure crates must never reach: the shell's runtimes, transports, storage, metrics and
/// the GPU.
const SHELL: &[&str] = &["tokio", "tonic", "quinn", "rocksdb", "prometheus", "cudarc"];

/// Each crate with the crates it must not reach through normal or build dependencies.
const RULES: &[(&str, &[&str])] = &[
    ("colony-core", SHELL),
    ("colony-model", SHELL),
    // The server uses a model through colony-model; training and the GPU stay in the learner.
    ("colony-server", &["cudarc", "colony-learn"]),
];

/// The resolved graph: each package id's name and the ids it depends on other than for tests.
#[derive(Debug)]
struct Graph {
    names: BTreeMap<String, String>,
    edges: BTreeMap<String, Vec<String>>,
}

fn field<'a>(value: &'a Value, key: &str) -> anyhow::Result<&'a Value> {
    value.get(key).with_context(|| format!("cargo metadata: no {key:?} in {value}"))
}

fn text<'a>(value: &'a Value, key: &str) -> anyhow::Result<&'a str> {
    field(value, key)?.as_str().with_context(|| format!("cargo metadata: {key:?} is not a string"))
}

fn array<'a>(value: &'a Value, key: &str) -> anyhow::Result<&'a Vec<Value>> {
    field(value, key)?
        .as_array()
        .with_context(|| format!("cargo metadata: {key:?} is not an array"))
}

/// Reads `cargo metadata --format-version 1` output. A dependency counts when any of its
/// `dep_kinds` is normal (`null`) or `build`; one needed only by tests (`dev`) does not ship.
fn graph(metadata: &Value) -> anyhow::Result<Graph> {
    let mut names = BTreeMap::new();
    for package in array(metadata, "packages")? {
        names.insert(text(package, "id")?.to_owned(), text(package, "name")?.to_owned());
    }
    let mut edges = BTreeMap::new();
    for node in array(field(metadata, "resolve")?, "nodes")? {
        let mut deps = Vec::new();
        for dep in array(node, "deps")? {
            let mut shipped = false;
            for kind in array(dep, "dep_kinds")? {
                shipped |= field(kind, "kind")?.as_str() != Some("dev");
            }
            if shipped {
                deps.push(text(dep, "pkg")?.to_owned());
            }
        }
        edges.insert(text(node, "id")?.to_owned(), deps);
    }
    Ok(Graph { names, edges })
}

/// For each crate in `forbidden` that `root` reaches, the shortest chain of crate names from
/// `root` to it.
fn forbidden_paths(
    graph: &Graph,
    root: &str,
    forbidden: &[&str],
) -> anyhow::Result<Vec<Vec<String>>> {
    let name = |id: &str| graph.names.get(id).map_or(id, String::as_str).to_owned();
    let roots: Vec<&String> =
        graph.names.iter().filter(|(_, n)| *n == root).map(|(id, _)| id).collect();
    ensure!(!roots.is_empty(), "{root} is not in the dependency graph");
    let mut parent: BTreeMap<&str, Option<&str>> =
        roots.iter().map(|id| (id.as_str(), None)).collect();
    let mut queue: VecDeque<&str> = roots.iter().map(|id| id.as_str()).collect();
    let mut found = BTreeSet::new();
    let mut paths = Vec::new();
    while let Some(id) = queue.pop_front() {
        let crate_name = name(id);
        if forbidden.contains(&crate_name.as_str()) {
            // Breadth first, so the first path to a crate is a shortest one.
            if found.insert(crate_name) {
                let mut chain = vec![name(id)];
                let mut at = id;
                while let Some(&Some(up)) = parent.get(at) {
                    chain.push(name(up));
                    at = up;
                }
                chain.reverse();
                paths.push(chain);
            }
            continue;
        }
        for dep in graph.edges.get(id).into_iter().flatten() {
            if !parent.contains_key(dep.as_str()) {
                parent.insert(dep.as_str(), Some(id));
                queue.push_back(dep);
            }
        }
    }
    Ok(paths)
}

/// Every broken rule of `rules`, one line each.
fn violations(graph: &Graph, rules: &[(&str, &[&str])]) -> anyhow::Result<Vec<String>> {
    let mut broken = Vec::new();
    for (root, forbidden) in rules {
        for chain in forbidden_paths(graph, root, forbidden)? {
            let reached = chain.last().map_or("", String::as_str);
            broken.push(format!("{root} reaches {reached}: {}", chain.join(" -> ")));
        }
    }
    Ok(broken)
}

#[test]
fn pure_crates_reach_no_shell_and_the_server_no_trainer() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let version =
        Command::new(&cargo).arg("-vV").output().with_context(|| format!("run {cargo:?} -vV"))?;
    let version = String::from_utf8_lossy(&version.stdout);
    let host = version
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .with_context(|| format!("no host triple in cargo -vV: {version}"))?;
    // Only the host's dependencies: those of other platforms never build here, and offline
    // cargo cannot resolve the ones it never downloaded.
    let output = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", host])
        .current_dir(root)
        .output()
        .with_context(|| format!("run {cargo:?} metadata"))?;
    if !output.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let metadata: Value = serde_json::from_slice(&output.stdout).context("parse cargo metadata")?;
    let broken = violations(&graph(&metadata)?, RULES)?;
    assert!(
        broken.is_empty(),
        "crate boundaries broken (normal and build dependencies):\n{}",
        broken.join("\n")
    );
    Ok(())
}

/// The check above can fail: on a small graph with a forbidden normal chain, a forbidden build
/// dependency and a forbidden crate reachable only through a dev-dependency, it reports exactly
/// the first two.
#[test]
fn the_walker_reports_forbidden_chains_and_ignores_dev_dependencies() -> anyhow::Result<()> {
    let dep = |pkg: &str, kinds: Value| json!({ "name": pkg, "pkg": pkg, "dep_kinds": kinds });
    let normal = || json!([{ "kind": null, "target": null }]);
    let packages: Vec<Value> =
        ["colony-model", "serde", "tokio", "cc", "cudarc", "proptest", "rocksdb"]
            .map(|name| json!({ "id": name, "name": name }))
            .into();
    let metadata = json!({
        "packages": packages,
        "resolve": { "nodes": [
            { "id": "colony-model", "deps": [
                dep("serde", normal()),
                dep("cc", json!([{ "kind": "build", "target": null }])),
                dep("proptest", json!([{ "kind": "dev", "target": null }])),
            ] },
            { "id": "serde", "deps": [dep("tokio", normal())] },
            { "id": "cc", "deps": [dep("cudarc", normal())] },
            { "id": "proptest", "deps": [dep("rocksdb", normal())] },
            { "id": "tokio", "deps": [] },
            { "id": "cudarc", "deps": [] },
            { "id": "rocksdb", "deps": [] },
        ] },
    });
    let graph = graph(&metadata)?;
    assert_eq!(
        violations(&graph, &[("colony-model", SHELL)])?,
        [
            "colony-model reaches tokio: colony-model -> serde -> tokio",
            "colony-model reaches cudarc: colony-model -> cc -> cudarc",
        ]
    );
    assert_eq!(violations(&graph, &[("serde", &["rocksdb"])])?, Vec::<String>::new());
    assert!(forbidden_paths(&graph, "colony-nothing", SHELL).is_err());
    Ok(())
}
