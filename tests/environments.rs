//! Execution environments over HTTP: create/replace/list/get/delete, validation, prewarming
//! pools and their statistics, persistence across restarts, health and version.

mod support;

use std::collections::BTreeSet;

use serde::Deserialize;
use serde_json::{Value, json};
use support::{Answer, KeyOrder, TestServer, environment_body, eventually};

const IMAGE: &str = "openhpi/co_execenv_python:3.8";

/// A PUT body like CodeOcean's with some fields changed.
fn body_with(id: u64, pool: u32, changes: Value) -> Value {
    let mut body = environment_body(id, pool);
    for (key, value) in changes.as_object().expect("object") {
        body[key] = value.clone();
    }
    body
}

/// The definition GET returns for a CodeOcean-style PUT.
fn stored(id: u64, pool: u32) -> Value {
    json!({"prewarmingPoolSize": pool, "cpuLimit": 20, "memoryLimit": 256, "image": IMAGE,
           "networkAccess": false, "exposedPorts": [], "id": id})
}

fn put(server: &TestServer, id: u64, body: &Value) -> Answer {
    server.send("PUT", &format!("/execution-environments/{id}"), body)
}

fn put_raw(server: &TestServer, id: &str, body: &[u8]) -> Answer {
    server.request("PUT", &format!("/execution-environments/{id}"), Some(body))
}

fn statistics(server: &TestServer) -> Value {
    let answer = server.get("/statistics/execution-environments");
    assert_eq!(answer.status, 200, "{}", answer.text());
    answer.json()
}

fn figures(id: u64, pool: u32, idle: u64, used: u64) -> Value {
    json!({"id": id, "prewarmingPoolSize": pool, "idleRunners": idle, "usedRunners": used})
}

/// The runners that exist: one directory per idle or claimed runner.
fn workspaces(server: &TestServer) -> BTreeSet<String> {
    server.runner_dirs()
}

#[track_caller]
fn assert_empty(answer: &Answer, status: u16) {
    assert_eq!(answer.status, status, "{}", answer.text());
    assert!(answer.body.is_empty(), "body: {:?}", answer.text());
}

#[track_caller]
fn assert_json_error(answer: &Answer, status: u16) {
    assert_eq!(answer.status, status, "{}", answer.text());
    assert_eq!(answer.header("Content-Type"), Some("application/json"));
    assert!(
        !answer.message().is_empty(),
        "no message: {}",
        answer.text()
    );
}

#[test]
fn put_answers_201_for_a_new_environment_and_204_for_a_replaced_one_with_empty_bodies() {
    let server = TestServer::start();
    assert_empty(&put(&server, 7, &environment_body(7, 0)), 201);
    assert_empty(&put(&server, 7, &environment_body(7, 0)), 204);
    assert_empty(&put(&server, 7, &environment_body(7, 1)), 204);
    assert_empty(&put(&server, 8, &environment_body(8, 0)), 201);
}

#[test]
fn the_list_is_an_empty_array_without_environments() {
    let server = TestServer::start();
    let answer = server.get("/execution-environments");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("Content-Type"), Some("application/json"));
    assert_eq!(answer.json(), json!({"executionEnvironments": []}));
}

#[test]
fn the_list_holds_every_environment_with_integer_ids_last() {
    let server = TestServer::start();
    server.environment(12, 0);
    server.environment(3, 1);
    let answer = server.get("/execution-environments");
    assert_eq!(answer.status, 200);
    let list = answer.json()["executionEnvironments"].clone();
    let list = list.as_array().expect("an array");
    let mut ids: Vec<u64> = list
        .iter()
        .map(|env| env["id"].as_u64().expect("integer id"))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, [3, 12]);
    for env in list {
        let id = env["id"].as_u64().unwrap();
        let pool = if id == 3 { 1 } else { 0 };
        assert_eq!(*env, stored(id, pool));
    }
    #[derive(Deserialize)]
    struct List {
        #[serde(rename = "executionEnvironments")]
        environments: Vec<KeyOrder>,
    }
    let order: List = serde_json::from_slice(&answer.body).expect("list");
    for keys in order.environments {
        assert_eq!(
            keys.0,
            [
                "prewarmingPoolSize",
                "cpuLimit",
                "memoryLimit",
                "image",
                "networkAccess",
                "exposedPorts",
                "id"
            ]
        );
    }
}

#[test]
fn get_returns_the_stored_definition_with_the_id_last() {
    let server = TestServer::start();
    let body = body_with(
        5,
        0,
        json!({"cpuLimit": 40, "memoryLimit": 512, "networkAccess": true, "exposedPorts": [80, 8080]}),
    );
    assert_eq!(put(&server, 5, &body).status, 201);
    let answer = server.get("/execution-environments/5");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("Content-Type"), Some("application/json"));
    assert_eq!(
        answer.text(),
        format!(
            r#"{{"prewarmingPoolSize":0,"cpuLimit":40,"memoryLimit":512,"image":"{IMAGE}","networkAccess":true,"exposedPorts":[80,8080],"id":5}}"#
        )
    );
}

#[test]
fn get_of_an_unknown_environment_is_404_with_an_empty_body() {
    let server = TestServer::start();
    assert_empty(&server.get("/execution-environments/4"), 404);
    server.environment(5, 0);
    assert_empty(&server.get("/execution-environments/4"), 404);
}

#[test]
fn delete_answers_204_then_404_with_empty_bodies() {
    let server = TestServer::start();
    server.environment(9, 0);
    assert_empty(&server.delete("/execution-environments/9"), 204);
    assert_empty(&server.get("/execution-environments/9"), 404);
    assert_empty(&server.delete("/execution-environments/9"), 404);
    assert_empty(&server.delete("/execution-environments/10"), 404);
    assert_eq!(
        server.get("/execution-environments").json(),
        json!({"executionEnvironments": []})
    );
}

#[test]
fn unknown_fields_and_trailing_bytes_are_ignored_and_the_path_id_wins_over_the_body_id() {
    let server = TestServer::start();
    let mut body = body_with(
        99,
        0,
        json!({"unknown": {"nested": [1, 2]}, "name": "Python"}),
    );
    body["id"] = json!(99);
    let mut bytes = body.to_string().into_bytes();
    bytes.extend_from_slice(b"\n this is not JSON");
    assert_empty(&put_raw(&server, "7", &bytes), 201);
    assert_eq!(server.get("/execution-environments/7").json(), stored(7, 0));
    assert_empty(&server.get("/execution-environments/99"), 404);
    assert_eq!(statistics(&server), json!({"7": figures(7, 0, 0, 0)}));
}

#[test]
fn missing_and_null_fields_take_zero_values() {
    let server = TestServer::start();
    assert_empty(
        &put_raw(&server, "4", br#"{"image":"host","exposedPorts":null}"#),
        201,
    );
    assert_eq!(
        server.get("/execution-environments/4").json(),
        json!({"prewarmingPoolSize": 0, "cpuLimit": 0, "memoryLimit": 0, "image": "host",
               "networkAccess": false, "exposedPorts": [], "id": 4})
    );
}

const BAD_BODIES: &[&str] = &[
    "",
    "   ",
    "{",
    r#"{"prewarmingPoolSize": "1"}"#,
    r#"{"prewarmingPoolSize": -1}"#,
    r#"{"prewarmingPoolSize": 1.5}"#,
    r#"{"cpuLimit": -20}"#,
    r#"{"memoryLimit": -256}"#,
    r#"{"memoryLimit": "256"}"#,
    r#"{"image": 5}"#,
    r#"{"networkAccess": "yes"}"#,
    r#"{"exposedPorts": 80}"#,
    r#"{"exposedPorts": [70000]}"#,
    r#"{"exposedPorts": [-1]}"#,
    r#"{"id": 5, "image": "x", "prewarmingPoolSize": 1,"#,
];

/// Bodies that are not JSON objects at all (Go cannot decode them into a struct).
const NOT_OBJECTS: &[&str] = &[
    "[1, 2]",
    r#"[0, 20, 256, "x", false, [], 3]"#,
    "\"env\"",
    "42",
];

#[test]
fn malformed_put_bodies_are_400_with_a_json_message() {
    let server = TestServer::start();
    let mut accepted = Vec::new();
    for body in BAD_BODIES.iter().chain(NOT_OBJECTS) {
        let answer = put_raw(&server, "3", body.as_bytes());
        if answer.status == 400 {
            assert_json_error(&answer, 400);
        } else {
            accepted.push((body, answer.status));
        }
    }
    assert!(accepted.is_empty(), "not rejected with 400: {accepted:?}");
    assert_empty(&server.get("/execution-environments/3"), 404);
}

#[test]
fn a_rejected_put_changes_nothing() {
    let server = TestServer::start();
    server.environment(3, 1);
    server.wait_idle(3, 1);
    for body in BAD_BODIES {
        assert_eq!(put_raw(&server, "3", body.as_bytes()).status, 400);
        assert_eq!(put_raw(&server, "4", body.as_bytes()).status, 400);
    }
    assert_eq!(
        put_raw(
            &server,
            "3",
            br#"{"prewarmingPoolSize": 5, "memoryLimit": -1}"#
        )
        .status,
        400
    );
    assert_eq!(server.get("/execution-environments/3").json(), stored(3, 1));
    assert_empty(&server.get("/execution-environments/4"), 404);
    assert_eq!(
        server.get("/execution-environments").json(),
        json!({"executionEnvironments": [stored(3, 1)]})
    );
    assert_eq!(statistics(&server), json!({"3": figures(3, 1, 1, 0)}));
}

#[test]
fn non_numeric_or_negative_ids_are_404_and_overflowing_ids_are_400() {
    let server = TestServer::start();
    server.environment(1, 0);
    let body = environment_body(1, 0).to_string();
    for id in ["abc", "-1", "1.5", "1e3", "0x10"] {
        let path = format!("/execution-environments/{id}");
        assert_empty(&server.get(&path), 404);
        assert_empty(&server.delete(&path), 404);
        assert_empty(&put_raw(&server, id, body.as_bytes()), 404);
    }
    let huge = "99999999999999999999999999";
    let path = format!("/execution-environments/{huge}");
    assert_json_error(&server.get(&path), 400);
    assert_json_error(&server.delete(&path), 400);
    assert_json_error(&put_raw(&server, huge, body.as_bytes()), 400);
    assert_eq!(
        server.get("/execution-environments").json(),
        json!({"executionEnvironments": [stored(1, 0)]})
    );
}

#[test]
fn ids_beyond_gos_int_are_400_like_poseidon() {
    // Poseidon parses ids into a Go `int` (64 bits, signed).
    let server = TestServer::start();
    let id = "9223372036854775808";
    let body = environment_body(0, 0).to_string();
    assert_json_error(&put_raw(&server, id, body.as_bytes()), 400);
    assert_json_error(&server.get(&format!("/execution-environments/{id}")), 400);
    assert_empty(
        &put_raw(&server, "9223372036854775807", body.as_bytes()),
        201,
    );
}

#[test]
fn the_fetch_parameter_accepts_booleans_and_rejects_anything_else() {
    let server = TestServer::start();
    server.environment(2, 0);
    for value in ["true", "false", "1", "0", "TRUE", "f"] {
        let list = server.get(&format!("/execution-environments?fetch={value}"));
        assert_eq!(list.status, 200, "fetch={value}: {}", list.text());
        assert_eq!(
            list.json(),
            json!({"executionEnvironments": [stored(2, 0)]})
        );
        let one = server.get(&format!("/execution-environments/2?fetch={value}"));
        assert_eq!(one.status, 200, "fetch={value}: {}", one.text());
        assert_eq!(one.json(), stored(2, 0));
    }
    for value in ["maybe", "yes", "2"] {
        let list = server.get(&format!("/execution-environments?fetch={value}"));
        assert_json_error(&list, 400);
        assert!(
            list.message().contains("could not parse fetch parameter"),
            "{}",
            list.text()
        );
        assert_json_error(
            &server.get(&format!("/execution-environments/2?fetch={value}")),
            400,
        );
    }
}

#[test]
fn the_pool_is_prewarmed_to_its_size_and_statistics_show_it() {
    let server = TestServer::start();
    server.environment(1, 3);
    server.wait_idle(1, 3);
    assert_eq!(statistics(&server), json!({"1": figures(1, 3, 3, 0)}));
    assert_eq!(workspaces(&server).len(), 3);
}

#[test]
fn a_put_does_not_wait_for_its_pool_to_fill() {
    // The capacity allows only two runners: a PUT that filled the pool on the request path
    // would never return.
    let server = TestServer::start_with(|config| config.runner.capacity = 2);
    assert_empty(&put(&server, 1, &environment_body(1, 5)), 201);
    server.wait_idle(1, 2);
    assert_eq!(statistics(&server), json!({"1": figures(1, 5, 2, 0)}));
    assert_empty(&put(&server, 1, &environment_body(1, 6)), 204);
    assert_eq!(statistics(&server), json!({"1": figures(1, 6, 2, 0)}));
}

#[test]
fn growing_the_pool_takes_effect_at_once() {
    let server = TestServer::start();
    server.environment(1, 1);
    server.wait_idle(1, 1);
    assert_empty(&put(&server, 1, &environment_body(1, 4)), 204);
    assert_eq!(statistics(&server)["1"]["prewarmingPoolSize"], json!(4));
    server.wait_idle(1, 4);
    assert_eq!(statistics(&server), json!({"1": figures(1, 4, 4, 0)}));
}

#[test]
fn shrinking_the_pool_removes_surplus_idle_runners_at_once() {
    let server = TestServer::start();
    server.environment(1, 4);
    server.wait_idle(1, 4);
    assert_empty(&put(&server, 1, &environment_body(1, 1)), 204);
    assert_eq!(statistics(&server), json!({"1": figures(1, 1, 1, 0)}));
    eventually("surplus workspaces removed", || {
        workspaces(&server).len() == 1
    });
    assert_empty(&put(&server, 1, &environment_body(1, 0)), 204);
    assert_eq!(statistics(&server), json!({"1": figures(1, 0, 0, 0)}));
    eventually("all idle workspaces removed", || {
        workspaces(&server).is_empty()
    });
}

#[test]
fn an_unchanged_put_keeps_the_idle_runners() {
    let server = TestServer::start();
    server.environment(1, 2);
    server.wait_idle(1, 2);
    let idle = workspaces(&server);
    assert_eq!(idle.len(), 2);
    assert_empty(&put(&server, 1, &environment_body(1, 2)), 204);
    assert_eq!(statistics(&server), json!({"1": figures(1, 2, 2, 0)}));
    assert_eq!(workspaces(&server), idle);
    let claimed = server.runner(1, 0);
    assert!(
        idle.contains(&claimed),
        "claimed {claimed} is not one of the idle runners {idle:?}"
    );
}

#[test]
fn an_unchanged_put_keeps_claimed_runners() {
    let server = TestServer::start();
    server.environment(1, 1);
    let runner = server.runner(1, 0);
    server.copy(&runner, &[("kept.txt", "still here")]);
    assert_empty(&put(&server, 1, &environment_body(1, 1)), 204);
    let answer = server.get(&format!("/runners/{runner}/files/raw?path=kept.txt"));
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "still here");
}

#[test]
fn a_changed_definition_replaces_the_idle_pool_but_not_claimed_runners() {
    let server = TestServer::start();
    server.environment(1, 2);
    let claimed = server.runner(1, 0);
    server.copy(&claimed, &[("kept.txt", "still here")]);
    server.wait_idle(1, 2);
    let mut old_idle = workspaces(&server);
    assert!(old_idle.remove(&claimed));
    assert_eq!(old_idle.len(), 2);

    let changed = body_with(1, 2, json!({"memoryLimit": 512}));
    assert_empty(&put(&server, 1, &changed), 204);
    assert_eq!(
        server.get("/execution-environments/1").json()["memoryLimit"],
        512
    );
    eventually("the old idle runners are gone", || {
        workspaces(&server).is_disjoint(&old_idle)
    });
    server.wait_idle(1, 2);
    assert_eq!(statistics(&server), json!({"1": figures(1, 2, 2, 1)}));

    let answer = server.get(&format!("/runners/{claimed}/files/raw?path=kept.txt"));
    assert_eq!(answer.status, 200, "claimed runner lost: {}", answer.text());
    assert_eq!(answer.text(), "still here");
    let fresh = server.runner(1, 0);
    assert!(!old_idle.contains(&fresh), "{fresh} is an old idle runner");
}

#[test]
fn deleting_an_environment_destroys_its_runners() {
    let server = TestServer::start();
    server.environment(1, 1);
    server.environment(2, 1);
    let first = server.runner(1, 0);
    let second = server.runner(1, 0);
    let other = server.runner(2, 0);
    server.wait_idle(1, 1);
    server.wait_idle(2, 1);
    assert_empty(&server.delete("/execution-environments/1"), 204);
    for runner in [&first, &second] {
        let answer = server.get(&format!("/runners/{runner}/files"));
        assert_eq!(answer.status, 410, "{runner}: {}", answer.text());
        let answer = server.delete(&format!("/runners/{runner}"));
        assert_eq!(answer.status, 410, "{runner}: {}", answer.text());
    }
    let claim = server.send(
        "POST",
        "/runners",
        &json!({"executionEnvironmentId": 1, "inactivityTimeout": 0}),
    );
    assert_eq!(claim.status, 404, "{}", claim.text());
    assert_eq!(statistics(&server), json!({"2": figures(2, 1, 1, 1)}));
    server.wait_idle(2, 1);
    eventually("environment 1's workspaces are removed", || {
        workspaces(&server).iter().all(|id| id.starts_with("2-"))
    });
    assert_eq!(server.get(&format!("/runners/{other}/files")).status, 200);
}

#[test]
fn environments_survive_a_restart_and_their_pools_are_refilled() {
    let server = TestServer::start();
    server.environment(1, 2);
    let second = body_with(2, 0, json!({"memoryLimit": 512, "cpuLimit": 40}));
    assert_eq!(put(&server, 2, &second).status, 201);
    server.environment(3, 0);
    assert_empty(&server.delete("/execution-environments/3"), 204);
    server.wait_idle(1, 2);
    let dir = server.stop();

    let server = TestServer::start_in(dir, |_| {});
    let mut expected_second = stored(2, 0);
    expected_second["memoryLimit"] = json!(512);
    expected_second["cpuLimit"] = json!(40);
    assert_eq!(server.get("/execution-environments/1").json(), stored(1, 2));
    assert_eq!(
        server.get("/execution-environments/2").json(),
        expected_second
    );
    assert_empty(&server.get("/execution-environments/3"), 404);
    server.wait_idle(1, 2);
    assert_eq!(
        statistics(&server),
        json!({"1": figures(1, 2, 2, 0), "2": figures(2, 0, 0, 0)})
    );
    assert_empty(&put(&server, 1, &environment_body(1, 2)), 204);
    server.runner(1, 0);
}

#[test]
fn health_answers_204_with_an_empty_body() {
    let server = TestServer::start();
    assert_empty(&server.get("/health"), 204);
    server.environment(1, 2);
    assert_empty(&server.get("/health"), 204);
}

#[test]
fn health_answers_503_while_a_pool_is_below_the_threshold() {
    let server = TestServer::start_with(|config| {
        config.server.prewarming_pool_threshold = 0.5;
        config.runner.capacity = 3;
    });
    server.environment(10, 2);
    server.environment(11, 1);
    server.environment(12, 0);
    server.wait_idle(10, 2);
    server.wait_idle(11, 1);
    assert_empty(&server.get("/health"), 204);

    // Capacity is exhausted, so claimed runners are not replaced.
    let a = server.runner(10, 0);
    assert_empty(&server.get("/health"), 204);
    let b = server.runner(10, 0);
    let health = server.get("/health");
    assert_eq!(health.status, 503, "{}", health.text());
    assert_eq!(health.header("Content-Type"), Some("application/json"));
    assert_eq!(
        health.json(),
        json!({"message": "the prewarming pool is depleting: environments 10",
               "errorCode": "PREWARMING_POOL_DEPLETING"})
    );
    let c = server.runner(11, 0);
    assert_eq!(
        server.get("/health").json(),
        json!({"message": "the prewarming pool is depleting: environments 10, 11",
               "errorCode": "PREWARMING_POOL_DEPLETING"})
    );

    for runner in [a, b, c] {
        assert_empty(&server.delete(&format!("/runners/{runner}")), 204);
    }
    server.wait_idle(10, 2);
    server.wait_idle(11, 1);
    assert_empty(&server.get("/health"), 204);
}

#[test]
fn version_is_a_json_string() {
    let server = TestServer::start();
    let answer = server.get("/version");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("Content-Type"), Some("application/json"));
    let version = answer.json();
    assert!(version.as_str().is_some_and(|v| !v.is_empty()), "{version}");

    let server = TestServer::start_with(|config| config.server.release = Some("d6c69f2".into()));
    assert_eq!(server.get("/version").text(), r#""d6c69f2""#);
}

#[test]
fn statistics_are_an_empty_object_without_environments() {
    let server = TestServer::start();
    let answer = server.get("/statistics/execution-environments");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("Content-Type"), Some("application/json"));
    assert_eq!(answer.text(), "{}");
}

#[test]
fn statistics_count_idle_and_used_runners_exactly_after_claims_and_deletes() {
    let server = TestServer::start();
    server.environment(4, 2);
    server.environment(15, 0);
    server.wait_idle(4, 2);
    assert_eq!(
        statistics(&server),
        json!({"4": figures(4, 2, 2, 0), "15": figures(15, 0, 0, 0)})
    );

    let first = server.runner(4, 0);
    let second = server.runner(4, 0);
    let on_demand = server.runner(15, 0);
    server.wait_idle(4, 2);
    assert_eq!(
        statistics(&server),
        json!({"4": figures(4, 2, 2, 2), "15": figures(15, 0, 0, 1)})
    );

    assert_empty(&server.delete(&format!("/runners/{first}")), 204);
    assert_empty(&server.delete(&format!("/runners/{on_demand}")), 204);
    assert_eq!(
        statistics(&server),
        json!({"4": figures(4, 2, 2, 1), "15": figures(15, 0, 0, 0)})
    );
    assert_eq!(server.delete(&format!("/runners/{first}")).status, 410);
    assert_eq!(
        statistics(&server),
        json!({"4": figures(4, 2, 2, 1), "15": figures(15, 0, 0, 0)})
    );

    assert_empty(&server.delete("/execution-environments/4"), 204);
    assert_eq!(statistics(&server), json!({"15": figures(15, 0, 0, 0)}));
    assert_eq!(server.delete(&format!("/runners/{second}")).status, 410);
}

#[test]
fn a_failed_environment_write_answers_500_and_changes_nothing() {
    let server = TestServer::start();
    let environments = server.state.path().join("environments");
    std::fs::remove_dir_all(&environments).expect("remove");
    std::fs::write(&environments, "not a directory").expect("block");
    let answer = server.send("PUT", "/execution-environments/1", &environment_body(1, 2));
    assert_eq!(answer.status, 500, "{}", answer.text());
    assert_eq!(answer.json()["errorCode"], "UNKNOWN");
    // What could not be saved is not in effect either.
    assert_eq!(server.get("/execution-environments/1").status, 404);
    std::fs::remove_file(&environments).expect("unblock");
    std::fs::create_dir(&environments).expect("restore");
    let answer = server.send("PUT", "/execution-environments/1", &environment_body(1, 2));
    assert_eq!(answer.status, 201, "{}", answer.text());
    server.wait_idle(1, 2);
    assert!(environments.join("1.json").exists());
}
