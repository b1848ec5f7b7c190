//! Routes of `/api/v1`: method + path segments → [`Route`].

use crate::server::http::Method;

use super::{App, Reply, Request, environments, paths::PREFIX, runners, status};
use crate::{
    error::{Error, Result},
    id::EnvironmentId,
};

/// Every route of the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /health`
    Health,
    /// `GET /version`
    Version,
    /// `GET /statistics/execution-environments`
    Statistics,
    /// `GET /execution-environments`
    ListEnvironments,
    /// `GET /execution-environments/{id}`
    GetEnvironment(EnvironmentId),
    /// `PUT /execution-environments/{id}`
    PutEnvironment(EnvironmentId),
    /// `DELETE /execution-environments/{id}`
    DeleteEnvironment(EnvironmentId),
    /// `POST /runners`
    ProvideRunner,
    /// `DELETE /runners/{id}`
    DeleteRunner(String),
    /// `GET /runners/{id}/files`
    ListFiles(String),
    /// `PATCH /runners/{id}/files`
    UpdateFiles(String),
    /// `GET /runners/{id}/files/raw`
    DownloadFile(String),
    /// `POST /runners/{id}/execute`
    Execute(String),
    /// `GET /runners/{id}/websocket` (served on the WebSocket listener)
    WebSocket(String),
    /// `GET /metrics`: Prometheus' text format (not a Poseidon route)
    Metrics,
    /// `GET /` (outside `/api/v1`): the status page for browsers
    StatusPage,
    /// `POST /`: the status page's login form
    StatusLogin,
}

impl Route {
    /// Matches a request; unknown paths are [`Error::NotFound`], known paths with another
    /// method [`Error::MethodNotAllowed`].
    pub fn parse(method: &Method, path: &str) -> Result<Route> {
        if path == "/" {
            return match method {
                Method::Get => Ok(Route::StatusPage),
                Method::Post => Ok(Route::StatusLogin),
                _ => Err(Error::MethodNotAllowed),
            };
        }
        let rest = path
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or(Error::NotFound)?;
        let segments: Vec<&str> = rest.split('/').collect();
        // No route has empty segments (so `/runners/` and `//` are unknown, as in Poseidon).
        if segments.iter().any(|segment| segment.is_empty()) {
            return Err(Error::NotFound);
        }
        let get = *method == Method::Get;
        let route = match (segments.as_slice(), method) {
            (["health"], _) if get => Route::Health,
            (["version"], _) if get => Route::Version,
            (["statistics", "execution-environments"], _) if get => Route::Statistics,
            (["execution-environments"], _) if get => Route::ListEnvironments,
            (["execution-environments", id], method) => {
                let id = environment_id(id)?;
                match method {
                    Method::Get => Route::GetEnvironment(id),
                    Method::Put => Route::PutEnvironment(id),
                    Method::Delete => Route::DeleteEnvironment(id),
                    _ => return Err(Error::MethodNotAllowed),
                }
            }
            (["runners"], Method::Post) => Route::ProvideRunner,
            (["runners", id], Method::Delete) => Route::DeleteRunner(id.to_string()),
            (["runners", id, "files"], Method::Get) => Route::ListFiles(id.to_string()),
            (["runners", id, "files"], Method::Patch) => Route::UpdateFiles(id.to_string()),
            (["runners", id, "files", "raw"], _) if get => Route::DownloadFile(id.to_string()),
            (["runners", id, "execute"], Method::Post) => Route::Execute(id.to_string()),
            (["runners", id, "websocket"], _) if get => Route::WebSocket(id.to_string()),
            (["metrics"], _) if get => Route::Metrics,
            (known, _) if is_known(known) => return Err(Error::MethodNotAllowed),
            _ => return Err(Error::NotFound),
        };
        Ok(route)
    }

    /// Whether the route requires the `Poseidon-Token` (all but health and version).
    /// The status page checks the token itself (it also takes its login cookie).
    pub fn needs_token(&self) -> bool {
        !matches!(
            self,
            Route::Health | Route::Version | Route::StatusPage | Route::StatusLogin
        )
    }

    /// The route's name in metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Health => "health",
            Route::Version => "version",
            Route::Statistics => "statistics",
            Route::ListEnvironments => "list_environments",
            Route::GetEnvironment(_) => "get_environment",
            Route::PutEnvironment(_) => "put_environment",
            Route::DeleteEnvironment(_) => "delete_environment",
            Route::ProvideRunner => "provide_runner",
            Route::DeleteRunner(_) => "delete_runner",
            Route::ListFiles(_) => "list_files",
            Route::UpdateFiles(_) => "update_files",
            Route::DownloadFile(_) => "download_file",
            Route::Execute(_) => "execute",
            Route::WebSocket(_) => "websocket",
            Route::Metrics => "metrics",
            Route::StatusPage => "status_page",
            Route::StatusLogin => "status_login",
        }
    }

    /// Runs the route's handler.
    pub fn handle(self, app: &App, request: &Request) -> Result<Reply> {
        match self {
            Route::Health => environments::health(app),
            Route::Version => environments::version(app),
            Route::Statistics => environments::statistics(app),
            Route::ListEnvironments => environments::list(app, request),
            Route::GetEnvironment(id) => environments::get(app, id, request),
            Route::PutEnvironment(id) => environments::put(app, id, request),
            Route::DeleteEnvironment(id) => environments::delete(app, id),
            Route::ProvideRunner => runners::provide(app, request),
            Route::DeleteRunner(id) => runners::delete(app, &id),
            Route::ListFiles(id) => runners::list_files(app, &id, request),
            Route::UpdateFiles(id) => runners::update_files(app, &id, request),
            Route::DownloadFile(id) => runners::download_file(app, &id, request),
            Route::Execute(id) => runners::execute(app, &id, request),
            Route::WebSocket(id) => runners::websocket_on_http(app, &id),
            Route::Metrics => environments::metrics(app),
            Route::StatusPage => status::show(app, request),
            Route::StatusLogin => status::login(app, request),
        }
    }
}

/// Paths that exist for some method.
fn is_known(segments: &[&str]) -> bool {
    matches!(
        segments,
        ["health"]
            | ["version"]
            | ["statistics", "execution-environments"]
            | ["execution-environments"]
            | ["runners"]
            | ["runners", _]
            | ["runners", _, "files"]
            | ["runners", _, "files", "raw"]
            | ["runners", _, "execute"]
            | ["runners", _, "websocket"]
            | ["metrics"]
    )
}

/// Environment ids are digits (anything else is no route, like Poseidon's `[0-9]+`); an id
/// that does not fit is a bad request.
fn environment_id(segment: &str) -> Result<EnvironmentId> {
    if segment.is_empty() || !segment.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::NotFound);
    }
    // Ids are Go `int`s in Poseidon: larger ones are refused as there.
    segment
        .parse::<i64>()
        .map(|id| EnvironmentId(id.unsigned_abs()))
        .map_err(|_| Error::bad_request(format!("invalid execution environment id {segment}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_poseidon_paths() {
        let parse = |method, path| Route::parse(&method, path);
        assert_eq!(parse(Method::Get, "/api/v1/health").unwrap(), Route::Health);
        assert_eq!(
            parse(Method::Put, "/api/v1/execution-environments/12").unwrap(),
            Route::PutEnvironment(EnvironmentId(12))
        );
        assert_eq!(
            parse(Method::Get, "/api/v1/runners/1-x/files/raw").unwrap(),
            Route::DownloadFile("1-x".into())
        );
        assert_eq!(
            parse(Method::Delete, "/api/v1/runners/9-a").unwrap(),
            Route::DeleteRunner("9-a".into())
        );
    }

    use crate::{
        api::paths::{EXECUTION_PARAMETER, websocket_path},
        id::{ExecutionId, RunnerId},
    };

    #[test]
    fn websocket_paths_are_read_back() {
        let runner = RunnerId::new(EnvironmentId(3));
        let execution = ExecutionId::new();
        let path = websocket_path(&runner, execution);
        let (path, query) = path.split_once('?').unwrap();
        assert_eq!(
            Route::parse(&Method::Get, path).unwrap(),
            Route::WebSocket(runner.to_string())
        );
        assert_eq!(query, format!("{EXECUTION_PARAMETER}={execution}"));
    }

    #[test]
    fn unknown_paths_methods_and_ids_are_told_apart() {
        let status = |method, path| Route::parse(&method, path).unwrap_err().status();
        assert_eq!(status(Method::Get, "/api/v1/nothing"), 404);
        assert_eq!(status(Method::Get, "/api/v1/runners/"), 404);
        assert_eq!(status(Method::Get, "/health"), 404);
        assert_eq!(status(Method::Post, "/api/v1/health"), 405);
        assert_eq!(
            status(Method::Get, "/api/v1/execution-environments/-1"),
            404
        );
        assert_eq!(
            status(Method::Get, "/api/v1/execution-environments/abc"),
            404
        );
        assert_eq!(
            status(
                Method::Get,
                "/api/v1/execution-environments/99999999999999999999999"
            ),
            400
        );
        assert_eq!(
            status(Method::Post, "/api/v1/execution-environments/1"),
            405
        );
    }
}
