//! Binding, threads and shutdown: the HTTP listener feeding a worker pool over a channel and
//! the WebSocket listener; the manager's threads are started and stopped with them.

mod http;
mod scrape;

use std::{
    fmt,
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender};

use self::http::HttpListener;

use crate::{
    api::{self, App},
    config::Config,
    error::{Error, Result},
    executor::Executor,
    manager::Manager,
    store::Store,
};

/// A bound but not yet running server.
pub struct Server {
    http: Arc<HttpListener>,
    requests: Receiver<tiny_http::Request>,
    http_addr: SocketAddr,
    websocket: TcpListener,
    websocket_addr: SocketAddr,
    scrape: Option<TcpListener>,
    app: Arc<App>,
    config: Config,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("http_addr", &self.http_addr)
            .field("websocket_addr", &self.websocket_addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds both listeners, opens the state directory and restores persisted environments.
    pub fn bind(config: Config) -> Result<Server> {
        let executor = crate::executor::from_config(&config)?;
        Server::with_executor(config, executor)
    }

    /// Like [`Server::bind`] with a given executor.
    pub fn with_executor(config: Config, executor: Arc<dyn Executor>) -> Result<Server> {
        let address = config.server.address;
        let timeout = Duration::from_secs(config.server.http_timeout_secs.max(1));
        let (requests_tx, requests) = crossbeam_channel::bounded(64);
        let http = HttpListener::bind(address, config.server.port, timeout, requests_tx).map_err(
            |err| {
                let port = config.server.port;
                Error::internal(&format!("cannot listen on {address}:{port}"), err)
            },
        )?;
        let http_addr = http.addr();
        let ws_port = config.server.websocket_port();
        let websocket = TcpListener::bind((address, ws_port)).map_err(|err| {
            Error::internal(&format!("cannot listen on {address}:{ws_port}"), err)
        })?;
        let websocket_addr = websocket.local_addr()?;
        let scrape = match config.metrics.listen {
            Some(address) => Some(TcpListener::bind(address).map_err(|err| {
                Error::internal(&format!("cannot listen on {address} for metrics"), err)
            })?),
            None => None,
        };

        let store = Store::open(&config.state.dir)
            .map_err(|err| {
                Error::internal(&format!("cannot open {}", config.state.dir.display()), err)
            })?
            .sync_runners(config.state.sync);
        let manager = Arc::new(Manager::new(executor, store, config.runner.capacity)?);
        manager.restore(Instant::now())?;
        let app = Arc::new(App {
            metrics: Arc::clone(manager.metrics()),
            manager,
            server: config.server.clone(),
            websocket_port: websocket_addr.port(),
            max_output_bytes: config.runner.max_output_bytes,
        });
        Ok(Server {
            http: Arc::new(http),
            requests,
            http_addr,
            websocket,
            websocket_addr,
            scrape,
            app,
            config,
        })
    }

    /// The HTTP listener's address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The WebSocket listener's address.
    pub fn websocket_addr(&self) -> SocketAddr {
        self.websocket_addr
    }

    /// Starts every thread; the server serves until [`ServerHandle::shutdown`].
    pub fn spawn(self) -> Result<ServerHandle> {
        let named = |name: &str| thread::Builder::new().name(name.to_owned());
        let mut threads = Vec::new();
        let (stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
        self.http.start(stop.clone())?;
        for index in 0..self.config.server.workers.max(1) {
            let (app, requests) = (Arc::clone(&self.app), self.requests.clone());
            let worker = named(&format!("http-{index}")).spawn(move || {
                for request in requests {
                    api::dispatch(&app, request);
                }
            })?;
            threads.push(worker);
        }
        self.app.manager.start(self.config.runner.prewarm_threads)?;
        let websocket_stop = Arc::new(AtomicBool::new(false));
        let (listener, app, flag) = (
            self.websocket,
            Arc::clone(&self.app),
            Arc::clone(&websocket_stop),
        );
        threads.push(named("ws-accept").spawn(move || api::ws::serve(listener, app, flag))?);
        let mut scrape_addr = None;
        if let Some(listener) = self.scrape {
            let address = listener.local_addr()?;
            scrape_addr = Some(address);
            let (app, flag) = (Arc::clone(&self.app), Arc::clone(&websocket_stop));
            threads.push(named("metrics").spawn(move || scrape::serve(listener, app, flag))?);
            log::info!("metrics without token on http://{address}/metrics");
        }
        log::info!("HTTP API listening on http://{}/api/v1", self.http_addr);
        log::info!(
            "WebSocket executions listening on ws://{}",
            self.websocket_addr
        );
        Ok(ServerHandle {
            http: self.http,
            http_addr: self.http_addr,
            websocket_addr: self.websocket_addr,
            scrape_addr,
            app: self.app,
            websocket_stop,
            stop: Some(stop_tx),
            threads,
        })
    }
}

/// A running server.
pub struct ServerHandle {
    http: Arc<HttpListener>,
    http_addr: SocketAddr,
    websocket_addr: SocketAddr,
    scrape_addr: Option<SocketAddr>,
    app: Arc<App>,
    websocket_stop: Arc<AtomicBool>,
    stop: Option<Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("http_addr", &self.http_addr)
            .field("websocket_addr", &self.websocket_addr)
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// The HTTP listener's address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The WebSocket listener's address.
    pub fn websocket_addr(&self) -> SocketAddr {
        self.websocket_addr
    }

    /// The address of the scrape listener (`metrics.listen`), if there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.scrape_addr
    }

    /// What the server counts.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.app.metrics
    }

    /// The API base URL, e.g. `http://127.0.0.1:7200/api/v1` (CodeOcean's `runner_management.url`).
    pub fn url(&self) -> String {
        format!("http://{}/api/v1", self.http_addr)
    }

    /// The runner manager (for harnesses that inspect state).
    pub fn manager(&self) -> &Arc<Manager> {
        &self.app.manager
    }

    /// Stops listening, ends every execution (each gets an `error` message), destroys every
    /// runner and joins the server's threads.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        let Some(stop) = self.stop.take() else { return };
        log::info!("shutting down");
        self.websocket_stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.websocket_addr);
        if let Some(address) = self.scrape_addr {
            let _ = TcpStream::connect(address);
        }
        drop(stop);
        self.http.stop();
        self.app.manager.shutdown();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        log::info!("stopped");
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop_now();
    }
}
