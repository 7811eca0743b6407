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
