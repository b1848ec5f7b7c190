//! Moving environments to the next host: `environments export` prints a server's environment
//! definitions as JSON, `environments import URL` puts them into another server (a Poseidon
//! on a Nomad cluster, or another poseidon-lite) through its `PUT /execution-environments/{id}`.
//! Both talk to the servers' APIs, so they work the same against either kind.

use std::time::Duration;

use serde_json::Value;

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(60);

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .build()
        .into()
}

/// `GET {api}/execution-environments` of a running server, as the export prints it:
/// `{"executionEnvironments":[…]}`, each element a body its `PUT` accepts.
pub fn export(api: &str, token: Option<&str>) -> Result<String, String> {
    let url = format!("{}/execution-environments", api.trim_end_matches('/'));
    let mut request = agent().get(&url);
    if let Some(token) = token {
        request = request.header("Poseidon-Token", token);
    }
    let mut response = request.call().map_err(|err| format!("GET {url}: {err}"))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|err| format!("GET {url}: {err}"))?;
    if status != 200 {
        return Err(format!("GET {url} answered {status} {body}"));
    }
    let environments = environments(&body)?;
    let list = serde_json::json!({ "executionEnvironments": environments });
    serde_json::to_string_pretty(&list).map_err(|err| err.to_string())
}

/// The environments of an export (or of a bare JSON array of definitions), each checked to
/// be an object with a numeric `id`.
pub fn environments(exported: &str) -> Result<Vec<Value>, String> {
    let value: Value =
        serde_json::from_str(exported).map_err(|err| format!("not an export: {err}"))?;
    let list = match value {
        Value::Array(list) => list,
        Value::Object(mut object) => match object.remove("executionEnvironments") {
            Some(Value::Array(list)) => list,
            Some(Value::Null) => Vec::new(),
            _ => return Err("not an export: no executionEnvironments array".into()),
        },
        _ => return Err("not an export: expected an object or an array".into()),
    };
    for environment in &list {
        if environment.get("id").and_then(Value::as_u64).is_none() {
            return Err(format!(
                "an environment without a numeric id: {environment}"
            ));
        }
    }
    Ok(list)
}

/// Puts every environment of `exported` into the server at `api`; returns one line per
/// environment. Every environment is tried; any failure makes the whole an error, whose text
/// lists them all.
pub fn import(api: &str, token: Option<&str>, exported: &str) -> Result<Vec<String>, String> {
    let api = api.trim_end_matches('/');
    let mut report = Vec::new();
    let mut failed = false;
    for environment in environments(exported)? {
        let id = environment["id"].as_u64().unwrap_or_default();
        let url = format!("{api}/execution-environments/{id}");
        let mut request = agent().put(&url).header("Content-Type", "application/json");
        if let Some(token) = token {
            request = request.header("Poseidon-Token", token);
        }
        let line = match request.send(environment.to_string()) {
            Ok(mut response) => match response.status().as_u16() {
                201 => format!("environment {id}: created"),
                204 => format!("environment {id}: replaced"),
                status => {
                    failed = true;
                    let body = response.body_mut().read_to_string().unwrap_or_default();
                    format!("environment {id}: refused with {status} {body}")
                }
            },
            Err(err) => {
                failed = true;
                format!("environment {id}: PUT {url}: {err}")
            }
        };
        report.push(line);
    }
    match failed {
        true => Err(report.join("\n")),
        false => Ok(report),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_and_bare_arrays_are_read() {
        let listed = environments(r#"{"executionEnvironments":[{"id":3,"image":"x"}]}"#);
        assert_eq!(listed.unwrap().len(), 1);
        assert_eq!(environments(r#"[{"id":1},{"id":2}]"#).unwrap().len(), 2);
        assert_eq!(
            environments(r#"{"executionEnvironments":null}"#).unwrap(),
            Vec::<Value>::new()
        );
    }

    #[test]
    fn malformed_exports_are_refused() {
        assert_eq!(
            environments(r#"[{"image":"x"}]"#).unwrap_err(),
            r#"an environment without a numeric id: {"image":"x"}"#
        );
        assert!(
            environments("{}")
                .unwrap_err()
                .contains("no executionEnvironments")
        );
        assert!(
            environments("3")
                .unwrap_err()
                .contains("expected an object")
        );
        assert!(environments("{").unwrap_err().starts_with("not an export"));
    }
}
