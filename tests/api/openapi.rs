//! The committed `openapi.yaml` is the spec the service serves. `UPDATE_OPENAPI=1` rewrites it.

use crate::helpers::spawn_app;

#[tokio::test]
async fn the_served_spec_equals_openapi_yaml() {
    let app = spawn_app().await;
    let served: serde_json::Value = app
        .client
        .get(format!("{}/openapi.json", app.address))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml");
    if std::env::var("UPDATE_OPENAPI").is_ok() {
        std::fs::write(path, gozon::app::routes::openapi_yaml()).unwrap();
    }
    let committed = std::fs::read_to_string(path).expect("openapi.yaml is committed");
    let committed: serde_json::Value =
        serde_yaml::from_str(&committed).expect("openapi.yaml parses");
    assert!(
        served == committed,
        "openapi.yaml differs from the served spec: run `UPDATE_OPENAPI=1 cargo test --test api openapi` \
         (or `gozon openapi --output openapi.yaml`) and commit the result"
    );
    assert!(served["paths"]["/api/orders/create_order"]["post"].is_object());
    assert!(served["paths"]["/api/payments/add_funds"]["post"]["responses"]["404"].is_object());
}

#[tokio::test]
async fn swagger_ui_is_served() {
    let app = spawn_app().await;
    let page = app
        .client
        .get(format!("{}/docs", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("swagger"));
}

#[tokio::test]
async fn every_role_serves_the_whole_spec_and_swagger_ui() {
    use crate::helpers::TestEnv;
    use gozon::app::cli::Role;
    let env = TestEnv::new();
    for role in [Role::Orders, Role::Payments] {
        let app = env.spawn(role).await;
        let spec: serde_json::Value = app
            .client
            .get(format!("{}/openapi.json", app.address))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            spec["paths"]["/api/orders/create_order"].is_object(),
            "{role:?}"
        );
        assert!(
            spec["paths"]["/api/payments/add_funds"].is_object(),
            "{role:?}"
        );
        let docs = app
            .client
            .get(format!("{}/docs", app.address))
            .send()
            .await
            .unwrap();
        assert_eq!(docs.status(), 200, "{role:?}");
    }
}

#[tokio::test]
async fn a_405_says_which_methods_are_allowed() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(format!(
            "{}/api/orders/create_order?user_id=a&amount=1",
            app.address
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    let response = app
        .client
        .post(format!("{}/api/payments/balance?user_id=a", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (
            response.status().as_u16(),
            response.headers()["allow"].to_str().unwrap()
        ),
        (405, "GET")
    );
}
