//! Binding, threads and shutdown: the listeners, whose `front` reads requests and feeds two
//! worker pools over channels (one for the API, one for downloads, listings and large bodies);
//! the manager's threads are started and stopped with them.

mod front;
pub mod http;
mod scrape;
pub mod systemd;
mod tls;

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

use self::{
    front::{Front, Job, Returned, Settings, Waker},
    http::Port,
};

use crate::{
    api::{self, App},
    config::Config,
    error::{Error, Result},
    executor::Executor,
    manager::Manager,
    store::Store,
};

/// A public TLS listener and the loopback listener it relays to.
type Relayed = (TcpListener, SocketAddr);

/// How long shutdown waits for WebSocket sessions to send their final message.
const SESSION_WAIT: Duration = Duration::from_secs(5);

/// A bound but not yet running server.
pub struct Server {
    front: Front,
    api_jobs: Receiver<Job>,
    bulk_jobs: Receiver<Job>,
    http_addr: SocketAddr,
    websocket_addr: SocketAddr,
    /// The plaintext API listener the watchdog asks.
    self_check: SocketAddr,
    /// TLS settings and the public listeners with the loopback listener each relays to.
    tls: Option<(Arc<tls::Tls>, Vec<Relayed>)>,
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

fn listen(address: std::net::IpAddr, port: u16) -> Result<TcpListener> {
    TcpListener::bind((address, port))
        .map_err(|err| Error::internal(&format!("cannot listen on {address}:{port}"), err))
}

impl Server {
    /// Binds both listeners, opens the state directory and restores persisted environments.
    pub fn bind(config: Config) -> Result<Server> {
        let executor = crate::executor::from_config(&config)?;
        Server::with_executor(config, executor)
    }

    /// Destroys every runner of the state directory, claimed ones included, and their
    /// records (`--destroy-runners`; no server may run on the directory). Environments stay.
    /// Returns how many records were removed.
    pub fn destroy_runners(config: &Config) -> Result<usize> {
        let executor = crate::executor::from_config(config)?;
        let store = Store::open(&config.state.dir).map_err(|err| {
            Error::internal(&format!("cannot open {}", config.state.dir.display()), err)
        })?;
        executor.remove_leftovers(&[]);
        store
            .remove_all_runners()
            .map_err(|err| Error::internal("cannot remove the runner records", err))
    }

    /// Like [`Server::bind`] with a given executor.
    pub fn with_executor(config: Config, executor: Arc<dyn Executor>) -> Result<Server> {
        let server = &config.server;
        let address = server.address;
        let mut activated = match server.systemd_socket_activation {
            true => systemd::activated()
                .map_err(|err| Error::internal("cannot use the sockets from systemd", err))?,
            false => systemd::Activated::default(),
        };
        let http = match activated.http.take() {
            Some(listener) => listener,
            None => listen(address, server.port)?,
        };
        let http_addr = http.local_addr()?;
        let mut public = vec![(http, Port::Api)];
        // The API listener serves WebSocket upgrades too; a second listener only when asked.
        let websocket_addr = match (activated.websocket.take(), server.websocket_port()) {
            (Some(websocket), _) => {
                let addr = websocket.local_addr()?;
                public.push((websocket, Port::WebSocket));
                addr
            }
            (None, port) if port != 0 && port == server.port => http_addr,
            (None, port) => {
                let websocket = listen(address, port)?;
                let addr = websocket.local_addr()?;
                public.push((websocket, Port::WebSocket));
                addr
            }
        };
        // With TLS the public listeners relay to plaintext ones on loopback, which the front
        // serves; without, the front serves the public ones.
        let (listeners, tls) = match server.tls.active {
            false => (public, None),
            true => {
                let tls = tls_settings(&server.tls)?;
                let mut inner = Vec::new();
                let mut relays = Vec::new();
                for (listener, port) in public {
                    let backend = listen(std::net::Ipv4Addr::LOCALHOST.into(), 0)?;
                    relays.push((listener, backend.local_addr()?));
                    inner.push((backend, port));
                }
                (inner, Some((Arc::new(tls), relays)))
            }
        };
        let self_check = listeners[0].0.local_addr()?;
        let max_connections = server.max_connections.max(1);
        // As many queued jobs as there can be connections: the front never waits on a queue.
        let (api, api_jobs) = crossbeam_channel::bounded(max_connections);
        let (bulk, bulk_jobs) = crossbeam_channel::bounded(max_connections);
        let settings = Settings {
            api,
            bulk,
            http_timeout: Duration::from_secs(server.http_timeout_secs.max(1)),
            websocket_timeout: server.websocket_timeout(),
            max_connections,
        };
        let front = Front::new(listeners, settings)?;
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
        if !config.influxdb.url.is_empty() {
            // The writer ends by itself once the metrics stop queueing (at shutdown).
            let (influx, _writer) = crate::metrics::influx::Influx::start(&config.influxdb)?;
            manager.metrics().start_influx(influx);
            log::info!("pushing Poseidon's measurements to {}", config.influxdb.url);
        }
        let app = Arc::new(App {
            metrics: Arc::clone(manager.metrics()),
            manager,
            server: config.server.clone(),
            websocket_port: websocket_addr.port(),
            max_output_bytes: config.runner.max_output_bytes,
            sessions: std::sync::atomic::AtomicUsize::new(0),
        });
        Ok(Server {
            front,
            api_jobs,
            bulk_jobs,
            http_addr,
            websocket_addr,
            self_check,
            tls,
            scrape,
            app,
            config,
        })
    }

    /// The HTTP listener's address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The WebSocket listener's address (the HTTP listener's when there is no second one).
    pub fn websocket_addr(&self) -> SocketAddr {
        self.websocket_addr
    }

    /// Starts every thread; the server serves until [`ServerHandle::shutdown`].
    pub fn spawn(self) -> Result<ServerHandle> {
        let named = |name: &str| thread::Builder::new().name(name.to_owned());
        let mut threads = Vec::new();
        let waker = self.front.waker();
        let workers = self.config.server.workers.max(1);
        for (pool, jobs) in [("http", &self.api_jobs), ("bulk", &self.bulk_jobs)] {
            for index in 0..workers {
                let (app, jobs, waker) = (Arc::clone(&self.app), jobs.clone(), waker.clone());
                let worker = named(&format!("{pool}-{index}"))
                    .spawn(move || serve_jobs(&app, &jobs, &waker))?;
                threads.push(worker);
            }
        }
        self.app.manager.start(self.config.runner.prewarm_threads)?;
        let front = self.front;
        threads.push(named("http-front").spawn(move || front.run())?);
        let scrape_stop = Arc::new(AtomicBool::new(false));
        let mut scrape_addr = None;
        if let Some(listener) = self.scrape {
            let address = listener.local_addr()?;
            scrape_addr = Some(address);
            let (app, flag) = (Arc::clone(&self.app), Arc::clone(&scrape_stop));
            threads.push(named("metrics").spawn(move || scrape::serve(listener, app, flag))?);
            log::info!("metrics without token on http://{address}/metrics");
        }
        let tls_stop = Arc::new(AtomicBool::new(false));
        let mut certificates = None;
        if let Some((settings, relays)) = self.tls {
            let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for (listener, backend) in relays {
                let relay = tls::Relay {
                    backend,
                    timeout: self.config.server.websocket_timeout(),
                    open: Arc::clone(&open),
                    max_connections: self.config.server.max_connections.max(1),
                };
                let (settings, flag) = (Arc::clone(&settings), Arc::clone(&tls_stop));
                threads.push(
                    named("tls-accept")
                        .spawn(move || tls::serve(listener, settings, relay, flag))?,
                );
            }
            certificates = Some(settings);
        }
        let (http, ws) = match certificates {
            Some(_) => ("https", "wss"),
            None => ("http", "ws"),
        };
        log::info!(
            "HTTP API listening on {http}://{}{}",
            self.http_addr,
            api::PREFIX
        );
        log::info!(
            "WebSocket executions listening on {ws}://{}",
            self.websocket_addr
        );
        match systemd::notify("READY=1") {
            Ok(true) => log::info!("told systemd that the server is ready"),
            Ok(false) => {}
            Err(err) => log::warn!("cannot notify systemd: {err}"),
        }
        let (watchdog_stop, stop) = crossbeam_channel::bounded::<()>(0);
        if let Some(interval) = systemd::watchdog_interval() {
            threads.push(systemd::spawn_watchdog(
                self.self_check,
                interval,
                stop.clone(),
            )?);
        }
        if self.app.metrics.influx_on() {
            let interval = Duration::from_secs(self.config.influxdb.interval_secs.max(1));
            let app = Arc::clone(&self.app);
            threads.push(named("influxdb-periodic").spawn(move || {
                loop {
                    crossbeam_channel::select! {
                        recv(stop) -> _ => return,
                        recv(crossbeam_channel::after(interval)) -> _ => {
                            app.metrics.periodic(&app.manager.statistics());
                        }
                    }
                }
            })?);
        }
        Ok(ServerHandle {
            waker: Some(waker),
            http_addr: self.http_addr,
            websocket_addr: self.websocket_addr,
            scrape_addr,
            scrape_stop,
            watchdog_stop: Some(watchdog_stop),
            certificates,
            tls_stop,
            app: self.app,
            threads,
        })
    }
}

/// The TLS settings of `server.tls`, with the certificate read.
fn tls_settings(config: &crate::config::TlsConfig) -> Result<tls::Tls> {
    let (Some(certfile), Some(keyfile)) = (&config.certfile, &config.keyfile) else {
        return Err(Error::internal(
            "server.tls.active needs server.tls.certfile and server.tls.keyfile",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    };
    tls::Tls::new(certfile.clone(), keyfile.clone())
        .map_err(|err| Error::internal("cannot read the TLS certificate", err))
}

/// A worker: serves requests until the front stops.
fn serve_jobs(app: &Arc<App>, jobs: &Receiver<Job>, waker: &Waker) {
    for job in jobs {
        let mut exchange = job.exchange;
        let timeout = Duration::from_secs(app.server.http_timeout_secs.max(1));
        if exchange.conn().block(timeout).is_err() {
            continue;
        }
        if exchange.head().websocket || exchange.conn().port == Port::WebSocket {
            api::ws::handshake(app, exchange);
            continue;
        }
        // A body may take the timeout plus a second per 64 KiB (a slow but moving upload).
        let length = exchange.body_length().unwrap_or(app.server.max_body_bytes);
        let allowance = timeout + Duration::from_secs(length / (64 << 10));
        exchange.conn_mut().deadline = Some(Instant::now() + allowance);
        api::dispatch(app, &mut exchange);
        let keep_alive = exchange.keep_alive();
        let conn = exchange.into_conn();
        waker.give_back(if keep_alive {
            Returned::KeepAlive(conn)
        } else {
            Returned::Close(conn)
        });
    }
}

/// A running server.
pub struct ServerHandle {
    waker: Option<Waker>,
    http_addr: SocketAddr,
    websocket_addr: SocketAddr,
    scrape_addr: Option<SocketAddr>,
    scrape_stop: Arc<AtomicBool>,
    /// Dropped to stop the watchdog and the periodic InfluxDB points.
    watchdog_stop: Option<Sender<()>>,
    /// TLS settings, for reloading the certificate.
    certificates: Option<Arc<tls::Tls>>,
    /// Set to stop the TLS listeners (then woken by a connection).
    tls_stop: Arc<AtomicBool>,
    app: Arc<App>,
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

    /// Reads the TLS certificate and key again (SIGHUP); new connections use them. Without
    /// TLS there is nothing to do.
    pub fn reload_certificates(&self) -> Result<()> {
        match &self.certificates {
            Some(tls) => tls
                .reload()
                .map_err(|err| Error::internal("cannot reload the TLS certificate", err)),
            None => Ok(()),
        }
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
        let scheme = if self.certificates.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}{}", self.http_addr, api::PREFIX)
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
        let Some(waker) = self.waker.take() else {
            return;
        };
        log::info!("shutting down");
        let _ = systemd::notify("STOPPING=1");
        self.watchdog_stop.take();
        waker.stop();
        if self.certificates.is_some() {
            self.tls_stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.http_addr);
            if self.websocket_addr != self.http_addr {
                let _ = TcpStream::connect(self.websocket_addr);
            }
        }
        self.scrape_stop.store(true, Ordering::SeqCst);
        if let Some(address) = self.scrape_addr {
            let _ = TcpStream::connect(address);
        }
        self.app.manager.shutdown();
        // Sessions send their final message (an error: the server is shutting down) and close
        // while the manager destroys their runners; give them a moment to finish.
        let deadline = Instant::now() + SESSION_WAIT;
        while self.app.sessions.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        self.app.metrics.stop_influx();
        log::info!("stopped");
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop_now();
    }
}
