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
        (405, "GET, HEAD")
    );
}

#[tokio::test]
async fn every_get_route_and_static_file_answers_head_as_get_without_a_body() {
    let app = spawn_app().await;
    app.funded_account("hedda", "10").await;
    let order = app.create_order("hedda", "1").await;
    let order_id = order.str("id").to_owned();
    let paths = [
        "/".to_owned(),
        "/index.html".to_owned(),
        "/app.js".to_owned(),
        "/docs".to_owned(),
        "/openapi.json".to_owned(),
        "/health/live".to_owned(),
        "/health/ready".to_owned(),
        "/metrics".to_owned(),
        "/api/payments/balance?user_id=hedda".to_owned(),
        "/api/payments/transactions?user_id=hedda".to_owned(),
        format!("/api/orders/order?id={order_id}"),
        "/api/orders/orders?user_id=hedda".to_owned(),
        "/api/orders/order?id=nonsense".to_owned(),
        "/nothing-here.js".to_owned(),
    ];
    for path in &paths {
        let url = format!("{}{path}", app.address);
        let get = app.client.get(&url).send().await.unwrap();
        let (status, content_type) = (get.status(), get.headers().get("content-type").cloned());
        let head = app.client.head(&url).send().await.unwrap();
        assert_eq!(head.status(), status, "HEAD {path}");
        assert_eq!(
            head.headers().get("content-type"),
            content_type.as_ref(),
            "HEAD {path}"
        );
        assert!(
            head.bytes().await.unwrap().is_empty(),
            "HEAD {path} has no body"
        );
    }
    // The event stream too: its headers at once, no stream.
    let head = app
        .client
        .head(format!("{}/api/orders/events?user_id=hedda", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-type"], "text/event-stream");
}
