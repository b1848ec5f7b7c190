//! Handlers of the environment, health, version and statistics routes.

use std::collections::BTreeMap;

use super::{App, Reply, Request};
use crate::{
    dto::{self, Environment, EnvironmentList, InternalServerError},
    error::{Error, Result},
    id::EnvironmentId,
    metrics,
};

/// `GET /health`: 204, or 503 when a pool is below the configured threshold.
pub fn health(app: &App) -> Result<Reply> {
    let depleted = app.manager.depleted(app.server.prewarming_pool_threshold);
    if depleted.is_empty() {
        return Ok(Reply::Empty(204));
    }
    let ids: Vec<String> = depleted.iter().map(ToString::to_string).collect();
    let message = format!(
        "the prewarming pool is depleting: environments {}",
        ids.join(", ")
    );
    Ok(Reply::json(
        503,
        &InternalServerError {
            message: &message,
            error_code: "PREWARMING_POOL_DEPLETING",
        },
    ))
}

/// `GET /version`: the release as a JSON string.
pub fn version(app: &App) -> Result<Reply> {
    Ok(Reply::json(200, &app.release()))
}

/// `GET /metrics`: every metric in Prometheus' text format.
pub fn metrics(app: &App) -> Result<Reply> {
    let text = app.metrics_text();
    Ok(Reply::Stream {
        headers: vec![("Content-Type", metrics::text::CONTENT_TYPE.to_owned())],
        length: Some(text.len() as u64),
        body: Box::new(std::io::Cursor::new(text.into_bytes())),
    })
}

/// `GET /statistics/execution-environments`: pool figures keyed by environment id.
pub fn statistics(app: &App) -> Result<Reply> {
    let figures: BTreeMap<String, dto::EnvironmentStatistics> = app
        .manager
        .statistics()
        .into_iter()
        .map(|figures| (figures.id.to_string(), figures))
        .collect();
    Ok(Reply::json(200, &figures))
}

/// Validates the `fetch` parameter; there is nothing to fetch from on one host.
fn check_fetch(request: &Request) -> Result<()> {
    match request.query.get("fetch") {
        Some(value) if request.flag("fetch").is_none() => Err(Error::bad_request(format!(
            "could not parse fetch parameter: invalid syntax {value:?}"
        ))),
        _ => Ok(()),
    }
}

/// `GET /execution-environments`.
pub fn list(app: &App, request: &Request) -> Result<Reply> {
    check_fetch(request)?;
    Ok(Reply::json(
        200,
        &EnvironmentList {
            environments: app.manager.environments(),
        },
    ))
}

/// `GET /execution-environments/{id}`.
pub fn get(app: &App, id: EnvironmentId, request: &Request) -> Result<Reply> {
    check_fetch(request)?;
    Ok(Reply::json(200, &app.manager.environment(id)?))
}

/// `PUT /execution-environments/{id}`: 201 when new, 204 when replaced.
pub fn put(app: &App, id: EnvironmentId, request: &Request) -> Result<Reply> {
    let environment: Environment = dto::parse(&request.body)?;
    environment.check_bounds().map_err(Error::bad_request)?;
    let created = app.manager.put_environment(id, environment)?;
    if app.metrics.influx_on()
        && let Ok(environment) = app.manager.environment(id)
    {
        let count = app.manager.statistics().len();
        app.metrics.environment_stored(&environment, created, count);
    }
    Ok(Reply::Empty(if created { 201 } else { 204 }))
}

/// `DELETE /execution-environments/{id}`.
pub fn delete(app: &App, id: EnvironmentId) -> Result<Reply> {
    app.manager.delete_environment(id)?;
    if app.metrics.influx_on() {
        let count = app.manager.statistics().len();
        app.metrics.environment_deleted(id.0, count);
    }
    Ok(Reply::Empty(204))
}
