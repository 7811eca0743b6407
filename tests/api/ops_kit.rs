//! The operations kit under deploy/ speaks of metrics that exist: every metric an alert rule or a
//! dashboard panel names is on /metrics, with the labels its selectors use.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use crate::helpers::spawn_app;

/// Labels Prometheus adds when it scrapes, and the names it makes itself.
const SCRAPE_LABELS: [&str; 2] = ["job", "instance"];
const PROMETHEUS_OWN: [&str; 1] = ["up"];

/// What /metrics exposes: every series name (counters' `_total`, histograms' `_bucket`, `_sum`
/// and `_count`) and the labels seen on its samples.
struct Exposed {
    names: BTreeSet<String>,
    labels: BTreeMap<String, BTreeSet<String>>,
}

fn exposed(text: &str) -> Exposed {
    let mut names = BTreeSet::new();
    let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            match kind {
                "counter" => names.insert(format!("{name}_total")),
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                    true
                }
                _ => names.insert(name.to_owned()),
            };
        } else if !line.starts_with('#') && !line.is_empty() {
            let name_end = line.find(['{', ' ']).unwrap();
            let entry = labels.entry(line[..name_end].to_owned()).or_default();
            if let Some(inner) = line[name_end..].strip_prefix('{') {
                let inner = &inner[..inner.find('}').unwrap()];
                for pair in inner.split(',').filter(|p| !p.is_empty()) {
                    entry.insert(pair.split('=').next().unwrap().trim().to_owned());
                }
            }
        }
    }
    Exposed { names, labels }
}

/// Checks one PromQL expression against what is exposed; returns the problems.
fn check_expr(expr: &str, exposed: &Exposed) -> Vec<String> {
    let selector = regex::Regex::new(r"\b([a-z_][a-z0-9_]*)\s*(\{([^}]*)\})?").unwrap();
    let matcher = regex::Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*""#).unwrap();
    let mut problems = Vec::new();
    let mut metrics = 0;
    for found in selector.captures_iter(expr) {
        let name = &found[1];
        let prometheus_own = PROMETHEUS_OWN.contains(&name);
        if !name.starts_with("gozon_") && !prometheus_own {
            continue;
        }
        metrics += 1;
        if prometheus_own {
            continue;
        }
        if !exposed.names.contains(name) {
            problems.push(format!("{expr:?}: {name} is not on /metrics"));
            continue;
        }
        let seen = exposed.labels.get(name).cloned().unwrap_or_default();
        for label in found.get(3).map_or("", |m| m.as_str()).split(',') {
            let Some(m) = matcher.captures(label) else {
                continue;
            };
            let label = &m[1];
            if !SCRAPE_LABELS.contains(&label) && !seen.contains(label) {
                problems.push(format!(
                    "{expr:?}: {name} has no label {label} (seen: {seen:?})"
                ));
            }
        }
    }
    if metrics == 0 {
        problems.push(format!("{expr:?} names no metric"));
    }
    problems
}

fn exprs_in(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    _ => exprs_in(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|item| exprs_in(item, out)),
        _ => {}
    }
}

fn deploy(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test]
async fn alert_rules_and_the_dashboard_name_only_exposed_metrics() {
    let app = spawn_app().await;
    // Traffic, so every labelled family has samples.
    app.funded_account("kit", "10").await;
    let order = app.create_order("kit", "1.00").await;
    app.wait_until_final(order.str("id"), Duration::from_secs(20))
        .await;
    app.create_order("nobody-kit", "1.00").await;
    let text = reqwest::get(format!("{}/metrics", app.address))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exposed = exposed(&text);
    for wanted in ["gozon_ready", "gozon_dead_letters", "gozon_queue_depth"] {
        assert!(exposed.names.contains(wanted), "{wanted} missing:\n{text}");
    }

    // The rules: well-formed, each with a severity and a summary, each naming real metrics.
    let rules: serde_yaml::Value = serde_yaml::from_str(&deploy("prometheus/alerts.yml")).unwrap();
    let mut problems = Vec::new();
    let mut alerts = BTreeSet::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let alert = rule["alert"].as_str().expect("alert name");
            assert!(alerts.insert(alert.to_owned()), "{alert} twice");
            assert!(
                rule["labels"]["severity"].as_str().is_some(),
                "{alert}: severity"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{alert}: summary"
            );
            problems.extend(check_expr(rule["expr"].as_str().expect("expr"), &exposed));
        }
    }
    for needed in [
        "GozonOutboxStuck",
        "GozonDeadLetters",
        "GozonSagaSlow",
        "GozonNotReady",
    ] {
        assert!(alerts.contains(needed), "no {needed} rule");
    }

    // The dashboard: every panel's queries.
    let dashboard: serde_json::Value =
        serde_json::from_str(&deploy("grafana/gozon-dashboard.json")).unwrap();
    let mut exprs = Vec::new();
    exprs_in(&dashboard["panels"], &mut exprs);
    assert!(exprs.len() >= 10, "{} queries", exprs.len());
    for expr in &exprs {
        problems.extend(check_expr(expr, &exposed));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_check_catches_an_unknown_metric_and_label() {
    let exposed = exposed(
        "# TYPE gozon_ready gauge\ngozon_ready 1\n# TYPE gozon_dead_letters gauge\ngozon_dead_letters{queue=\"q\"} 0\n",
    );
    assert!(check_expr("gozon_ready == 0", &exposed).is_empty());
    assert!(
        check_expr(
            "max by (queue) (gozon_dead_letters{queue=~\"q.*\"}) > 0",
            &exposed
        )
        .is_empty()
    );
    assert_eq!(check_expr("gozon_readdy == 0", &exposed).len(), 1);
    assert_eq!(
        check_expr("gozon_dead_letters{topic=\"x\"} > 0", &exposed).len(),
        1
    );
    assert_eq!(check_expr("vector(1)", &exposed).len(), 1);
}
