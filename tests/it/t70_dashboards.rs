//! The shipped Grafana dashboards are well-formed and every query in them is valid PromQL.

use anyhow::Context as _;
use std::collections::BTreeSet;
use std::path::Path;

#[test]
fn every_dashboard_query_is_valid_promql() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster/grafana");
    let mut uids = BTreeSet::new();
    let mut rules = String::from("groups:\n  - name: dashboards\n    rules:\n");
    for name in ["system.json", "agents.json", "resources.json"] {
        let text =
            std::fs::read_to_string(dir.join(name)).with_context(|| format!("read {name}"))?;
        let dashboard: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{name} is not JSON"))?;
        let uid = dashboard["uid"].as_str().context("dashboard uid")?;
        assert!(uids.insert(uid.to_owned()), "{name}: uid {uid} is not unique");
        assert!(
            dashboard["title"].as_str().is_some_and(|t| t.starts_with("Colony")),
            "{name}: title"
        );
        let panels = dashboard["panels"].as_array().context("panels")?;
        assert!(!panels.is_empty(), "{name} has no panels");
        let mut ids = BTreeSet::new();
        for panel in panels {
            assert!(
                ids.insert(panel["id"].as_u64().context("panel id")?),
                "{name}: duplicate panel id"
            );
            assert_eq!(panel["datasource"]["type"], "prometheus", "{name}: {}", panel["title"]);
            for target in panel["targets"].as_array().context("targets")? {
                let expr = target["expr"].as_str().context("expr")?;
                rules.push_str(&format!(
                    "      - record: dashboard:check\n        expr: {}\n",
                    serde_json::to_string(expr)?
                ));
            }
        }
    }
    let scratch = tempfile::tempdir()?;
    let file = scratch.path().join("dashboard_queries.yml");
    std::fs::write(&file, rules)?;
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .map_err(|e| {
        anyhow::anyhow!(
            "promtool is required (cluster/test.sh installs Debian's prometheus package): {e}"
        )
    })?;
    assert!(
        out.status.success(),
        "a dashboard query is not valid PromQL:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
