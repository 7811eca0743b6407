//! What deploys Gozon fits what Gozon is. The image's first stage (dependencies only) has every
//! workspace member's manifest, or cargo cannot load the workspace. The Kubernetes base holds
//! together: every file is listed, every Secret and ConfigMap a pod
//! reads is made by the base (or by an operator it deploys), the gateway runs the compose
//! gateway's nginx.conf, and each container's arguments and variables are ones `gozon` takes.
//! (scripts/test-e2e validates the core kinds against Kubernetes' schemas with
//! kubernetes-validate.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use gozon::app::cli::Cli;
use serde::Deserialize;

fn base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s/base")
}

fn documents(file: &Path) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(file).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| serde_yaml::Value::deserialize(document).unwrap())
        .filter(|document| !document.is_null())
        .collect()
}

fn strings(value: &serde_yaml::Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Every value of `key` anywhere under `value`.
fn all<'a>(value: &'a serde_yaml::Value, key: &str, out: &mut Vec<&'a serde_yaml::Value>) {
    match value {
        serde_yaml::Value::Mapping(map) => {
            for (k, v) in map {
                if k.as_str() == Some(key) {
                    out.push(v);
                }
                all(v, key, out);
            }
        }
        serde_yaml::Value::Sequence(items) => items.iter().for_each(|item| all(item, key, out)),
        _ => {}
    }
}

/// The environment variables `gozon serve` reads, and the standard ones it honours.
fn known_variables() -> BTreeSet<String> {
    let mut known: BTreeSet<String> = ["RUST_LOG", "OTEL_SERVICE_NAME"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let command = Cli::command();
    for sub in command.get_subcommands() {
        for arg in sub.get_arguments() {
            if let Some(env) = arg.get_env() {
                known.insert(env.to_string_lossy().into_owned());
            }
        }
    }
    known
}

#[test]
fn the_kubernetes_base_holds_together() {
    let kustomization = &documents(&base().join("kustomization.yaml"))[0];
    let resources = strings(&kustomization["resources"]);
    let listed: BTreeSet<String> = resources.iter().cloned().collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(base())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    assert_eq!(listed, on_disk, "every manifest is listed, and only those");

    // What the base makes: generated Secrets and ConfigMaps, declared ones, and the user
    // secret the RabbitMQ operator makes for each RabbitmqCluster.
    let mut secrets: BTreeSet<String> = BTreeSet::new();
    let mut config_maps: BTreeSet<String> = BTreeSet::new();
    for generated in kustomization["secretGenerator"].as_sequence().unwrap() {
        secrets.insert(generated["name"].as_str().unwrap().to_owned());
    }
    for generated in kustomization["configMapGenerator"].as_sequence().unwrap() {
        config_maps.insert(generated["name"].as_str().unwrap().to_owned());
        for file in strings(&generated["files"]) {
            let (_, path) = file.split_once('=').unwrap_or(("", &file));
            assert!(base().join(path).exists(), "{path}");
        }
    }
    let mut kinds = BTreeSet::new();
    let mut pods = Vec::new();
    let mut config_keys = BTreeSet::new();
    for file in &resources {
        for document in documents(&base().join(file)) {
            let kind = document["kind"].as_str().unwrap().to_owned();
            let name = document["metadata"]["name"].as_str().unwrap().to_owned();
            match kind.as_str() {
                "ConfigMap" => {
                    for key in document["data"].as_mapping().unwrap().keys() {
                        config_keys.insert(key.as_str().unwrap().to_owned());
                    }
                    config_maps.insert(name.clone());
                }
                "Secret" => {
                    secrets.insert(name.clone());
                }
                "RabbitmqCluster" => {
                    secrets.insert(format!("{name}-default-user"));
                }
                // The messaging topology operator writes each User's credentials here.
                "User" => {
                    secrets.insert(format!("{name}-user-credentials"));
                }
                "Deployment" => pods.push((name.clone(), document["spec"]["template"].clone())),
                _ => {}
            }
            kinds.insert(kind);
        }
    }
    for needed in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Ingress",
        "ConfigMap",
        "RabbitmqCluster",
        "Cluster",
        "NetworkPolicy",
        "User",
        "Permission",
    ] {
        assert!(kinds.contains(needed), "no {needed}");
    }
    let known = known_variables();
    for key in &config_keys {
        assert!(
            known.contains(key),
            "the ConfigMap sets {key}, which gozon does not read"
        );
    }

    // Each pod reads only what exists; each gozon container runs a command gozon takes.
    let make_secrets = std::fs::read_to_string(base().join("../make-secrets")).unwrap();
    for (deployment, pod) in &pods {
        let mut refs = Vec::new();
        all(pod, "secretKeyRef", &mut refs);
        for reference in refs {
            let name = reference["name"].as_str().unwrap();
            let key = reference["key"].as_str().unwrap();
            assert!(secrets.contains(name), "{deployment}: no secret {name}");
            let optional = reference["optional"].as_bool() == Some(true);
            if name == "gozon-secrets" && !optional {
                assert!(
                    make_secrets.contains(&format!("{key}=")),
                    "{deployment}: {key}"
                );
            }
        }
        let mut refs = Vec::new();
        all(pod, "configMapRef", &mut refs);
        all(pod, "configMap", &mut refs);
        for reference in refs {
            let name = reference["name"].as_str().unwrap();
            assert!(
                config_maps.contains(name),
                "{deployment}: no config map {name}"
            );
        }
        let containers = pod["spec"]["containers"].as_sequence().unwrap().iter();
        let inits = pod["spec"]["initContainers"]
            .as_sequence()
            .into_iter()
            .flatten();
        for container in containers.chain(inits) {
            if container["image"].as_str() != Some("gozon") || !container["command"].is_null() {
                continue;
            }
            let args: Vec<String> = strings(&container["args"])
                .into_iter()
                .map(|arg| arg.replace("$(DB_USER)", "orders_app"))
                .collect();
            let parsed = Cli::try_parse_from(std::iter::once("gozon".to_owned()).chain(args));
            assert!(parsed.is_ok(), "{deployment}: {:?}", parsed.err());
            for variable in container["env"].as_sequence().into_iter().flatten() {
                let name = variable["name"].as_str().unwrap();
                let helper = ["DB_USER", "DB_PASSWORD", "DB_OWNER", "DB_OWNER_PASSWORD"]
                    .contains(&name)
                    || name.starts_with("AMQP_") && name != "AMQP_URL";
                assert!(helper || known.contains(name), "{deployment}: {name}");
            }
        }
    }

    // The gateway serves exactly what the compose gateway does.
    let compose = std::fs::read_to_string(base().join("../../../gateway/nginx.conf")).unwrap();
    let kubernetes = std::fs::read_to_string(base().join("gateway/nginx.conf")).unwrap();
    assert_eq!(
        compose, kubernetes,
        "deploy/k8s/base/gateway/nginx.conf is gateway/nginx.conf"
    );
}

#[test]
fn the_image_copies_every_workspace_members_manifest() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    // `members = [".", "migrations", "bench"]`
    let line = manifest
        .lines()
        .find(|line| line.starts_with("members"))
        .expect("a members line");
    let list = line.split_once('[').unwrap().1.split(']').next().unwrap();
    let members: Vec<&str> = list
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .collect();
    assert!(members.contains(&"migrations"), "{members:?}");
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    for member in members.into_iter().filter(|m| !m.is_empty() && *m != ".") {
        let copy = format!("COPY {member}/Cargo.toml {member}/Cargo.toml");
        assert!(dockerfile.contains(&copy), "the Dockerfile lacks `{copy}`");
    }
}

#[test]
fn the_monitoring_component_carries_the_alert_rules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = &documents(&root.join("deploy/prometheus/alerts.yml"))[0];
    let component = root.join("deploy/k8s/components/monitoring");
    let rule = &documents(&component.join("prometheusrule.yaml"))[0];
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(
        rule["spec"]["groups"], rules["groups"],
        "prometheusrule.yaml is alerts.yml"
    );
    let kustomization = &documents(&component.join("kustomization.yaml"))[0];
    assert_eq!(kustomization["kind"], "Component");
    for file in strings(&kustomization["resources"]) {
        assert!(component.join(&file).exists(), "{file}");
    }
    // The PodMonitor scrapes the port the roles name.
    let monitor = &documents(&component.join("podmonitor.yaml"))[0];
    let port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    let orders = std::fs::read_to_string(base().join("orders.yaml")).unwrap();
    assert!(orders.contains(&format!("- name: {port}")), "port {port}");
}

/// Every document of the base, by kind and name.
fn base_documents() -> Vec<serde_yaml::Value> {
    let kustomization = &documents(&base().join("kustomization.yaml"))[0];
    strings(&kustomization["resources"])
        .iter()
        .flat_map(|file| documents(&base().join(file)))
        .collect()
}

fn find<'a>(docs: &'a [serde_yaml::Value], kind: &str, name: &str) -> &'a serde_yaml::Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The environment a Deployment's gozon container gets: its own variables and the ConfigMap's.
fn serving_env(docs: &[serde_yaml::Value], deployment: &str) -> Vec<(String, serde_yaml::Value)> {
    let pod = &find(docs, "Deployment", deployment)["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let mut env: Vec<(String, serde_yaml::Value)> = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_owned(), v.clone()))
        .collect();
    let config = &find(docs, "ConfigMap", "gozon-config")["data"];
    for (key, value) in config.as_mapping().unwrap() {
        env.push((key.as_str().unwrap().to_owned(), value.clone()));
    }
    env
}

#[test]
fn the_kubernetes_base_authenticates_and_grants_the_least() {
    let docs = base_documents();
    // jwt mode against an identity provider, with issuer and audience, for both roles; tokens
    // are checked by settings gozon accepts (the ConfigMap's values, as gozon parses them).
    let config = &find(&docs, "ConfigMap", "gozon-config")["data"];
    assert_eq!(config["GOZON_AUTH"], "jwt");
    let mut args = vec!["gozon".to_owned(), "serve".to_owned()];
    for (flag, key) in [
        ("--jwt-jwks-url", "GOZON_JWT_JWKS_URL"),
        ("--jwt-issuer", "GOZON_JWT_ISSUER"),
        ("--jwt-audience", "GOZON_JWT_AUDIENCE"),
        ("--jwt-max-ttl", "GOZON_JWT_MAX_TTL"),
        ("--trusted-proxies", "GOZON_TRUSTED_PROXIES"),
    ] {
        let value = config[key].as_str().unwrap_or_else(|| panic!("no {key}"));
        args.extend([flag.to_owned(), value.to_owned()]);
    }
    args.extend([
        "--auth".into(),
        "jwt".into(),
        "--message-key".into(),
        "k".repeat(40),
    ]);
    args.extend(["--events-ticket-key".into(), "t".repeat(40)]);
    let cli = Cli::try_parse_from(&args).unwrap();
    let gozon::app::cli::Command::Serve { settings, .. } = cli.command else {
        unreachable!()
    };
    assert!(settings.authenticator(true).is_ok());
    assert!(settings.jwt_jwks_url.unwrap().starts_with("https://"));
    for role in ["orders", "payments"] {
        let env = serving_env(&docs, role);
        let names: Vec<&str> = env.iter().map(|(name, _)| name.as_str()).collect();
        assert!(
            !names.contains(&"GOZON_JWT_SECRET"),
            "{role}: public keys only"
        );
        // The ticket key is the orders role's alone.
        assert_eq!(
            names.contains(&"GOZON_EVENTS_TICKET_KEY"),
            role == "orders",
            "{role}"
        );
        // Its own broker user, not the operator's administrator.
        let amqp_user = env.iter().find(|(name, _)| name == "AMQP_USER").unwrap();
        assert_eq!(
            amqp_user.1["valueFrom"]["secretKeyRef"]["name"],
            format!("gozon-{role}-user-credentials").as_str()
        );
    }
    // Each broker user has exactly the rights gozon documents for its role.
    let prefix = config["GOZON_AMQP_PREFIX"].as_str().unwrap();
    for (role, peer) in [("orders", "payments"), ("payments", "orders")] {
        let permission = &find(&docs, "Permission", &format!("gozon-{role}"))["spec"];
        let wanted = gozon::messaging::amqp::permissions(prefix, role, &[peer]);
        assert_eq!(
            permission["userReference"]["name"],
            format!("gozon-{role}").as_str()
        );
        assert_eq!(
            permission["permissions"]["configure"],
            wanted.configure.as_str()
        );
        assert_eq!(permission["permissions"]["write"], wanted.write.as_str());
        assert_eq!(permission["permissions"]["read"], wanted.read.as_str());
    }
    // TLS at the Ingress, for the host it routes.
    let ingress = &find(&docs, "Ingress", "gozon")["spec"];
    assert_eq!(ingress["tls"][0]["hosts"][0], ingress["rules"][0]["host"]);
    assert!(ingress["tls"][0]["secretName"].is_string());
    // Default deny, both ways, for every pod.
    let deny = &find(&docs, "NetworkPolicy", "default-deny")["spec"];
    assert_eq!(
        deny["podSelector"],
        serde_yaml::Value::Mapping(Default::default())
    );
    assert_eq!(strings(&deny["policyTypes"]), ["Ingress", "Egress"]);
    assert!(deny["ingress"].is_null() && deny["egress"].is_null());
    // The roles take their API from the gateway only.
    for role in ["orders", "payments"] {
        let policy = &find(&docs, "NetworkPolicy", role)["spec"];
        let from = &policy["ingress"][0]["from"];
        assert_eq!(from.as_sequence().unwrap().len(), 1);
        assert_eq!(
            from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
            "gateway"
        );
    }
    // nginx unprivileged, with a read-only root and no capabilities.
    let gateway = &find(&docs, "Deployment", "gateway")["spec"]["template"]["spec"];
    let nginx = &gateway["containers"][0]["securityContext"];
    assert_eq!(nginx["runAsNonRoot"], true);
    assert_eq!(nginx["readOnlyRootFilesystem"], true);
    assert_eq!(nginx["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&nginx["capabilities"]["drop"]), ["ALL"]);
    assert!(nginx["runAsUser"].as_u64().is_some_and(|uid| uid > 0));
}

#[test]
fn the_compose_broker_grants_each_role_what_gozon_documents() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = std::fs::read_to_string(root.join("deploy/rabbitmq/with-users.sh")).unwrap();
    // In the script's unquoted heredoc of JSON, a regex's backslash is written four times and
    // its `$` escaped.
    let as_written = |regex: &str| regex.replace('\\', "\\\\\\\\").replace('$', "\\$");
    for (role, peer) in [("orders", "payments"), ("payments", "orders")] {
        let wanted = gozon::messaging::amqp::permissions("gozon", role, &[peer]);
        let block = script
            .split("{\"user\": ")
            .find(|block| block.starts_with(&format!("\"gozon-{role}\"")))
            .unwrap_or_else(|| panic!("no permissions for gozon-{role}"));
        for (right, regex) in [
            ("configure", &wanted.configure),
            ("write", &wanted.write),
            ("read", &wanted.read),
        ] {
            let line = format!("\"{right}\": \"{}\"", as_written(regex));
            assert!(block.contains(&line), "gozon-{role}: {line} in {block}");
        }
    }
    let (code, out) = crate::helpers::gozon(&["broker-permissions", "--context", "orders"]);
    assert_eq!(code, Some(0));
    let wanted = gozon::messaging::amqp::permissions("gozon", "orders", &["payments"]);
    assert_eq!(
        out.trim_end(),
        format!("{}\t{}\t{}", wanted.configure, wanted.write, wanted.read)
    );
}
